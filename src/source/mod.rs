//! The LDAP source: connect (TLS, bind), paged search of users and groups, range retrieval of
//! large attributes, the Active Directory dialect, group expansion.
//!
//! A read is all or nothing: any failed, truncated or suspicious read is a [`SourceError`],
//! never a smaller [`Directory`], because a smaller directory would look like people leaving.

mod ad;
pub mod dirsync;
mod expand;
pub mod feed;
mod range;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use chrono::{DateTime, Utc};
use ldap3::adapters::PagedResults;
use ldap3::asn1::PL;
use ldap3::{Ldap, LdapConnAsync, LdapConnSettings, ResultEntry, Scope, SearchEntry};
use tracing::{debug, info, warn};

use crate::config::{Dialect, LdapConfig, LdapServer, LdapTransport};
use crate::mirror::{Changes, Cookies, Delta, MirrorCopy, MirrorGroup, MirrorUser};
use crate::model::{dn, Attributes, Directory, DirectoryId, DirectoryUser};

pub use self::feed::RefreshError;

/// What a read failed on, when an error of a library or of a further connection did.
type Cause = Box<dyn std::error::Error + Send + Sync>;

/// `reason` says in one line what went wrong (an LDAP result by name and code, never anything
/// secret); `source`, where there is one, is the error it was taken from.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot connect to LDAP server {url}: {reason}. Check ldap.url, that the server is running, and the TLS settings (ldap.starttls, ldap.ca_file)")]
    Connect {
        url: String,
        reason: String,
        #[source]
        source: Option<Box<ldap3::LdapError>>,
    },
    #[error("cannot read ldap.ca_file {path}: {reason}")]
    CaFile {
        path: String,
        reason: String,
        #[source]
        source: Option<Cause>,
    },
    #[error("LDAP bind as {dn} failed: {reason}. Check ldap.bind_dn and ldap.bind_password")]
    Bind {
        dn: String,
        reason: String,
        #[source]
        source: Box<ldap3::LdapError>,
    },
    #[error("LDAP search of {base} with filter {filter} failed: {reason}")]
    Search {
        base: String,
        filter: String,
        reason: String,
        #[source]
        source: Option<Box<ldap3::LdapError>>,
    },
    #[error("LDAP read of {base} is incomplete: {reason}. Nothing was changed on any target")]
    Incomplete {
        base: String,
        reason: String,
        #[source]
        source: Option<Cause>,
    },
    #[error("directory entry {dn} has no {attribute}: cannot identify it. Check that the bind account may read {attribute}; nothing was changed on any target")]
    MissingId { dn: String, attribute: &'static str },
    /// Two entries with one id would be one account that flips between two people, or one
    /// of them silently dropped: the read cannot be used.
    #[error("directory entries {first_dn} and {second_dn} have the same {attribute} {id}: one account cannot belong to two entries, so the read is incomplete and nothing was changed on any target. Give one of them its own {attribute} (an entry copied or restored together with its operational attributes keeps the old one), or leave one out of ldap.users.filter / ldap.groups.filter")]
    DuplicateId {
        id: DirectoryId,
        attribute: &'static str,
        first_dn: String,
        second_dn: String,
    },
    #[error("directory entry {dn} was returned twice ({how}): the read is incomplete and nothing was changed on any target. {fix}")]
    DuplicateEntry {
        dn: String,
        how: &'static str,
        fix: &'static str,
    },
    #[error("group {dn} has a {attribute} value that is not valid UTF-8: its members cannot be known, so the read is incomplete and nothing was changed on any target. Fix the value in the directory")]
    InvalidMembers { dn: String, attribute: &'static str },
}

impl SourceError {
    /// A search of `base` / `filter` that the server or the connection refused to start.
    fn search(base: &str, filter: &str, e: ldap3::LdapError) -> SourceError {
        SourceError::Search {
            base: base.into(),
            filter: filter.into(),
            reason: describe(&e),
            source: Some(Box::new(e)),
        }
    }
}

/// The attribute holding an entry's immutable id.
fn id_attribute(dialect: Dialect) -> &'static str {
    match dialect {
        Dialect::OpenLdap => "entryUUID",
        Dialect::ActiveDirectory => "objectGUID",
    }
}

/// Attributes asked for on user entries: all user attributes, the id (operational in
/// OpenLDAP), and in AD the ones the dialect itself reads, named so a narrowed `*` (some
/// directories filter it by schema or ACL) cannot drop them silently.
fn user_attributes(dialect: Dialect) -> &'static [&'static str] {
    match dialect {
        Dialect::OpenLdap => &["*", "entryUUID"],
        Dialect::ActiveDirectory => &[
            "*",
            "objectGUID",
            "userAccountControl",
            "accountExpires",
            "userPrincipalName",
            "sAMAccountName",
        ],
    }
}

/// Reads the whole directory as configured, with every user attribute. Fails rather than
/// return a partial read. `now` decides which AD accounts have expired.
pub async fn read(cfg: &LdapConfig, now: DateTime<Utc>) -> Result<Directory, SourceError> {
    read_attributes(cfg, None, now).await
}

/// Like [`read`], asking only for `wanted` user attributes (besides the ones the dialect
/// needs): what the mappings name. Less to transfer, decode and hold.
pub async fn read_attributes(
    cfg: &LdapConfig,
    wanted: Option<&[String]>,
    now: DateTime<Utc>,
) -> Result<Directory, SourceError> {
    read_streaming(cfg, wanted, &mut |_| {}, now).await
}

/// Like [`read_attributes`], handing each user to `on_user` as soon as it is final (its
/// attributes complete, its disabled state known), while the rest is still being read: the
/// caller can map it and drop what it no longer needs. The read as a whole still either
/// completes or fails; what `on_user` saw of a failed read must be thrown away.
pub async fn read_streaming(
    cfg: &LdapConfig,
    wanted: Option<&[String]>,
    on_user: &mut (dyn FnMut(&mut DirectoryUser) + Send),
    now: DateTime<Utc>,
) -> Result<Directory, SourceError> {
    read_capturing(cfg, wanted, on_user, &mut |_, _, _| {}, now).await
}

/// The user attributes a read asks for: what `wanted` names (all user attributes without
/// it), and what the dialect itself reads.
fn user_attribute_list(dialect: Dialect, wanted: Option<&[String]>) -> Vec<&str> {
    match wanted {
        None => user_attributes(dialect).to_vec(),
        Some(w) => user_attributes(dialect)
            .iter()
            .copied()
            .filter(|a| *a != "*")
            .chain(w.iter().map(String::as_str))
            .collect(),
    }
}

/// The group attributes a read asks for: the name, the members and the id, and what
/// `wanted` names (a group name template or a `groups_filter` may read any attribute).
fn group_attribute_list(dialect: Dialect, wanted: Option<&[String]>) -> Vec<&str> {
    match wanted {
        None => vec!["*", id_attribute(dialect)],
        Some(w) => ["cn", "member", id_attribute(dialect)]
            .into_iter()
            .chain(
                w.iter()
                    .map(String::as_str)
                    .filter(|a| !["cn", "member"].iter().any(|b| a.eq_ignore_ascii_case(b))),
            )
            .collect(),
    }
}

