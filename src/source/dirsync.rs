//! Active Directory's change feeds: DirSync (`1.2.840.113556.1.4.841`, MS-ADTS 3.1.1.3.4.1.3)
//! and, where DirSync is refused, a `uSNChanged` watermark of one DC (its `invocationId`
//! stored with it) with tombstones read through the show-deleted control.
//!
//! Both only say *which* objects changed (their objectGUID and DN, and whether they are
//! tombstones); the caller reads those objects again under the configured bases and filters,
//! as a full read reads them, so a delta and a full read see the same entries.

use ldap3::controls::RawControl;
use ldap3::{Ldap, Scope, SearchEntry};

use super::feed::{self, RefreshError};
use super::{ad, describe, result_name, search_entry, SourceError};
use crate::config::LdapConfig;
use crate::model::DirectoryId;

pub const DIRSYNC_OID: &str = "1.2.840.113556.1.4.841";
const SHOW_DELETED_OID: &str = "1.2.840.113556.1.4.417";
/// LDAP_DIRSYNC_OBJECT_SECURITY: what the account may read, without the replication right.
const OBJECT_SECURITY: u32 = 0x1;
/// LDAP_DIRSYNC_INCREMENTAL_VALUES: a member change comes as the values added and removed.
const INCREMENTAL_VALUES: u32 = 0x8000_0000;
/// What one DirSync answer may carry (the server pages on its own below this).
const MAX_BYTES: u32 = 1 << 20;
/// The objects a feed watches: users (and so computers, which a filter leaves out later),
/// groups, and the OUs and containers whose renames move the others. `objectClass` never
/// changes, and a tombstone keeps it.
const FILTER: &str =
    "(|(objectClass=user)(objectClass=group)(objectClass=organizationalUnit)(objectClass=container))";

/// How the feed reads Active Directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// DirSync; `object_security` without the replication right (only what the account may
    /// read is reported).
    DirSync { object_security: bool },
    /// The `uSNChanged` watermark of one DC.
    Usn,
}

impl Mode {
    pub fn describe(self) -> &'static str {
        match self {
            Mode::DirSync {
                object_security: false,
            } => "dirsync (with the replication right \"Replicating Directory Changes\")",
            Mode::DirSync {
                object_security: true,
            } => "dirsync in object-security mode (without the replication right: changes to what this account may read; deletes are found by listing the ids in scope every cycle)",
            Mode::Usn => "usn (a uSNChanged watermark of one domain controller; deletes are found by listing the ids in scope every cycle)",
        }
    }
}

/// Where an AD feed stands, as stored in the mirror's users cookie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cookie {
    DirSync {
        object_security: bool,
        cookie: Vec<u8>,
    },
    Usn {
        invocation_id: String,
        usn: u64,
    },
}

impl Cookie {
    pub fn mode(&self) -> Mode {
        match self {
            Cookie::DirSync {
                object_security, ..
            } => Mode::DirSync {
                object_security: *object_security,
            },
            Cookie::Usn { .. } => Mode::Usn,
        }
    }

    pub fn to_text(&self) -> String {
        use base64::Engine as _;
        match self {
            Cookie::DirSync {
                object_security,
                cookie,
            } => format!(
                "dirsync:{}:{}",
                if *object_security { "os" } else { "full" },
                base64::engine::general_purpose::STANDARD.encode(cookie)
            ),
            Cookie::Usn { invocation_id, usn } => format!("usn:{invocation_id}:{usn}"),
        }
    }

    pub fn parse(text: &str) -> Option<Cookie> {
        use base64::Engine as _;
        let mut parts = text.splitn(3, ':');
        match (parts.next()?, parts.next()?, parts.next()?) {
            ("dirsync", security, cookie) => Some(Cookie::DirSync {
                object_security: match security {
                    "os" => true,
                    "full" => false,
                    _ => return None,
                },
                cookie: base64::engine::general_purpose::STANDARD
                    .decode(cookie)
                    .ok()?,
            }),
            ("usn", invocation_id, usn) => Some(Cookie::Usn {
                invocation_id: invocation_id.to_string(),
                usn: usn.parse().ok()?,
            }),
            _ => None,
        }
    }
}