/// Like [`read_streaming`], also handing each group entry as read (its members still DNs) to
/// `on_group`: what a full read gives the directory's mirror.
pub async fn read_capturing(
    cfg: &LdapConfig,
    wanted: Option<&[String]>,
    on_user: &mut (dyn FnMut(&mut DirectoryUser) + Send),
    on_group: &mut (dyn FnMut(&DirectoryId, &str, &Attributes) + Send),
    now: DateTime<Utc>,
) -> Result<Directory, SourceError> {
    let started = Instant::now();
    let mut ldap = connect(cfg).await?;
    let id_attr = id_attribute(cfg.dialect);
    let user_attrs = user_attribute_list(cfg.dialect, wanted);
    let group_attrs = group_attribute_list(cfg.dialect, wanted);

    // The three searches run at once, each on its own connection (slapd keeps one paged search
    // per connection: a second one invalidates the first one's cookie), and every entry is
    // converted as it arrives: the raw entries are never all held at once, and the conversion
    // overlaps the server's work.
    // Who is disabled is known once the disabled-users search is over; users that arrive
    // before that wait in `Finisher::pending`.
    let disabled_known: OnceLock<HashSet<String>> = OnceLock::new();
    if cfg.users.disabled_filter.is_none() {
        let _ = disabled_known.set(HashSet::new());
    }
    let users_read = async {
        let mut ldap = ldap.clone();
        let mut done = Finisher {
            users: Vec::new(),
            user_dns: Vec::new(),
            pending: Vec::new(),
            on_user,
        };
        let mut ranged = Vec::new();
        let mut keep = |mut entry: SearchEntry| -> Result<(), SourceError> {
            if range::has_ranges(&entry) {
                ranged.push(entry);
                return Ok(());
            }
            let (user, norm) = user_entry(&mut entry, cfg.dialect, now)?;
            done.add(user, norm, disabled_known.get());
            Ok(())
        };
        paged_search_each(
            &mut ldap,
            cfg,
            &cfg.users.base,
            &cfg.users.filter,
            &user_attrs,
            &mut keep,
        )
        .await?;
        // Entries with `attr;range=…` (AD, beyond 1500 values) are completed, then converted.
        complete_ranges(&mut ldap, &cfg.users.base, &mut ranged).await?;
        for mut entry in ranged {
            let (user, norm) = user_entry(&mut entry, cfg.dialect, now)?;
            done.add(user, norm, disabled_known.get());
        }
        Ok::<_, SourceError>(done)
    };
    let disabled_read = async {
        let mut disabled = HashSet::new();
        if let Some(df) = &cfg.users.disabled_filter {
            let mut ldap = connect_during_read(cfg, &cfg.users.base).await?;
            let filter = format!("(&{}{})", cfg.users.filter, df);
            paged_search_each(
                &mut ldap,
                cfg,
                &cfg.users.base,
                &filter,
                &["1.1"],
                &mut |e| {
                    disabled.insert(dn::normalize_lossy(&e.dn));
                    Ok(())
                },
            )
            .await?;
            let _ = ldap.unbind().await;
            let _ = disabled_known.set(disabled);
        }
        Ok::<_, SourceError>(())
    };
    let groups_read = async {
        let mut raw_groups = Vec::new();
        if let Some(g) = &cfg.groups {
            let mut ldap = connect_during_read(cfg, &g.base).await?;
            let mut ranged = Vec::new();
            let mut keep = |entry: SearchEntry| -> Result<(), SourceError> {
                if range::has_ranges(&entry) {
                    ranged.push(entry);
                    return Ok(());
                }
                raw_groups.push(group_entry(entry, cfg.dialect)?);
                Ok(())
            };
            paged_search_each(&mut ldap, cfg, &g.base, &g.filter, &group_attrs, &mut keep).await?;
            complete_ranges(&mut ldap, &g.base, &mut ranged).await?;
            let _ = ldap.unbind().await;
            for entry in ranged {
                raw_groups.push(group_entry(entry, cfg.dialect)?);
            }
            for (id, dn, attrs) in &raw_groups {
                on_group(id, dn, attrs);
            }
        }
        // How the groups nest is worked out now, while the users are still arriving.
        let nested = cfg.groups.as_ref().is_some_and(|g| g.nested);
        Ok::<_, SourceError>(expand::GroupGraph::new(raw_groups, nested))
    };
    let (mut done, (), graph) = tokio::try_join!(users_read, disabled_read, groups_read)?;
    let _ = ldap.unbind().await;
    let no_one = HashSet::new();
    done.flush(disabled_known.get().unwrap_or(&no_one));
    let Finisher {
        users, user_dns, ..
    } = done;
    unique_ids(
        id_attr,
        users.iter().map(|u| (&u.id, u.dn.as_str())),
        graph.entries(),
    )?;
    let groups = graph.resolve(&users, &user_dns);
    info!(
        users = users.len(),
        groups = groups.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        rss_mib = crate::memory::rss_mib(),
        "directory read"
    );
    Ok(Directory { users, groups })
}

/// Users read so far, and the ones waiting to learn whether they are disabled.
struct Finisher<'a> {
    users: Vec<DirectoryUser>,
    user_dns: Vec<String>,
    pending: Vec<(DirectoryUser, String)>,
    on_user: &'a mut (dyn FnMut(&mut DirectoryUser) + Send),
}

impl Finisher<'_> {
    fn add(&mut self, user: DirectoryUser, norm: String, disabled: Option<&HashSet<String>>) {
        match disabled {
            Some(d) => {
                self.flush(d);
                self.finish(user, norm, d);
            }
            None => self.pending.push((user, norm)),
        }
    }

    fn flush(&mut self, disabled: &HashSet<String>) {
        for (user, norm) in std::mem::take(&mut self.pending) {
            self.finish(user, norm, disabled);
        }
    }

    fn finish(&mut self, mut user: DirectoryUser, norm: String, disabled: &HashSet<String>) {
        user.disabled |= disabled.contains(&norm);
        (self.on_user)(&mut user);
        self.users.push(user);
        self.user_dns.push(norm);
    }
}

/// Fails on the first id held by two entries (users and groups share one id space: each is
/// one `externalId`). `users` are (id, DN) in read order, `groups` likewise.
fn unique_ids<'a>(
    attribute: &'static str,
    users: impl ExactSizeIterator<Item = (&'a DirectoryId, &'a str)>,
    groups: impl Iterator<Item = (&'a DirectoryId, &'a str)>,
) -> Result<(), SourceError> {
    let mut seen: HashMap<&DirectoryId, (&str, bool)> = HashMap::with_capacity(users.len());
    let users = users.map(|(id, dn)| (id, dn, true));
    for (id, dn, is_user) in users.chain(groups.map(|(id, dn)| (id, dn, false))) {
        let Some(&(first_dn, first_is_user)) = seen.get(id) else {
            seen.insert(id, (dn, is_user));
            continue;
        };
        if dn::normalize_lossy(first_dn) == dn::normalize_lossy(dn) {
            return Err(SourceError::DuplicateEntry {
                dn: dn.to_string(),
                how: match (first_is_user, is_user) {
                    (true, true) => "twice by the users search",
                    (false, false) => "twice by the groups search",
                    _ => "as a user and as a group",
                },
                fix: if first_is_user == is_user {
                    "The server's paged results are inconsistent (did the entry move during the read?); the next cycle reads again"
                } else {
                    "Make ldap.users.filter and ldap.groups.filter exclusive"
                },
            });
        }
        return Err(SourceError::DuplicateId {
            id: id.clone(),
            attribute,
            first_dn: first_dn.to_string(),
            second_dn: dn.to_string(),
        });
    }
    Ok(())
}

/// One group entry: its id, DN and attributes (members still as DNs).
fn group_entry(
    mut entry: SearchEntry,
    dialect: Dialect,
) -> Result<(DirectoryId, String, Attributes), SourceError> {
    let id = entry_id(&mut entry, dialect)?;
    // ldap3 files an attribute with a value that is not UTF-8 under `bin_attrs`: read as
    // text only, the group would seem to have lost all its members.
    if entry
        .bin_attrs
        .keys()
        .any(|k| k.eq_ignore_ascii_case("member"))
    {
        return Err(SourceError::InvalidMembers {
            dn: entry.dn,
            attribute: "member",
        });
    }
    // Other attributes that are not text are named, so a group name template or a
    // `groups_filter` that reads one makes the group a problem rather than a guess.
    let unreadable: Vec<String> = entry
        .bin_attrs
        .keys()
        .map(|k| k.to_ascii_lowercase())
        .collect();
    let mut attrs = lowercase_attrs(entry.attrs);
    if !unreadable.is_empty() {
        attrs.insert(crate::model::UNREADABLE_ATTRIBUTES.to_owned(), unreadable);
    }
    Ok((id, entry.dn, attrs))
}

/// One user entry in the model (with its normalized DN, for group expansion).
fn user_entry(
    entry: &mut SearchEntry,
    dialect: Dialect,
    now: DateTime<Utc>,
) -> Result<(DirectoryUser, String), SourceError> {
    let id = entry_id(entry, dialect)?;
    let norm = dn::normalize_lossy(&entry.dn);
    let attrs = lowercase_attrs(std::mem::take(&mut entry.attrs));
    let disabled = ad_inactive(dialect, &attrs, now);
    // What is left in `bin_attrs` (AD's ids are text by now) is not valid UTF-8: named, so a
    // mapping that uses it reports the entry instead of pushing the attribute as absent.
    let mut invalid_utf8: Vec<String> = entry
        .bin_attrs
        .keys()
        .map(|k| k.to_ascii_lowercase())
        .collect();
    invalid_utf8.sort_unstable();
    let user = DirectoryUser {
        id,
        dn: std::mem::take(&mut entry.dn),
        attrs,
        disabled,
        invalid_utf8,
    };
    Ok((user, norm))
}

/// Range retrieval for every entry that came back with a `attr;range=…` attribute (AD does
/// this for `member` beyond 1500 values), whatever the dialect.
async fn complete_ranges(
    ldap: &mut Ldap,
    base: &str,
    entries: &mut [SearchEntry],
) -> Result<(), SourceError> {
    for entry in entries.iter_mut().filter(|e| range::has_ranges(e)) {
        range::complete(ldap, base, entry).await?;
    }
    Ok(())
}

fn lowercase_attrs(attrs: HashMap<String, Vec<String>>) -> Attributes {
    attrs
        .into_iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect::<BTreeMap<_, _>>()
}