/// One object the feed says changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changed {
    pub id: DirectoryId,
    pub dn: String,
    /// A tombstone (`isDeleted`).
    pub deleted: bool,
    /// Its `member` values changed (or it is a group, where the feed cannot tell).
    pub members: bool,
}

/// The mode a feed starts in: `Usn` when asked for, else DirSync with the replication right,
/// else in object-security mode, else (DirSync refused) `Usn`, with why.
pub async fn probe(ldap: &mut Ldap, cfg: &LdapConfig, usn_only: bool) -> (Mode, Option<String>) {
    if usn_only {
        return (Mode::Usn, None);
    }
    let nc = match naming_context(ldap, cfg).await {
        Ok(nc) => nc,
        Err(e) => return (Mode::Usn, Some(e.to_string())),
    };
    let mut last = None;
    for object_security in [false, true] {
        let flags = INCREMENTAL_VALUES | if object_security { OBJECT_SECURITY } else { 0 };
        // Nothing matches: the answer is only whether DirSync is allowed.
        match dirsync_once(
            ldap,
            cfg,
            &nc,
            flags,
            &[],
            "(objectGUID=\\00)",
            &["objectGUID"],
        )
        .await
        {
            Ok(_) => return (Mode::DirSync { object_security }, None),
            Err(why) => last = Some(why.to_string()),
        }
    }
    (Mode::Usn, last)
}

/// A cookie for the directory as it is now.
pub async fn start(ldap: &mut Ldap, cfg: &LdapConfig, mode: Mode) -> Result<Cookie, RefreshError> {
    match mode {
        Mode::Usn => {
            let (invocation_id, usn) = usn_now(ldap, cfg).await?;
            Ok(Cookie::Usn { invocation_id, usn })
        }
        Mode::DirSync { object_security } => {
            let nc = naming_context(ldap, cfg).await?;
            let (_, cookie) =
                dirsync(ldap, cfg, &nc, object_security, &[], &["objectGUID"]).await?;
            Ok(Cookie::DirSync {
                object_security,
                cookie,
            })
        }
    }
}

/// What changed since `cookie`, and the cookie to go on from.
pub async fn changes(
    ldap: &mut Ldap,
    cfg: &LdapConfig,
    cookie: &Cookie,
) -> Result<(Vec<Changed>, Cookie), RefreshError> {
    match cookie {
        Cookie::DirSync {
            object_security,
            cookie,
        } => {
            let nc = naming_context(ldap, cfg).await?;
            let (changed, cookie) = dirsync(
                ldap,
                cfg,
                &nc,
                *object_security,
                cookie,
                &["*", "objectGUID", "isDeleted"],
            )
            .await?;
            Ok((
                changed,
                Cookie::DirSync {
                    object_security: *object_security,
                    cookie,
                },
            ))
        }
        Cookie::Usn { invocation_id, usn } => {
            let (now_id, now_usn) = usn_now(ldap, cfg).await?;
            if &now_id != invocation_id {
                return Err(RefreshError::Required(format!(
                    "the domain controller's invocationId is {now_id}, not {invocation_id} as when the watermark was taken (another DC, or one restored from a backup): its uSNChanged values are not comparable"
                )));
            }
            let changed = changed_since(ldap, cfg, *usn).await?;
            Ok((
                changed,
                Cookie::Usn {
                    invocation_id: now_id,
                    usn: now_usn.max(*usn),
                },
            ))
        }
    }
}

/// DirSync from `cookie` to the end (the server's `more` flag), with the objects it names.
async fn dirsync(
    ldap: &mut Ldap,
    cfg: &LdapConfig,
    nc: &str,
    object_security: bool,
    cookie: &[u8],
    attrs: &[&str],
) -> Result<(Vec<Changed>, Vec<u8>), RefreshError> {
    let flags = INCREMENTAL_VALUES | if object_security { OBJECT_SECURITY } else { 0 };
    let mut cookie = cookie.to_vec();
    let mut out = Vec::new();
    // A server that says "more" for ever is not followed for ever.
    for _ in 0..100_000 {
        let (entries, more, next) =
            match dirsync_once(ldap, cfg, nc, flags, &cookie, FILTER, attrs).await {
                Ok(answer) => answer,
                Err(Refused::Rejected(why)) => return Err(RefreshError::Required(why)),
                Err(Refused::Failed(e)) => return Err(RefreshError::Failed(e)),
            };
        for e in entries {
            out.push(changed(e, nc)?);
        }
        if !more {
            return Ok((out, next));
        }
        if next == cookie {
            return Err(RefreshError::Failed(SourceError::Incomplete {
                base: nc.to_string(),
                reason:
                    "the server said there are more DirSync answers, but its cookie did not move"
                        .into(),
                source: None,
            }));
        }
        cookie = next;
    }
    Err(RefreshError::Failed(SourceError::Incomplete {
        base: nc.to_string(),
        reason: "the DirSync answers never ended (the server kept saying there is more)".into(),
        source: None,
    }))
}

enum Refused {
    /// The server will not serve DirSync (or this cookie) to this account.
    Rejected(String),
    Failed(SourceError),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Rejected(why) => f.write_str(why),
            Refused::Failed(e) => write!(f, "{e}"),
        }
    }
}

/// One DirSync request: the entries, whether there is more, the next cookie.
async fn dirsync_once(
    ldap: &mut Ldap,
    cfg: &LdapConfig,
    nc: &str,
    flags: u32,
    cookie: &[u8],
    filter: &str,
    attrs: &[&str],
) -> Result<(Vec<SearchEntry>, bool, Vec<u8>), Refused> {
    let failed = |reason: String| {
        Refused::Failed(SourceError::Incomplete {
            base: nc.to_string(),
            reason,
            source: None,
        })
    };
    let control = RawControl {
        ctype: DIRSYNC_OID.to_string(),
        crit: true,
        val: Some(request_value(flags, MAX_BYTES, cookie)),
    };
    ldap.with_timeout(cfg.timeout);
    let result = ldap
        .with_controls(vec![control])
        .search(nc, Scope::Subtree, filter, attrs.to_vec())
        .await
        .map_err(|e| failed(format!("the DirSync search failed: {}", describe(&e))))?;
    let (entries, done) = (result.0, result.1);
    match done.rc {
        0 => {}
        // insufficientAccessRights, unwillingToPerform, unavailableCriticalExtension,
        // protocolError (a cookie it cannot read)
        rc @ (50 | 53 | 12 | 2) => {
            return Err(Refused::Rejected(format!(
                "the server refused DirSync: {} (LDAP result code {rc}){}",
                result_name(rc),
                if done.text.is_empty() {
                    String::new()
                } else {
                    format!(": {}", done.text.escape_debug())
                }
            )))
        }
        rc => {
            return Err(failed(format!(
                "the DirSync search ended with {} (LDAP result code {rc})",
                result_name(rc)
            )))
        }
    }
    let out = readable(entries).map_err(failed)?;
    let answer = done
        .ctrls
        .iter()
        .find(|c| c.1.ctype == DIRSYNC_OID)
        .and_then(|c| c.1.val.as_deref())
        .ok_or_else(|| failed("the DirSync answer carries no DirSync control".into()))?;
    let (more, next) = parse_response(answer)
        .map_err(|why| failed(format!("a malformed DirSync control: {why}")))?;
    Ok((out, more, next))
}