/// AD accounts are inactive when `userAccountControl` has bit 2 (ACCOUNTDISABLE) set or
/// `accountExpires` lies in the past.
fn ad_inactive(dialect: Dialect, attrs: &Attributes, now: DateTime<Utc>) -> bool {
    let first = |name: &str| attrs.get(name).and_then(|v| v.first()).map(String::as_str);
    dialect == Dialect::ActiveDirectory
        && (ad::uac_disabled(first("useraccountcontrol"))
            || ad::account_expired(first("accountexpires"), now))
}

/// Whether a user with these attributes is inactive by the dialect's own rules (AD's
/// `userAccountControl` and `accountExpires`), as a read decides it.
pub fn inactive(cfg: &LdapConfig, attrs: &Attributes, now: DateTime<Utc>) -> bool {
    ad_inactive(cfg.dialect, attrs, now)
}

/// Active Directory: the earliest `accountExpires` after `now` among these users' attributes.
pub fn next_expiry<'a>(
    cfg: &LdapConfig,
    users: impl Iterator<Item = &'a Attributes>,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    if cfg.dialect != Dialect::ActiveDirectory {
        return None;
    }
    users
        .filter_map(|a| a.get("accountexpires").and_then(|v| v.first()))
        .filter_map(|v| ad::account_expires_at(v))
        .filter(|t| *t > now)
        .min()
}

/// The entry's immutable id. In AD this also turns the binary ids into text attributes
/// (whichever map ldap3 filed them under), so nothing downstream sees raw GUID bytes.
fn entry_id(entry: &mut SearchEntry, dialect: Dialect) -> Result<DirectoryId, SourceError> {
    let attr = id_attribute(dialect);
    let id = match dialect {
        Dialect::OpenLdap => entry
            .attrs
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(attr))
            .and_then(|(_, v)| v.first())
            .map(|t| DirectoryId::new(t)),
        Dialect::ActiveDirectory => {
            let guid = ad::object_guid(entry);
            ad::textualize_ids(entry);
            guid.map(|s| DirectoryId::new(&s))
        }
    };
    id.filter(|i| !i.0.is_empty())
        .ok_or_else(|| SourceError::MissingId {
            dn: entry.dn.clone(),
            attribute: attr,
        })
}

/// Formats AD's 16-byte `objectGUID` (first three fields little-endian) as the canonical
/// lowercase GUID string.
pub fn guid_to_string(b: &[u8]) -> Option<String> {
    if b.len() != 16 {
        return None;
    }
    Some(format!(
        "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]
    ))
}

/// A further connection of a read that has begun (the first one bound with the same
/// credentials): if it fails, the server went away or stopped answering in the middle of the
/// read, which makes the read incomplete, whatever the failing step says.
async fn connect_during_read(cfg: &LdapConfig, base: &str) -> Result<Ldap, SourceError> {
    connect(cfg).await.map_err(|e| SourceError::Incomplete {
        base: base.to_string(),
        reason: format!("a second connection to the directory failed during the read ({e})"),
        source: Some(Box::new(e)),
    })
}

/// Connects and binds (for `check --connect`); returns the URL that answered.
pub async fn check_connection(cfg: &LdapConfig) -> Result<String, SourceError> {
    let mut ldap = connect(cfg).await?;
    let _ = ldap.unbind().await;
    Ok(cfg.urls.first().map(|s| s.to_string()).unwrap_or_default())
}

async fn connect(cfg: &LdapConfig) -> Result<Ldap, SourceError> {
    let tls = match &cfg.ca_file {
        Some(path) => Some(Arc::new(tls_config(path)?)),
        None => None,
    };
    let mut last_err = None;
    for (i, server) in cfg.urls.iter().enumerate() {
        let url = server.as_str();
        if let Some(refused) = cleartext_refusal(cfg, server) {
            return Err(refused);
        }
        let mut settings = LdapConnSettings::new()
            .set_conn_timeout(cfg.timeout)
            .set_starttls(server.transport == LdapTransport::StartTls);
        if let Some(tls) = &tls {
            settings = settings.set_config(tls.clone());
        }
        // The socket is opened here so it can have TCP_NODELAY: without it, the bind's second
        // TLS record waits for a delayed ACK (40 ms per connection on Linux).
        let connected = match tcp_stream(url, cfg.timeout).await {
            Ok(Some(stream)) => {
                settings = settings.set_std_stream(ldap3::StdStream::Tcp(stream));
                LdapConnAsync::with_settings(settings, url).await
            }
            Ok(None) => LdapConnAsync::with_settings(settings, url).await,
            Err(e) => Err(ldap3::LdapError::Io { source: e }),
        };
        match connected {
            Ok((conn, mut ldap)) => {
                ldap3::drive!(conn);
                ldap.with_timeout(cfg.timeout);
                if let (Some(bind_dn), Some(pw)) = (&cfg.bind_dn, &cfg.bind_password) {
                    let res = ldap.simple_bind(bind_dn, pw.expose()).await;
                    match res.map(|r| r.success()) {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) | Err(e) => {
                            return Err(SourceError::Bind {
                                dn: bind_dn.clone(),
                                reason: describe(&e),
                                source: Box::new(e),
                            });
                        }
                    }
                }
                debug!(url, "connected to LDAP");
                return Ok(ldap);
            }
            Err(e) => {
                if i + 1 < cfg.urls.len() {
                    warn!(url, error = %describe(&e), "LDAP server unreachable, trying the next one");
                }
                last_err = Some(SourceError::Connect {
                    url: url.to_string(),
                    reason: describe(&e),
                    source: Some(Box::new(e)),
                });
            }
        }
    }
    Err(last_err.unwrap_or_else(|| SourceError::Connect {
        url: String::new(),
        reason: "no ldap.url configured".into(),
        source: None,
    }))
}

/// The configuration refuses this too; here it is checked again right before a connection:
/// a simple bind never leaves in cleartext unless the operator said so (or it stays on this
/// machine).
fn cleartext_refusal(cfg: &LdapConfig, server: &LdapServer) -> Option<SourceError> {
    (server.transport == LdapTransport::Plain
        && cfg.bind_password.is_some()
        && !cfg.allow_plaintext
        && !server.is_loopback())
    .then(|| SourceError::Connect {
        url: server.to_string(),
        reason: "the bind would be sent in cleartext; use ldaps://, set ldap.starttls = true, or set ldap.allow_plaintext = true".into(),
        source: None,
    })
}

/// A connected TCP socket with TCP_NODELAY for an `ldap://` or `ldaps://` URL (`None` for
/// anything else, e.g. `ldapi://`, which ldap3 connects itself).
async fn tcp_stream(
    url: &str,
    timeout: std::time::Duration,
) -> std::io::Result<Option<std::net::TcpStream>> {
    let Ok(parsed) = url::Url::parse(url) else {
        return Ok(None);
    };
    let port = match (parsed.scheme(), parsed.port()) {
        (_, Some(p)) => p,
        ("ldap", None) => 389,
        ("ldaps", None) => 636,
        _ => return Ok(None),
    };
    let host = match parsed.host_str() {
        Some("") | None => "localhost".to_string(),
        Some(h) => h.trim_start_matches('[').trim_end_matches(']').to_string(),
    };
    let stream = tokio::time::timeout(timeout, tokio::net::TcpStream::connect((host, port)))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connection timed out"))??;
    stream.set_nodelay(true)?;
    stream.into_std().map(Some)
}