/// The entries of an answer (references and intermediate messages left out), or why one
/// cannot be read.
fn readable(entries: Vec<ldap3::ResultEntry>) -> Result<Vec<SearchEntry>, String> {
    entries
        .into_iter()
        .filter(|re| !re.is_ref() && !re.is_intermediate())
        .map(|re| {
            search_entry(re)
                .map_err(|why| format!("the server returned an entry that cannot be read ({why})"))
        })
        .collect()
}

/// One returned object as a change.
fn changed(mut e: SearchEntry, nc: &str) -> Result<Changed, RefreshError> {
    let Some(guid) = ad::object_guid(&e) else {
        return Err(RefreshError::Failed(SourceError::MissingId {
            dn: e.dn,
            attribute: "objectGUID",
        }));
    };
    let _ = nc;
    let deleted = e.attrs.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("isDeleted") && v.iter().any(|v| v.eq_ignore_ascii_case("TRUE"))
    }) || e.dn.contains("\\0ADEL:")
        || e.dn.contains("\nDEL:");
    let members = e
        .attrs
        .keys()
        .chain(e.bin_attrs.keys())
        .any(|k| k.to_ascii_lowercase().starts_with("member"))
        || e.attrs.iter().any(|(k, v)| {
            k.eq_ignore_ascii_case("objectClass")
                && v.iter().any(|c| c.eq_ignore_ascii_case("group"))
        });
    Ok(Changed {
        id: DirectoryId::new(&guid),
        dn: std::mem::take(&mut e.dn),
        deleted,
        members,
    })
}

/// The objects (tombstones included) whose `uSNChanged` is above `usn`.
async fn changed_since(
    ldap: &mut Ldap,
    cfg: &LdapConfig,
    usn: u64,
) -> Result<Vec<Changed>, RefreshError> {
    let nc = naming_context(ldap, cfg).await?;
    let filter = format!("(&{FILTER}(uSNChanged>={}))", usn.saturating_add(1));
    let failed = |reason: String| {
        RefreshError::Failed(SourceError::Incomplete {
            base: nc.clone(),
            reason,
            source: None,
        })
    };
    let show_deleted = RawControl {
        ctype: SHOW_DELETED_OID.to_string(),
        crit: true,
        val: None,
    };
    ldap.with_timeout(cfg.timeout);
    let result = ldap
        .with_controls(vec![show_deleted])
        .search(
            &nc,
            Scope::Subtree,
            &filter,
            vec!["objectGUID", "isDeleted", "objectClass"],
        )
        .await
        .map_err(|e| failed(format!("the uSNChanged search failed: {}", describe(&e))))?;
    let (entries, done) = (result.0, result.1);
    match done.rc {
        0 => {}
        // More changes than one search returns: a full read is the safe answer.
        4 | 11 => {
            return Err(RefreshError::Required(format!(
                "more objects changed than one search may return ({}, LDAP result code {})",
                result_name(done.rc),
                done.rc
            )))
        }
        rc => {
            return Err(failed(format!(
                "the uSNChanged search ended with {} (LDAP result code {rc})",
                result_name(rc)
            )))
        }
    }
    let mut out = Vec::new();
    for e in readable(entries).map_err(failed)? {
        out.push(changed(e, &nc)?);
    }
    Ok(out)
}

/// The DC's `invocationId` and `highestCommittedUSN`.
async fn usn_now(ldap: &mut Ldap, cfg: &LdapConfig) -> Result<(String, u64), SourceError> {
    let dse = root_dse(ldap, cfg, &["highestCommittedUSN", "dsServiceName"]).await?;
    let failed = |reason: String| SourceError::Incomplete {
        base: "(root DSE)".into(),
        reason,
        source: None,
    };
    let usn: u64 = first(&dse, "highestCommittedUSN")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| failed("the root DSE has no highestCommittedUSN".into()))?;
    let service = first(&dse, "dsServiceName")
        .ok_or_else(|| failed("the root DSE has no dsServiceName".into()))?
        .to_string();
    ldap.with_timeout(cfg.timeout);
    let found = ldap
        .search(
            &service,
            Scope::Base,
            "(objectClass=*)",
            vec!["invocationId"],
        )
        .await
        .map_err(|e| SourceError::search(&service, "(objectClass=*)", e))?;
    let (entries, done) = (found.0, found.1);
    if done.rc != 0 {
        return Err(failed(format!(
            "reading the invocationId of {service} failed with {} (LDAP result code {})",
            result_name(done.rc),
            done.rc
        )));
    }
    let id = entries
        .into_iter()
        .filter_map(|re| search_entry(re).ok())
        .find_map(|e| ad::raw_value(&e, "invocationId").and_then(super::guid_to_string))
        .ok_or_else(|| failed(format!("{service} has no invocationId")))?;
    Ok((id, usn))
}

/// Whether the object at `dn` is an OU or container rather than a user or group (gone
/// meanwhile: not one).
pub async fn is_container(
    ldap: &mut Ldap,
    cfg: &LdapConfig,
    dn: &str,
) -> Result<bool, SourceError> {
    let filter = "(|(objectClass=organizationalUnit)(objectClass=container))";
    ldap.with_timeout(cfg.timeout);
    let found = ldap
        .search(dn, Scope::Base, filter, vec!["1.1"])
        .await
        .map_err(|e| SourceError::search(dn, filter, e))?;
    let (entries, done) = (found.0, found.1);
    match done.rc {
        0 => Ok(entries.iter().any(|e| !e.is_ref() && !e.is_intermediate())),
        32 => Ok(false),
        rc => Err(SourceError::Incomplete {
            base: dn.to_string(),
            reason: format!(
                "reading a changed object again failed with {} (LDAP result code {rc})",
                result_name(rc)
            ),
            source: None,
        }),
    }
}

pub async fn naming_context(ldap: &mut Ldap, cfg: &LdapConfig) -> Result<String, SourceError> {
    let dse = root_dse(ldap, cfg, &["defaultNamingContext"]).await?;
    first(&dse, "defaultNamingContext")
        .map(str::to_string)
        .ok_or_else(|| SourceError::Incomplete {
            base: "(root DSE)".into(),
            reason: "the root DSE has no defaultNamingContext".into(),
            source: None,
        })
}

async fn root_dse(
    ldap: &mut Ldap,
    cfg: &LdapConfig,
    attrs: &[&str],
) -> Result<SearchEntry, SourceError> {
    ldap.with_timeout(cfg.timeout);
    let (entries, _) = ldap
        .search("", Scope::Base, "(objectClass=*)", attrs.to_vec())
        .await
        .and_then(|r| r.success())
        .map_err(|e| SourceError::search("(root DSE)", "(objectClass=*)", e))?;
    entries
        .into_iter()
        .find_map(|re| search_entry(re).ok())
        .ok_or_else(|| SourceError::Incomplete {
            base: "(root DSE)".into(),
            reason: "the server returned no root DSE".into(),
            source: None,
        })
}

fn first<'a>(e: &'a SearchEntry, attr: &str) -> Option<&'a str> {
    e.attrs
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(attr))
        .and_then(|(_, v)| v.first())
        .map(String::as_str)
}

/// `SEQUENCE { flags INTEGER, maxBytes INTEGER, cookie OCTET STRING }`. The flags are sent
/// as the four bytes of a 32-bit value, as AD reads them (INCREMENTAL_VALUES is its top bit).
fn request_value(flags: u32, max_bytes: u32, cookie: &[u8]) -> Vec<u8> {
    let mut body = tlv(0x02, &flags.to_be_bytes());
    body.extend(tlv(0x02, &positive_integer(max_bytes)));
    body.extend(tlv(0x04, cookie));
    tlv(0x30, &body)
}

fn positive_integer(v: u32) -> Vec<u8> {
    let mut b = v.to_be_bytes().to_vec();
    while b.len() > 1 && b[0] == 0 && b[1] & 0x80 == 0 {
        b.remove(0);
    }
    if b[0] & 0x80 != 0 {
        b.insert(0, 0);
    }
    b
}