fn tls_config(path: &std::path::Path) -> Result<rustls::ClientConfig, SourceError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let err = |reason: String, source: Option<Cause>| SourceError::CaFile {
        path: path.display().to_string(),
        reason,
        source,
    };
    let failed = |e: Cause| err(e.to_string(), Some(e));
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path).map_err(|e| failed(e.into()))?;
    for cert in certs {
        let cert = cert.map_err(|e| failed(e.into()))?;
        roots.add(cert).map_err(|e| failed(e.into()))?;
    }
    if roots.is_empty() {
        return Err(err("no certificate found in the file".into(), None));
    }
    Ok(rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Describes an ldap3 error in one line, without anything secret (ldap3 errors never carry
/// the bind password).
fn describe(e: &ldap3::LdapError) -> String {
    match e {
        ldap3::LdapError::LdapResult { result } => {
            let name = result_name(result.rc);
            if result.text.is_empty() {
                format!("{name} (LDAP result code {})", result.rc)
            } else {
                format!("{name} (LDAP result code {}): {}", result.rc, result.text)
            }
        }
        other => other.to_string(),
    }
}

fn result_name(rc: u32) -> &'static str {
    match rc {
        1 => "operationsError",
        2 => "protocolError",
        3 => "timeLimitExceeded",
        4 => "sizeLimitExceeded",
        10 => "referral",
        11 => "adminLimitExceeded",
        32 => "noSuchObject",
        34 => "invalidDNSyntax",
        49 => "invalidCredentials",
        50 => "insufficientAccessRights",
        51 => "busy",
        52 => "unavailable",
        53 => "unwillingToPerform",
        80 => "other",
        _ => "error",
    }
}

/// A paged search (RFC 2696) that either returns every entry or fails: a result code other
/// than success, a lost connection between pages, or a referral makes the read incomplete.
async fn paged_search_each(
    ldap: &mut Ldap,
    cfg: &LdapConfig,
    base: &str,
    filter: &str,
    attrs: &[&str],
    each: &mut dyn FnMut(SearchEntry) -> Result<(), SourceError>,
) -> Result<usize, SourceError> {
    let incomplete = |reason: String| SourceError::Incomplete {
        base: base.to_string(),
        reason,
        source: None,
    };
    let adapters: Vec<Box<dyn ldap3::adapters::Adapter<_, _>>> =
        vec![Box::new(PagedResults::new(cfg.page_size))];
    ldap.with_timeout(cfg.timeout);
    let mut stream = ldap
        .streaming_search_with(adapters, base, Scope::Subtree, filter, attrs.to_vec())
        .await
        .map_err(|e| SourceError::search(base, filter, e))?;
    let mut entries = 0usize;
    let mut rejected = None;
    loop {
        match stream.next().await {
            Ok(Some(re)) if re.is_intermediate() => {}
            Ok(Some(re)) if re.is_ref() => {
                // Continuation references are never chased (that means DNS lookups and other
                // servers). AD hands them out for its application partitions as a matter of
                // course; anywhere else they mean part of the tree is elsewhere.
                if cfg.dialect != Dialect::ActiveDirectory {
                    let _ = stream.finish().await;
                    return Err(incomplete(
                        "the server returned a continuation reference (part of the tree is on another server; referrals are not followed)".into(),
                    ));
                }
            }
            Ok(Some(re)) => {
                entries += 1;
                // An entry that cannot be used (no id) fails the read, but only once the
                // search is known to be complete: a truncated or referred read says so first.
                if rejected.is_none() {
                    let converted = search_entry(re).map_err(|why| {
                        incomplete(format!(
                            "the server returned an entry that cannot be read ({why})"
                        ))
                    });
                    if let Err(e) = converted.and_then(&mut *each) {
                        rejected = Some(e);
                    }
                }
            }
            Ok(None) => break,
            Err(e) => {
                let _ = stream.finish().await;
                return Err(SourceError::Incomplete {
                    base: base.to_string(),
                    reason: format!("{} after {} entries", describe(&e), entries),
                    source: Some(e.into()),
                });
            }
        }
    }
    let res = stream.finish().await;
    match res.rc {
        0 => {}
        32 if entries == 0 => {
            return Err(SourceError::Search {
                base: base.into(),
                filter: filter.into(),
                reason: "noSuchObject: the base DN does not exist".into(),
                source: None,
            })
        }
        rc => {
            let mut reason = format!(
                "{} (LDAP result code {rc}) after {} entries",
                result_name(rc),
                entries
            );
            if !res.text.is_empty() {
                reason.push_str(": ");
                reason.push_str(&res.text);
            }
            return Err(incomplete(reason));
        }
    }
    if let Some(e) = rejected {
        return Err(e);
    }
    debug!(
        base,
        filter,
        entries,
        rss_mib = crate::memory::rss_mib(),
        "paged search done"
    );
    Ok(entries)
}

/// [`SearchEntry::construct`], which panics on an entry whose DN or attribute description is
/// not UTF-8 (or that is not shaped like an entry): those are checked first, so what a server
/// sends cannot crash the process. Values are not checked here (ldap3 files the ones that
/// are not UTF-8 under `bin_attrs`).
pub(super) fn search_entry(re: ResultEntry) -> Result<SearchEntry, String> {
    let malformed = || "it is not shaped like an LDAP entry".to_string();
    let PL::C(parts) = &re.0.payload else {
        return Err(malformed());
    };
    let (Some(dn), Some(attrs), 4) = (parts.first(), parts.get(1), re.0.id) else {
        return Err(malformed());
    };
    let (PL::P(dn), PL::C(attrs)) = (&dn.payload, &attrs.payload) else {
        return Err(malformed());
    };
    let dn = std::str::from_utf8(dn).map_err(|_| {
        format!(
            "its DN {} is not valid UTF-8",
            String::from_utf8_lossy(dn).escape_debug()
        )
    })?;
    for attr in attrs {
        let PL::C(attr) = &attr.payload else {
            return Err(malformed());
        };
        let (Some(name), Some(values)) = (attr.first(), attr.get(1)) else {
            return Err(malformed());
        };
        let (PL::P(name), PL::C(values)) = (&name.payload, &values.payload) else {
            return Err(malformed());
        };
        if std::str::from_utf8(name).is_err() {
            return Err(format!(
                "entry {dn} has an attribute description that is not valid UTF-8"
            ));
        }
        if !values.iter().all(|v| matches!(v.payload, PL::P(_))) {
            return Err(malformed());
        }
    }
    Ok(SearchEntry::construct(re))
}

/// The change feed a server offers, from its root DSE's `supportedControl`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advertised {
    /// RFC 4533 content synchronisation (OpenLDAP syncprov, 389-DS).
    Syncrepl,
    /// Active Directory's DirSync control.
    DirSync,
    /// Neither.
    Nothing,
}

use dirsync::DIRSYNC_OID;

/// Reads the root DSE's `supportedControl` (for `ldap.change_feed = "auto"` and `check
/// --connect`).
pub async fn advertised_feed(cfg: &LdapConfig) -> Result<Advertised, SourceError> {
    let mut ldap = connect(cfg).await?;
    let found = root_dse_feed(&mut ldap).await;
    let _ = ldap.unbind().await;
    found
}

/// Active Directory: the feed a full read would start (DirSync with the replication right,
/// in object-security mode, or the uSNChanged watermark), and why DirSync cannot be used
/// where it cannot.
pub async fn ad_feed_mode(
    cfg: &LdapConfig,
) -> Result<(dirsync::Mode, Option<String>), SourceError> {
    let mut ldap = connect(cfg).await?;
    let usn_only = cfg.change_feed == crate::config::ChangeFeed::Usn;
    let found = dirsync::probe(&mut ldap, cfg, usn_only).await;
    let _ = ldap.unbind().await;
    Ok(found)
}

async fn root_dse_feed(ldap: &mut Ldap) -> Result<Advertised, SourceError> {
    let search_failed = |reason: String| SourceError::Search {
        base: "(root DSE)".into(),
        filter: "(objectClass=*)".into(),
        reason,
        source: None,
    };
    let (entries, _) = ldap
        .search("", Scope::Base, "(objectClass=*)", vec!["supportedControl"])
        .await
        .map_err(|e| search_failed(describe(&e)))?
        .non_error()
        .map_err(|e| search_failed(describe(&e)))?;
    let controls: Vec<String> = entries
        .into_iter()
        .filter_map(|re| search_entry(re).ok())
        .flat_map(|e| {
            e.attrs
                .into_iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case("supportedControl"))
                .flat_map(|(_, v)| v)
        })
        .collect();
    Ok(if controls.iter().any(|c| c == feed::SYNC_REQUEST_OID) {
        Advertised::Syncrepl
    } else if controls.iter().any(|c| c == DIRSYNC_OID) {
        Advertised::DirSync
    } else {
        Advertised::Nothing
    })
}

fn cookie_bytes(c: &Option<String>) -> Option<Vec<u8>> {
    use base64::Engine as _;
    c.as_ref()
        .and_then(|c| base64::engine::general_purpose::STANDARD.decode(c).ok())
}

fn cookie_text(c: Option<Vec<u8>>) -> Option<String> {
    use base64::Engine as _;
    c.map(|c| base64::engine::general_purpose::STANDARD.encode(c))
}

/// The cookies of the directory as it is now, asked for before a full read (with no
/// attributes): a delta from them replays whatever changes while the read runs, which is
/// harmless, and misses nothing.
/// Also returns (feed id, own id) of every entry, where the feed names entries by another id
/// than their own (389-DS).
#[allow(clippy::type_complexity)]
pub async fn feed_start(
    cfg: &LdapConfig,
) -> Result<(Cookies, Vec<(DirectoryId, DirectoryId)>, String), RefreshError> {
    let mut ldap = connect(cfg).await?;
    let vendor = vendor_name(&mut ldap).await;
    let mut cookies = Cookies::default();
    if cfg.dialect == Dialect::ActiveDirectory {
        let usn_only = cfg.change_feed == crate::config::ChangeFeed::Usn;
        let (mode, refused) = dirsync::probe(&mut ldap, cfg, usn_only).await;
        if let Some(why) = refused {
            warn!(reason = %why, "DirSync cannot be used; the change feed follows the uSNChanged watermark of this domain controller");
        }
        let nc = dirsync::naming_context(&mut ldap, cfg).await?;
        let under = |base: &str| dn::normalize_lossy(base).ends_with(&dn::normalize_lossy(&nc));
        if !under(&cfg.users.base) || cfg.groups.as_ref().is_some_and(|g| !under(&g.base)) {
            // DirSync and uSNChanged follow this domain's naming context only.
            warn!(naming_context = %nc, "a search base lies outside the domain controller's naming context, which its change feed does not cover");
            let _ = ldap.unbind().await;
            return Ok((cookies, Vec::new(), vendor));
        }
        let cookie = dirsync::start(&mut ldap, cfg, mode).await?;
        let _ = ldap.unbind().await;
        cookies.users = Some(cookie.to_text());
        return Ok((cookies, Vec::new(), vendor));
    }
    let id_attr = [id_attribute(cfg.dialect)];
    let mut pairs = Vec::new();
    let mut learn = |changed: Vec<(String, SearchEntry)>| -> Result<(), SourceError> {
        for (sync, mut e) in changed {
            let id = entry_id(&mut e, cfg.dialect)?;
            let sync = DirectoryId::new(&sync);
            if sync != id {
                pairs.push((sync, id));
            }
        }
        Ok(())
    };
    let mut search = Refresher {
        cfg,
        quirks: feed::Quirks::default(),
        ldap: &mut ldap,
    };
    let (cookie, users) = search
        .run(&cfg.users.base, &cfg.users.filter, &id_attr, &None)
        .await?;
    cookies.users = cookie;
    learn(users.changed)?;
    if let Some(df) = &cfg.users.disabled_filter {
        let filter = format!("(&{}{})", cfg.users.filter, df);
        let (cookie, _) = search
            .run(&cfg.users.base, &filter, &id_attr, &None)
            .await?;
        cookies.disabled = cookie;
    }
    if let Some(g) = &cfg.groups {
        let (cookie, groups) = search.run(&g.base, &g.filter, &id_attr, &None).await?;
        cookies.groups = cookie;
        learn(groups.changed)?;
    }
    let _ = ldap.unbind().await;
    Ok((cookies, pairs, vendor))
}

/// The root DSE's `vendorName` (empty where it says none).
async fn vendor_name(ldap: &mut Ldap) -> String {
    let Ok(Ok((entries, _))) = ldap
        .search("", Scope::Base, "(objectClass=*)", vec!["vendorName"])
        .await
        .map(|r| r.non_error())
    else {
        return String::new();
    };
    entries
        .into_iter()
        .filter_map(|re| search_entry(re).ok())
        .flat_map(|e| e.attrs.into_iter())
        .filter(|(k, _)| k.eq_ignore_ascii_case("vendorName"))
        .flat_map(|(_, v)| v)
        .next()
        .unwrap_or_default()
}

/// Watches the directory (users, disabled users, groups) with persistent searches from
/// `cookies`, calling `changed` whenever the server tells of a change, until the connection
/// or one of the searches ends: always an error, the caller reconnects.
pub async fn watch(
    cfg: &LdapConfig,
    cookies: &Cookies,
    changed: &(dyn Fn(Option<DateTime<Utc>>) + Sync),
) -> Result<(), SourceError> {
    let ldap = connect(cfg).await?;
    let users = {
        let mut ldap = ldap.clone();
        let cookie = cookie_bytes(&cookies.users);
        async move {
            feed::persist(
                &mut ldap,
                &cfg.users.base,
                &cfg.users.filter,
                cookie.as_deref(),
                changed,
            )
            .await
        }
    };
    let disabled = {
        let mut ldap = ldap.clone();
        let cookie = cookie_bytes(&cookies.disabled);
        async move {
            match &cfg.users.disabled_filter {
                Some(df) => {
                    let filter = format!("(&{}{})", cfg.users.filter, df);
                    feed::persist(
                        &mut ldap,
                        &cfg.users.base,
                        &filter,
                        cookie.as_deref(),
                        changed,
                    )
                    .await
                }
                None => std::future::pending().await,
            }
        }
    };
    let groups = {
        let mut ldap = ldap.clone();
        let cookie = cookie_bytes(&cookies.groups);
        async move {
            match &cfg.groups {
                Some(g) => {
                    feed::persist(&mut ldap, &g.base, &g.filter, cookie.as_deref(), changed).await
                }
                None => std::future::pending().await,
            }
        }
    };
    let ended = tokio::select! {
        r = users => r,
        r = disabled => r,
        r = groups => r,
    };
    let mut ldap = ldap;
    let _ = ldap.unbind().await;
    ended
}

/// Reads what changed since `cookies`, as typed changes, and the cookies to continue from.
/// The three searches (users, disabled users, groups) run one after the other on one
/// connection; any that fails fails the whole read.
pub async fn read_delta(
    cfg: &LdapConfig,
    wanted: Option<&[String]>,
    cookies: &Cookies,
    vendor: &str,
    now: DateTime<Utc>,
) -> Result<(Delta, Cookies), RefreshError> {
    if cfg.dialect == Dialect::ActiveDirectory {
        return ad_delta(cfg, wanted, cookies, now).await;
    }
    let quirks = feed::Quirks::of(vendor);
    let mut ldap = connect(cfg).await?;
    let mut next = Cookies::default();
    let mut delta = Delta::default();
    let user_attrs = user_attribute_list(cfg.dialect, wanted);
    let mut search = Refresher {
        cfg,
        quirks,
        ldap: &mut ldap,
    };
    let (cookie, users) = search
        .run(
            &cfg.users.base,
            &cfg.users.filter,
            &user_attrs,
            &cookies.users,
        )
        .await?;
    next.users = cookie;
    delta.users = typed(users.changed, users.deleted, users.present, |mut e| {
        let (user, _) = user_entry(&mut e, cfg.dialect, now)?;
        Ok((
            user.id,
            MirrorUser {
                dn: user.dn,
                attrs: user.attrs,
                invalid_utf8: user.invalid_utf8,
            },
        ))
    })?;
    if let Some(df) = &cfg.users.disabled_filter {
        let filter = format!("(&{}{})", cfg.users.filter, df);
        let id_attr = [id_attribute(cfg.dialect)];
        let (cookie, d) = search
            .run(&cfg.users.base, &filter, &id_attr, &cookies.disabled)
            .await?;
        next.disabled = cookie;
        delta.disabled = typed(d.changed, d.deleted, d.present, |mut e| {
            Ok((entry_id(&mut e, cfg.dialect)?, ()))
        })?;
    }
    if let Some(g) = &cfg.groups {
        let attrs = group_attribute_list(cfg.dialect, wanted);
        let (cookie, r) = search
            .run(&g.base, &g.filter, &attrs, &cookies.groups)
            .await?;
        next.groups = cookie;
        delta.groups = typed(r.changed, r.deleted, r.present, |e| {
            let (id, dn, attrs) = group_entry(e, cfg.dialect)?;
            Ok((id, MirrorGroup { dn, attrs }))
        })?;
    }
    let _ = ldap.unbind().await;
    for (kind, deleted, present, changed) in [
        (
            "users",
            &delta.users.deleted,
            &delta.users.present,
            delta.users.changed.len(),
        ),
        (
            "disabled",
            &delta.disabled.deleted,
            &delta.disabled.present,
            delta.disabled.changed.len(),
        ),
        (
            "groups",
            &delta.groups.deleted,
            &delta.groups.present,
            delta.groups.changed.len(),
        ),
    ] {
        debug!(
            kind,
            changed,
            deleted = ?deleted,
            present = present.as_ref().map(|p| p.len()),
            "change feed refresh"
        );
    }
    Ok((delta, next))
}

/// For each of `users` and `groups` (ids), the DNs of the entries in scope that carry it now:
/// how a delta checks what the feed says is gone or renamed before it believes it (a second
/// entry given an existing entry's id, by a restore or an import, looks like a rename or a
/// delete of the first one in a feed).
pub async fn entries_with_ids(
    cfg: &LdapConfig,
    users: &[DirectoryId],
    groups: &[DirectoryId],
) -> Result<BTreeMap<DirectoryId, Vec<String>>, SourceError> {
    let mut found: BTreeMap<DirectoryId, Vec<String>> = BTreeMap::new();
    if users.is_empty() && groups.is_empty() {
        return Ok(found);
    }
    let mut ldap = connect(cfg).await?;
    let attr = id_attribute(cfg.dialect);
    let mut scopes = vec![(cfg.users.base.as_str(), cfg.users.filter.as_str(), users)];
    if let Some(g) = &cfg.groups {
        scopes.push((g.base.as_str(), g.filter.as_str(), groups));
    }
    for (base, filter, ids) in scopes {
        for filter in id_filters(cfg.dialect, filter, ids) {
            paged_search_each(&mut ldap, cfg, base, &filter, &[attr], &mut |mut e| {
                let id = entry_id(&mut e, cfg.dialect)?;
                found.entry(id).or_default().push(e.dn);
                Ok(())
            })
            .await?;
        }
    }
    let _ = ldap.unbind().await;
    Ok(found)
}