fn tlv(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let n = body.len();
    if n < 0x80 {
        out.push(n as u8);
    } else {
        let len: Vec<u8> = n
            .to_be_bytes()
            .iter()
            .copied()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | len.len() as u8);
        out.extend(len);
    }
    out.extend_from_slice(body);
    out
}

/// `SEQUENCE { moreResults INTEGER, unused INTEGER, cookie OCTET STRING }`.
fn parse_response(val: &[u8]) -> Result<(bool, Vec<u8>), String> {
    let mut it = feed::parts(feed::tag(val)?)?.into_iter();
    let more = it.next().ok_or("no moreResults")?;
    let more = feed::bytes(more)?;
    let _unused = it.next().ok_or("no second integer")?;
    let cookie = feed::bytes(it.next().ok_or("no cookie")?)?;
    Ok((more.iter().any(|b| *b != 0), cookie))
}

/// The bytes of a GUID in its canonical text form (first three fields little-endian), each
/// escaped for a filter (`\xx`); `None` for anything else.
pub fn guid_filter_value(text: &str) -> Option<String> {
    let hex: String = text.chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) || text.len() != 36 {
        return None;
    }
    let b: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16))
        .collect::<Result<_, _>>()
        .ok()?;
    let order = [3, 2, 1, 0, 5, 4, 7, 6, 8, 9, 10, 11, 12, 13, 14, 15];
    Some(order.iter().map(|&i| format!("\\{:02x}", b[i])).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_value_is_the_ber_ad_reads() {
        // As scripts in the field build it: flags 0x80000001, maxBytes 1 MiB, empty cookie.
        let v = request_value(0x8000_0001, 1 << 20, &[]);
        assert_eq!(
            v,
            vec![
                0x30, 0x0d, 0x02, 0x04, 0x80, 0x00, 0x00, 0x01, 0x02, 0x03, 0x10, 0x00, 0x00, 0x04,
                0x00
            ]
        );
        let long = request_value(0, 127, &[7u8; 300]);
        assert_eq!(&long[..4], &[0x30, 0x82, 0x01, 0x39]);
    }

    #[test]
    fn responses_parse_and_malformed_ones_are_errors() {
        let ok = tlv(
            0x30,
            &[tlv(0x02, &[1]), tlv(0x02, &[0]), tlv(0x04, b"abc")].concat(),
        );
        assert_eq!(parse_response(&ok).unwrap(), (true, b"abc".to_vec()));
        for bad in [
            &b""[..],
            &[0x30, 0x05, 0x02][..],
            &tlv(0x30, &tlv(0x02, &[0]))[..],
        ] {
            assert!(parse_response(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cookies_round_trip_as_text() {
        for c in [
            Cookie::DirSync {
                object_security: true,
                cookie: vec![0, 1, 2, 255],
            },
            Cookie::Usn {
                invocation_id: "0b1d3f1e-7c3a-4d8e-9f00-112233445566".into(),
                usn: 4711,
            },
        ] {
            assert_eq!(Cookie::parse(&c.to_text()), Some(c));
        }
        assert_eq!(Cookie::parse("dirsync:maybe:AA=="), None);
        assert_eq!(Cookie::parse("usn:x:notanumber"), None);
        assert_eq!(Cookie::parse("AAAA"), None);
    }

    #[test]
    fn guid_text_becomes_the_escaped_bytes() {
        let bytes: Vec<u8> = (1..=16).collect();
        let text = super::super::guid_to_string(&bytes).unwrap();
        let want: String = bytes.iter().map(|b| format!("\\{b:02x}")).collect();
        assert_eq!(guid_filter_value(&text).as_deref(), Some(want.as_str()));
        assert_eq!(guid_filter_value("not-a-guid"), None);
        assert_eq!(guid_filter_value("*)(objectClass=*"), None);
    }
}