/// `filter` narrowed to entries with one of `ids`, 500 ids a search. Ids are entryUUID text
/// (hex digits and dashes, nothing a filter must escape) or, in AD, GUID text turned back into
/// its escaped bytes; anything else is left out.
fn id_filters(dialect: Dialect, filter: &str, ids: &[DirectoryId]) -> Vec<String> {
    let attr = id_attribute(dialect);
    let values: Vec<String> = ids
        .iter()
        .filter_map(|id| match dialect {
            Dialect::OpenLdap => {
                id.0.chars()
                    .all(|c| c.is_ascii_hexdigit() || c == '-')
                    .then(|| id.0.clone())
            }
            Dialect::ActiveDirectory => dirsync::guid_filter_value(&id.0),
        })
        .collect();
    values
        .chunks(500)
        .map(|chunk| {
            let any: String = chunk.iter().map(|v| format!("({attr}={v})")).collect();
            format!("(&{filter}(|{any}))")
        })
        .collect()
}

/// The group entries with these ids as they are now (those gone are left out).
pub async fn read_groups(
    cfg: &LdapConfig,
    wanted: Option<&[String]>,
    ids: &[DirectoryId],
) -> Result<Vec<(DirectoryId, MirrorGroup)>, SourceError> {
    if cfg.groups.is_none() || ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut ldap = connect(cfg).await?;
    let out = groups_with_ids(&mut ldap, cfg, wanted, ids).await;
    let _ = ldap.unbind().await;
    out
}

/// The groups in scope whose `member` names one of `dns` now, as they are now: how a delta
/// learns the groups of an entry that came into scope already a member (moved in from
/// elsewhere: the directory rewrote the member values without the feed naming the group).
pub async fn groups_naming(
    cfg: &LdapConfig,
    wanted: Option<&[String]>,
    dns: &[String],
) -> Result<Vec<(DirectoryId, MirrorGroup)>, SourceError> {
    let Some(g) = &cfg.groups else {
        return Ok(Vec::new());
    };
    if dns.is_empty() {
        return Ok(Vec::new());
    }
    let mut ldap = connect(cfg).await?;
    let id_attr = [id_attribute(cfg.dialect)];
    let mut ids = Vec::new();
    for chunk in dns.chunks(100) {
        let any: String = chunk
            .iter()
            .map(|dn| format!("(member={})", ldap3::ldap_escape(dn.as_str())))
            .collect();
        let filter = format!("(&{}(|{any}))", g.filter);
        paged_search_each(&mut ldap, cfg, &g.base, &filter, &id_attr, &mut |mut e| {
            ids.push(entry_id(&mut e, cfg.dialect)?);
            Ok(())
        })
        .await?;
    }
    ids.sort();
    ids.dedup();
    let out = groups_with_ids(&mut ldap, cfg, wanted, &ids).await;
    let _ = ldap.unbind().await;
    out
}

async fn groups_with_ids(
    ldap: &mut Ldap,
    cfg: &LdapConfig,
    wanted: Option<&[String]>,
    ids: &[DirectoryId],
) -> Result<Vec<(DirectoryId, MirrorGroup)>, SourceError> {
    let mut out = Vec::new();
    let Some(g) = &cfg.groups else {
        return Ok(out);
    };
    let attrs = group_attribute_list(cfg.dialect, wanted);
    for filter in id_filters(cfg.dialect, &g.filter, ids) {
        let mut ranged = Vec::new();
        paged_search_each(ldap, cfg, &g.base, &filter, &attrs, &mut |e| {
            if range::has_ranges(&e) {
                ranged.push(e);
                return Ok(());
            }
            let (id, dn, attrs) = group_entry(e, cfg.dialect)?;
            out.push((id, MirrorGroup { dn, attrs }));
            Ok(())
        })
        .await?;
        complete_ranges(ldap, &g.base, &mut ranged).await?;
        for e in ranged {
            let (id, dn, attrs) = group_entry(e, cfg.dialect)?;
            out.push((id, MirrorGroup { dn, attrs }));
        }
    }
    Ok(out)
}

/// An Active Directory delta: the objects DirSync (or the uSNChanged watermark) names are read
/// again under each configured base and filter, as a full read reads them; one no longer
/// there (deleted, moved out, or no longer matching) is a delete from that scope.
async fn ad_delta(
    cfg: &LdapConfig,
    wanted: Option<&[String]>,
    cookies: &Cookies,
    now: DateTime<Utc>,
) -> Result<(Delta, Cookies), RefreshError> {
    use std::collections::BTreeSet;
    let cookie = cookies
        .users
        .as_deref()
        .and_then(dirsync::Cookie::parse)
        .ok_or_else(|| {
            RefreshError::Required(
                "the stored cookie is not one of an Active Directory feed".into(),
            )
        })?;
    let mut ldap = connect(cfg).await?;
    let (changed, next) = dirsync::changes(&mut ldap, cfg, &cookie).await?;
    let next = Cookies {
        users: Some(next.to_text()),
        ..Cookies::default()
    };
    let mut delta = Delta::default();
    // Without the replication right (object-security mode, or a watermark an account may
    // not see tombstones with), a deleted object is not reported: the ids in scope are
    // listed, as a present phase, and whatever the mirror holds beyond them is deleted.
    if cookie.mode()
        != (dirsync::Mode::DirSync {
            object_security: false,
        })
    {
        let id_attr = [id_attribute(cfg.dialect)];
        let mut scopes = vec![(&cfg.users.base, &cfg.users.filter, &mut delta.users.present)];
        if let Some(g) = &cfg.groups {
            scopes.push((&g.base, &g.filter, &mut delta.groups.present));
        }
        for (base, filter, present) in scopes {
            let mut ids = BTreeSet::new();
            paged_search_each(&mut ldap, cfg, base, filter, &id_attr, &mut |mut e| {
                ids.insert(entry_id(&mut e, cfg.dialect)?);
                Ok(())
            })
            .await?;
            *present = Some(ids);
        }
    }
    if changed.is_empty() {
        let _ = ldap.unbind().await;
        return Ok((delta, next));
    }
    // memberOf (in a filter or a mapping) changes with the groups, not with the entries the
    // feed names: a named object that is not a user in scope (a group, a tombstone, one
    // moved out) may have changed it for others.
    let follows_groups = |f: &str| f.to_ascii_lowercase().contains("memberof");
    let follow_groups = follows_groups(&cfg.users.filter)
        || cfg
            .users
            .disabled_filter
            .as_deref()
            .is_some_and(follows_groups)
        || cfg
            .groups
            .as_ref()
            .is_some_and(|g| follows_groups(&g.filter))
        || wanted.is_some_and(|w| w.iter().any(|a| follows_groups(a)));
    if follow_groups && changed.iter().any(|c| c.members || c.deleted) {
        let _ = ldap.unbind().await;
        return Err(RefreshError::Required(
            "a group changed or an object was deleted, and a filter or the mapping names memberOf, which follows from other entries than the ones the feed names".into(),
        ));
    }
    let all: BTreeSet<DirectoryId> = changed.iter().map(|c| c.id.clone()).collect();
    let live: Vec<DirectoryId> = changed
        .iter()
        .filter(|c| !c.deleted)
        .map(|c| c.id.clone())
        .collect();
    let gone = |found: &BTreeSet<DirectoryId>| all.difference(found).cloned().collect();
    let user_attrs = user_attribute_list(cfg.dialect, wanted);
    let mut found = BTreeSet::new();
    for filter in id_filters(cfg.dialect, &cfg.users.filter, &live) {
        let mut entries = Vec::new();
        paged_search_each(
            &mut ldap,
            cfg,
            &cfg.users.base,
            &filter,
            &user_attrs,
            &mut |e| {
                entries.push(e);
                Ok(())
            },
        )
        .await?;
        complete_ranges(&mut ldap, &cfg.users.base, &mut entries).await?;
        for mut e in entries {
            let (user, _) = user_entry(&mut e, cfg.dialect, now)?;
            found.insert(user.id.clone());
            delta.users.changed.push((
                user.id,
                MirrorUser {
                    dn: user.dn,
                    attrs: user.attrs,
                    invalid_utf8: user.invalid_utf8,
                },
            ));
        }
    }
    if follow_groups && all.len() != found.len() {
        let _ = ldap.unbind().await;
        return Err(RefreshError::Required(
            "an object named by the feed is no user in scope, and a filter or the mapping names memberOf".into(),
        ));
    }
    delta.users.deleted = gone(&found);
    if let Some(df) = &cfg.users.disabled_filter {
        let scope = format!("(&{}{})", cfg.users.filter, df);
        let id_attr = [id_attribute(cfg.dialect)];
        let mut found = BTreeSet::new();
        for filter in id_filters(cfg.dialect, &scope, &live) {
            paged_search_each(
                &mut ldap,
                cfg,
                &cfg.users.base,
                &filter,
                &id_attr,
                &mut |mut e| {
                    let id = entry_id(&mut e, cfg.dialect)?;
                    found.insert(id.clone());
                    delta.disabled.changed.push((id, ()));
                    Ok(())
                },
            )
            .await?;
        }
        delta.disabled.deleted = gone(&found);
    } else {
        // Without a disabled filter nobody is disabled but by AD's own rules, decided from
        // the attributes as they are now: whatever a full read marked is cleared.
        delta.disabled.deleted = all.clone();
    }
    let mut grouped = BTreeSet::new();
    if cfg.groups.is_some() {
        let groups = groups_with_ids(&mut ldap, cfg, wanted, &live).await?;
        grouped = groups.iter().map(|(id, _)| id.clone()).collect();
        delta.groups.deleted = gone(&grouped);
        delta.groups.changed = groups;
    }
    // A renamed or moved OU or container changes the DN of everything below it, and AD names
    // only the container: the mirror's DNs are stale, so a full read decides.
    let others: Vec<&dirsync::Changed> = changed
        .iter()
        .filter(|c| !c.deleted && !found.contains(&c.id) && !grouped.contains(&c.id))
        .collect();
    for c in others {
        if dirsync::is_container(&mut ldap, cfg, &c.dn).await? {
            let _ = ldap.unbind().await;
            return Err(RefreshError::Required(format!(
                "the container {} changed (a rename or move changes the DN of every entry below it, which the feed does not name)",
                c.dn
            )));
        }
    }
    let _ = ldap.unbind().await;
    debug!(
        named = changed.len(),
        tombstones = changed.iter().filter(|c| c.deleted).count(),
        users = delta.users.changed.len(),
        groups = delta.groups.changed.len(),
        "active directory change feed"
    );
    Ok((delta, next))
}

/// The searches of one delta, on one connection.
struct Refresher<'a> {
    cfg: &'a LdapConfig,
    quirks: feed::Quirks,
    ldap: &'a mut Ldap,
}

impl Refresher<'_> {
    /// One refresh from `cookie`, its entries without their id read again; the cookie to
    /// continue from, as stored.
    async fn run(
        &mut self,
        base: &str,
        filter: &str,
        attrs: &[&str],
        cookie: &Option<String>,
    ) -> Result<(Option<String>, feed::Refresh), RefreshError> {
        let mut r = feed::refresh_only(
            self.ldap,
            self.cfg.timeout,
            base,
            filter,
            attrs,
            cookie_bytes(cookie).as_deref(),
            self.quirks,
        )
        .await?;
        complete_ids(self.ldap, self.cfg, &mut r.changed, attrs).await?;
        Ok((cookie_text(r.cookie.take()), r))
    }
}

/// Entries a feed sent without their id attribute (389-DS sends a changed entry's user
/// attributes only, whatever was asked for) are read again by DN with `attrs`, as a full read
/// reads them; one gone meanwhile is left out (its delete comes in a later refresh).
async fn complete_ids(
    ldap: &mut Ldap,
    cfg: &LdapConfig,
    changed: &mut Vec<(String, SearchEntry)>,
    attrs: &[&str],
) -> Result<(), SourceError> {
    let attr = id_attribute(cfg.dialect);
    let has_id = |e: &SearchEntry| {
        e.attrs.keys().any(|k| k.eq_ignore_ascii_case(attr))
            || e.bin_attrs.keys().any(|k| k.eq_ignore_ascii_case(attr))
    };
    if changed.iter().all(|(_, e)| has_id(e)) {
        return Ok(());
    }
    let mut out = Vec::with_capacity(changed.len());
    for (sync, entry) in std::mem::take(changed) {
        if has_id(&entry) {
            out.push((sync, entry));
            continue;
        }
        let mut again = None;
        ldap.with_timeout(cfg.timeout);
        let search = ldap
            .search(&entry.dn, Scope::Base, "(objectClass=*)", attrs.to_vec())
            .await
            .map_err(|e| SourceError::search(&entry.dn, "(objectClass=*)", e))?;
        let (entries, res) = (search.0, search.1);
        match res.rc {
            0 => {
                for re in entries {
                    let e = search_entry(re).map_err(|why| SourceError::Incomplete {
                        base: entry.dn.clone(),
                        reason: format!("the server returned an entry that cannot be read ({why})"),
                        source: None,
                    })?;
                    again = Some(e);
                }
            }
            32 => {}
            rc => {
                return Err(SourceError::Incomplete {
                    base: entry.dn.clone(),
                    reason: format!(
                        "reading a changed entry again failed with {} (LDAP result code {rc})",
                        result_name(rc)
                    ),
                    source: None,
                })
            }
        }
        if let Some(e) = again {
            out.push((sync, e));
        }
    }
    *changed = out;
    Ok(())
}

/// A refresh as typed changes: each changed entry by its own id (`convert` reads it), with
/// the feed id it came under; deleted and present ones by their feed ids, which the mirror
/// resolves.
fn typed<T>(
    changed: Vec<(String, SearchEntry)>,
    deleted: std::collections::BTreeSet<String>,
    present: Option<std::collections::BTreeSet<String>>,
    convert: impl Fn(SearchEntry) -> Result<(DirectoryId, T), SourceError>,
) -> Result<Changes<T>, SourceError> {
    let mut sync = Vec::with_capacity(changed.len());
    let changed = changed
        .into_iter()
        .map(|(uuid, e)| {
            let (id, value) = convert(e)?;
            sync.push((DirectoryId::new(&uuid), id.clone()));
            Ok((id, value))
        })
        .collect::<Result<Vec<_>, SourceError>>()?;
    let ids =
        |set: std::collections::BTreeSet<String>| set.iter().map(|u| DirectoryId::new(u)).collect();
    Ok(Changes {
        changed,
        deleted: ids(deleted),
        present: present.map(ids),
        sync,
    })
}

/// The directory the mirror holds, put together as a full read puts its entries together:
/// who is disabled, the groups' members resolved (nested ones too), ids checked.
pub fn assemble(
    cfg: &LdapConfig,
    copy: MirrorCopy,
    now: DateTime<Utc>,
) -> Result<Directory, SourceError> {
    let MirrorCopy {
        users: mirrored,
        disabled,
        groups: mirrored_groups,
        ..
    } = copy;
    let mut users = Vec::with_capacity(mirrored.len());
    let mut user_dns = Vec::with_capacity(mirrored.len());
    for (id, u) in mirrored {
        let disabled = disabled.contains(&id) || ad_inactive(cfg.dialect, &u.attrs, now);
        user_dns.push(dn::normalize_lossy(&u.dn));
        users.push(DirectoryUser {
            id,
            dn: u.dn,
            attrs: u.attrs,
            disabled,
            invalid_utf8: u.invalid_utf8,
        });
    }
    let raw = mirrored_groups
        .into_iter()
        .map(|(id, g)| (id, g.dn, g.attrs))
        .collect();
    let nested = cfg.groups.as_ref().is_some_and(|g| g.nested);
    let graph = expand::GroupGraph::new(raw, nested);
    unique_ids(
        id_attribute(cfg.dialect),
        users.iter().map(|u| (&u.id, u.dn.as_str())),
        graph.entries(),
    )?;
    let groups = graph.resolve(&users, &user_dns);
    Ok(Directory { users, groups })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Secret, UsersConfig};

    fn ldap_config(url: &str, starttls: bool) -> LdapConfig {
        let url = url::Url::parse(url).unwrap();
        let transport = match (url.scheme(), starttls) {
            ("ldaps", _) => LdapTransport::Ldaps,
            (_, true) => LdapTransport::StartTls,
            _ => LdapTransport::Plain,
        };
        LdapConfig {
            urls: vec![LdapServer { url, transport }],
            starttls,
            allow_plaintext: false,
            ca_file: None,
            bind_dn: Some("cn=sync,dc=example,dc=org".into()),
            bind_password: Some(Secret::new("pw".into())),
            dialect: Dialect::OpenLdap,
            page_size: 100,
            timeout: std::time::Duration::from_secs(1),
            max_shrink: 1.0,
            change_feed: crate::config::ChangeFeed::None,
            users: UsersConfig {
                base: "dc=example,dc=org".into(),
                filter: "(objectClass=*)".into(),
                disabled_filter: None,
            },
            groups: None,
        }
    }

    /// Decided before any socket is opened (no address here is ever connected to).
    #[test]
    fn a_cleartext_bind_to_another_host_is_refused_unless_allowed() {
        let refused = |cfg: &LdapConfig| cleartext_refusal(cfg, &cfg.urls[0]);
        let cfg = ldap_config("LDAP://dc1.corp.example", false);
        let err = refused(&cfg).expect("refused").to_string();
        assert!(
            err.contains("ldap://dc1.corp.example") && err.contains("allow_plaintext"),
            "{err}"
        );
        assert!(!err.contains("pw"), "{err}");
        let mut allowed = cfg.clone();
        allowed.allow_plaintext = true;
        assert!(refused(&allowed).is_none());
        let mut anonymous = cfg.clone();
        anonymous.bind_password = None;
        assert!(refused(&anonymous).is_none(), "nothing secret to send");
        for protected in [
            ldap_config("LDAP://dc1.corp.example", true),
            ldap_config("LDAPS://dc1.corp.example", false),
            ldap_config("ldap://127.0.0.1:389", false),
            ldap_config("ldap://[::1]:389", false),
            ldap_config("ldap://LocalHost", false),
        ] {
            assert!(refused(&protected).is_none(), "{:?}", protected.urls);
        }
    }

    /// The message names what failed in one line; the error it came from stays its source.
    #[tokio::test]
    async fn a_failed_connection_or_ca_file_keeps_its_cause() {
        use std::error::Error as _;
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("ldap://127.0.0.1:{}", closed.local_addr().unwrap().port());
        drop(closed);
        let err = connect(&ldap_config(&url, false)).await.unwrap_err();
        let SourceError::Connect {
            reason,
            source: Some(cause),
            ..
        } = &err
        else {
            panic!("{err:?}");
        };
        assert_eq!(*reason, cause.to_string());
        assert!(matches!(**cause, ldap3::LdapError::Io { .. }), "{cause:?}");
        assert_eq!(
            err.to_string(),
            format!("cannot connect to LDAP server {url}: {reason}. Check ldap.url, that the server is running, and the TLS settings (ldap.starttls, ldap.ca_file)")
        );
        assert!(err.source().is_some());

        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("ca.pem");
        let err = tls_config(&missing).unwrap_err();
        let cause = err.source().expect("the file error");
        assert_eq!(
            err.to_string(),
            format!("cannot read ldap.ca_file {}: {cause}", missing.display())
        );
        std::fs::write(&missing, "not a certificate\n").unwrap();
        let err = tls_config(&missing).unwrap_err();
        assert!(err.source().is_none(), "{err:?}");
        assert!(
            err.to_string()
                .ends_with(": no certificate found in the file"),
            "{err}"
        );
    }

    fn ids<'a>(
        pairs: &'a [(DirectoryId, &'a str)],
    ) -> impl ExactSizeIterator<Item = (&'a DirectoryId, &'a str)> {
        pairs.iter().map(|(i, d)| (i, *d))
    }

    #[test]
    fn two_entries_with_one_id_stop_the_read_naming_both() {
        let id = |s: &str| DirectoryId::new(s);
        let users = [
            (id("A"), "uid=alice,ou=people,dc=x"),
            (id("b"), "uid=bob,ou=people,dc=x"),
        ];
        let groups = [(id("g"), "cn=eng,ou=groups,dc=x")];
        assert!(unique_ids("entryUUID", ids(&users), ids(&groups)).is_ok());

        // Two users (ids compare case-insensitively: both are one externalId).
        let twins = [users[0].clone(), (id("a"), "uid=mallory,ou=people,dc=x")];
        let err = unique_ids("entryUUID", ids(&twins), std::iter::empty()).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, SourceError::DuplicateId { .. }), "{text}");
        for part in [
            "uid=alice,ou=people,dc=x",
            "uid=mallory,ou=people,dc=x",
            "entryUUID",
            "nothing was changed",
        ] {
            assert!(text.contains(part), "{part}: {text}");
        }
        // A user and a group.
        let group = [(id("b"), "cn=ops,ou=groups,dc=x")];
        let text = unique_ids("objectGUID", ids(&users), ids(&group))
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("uid=bob,ou=people,dc=x") && text.contains("cn=ops,ou=groups,dc=x"),
            "{text}"
        );
        // Two groups.
        let groups = [groups[0].clone(), (id("g"), "cn=ops,ou=groups,dc=x")];
        assert!(unique_ids("entryUUID", ids(&users), ids(&groups)).is_err());
        // The same entry as a user and as a group: said as such.
        let same = [(id("b"), "UID=bob, ou=people,dc=x")];
        let err = unique_ids("entryUUID", ids(&users), ids(&same)).unwrap_err();
        assert!(matches!(err, SourceError::DuplicateEntry { .. }), "{err}");
        assert!(
            err.to_string().contains("as a user and as a group"),
            "{err}"
        );
    }

    /// An entry with these text and binary attributes (one value each).
    pub(super) fn entry_with(attrs: &[(&str, &str)], bin: &[(&str, &[u8])]) -> SearchEntry {
        SearchEntry {
            dn: "uid=jdoe,ou=people,dc=x".into(),
            attrs: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), vec![v.to_string()]))
                .collect(),
            bin_attrs: bin
                .iter()
                .map(|(k, v)| (k.to_string(), vec![v.to_vec()]))
                .collect(),
        }
    }

    #[test]
    fn values_that_are_not_utf8_are_named_on_the_user() {
        let now = DateTime::UNIX_EPOCH;
        let mut e = entry_with(
            &[("entryUUID", "u-1"), ("uid", "jdoe")],
            &[("Mail", b"j\xffdoe@x.org"), ("jpegPhoto", b"\xff\xd8")],
        );
        let (user, _) = user_entry(&mut e, Dialect::OpenLdap, now).unwrap();
        assert_eq!(user.invalid_utf8, vec!["jpegphoto", "mail"]);
        assert!(!user.attrs.contains_key("mail"));
        // AD's binary ids are text, not invalid values.
        let guid = [0x80u8; 16];
        let sid: &[u8] = &[1, 1, 0, 0, 0, 0, 0, 5, 18, 0, 0, 0x80];
        let mut e = entry_with(
            &[("userPrincipalName", "j@x.org")],
            &[
                ("objectGUID", &guid),
                ("objectSid", sid),
                ("thumbnailPhoto", b"\xff"),
            ],
        );
        let (user, _) = user_entry(&mut e, Dialect::ActiveDirectory, now).unwrap();
        assert_eq!(user.invalid_utf8, vec!["thumbnailphoto"]);
        assert!(user.attrs.contains_key("objectguid"));
    }

    /// A SearchResultEntry as it comes off the wire.
    fn result_entry(dn: &[u8], attrs: &[(&[u8], &[&[u8]])]) -> ResultEntry {
        use ldap3::asn1::{StructureTag, TagClass};
        let tag = |id, payload| StructureTag {
            class: TagClass::Universal,
            id,
            payload,
        };
        let attrs = attrs
            .iter()
            .map(|(name, values)| {
                let values = values.iter().map(|v| tag(4, PL::P(v.to_vec()))).collect();
                tag(
                    16,
                    PL::C(vec![tag(4, PL::P(name.to_vec())), tag(17, PL::C(values))]),
                )
            })
            .collect();
        ResultEntry::new(StructureTag {
            class: TagClass::Application,
            id: 4,
            payload: PL::C(vec![tag(4, PL::P(dn.to_vec())), tag(16, PL::C(attrs))]),
        })
    }

    #[test]
    fn entries_ldap3_would_panic_on_are_errors() {
        let ok = search_entry(result_entry(
            b"uid=a,dc=x",
            &[(b"mail", &[b"a@x", b"\xff"])],
        ))
        .unwrap();
        assert_eq!(ok.dn, "uid=a,dc=x");
        assert!(ok.bin_attrs.contains_key("mail"));
        let err = search_entry(result_entry(b"uid=\xffa,dc=x", &[])).unwrap_err();
        assert!(err.contains("DN") && err.contains("UTF-8"), "{err}");
        let err = search_entry(result_entry(b"uid=a,dc=x", &[(b"m\xffil", &[b"x"])])).unwrap_err();
        assert!(
            err.contains("uid=a,dc=x") && err.contains("attribute description"),
            "{err}"
        );
        let mut no_attrs = result_entry(b"uid=a,dc=x", &[]);
        if let PL::C(parts) = &mut no_attrs.0.payload {
            parts.pop();
        }
        assert!(search_entry(no_attrs).is_err());
    }

    #[test]
    fn a_group_whose_members_are_not_utf8_stops_the_read() {
        let e = SearchEntry {
            dn: "cn=eng,ou=groups,dc=x".into(),
            attrs: [("entryUUID".to_string(), vec!["g-1".to_string()])].into(),
            bin_attrs: [("member".to_string(), vec![b"uid=\xff".to_vec()])].into(),
        };
        let err = group_entry(e, Dialect::OpenLdap).unwrap_err().to_string();
        assert!(
            err.contains("cn=eng,ou=groups,dc=x") && err.contains("member"),
            "{err}"
        );
    }

    #[test]
    fn guid_bytes_format_canonically() {
        let bytes = [
            0x33, 0x22, 0x11, 0x00, 0x55, 0x44, 0x77, 0x66, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
            0xee, 0xff,
        ];
        assert_eq!(
            guid_to_string(&bytes).unwrap(),
            "00112233-4455-6677-8899-aabbccddeeff"
        );
        assert!(guid_to_string(&bytes[..15]).is_none());
    }
}
