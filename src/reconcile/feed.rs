//! How a pass learns the directory when a change feed is configured: a delta from the
//! mirror's cookies when the mirror is there and of the same view, else a full read that
//! rebuilds the mirror. Any doubt (no mirror, other settings, a lost snapshot, a refresh the
//! server refuses, `--full`, the full schedule) is a full read, with every guard of one, and
//! its reason is said in the log, the metrics and `status`.

use chrono::{DateTime, Utc};
use sha2::Digest;
use tracing::{info, warn};

use crate::config::{ChangeFeed, Dialect, LdapConfig, TargetConfig};
use crate::mirror::{Cookies, Mirror, MirrorMeta, Rebuild};
use crate::model::Directory;
use crate::snapshot::{FeedProgress, FeedStatus, Snapshot, SnapshotError};
use crate::source::{self, Advertised, RefreshError, SourceError};

/// The feed a mirror was built with, from its cookies: `syncrepl`, `dirsync` or `usn`.
pub fn kind_of(cookies: &Cookies) -> &'static str {
    match cookies.users.as_deref() {
        Some(c) if c.starts_with("usn:") => "usn",
        Some(c) if c.starts_with("dirsync:") => "dirsync",
        _ => "syncrepl",
    }
}

/// The feed these settings ask for (before the server is asked).
pub fn kind_for(cfg: &LdapConfig) -> &'static str {
    match (cfg.dialect, cfg.change_feed) {
        (Dialect::OpenLdap, _) => "syncrepl",
        (Dialect::ActiveDirectory, ChangeFeed::Usn) => "usn",
        (Dialect::ActiveDirectory, _) => "dirsync",
    }
}

/// Whether a mirror built with feed `kind` serves these settings (with `auto` or
/// `"dirsync"`, a DC that refused DirSync is followed by its uSNChanged watermark).
fn serves(cfg: &LdapConfig, kind: &str) -> bool {
    match (cfg.dialect, cfg.change_feed) {
        (Dialect::OpenLdap, _) => kind == "syncrepl",
        (Dialect::ActiveDirectory, ChangeFeed::Usn) => kind == "usn",
        (Dialect::ActiveDirectory, _) => kind == "dirsync" || kind == "usn",
    }
}

/// What the pass reads the directory from.
pub enum Way {
    /// No feed: the classic full read, nothing kept.
    Classic,
    /// A full read; with `Some`, a new mirror generation captures it, with the cookies
    /// taken before it.
    Full {
        why: String,
        /// Set when a delta was tried and the feed could not go on (metrics count these).
        fallback: Option<&'static str>,
        capture: Option<(Rebuild, Cookies)>,
    },
    /// What the mirror holds after this delta (the mirror is advanced already, unless in a
    /// dry run).
    Delta {
        directory: Directory,
        changed: usize,
        seq: u64,
        cookies: Cookies,
        /// Set for a fast delta (see [`Narrow`]).
        narrow: Option<Narrow>,
    },
    /// Nothing changed and every target applied everything: no target needs a plan.
    Quiet {
        users: usize,
        groups: usize,
        seq: u64,
        cookies: Cookies,
    },
}

/// A fast delta: only attributes of existing users changed (no DN, no disabled state, no
/// group, no entry added or removed), and every target had applied everything before. The
/// delta's directory holds just those users, each target plans them alone, and nothing else
/// can have changed for any target.
pub struct Narrow {
    pub users: std::collections::BTreeSet<crate::model::DirectoryId>,
    /// The mirror's counts (the directory holds only the users touched).
    pub counts: (usize, usize),
}

/// A digest of everything the mirror's content depends on.
pub fn basis(cfg: &LdapConfig, wanted: &[String]) -> String {
    let mut h = sha2::Sha256::new();
    let mut add = |s: &str| {
        h.update(s.as_bytes());
        h.update([0]);
    };
    add(env!("CARGO_PKG_VERSION"));
    add(match cfg.dialect {
        Dialect::OpenLdap => "openldap",
        Dialect::ActiveDirectory => "active-directory",
    });
    for u in &cfg.urls {
        add(u.as_str());
    }
    add(&cfg.users.base);
    add(&cfg.users.filter);
    add(cfg.users.disabled_filter.as_deref().unwrap_or("-"));
    if let Some(g) = &cfg.groups {
        add(&g.base);
        add(&g.filter);
        add(if g.nested { "nested" } else { "flat" });
    }
    for w in wanted {
        add(w);
    }
    format!("{:x}", h.finalize())
}

/// A digest of one target's settings as the mirror's consumer: its file, and the version.
pub fn target_settings(target: &TargetConfig) -> String {
    let mut h = sha2::Sha256::new();
    h.update(env!("CARGO_PKG_VERSION").as_bytes());
    h.update(std::fs::read(&target.file).unwrap_or_default());
    format!("{:x}", h.finalize())
}

/// Whether the feed is to be used at all, as configured (`auto` is decided by the server).
pub fn configured(cfg: &LdapConfig) -> bool {
    match cfg.dialect {
        Dialect::OpenLdap => matches!(cfg.change_feed, ChangeFeed::Auto | ChangeFeed::Syncrepl),
        Dialect::ActiveDirectory => matches!(
            cfg.change_feed,
            ChangeFeed::Auto | ChangeFeed::DirSync | ChangeFeed::Usn
        ),
    }
}

/// Options the caller decides.
pub struct Ask<'a> {
    pub cfg: &'a LdapConfig,
    pub wanted: &'a [String],
    pub full: Option<&'a str>,
    pub dry_run: bool,
    pub now: DateTime<Utc>,
    pub targets: &'a [&'a TargetConfig],
}

/// Decides how to read, and for a delta, reads it.
pub async fn decide(ask: &Ask<'_>, snapshot: Option<&Snapshot>) -> Result<Way, SourceError> {
    let mirror = snapshot.map(Mirror::of);
    let basis = basis(ask.cfg, ask.wanted);
    let meta = match (&mirror, snapshot.and_then(Snapshot::lost)) {
        (Some(m), None) => m.meta().unwrap_or_else(|e| {
            warn!(error = %e, "the directory's mirror cannot be read; reading the whole directory");
            None
        }),
        _ => None,
    };
    let why_full = match (&meta, ask.full) {
        (_, Some(why)) => Some(why.to_string()),
        (None, None) if snapshot.is_some_and(|s| s.lost().is_some()) => {
            Some("the snapshot was lost, and the directory's mirror with it".into())
        }
        (None, None) => Some("there is no mirror of the directory yet".into()),
        (Some(m), None) if m.basis != basis || !serves(ask.cfg, &m.kind) => Some(
            "the LDAP settings or the mapped attributes changed since the mirror was built".into(),
        ),
        (Some(m), None) if m.cookies.users.is_none() => Some("the mirror has no cookie".into()),
        // AD forgets tombstones after its tombstone lifetime (180 days by default, 60 in old
        // forests): a feed that old could miss deletes.
        (Some(m), None)
            if ask.cfg.dialect == Dialect::ActiveDirectory
                && m.last_full
                    .is_some_and(|t| ask.now - t > chrono::Duration::days(30)) =>
        {
            Some("the last full read of Active Directory is more than 30 days old".into())
        }
        _ => None,
    };
    let meta = match (why_full, meta) {
        (None, Some(meta)) => meta,
        (why, _) => return full(ask, mirror, why.unwrap_or_default(), snapshot).await,
    };
    let mirror = mirror.expect("a mirror's meta comes from a mirror");
    let read_started = std::time::Instant::now();
    let (delta, cookies) = match source::read_delta(
        ask.cfg,
        Some(ask.wanted),
        &meta.cookies,
        &meta.vendor,
        ask.now,
    )
    .await
    {
        Ok(read) => read,
        Err(RefreshError::Required(why)) => {
            warn!(reason = %why, "the change feed cannot continue; reading the whole directory");
            if !ask.dry_run {
                let _ = mirror.forget();
                let _ = snapshot.map(|s| s.set_feed_fallback(&why, ask.now));
            }
            return fall_back(ask, mirror, why, snapshot, "refresh-required").await;
        }
        Err(RefreshError::Failed(e)) => return Err(e),
    };
    let snapshot = snapshot.expect("a mirror comes from a snapshot");
    tracing::debug!(
        elapsed_ms = read_started.elapsed().as_millis() as u64,
        "change feed read"
    );
    let mut delta = delta;
    prune_present(&mirror, &meta, &mut delta)?;
    let present_phase = delta.users.present.is_some()
        || delta.disabled.present.is_some()
        || delta.groups.present.is_some();
    let caught_up = || {
        ask.targets.iter().all(|t| {
            snapshot
                .feed_progress(&t.name.0)
                .ok()
                .flatten()
                .is_some_and(|p: FeedProgress| p.covers(meta.seq, &target_settings(t), ask.now))
        })
    };
    // An AD account whose accountExpires passed is inactive now, though nothing changed: the
    // whole mirror is planned again (as a full read would see it).
    let expiring = meta.expires.is_some_and(|t| t <= ask.now);
    if delta.names_nothing() && caught_up() && !expiring {
        advance(ask, &mirror, &meta, cookies.clone(), None)?;
        return Ok(Way::Quiet {
            users: meta.users,
            groups: meta.groups,
            seq: meta.seq,
            cookies,
        });
    }
    let fast_eligible = delta.groups.changed.is_empty()
        && delta.groups.present.is_none()
        && delta.users.present.is_none()
        && none_held(&mirror, crate::mirror::Kind::Groups, &delta.groups.deleted)?
        && none_held(&mirror, crate::mirror::Kind::Users, &delta.users.deleted)?
        && delta.disabled.present.is_none()
        && ask.targets.iter().all(|t| t.scope_groups.is_empty())
        // A manager is resolved by DN among every user: the whole mirror is needed.
        && ask.targets.iter().all(|t| !t.maps_manager())
        && disabled_unchanged(&mirror, &delta)?
        && !expiring
        && caught_up();
    if fast_eligible {
        if let Some(way) = fast(ask, &mirror, &meta, &delta, cookies.clone())? {
            info!(
                changed = delta.users.changed.len(),
                read_ms = read_started.elapsed().as_millis() as u64,
                "directory read from the change feed: only attributes of existing users changed"
            );
            return Ok(way);
        }
    }
    let read_ms = read_started.elapsed().as_millis() as u64;
    let load_started = std::time::Instant::now();
    let loading = tokio::task::spawn_blocking(move || mirror.load().map(|copy| (mirror, copy)));
    let (mirror, mut copy) = match loading.await {
        Ok(Ok(loaded)) => loaded,
        Ok(Err(e)) => return Err(storage(e)),
        Err(e) => {
            return Err(storage(SnapshotError::Storage {
                path: snapshot.path().to_path_buf(),
                source: e.to_string().into(),
            }))
        }
    };
    let learned = copy.resolve(&mut delta);
    if let Some(doubt) = doubt(ask, &copy, &mut delta).await? {
        warn!(reason = %doubt, "the change feed and the directory disagree; reading the whole directory");
        if !ask.dry_run {
            let _ = snapshot.set_feed_fallback(&doubt, ask.now);
        }
        return fall_back(ask, mirror, doubt, Some(snapshot), "disagreement").await;
    }
    referring_groups(ask, &copy, &mut delta).await?;
    let writes = copy
        .apply(delta)
        .map_err(|e| {
            storage(SnapshotError::Encode {
                path: snapshot.path().to_path_buf(),
                source: e,
            })
        })?
        .and_learned(learned);
    let changed = writes.changed;
    let (users, groups) = (copy.users.len(), copy.groups.len());
    let load_ms = load_started.elapsed().as_millis() as u64;
    tracing::debug!(load_ms, rss_mib = crate::memory::rss_mib(), "mirror loaded");
    let assemble_started = std::time::Instant::now();
    let expires = source::next_expiry(ask.cfg, copy.users.values().map(|u| &u.attrs), ask.now);
    let directory = source::assemble(ask.cfg, copy, ask.now)?;
    let assemble_ms = assemble_started.elapsed().as_millis() as u64;
    let seq = if changed > 0 { meta.seq + 1 } else { meta.seq };
    advance(
        ask,
        &mirror,
        &MirrorMeta {
            seq,
            users,
            groups,
            expires,
            ..meta.clone()
        },
        cookies.clone(),
        Some(writes),
    )?;
    info!(
        changed,
        users,
        groups,
        present_phase,
        read_ms,
        load_ms,
        assemble_ms,
        rss_mib = crate::memory::rss_mib(),
        "directory read from the change feed"
    );
    if changed == 0 && caught_up() && !expiring {
        return Ok(Way::Quiet {
            users,
            groups,
            seq,
            cookies,
        });
    }
    Ok(Way::Delta {
        directory,
        changed,
        seq,
        cookies,
        narrow: None,
    })
}

/// What the feed says is gone, or has a new DN, is checked against the directory before it
/// is believed: an entry the feed deletes must be out of scope, an entry it renames must be
/// the only one with its id. Otherwise (a second entry with an existing entry's id, as a
/// restore or an import leaves it) the feed is in doubt, and a full read decides, with its
/// duplicate-id check. Says why, or `None`.
async fn doubt(
    ask: &Ask<'_>,
    copy: &crate::mirror::MirrorCopy,
    delta: &mut crate::mirror::Delta,
) -> Result<Option<String>, SourceError> {
    use crate::model::dn::normalize_lossy;
    use crate::model::DirectoryId;
    use std::collections::{BTreeMap, HashSet};
    type Ids = Vec<DirectoryId>;
    /// The ids to check, and among them those a new id took the DN of.
    fn suspects<T>(
        held: &BTreeMap<DirectoryId, T>,
        changes: &crate::mirror::Changes<T>,
        dn_of: impl Fn(&T) -> &str,
    ) -> Result<(Ids, Ids), String> {
        let mut out: Vec<_> = changes
            .deleted
            .iter()
            .filter(|id| held.contains_key(*id))
            .cloned()
            .collect();
        if let Some(present) = &changes.present {
            out.extend(held.keys().filter(|id| !present.contains(*id)).cloned());
        }
        let mut seen: BTreeMap<&crate::model::DirectoryId, String> = BTreeMap::new();
        for (id, value) in &changes.changed {
            let dn = normalize_lossy(dn_of(value));
            if let Some(other) = seen.insert(id, dn.clone()) {
                if other != dn {
                    return Err(format!(
                        "the change feed sent two entries with id {id} ({other}, {dn})"
                    ));
                }
            }
            if held
                .get(id)
                .is_some_and(|h| normalize_lossy(dn_of(h)) != dn)
            {
                out.push(id.clone());
            }
        }
        // A new id at a DN the mirror holds under another id: that entry was replaced (made
        // again, or its id rewritten in place), and is gone once the directory says so.
        let new_dns: HashSet<String> = changes
            .changed
            .iter()
            .filter(|(id, _)| !held.contains_key(id))
            .map(|(_, v)| normalize_lossy(dn_of(v)))
            .collect();
        let mut displaced = Vec::new();
        if !new_dns.is_empty() {
            let touched: HashSet<&DirectoryId> = changes
                .changed
                .iter()
                .map(|(id, _)| id)
                .chain(&changes.deleted)
                .collect();
            for (id, h) in held {
                if !touched.contains(id) && new_dns.contains(&normalize_lossy(dn_of(h))) {
                    displaced.push(id.clone());
                    out.push(id.clone());
                }
            }
        }
        out.sort();
        out.dedup();
        Ok((out, displaced))
    }
    let (users, displaced_users) = match suspects(&copy.users, &delta.users, |u| &u.dn) {
        Ok(s) => s,
        Err(why) => return Ok(Some(why)),
    };
    let (groups, displaced_groups) = match suspects(&copy.groups, &delta.groups, |g| &g.dn) {
        Ok(s) => s,
        Err(why) => return Ok(Some(why)),
    };
    if users.is_empty() && groups.is_empty() {
        return Ok(None);
    }
    let found = source::entries_with_ids(ask.cfg, &users, &groups).await?;
    let changed_dn = |id: &crate::model::DirectoryId| delta.changed_dn(id).map(str::to_string);
    for id in users.iter().chain(&groups) {
        let now: Vec<&String> = found
            .get(id)
            .map(|v| v.iter().collect())
            .unwrap_or_default();
        let expected = changed_dn(id);
        let agrees = match &expected {
            // Renamed: only the new DN holds the id.
            Some(new) => now.len() == 1 && normalize_lossy(now[0]) == normalize_lossy(new),
            // Gone: nothing in scope holds it.
            None => now.is_empty(),
        };
        if !agrees {
            let dns: Vec<&str> = now.iter().map(|s| s.as_str()).collect();
            return Ok(Some(format!(
                "the change feed says entry {id} {}, but the directory has it at {}",
                match &expected {
                    Some(new) => format!("moved to {new}"),
                    None => "is gone".to_string(),
                },
                if dns.is_empty() {
                    "no DN".to_string()
                } else {
                    dns.join(" and ")
                }
            )));
        }
    }
    // Verified gone: what the feed left out is a delete, as a full read sees it.
    delta.users.deleted.extend(displaced_users);
    delta.groups.deleted.extend(displaced_groups);
    Ok(None)
}

/// Groups that name a renamed, moved or deleted entry as a member are read again: a server's
/// referential integrity (OpenLDAP refint) rewrites their member values as an internal
/// operation that its feed does not always send, and a group left naming the old DN would
/// lose the member in a delta but not in a full read.
async fn referring_groups(
    ask: &Ask<'_>,
    copy: &crate::mirror::MirrorCopy,
    delta: &mut crate::mirror::Delta,
) -> Result<(), SourceError> {
    use crate::model::dn::normalize_lossy;
    use std::collections::BTreeSet;
    let mut old_dns: BTreeSet<String> = BTreeSet::new();
    let new_dn = |id: &crate::model::DirectoryId| delta.changed_dn(id).map(normalize_lossy);
    let held = copy
        .users
        .iter()
        .map(|(id, u)| (id, &u.dn))
        .chain(copy.groups.iter().map(|(id, g)| (id, &g.dn)));
    for (id, dn) in held {
        let old = normalize_lossy(dn);
        let gone = delta.users.deleted.contains(id)
            || delta.groups.deleted.contains(id)
            || delta
                .users
                .present
                .as_ref()
                .is_some_and(|p| !p.contains(id))
                && copy.users.contains_key(id)
            || delta
                .groups
                .present
                .as_ref()
                .is_some_and(|p| !p.contains(id))
                && copy.groups.contains_key(id);
        match new_dn(id) {
            Some(new) if new != old => {
                old_dns.insert(old);
            }
            None if gone => {
                old_dns.insert(old);
            }
            _ => {}
        }
    }
    // Entries new to the mirror may have come into scope as members already (moved in from
    // another part of the tree): their groups are read as they are now.
    let arrived: Vec<String> = delta
        .users
        .changed
        .iter()
        .filter(|(id, _)| !copy.users.contains_key(id))
        .map(|(_, u)| u.dn.clone())
        .chain(
            delta
                .groups
                .changed
                .iter()
                .filter(|(id, _)| !copy.groups.contains_key(id))
                .map(|(_, g)| g.dn.clone()),
        )
        .collect();
    if !arrived.is_empty() {
        let named: BTreeSet<crate::model::DirectoryId> = delta
            .groups
            .changed
            .iter()
            .map(|(id, _)| id.clone())
            .collect();
        let read = source::groups_naming(ask.cfg, Some(ask.wanted), &arrived).await?;
        delta
            .groups
            .changed
            .extend(read.into_iter().filter(|(id, _)| !named.contains(id)));
    }
    if old_dns.is_empty() {
        return Ok(());
    }
    let already: BTreeSet<&crate::model::DirectoryId> =
        delta.groups.changed.iter().map(|(id, _)| id).collect();
    let again: Vec<crate::model::DirectoryId> = copy
        .groups
        .iter()
        .filter(|(id, _)| !already.contains(id) && !delta.groups.deleted.contains(*id))
        .filter(|(_, g)| {
            g.attrs
                .get("member")
                .into_iter()
                .flatten()
                .any(|m| old_dns.contains(&normalize_lossy(m)))
        })
        .map(|(id, _)| id.clone())
        .collect();
    if again.is_empty() {
        return Ok(());
    }
    let read = source::read_groups(ask.cfg, Some(ask.wanted), &again).await?;
    delta.groups.changed.extend(read);
    Ok(())
}

/// A present phase that names every entry the mirror holds deletes nothing: dropped, so the
/// delta can still be quiet or fast (Active Directory without the replication right lists
/// the ids in scope every cycle).
fn prune_present(
    mirror: &Mirror,
    meta: &MirrorMeta,
    delta: &mut crate::mirror::Delta,
) -> Result<(), SourceError> {
    use crate::mirror::Kind;
    for (kind, present, count) in [
        (Kind::Users, &mut delta.users.present, meta.users),
        (Kind::Groups, &mut delta.groups.present, meta.groups),
    ] {
        let Some(ids) = present else { continue };
        let mut held = 0usize;
        for sync in ids.iter() {
            let id = mirror.own_id(sync).map_err(storage)?;
            if mirror.holds(kind, &id).map_err(storage)? {
                held += 1;
            }
        }
        if held == count {
            *present = None;
        }
    }
    Ok(())
}

/// Whether none of these feed ids names an entry the mirror holds as `kind`: syncprov names
/// every modified entry outside a search's filter as deleted from it (a user modified is
/// "deleted" from the groups search), which for an entry never in it is no change.
fn none_held(
    mirror: &Mirror,
    kind: crate::mirror::Kind,
    deleted: &std::collections::BTreeSet<crate::model::DirectoryId>,
) -> Result<bool, SourceError> {
    for sync in deleted {
        let id = mirror.own_id(sync).map_err(storage)?;
        if mirror.holds(kind, &id).map_err(storage)? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Whether the disabled-users refresh changes nobody's state: syncprov names a modified
/// entry outside the disabled filter as deleted from it (it cannot tell whether it was in
/// before), which for an entry the mirror holds as enabled is no change.
fn disabled_unchanged(mirror: &Mirror, delta: &crate::mirror::Delta) -> Result<bool, SourceError> {
    for (id, ()) in &delta.disabled.changed {
        if !mirror.is_disabled(id).map_err(storage)? {
            return Ok(false);
        }
    }
    for sync in &delta.disabled.deleted {
        let id = mirror.own_id(sync).map_err(storage)?;
        if mirror.is_disabled(&id).map_err(storage)? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The fast path ([`Narrow`]), if it applies: every changed user is one the mirror holds
/// under the same DN (a DN change or a new entry goes through the whole mirror). Reads only
/// those entries from the mirror.
fn fast(
    ask: &Ask<'_>,
    mirror: &Mirror,
    meta: &MirrorMeta,
    delta: &crate::mirror::Delta,
    cookies: Cookies,
) -> Result<Option<Way>, SourceError> {
    use crate::mirror::{Changes, Delta, MirrorCopy};
    use crate::model::dn::normalize_lossy;
    use crate::model::DirectoryUser;
    let mut before = MirrorCopy::default();
    for (id, new) in &delta.users.changed {
        let Some(old) = mirror.user(id).map_err(storage)? else {
            return Ok(None);
        };
        if normalize_lossy(&old.dn) != normalize_lossy(&new.dn) {
            return Ok(None);
        }
        if mirror.is_disabled(id).map_err(storage)? {
            before.disabled.insert(id.clone());
        }
        before.users.insert(id.clone(), old);
    }
    // The feed's ids of these entries are known already (same entries, same DNs), or
    // identical to their own.
    let mut copy = before;
    let writes = copy
        .apply(Delta {
            users: Changes {
                changed: delta.users.changed.clone(),
                ..Changes::default()
            },
            ..Delta::default()
        })
        .map_err(|e| {
            storage(SnapshotError::Encode {
                path: std::path::PathBuf::new(),
                source: e,
            })
        })?;
    let changed = writes.changed;
    let seq = if changed > 0 { meta.seq + 1 } else { meta.seq };
    let affected: std::collections::BTreeSet<_> = copy.users.keys().cloned().collect();
    let expires = meta
        .expires
        .into_iter()
        .chain(source::next_expiry(
            ask.cfg,
            copy.users.values().map(|u| &u.attrs),
            ask.now,
        ))
        .min();
    let users = copy
        .users
        .into_iter()
        .map(|(id, u)| DirectoryUser {
            disabled: copy.disabled.contains(&id) || source::inactive(ask.cfg, &u.attrs, ask.now),
            id,
            dn: u.dn,
            attrs: u.attrs,
            invalid_utf8: u.invalid_utf8,
        })
        .collect();
    advance(
        ask,
        mirror,
        &MirrorMeta {
            seq,
            expires,
            ..meta.clone()
        },
        cookies.clone(),
        Some(writes),
    )?;
    if changed == 0 {
        return Ok(Some(Way::Quiet {
            users: meta.users,
            groups: meta.groups,
            seq,
            cookies,
        }));
    }
    Ok(Some(Way::Delta {
        directory: Directory {
            users,
            groups: Vec::new(),
        },
        changed,
        seq,
        cookies,
        narrow: Some(Narrow {
            users: affected,
            counts: (meta.users, meta.groups),
        }),
    }))
}

/// Stores the delta and the new cookies (never in a dry run).
fn advance(
    ask: &Ask<'_>,
    mirror: &Mirror,
    meta: &MirrorMeta,
    cookies: Cookies,
    writes: Option<crate::mirror::Writes>,
) -> Result<(), SourceError> {
    if ask.dry_run {
        return Ok(());
    }
    let next = MirrorMeta {
        cookies,
        cookie_at: Some(ask.now),
        ..meta.clone()
    };
    mirror
        .commit_delta(writes.unwrap_or_default(), &next)
        .map_err(storage)
}

fn storage(e: SnapshotError) -> SourceError {
    SourceError::Incomplete {
        base: "(the directory's mirror)".into(),
        reason: e.to_string(),
        source: Some(Box::new(e)),
    }
}

/// A full read where a delta could not go on, counted under `reason`.
async fn fall_back(
    ask: &Ask<'_>,
    mirror: Mirror,
    why: String,
    snapshot: Option<&Snapshot>,
    reason: &'static str,
) -> Result<Way, SourceError> {
    match full(ask, Some(mirror), why, snapshot).await? {
        Way::Full { why, capture, .. } => Ok(Way::Full {
            why,
            fallback: Some(reason),
            capture,
        }),
        other => Ok(other),
    }
}

/// A full read: with the feed, the cookies are taken first and the read fills a new mirror.
async fn full(
    ask: &Ask<'_>,
    mirror: Option<Mirror>,
    why: String,
    snapshot: Option<&Snapshot>,
) -> Result<Way, SourceError> {
    if ask.cfg.change_feed == ChangeFeed::Auto {
        let wanted = match ask.cfg.dialect {
            Dialect::OpenLdap => Advertised::Syncrepl,
            Dialect::ActiveDirectory => Advertised::DirSync,
        };
        match source::advertised_feed(ask.cfg).await {
            Ok(found) if found == wanted => {}
            Ok(other) => {
                if let (Some(m), false) = (&mirror, ask.dry_run) {
                    let _ = m.forget();
                }
                let _ = other;
                return Ok(Way::Classic);
            }
            // The read that follows says what is wrong with the server.
            Err(_) => return Ok(Way::Classic),
        }
    }
    info!(reason = %why, "reading the whole directory");
    let (Some(mirror), false) = (mirror, ask.dry_run) else {
        return Ok(Way::Full {
            why,
            fallback: None,
            capture: None,
        });
    };
    let (cookies, pairs, vendor) = match source::feed_start(ask.cfg).await {
        Ok(c) => c,
        Err(RefreshError::Failed(e)) => return Err(e),
        Err(RefreshError::Required(r)) => {
            return Err(SourceError::Incomplete {
                base: ask.cfg.users.base.clone(),
                reason: format!("the change feed cannot start: {r}"),
                source: None,
            })
        }
    };
    let _ = snapshot;
    if cookies.users.is_none() {
        warn!(
            "the server gave no change feed cookie; the next cycle reads the whole directory again"
        );
        return Ok(Way::Full {
            why,
            fallback: None,
            capture: None,
        });
    }
    let mut rebuild = mirror.rebuild().map_err(storage)?;
    for (sync, id) in &pairs {
        rebuild.sync_id(sync, id);
    }
    rebuild.vendor = vendor;
    Ok(Way::Full {
        why,
        fallback: None,
        capture: Some((rebuild, cookies)),
    })
}

/// After a full read that filled `rebuild`: the new mirror becomes current.
pub fn finish_full(
    ask: &Ask<'_>,
    rebuild: Rebuild,
    cookies: Cookies,
    expires: Option<DateTime<Utc>>,
) -> Result<u64, SourceError> {
    // Never a number an earlier mirror had: a target's progress from before cannot match.
    let seq = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_micros() as u64);
    let meta = MirrorMeta {
        kind: kind_of(&cookies).into(),
        basis: basis(ask.cfg, ask.wanted),
        cookies,
        seq,
        users: rebuild.users,
        groups: rebuild.groups,
        last_full: Some(ask.now),
        cookie_at: Some(ask.now),
        vendor: rebuild.vendor.clone(),
        expires,
    };
    rebuild.finish(&meta).map_err(storage)?;
    Ok(seq)
}

/// What waits in the feed since the mirror's cookie, asked of the directory now (nothing is
/// stored): `None` without a mirror.
pub async fn waiting(
    cfg: &LdapConfig,
    wanted: &[String],
    snapshot: &Snapshot,
    now: DateTime<Utc>,
) -> Result<Option<String>, SourceError> {
    use crate::mirror::Kind;
    let mirror = Mirror::of(snapshot);
    let Some(meta) = mirror.meta().map_err(storage)? else {
        return Ok(None);
    };
    if !configured(cfg) || !serves(cfg, &meta.kind) || meta.cookies.users.is_none() {
        return Ok(None);
    }
    let delta = match source::read_delta(cfg, Some(wanted), &meta.cookies, &meta.vendor, now).await
    {
        Ok((delta, _)) => delta,
        Err(RefreshError::Required(why)) => {
            return Ok(Some(format!(
                "the next cycle reads the whole directory: {why}"
            )))
        }
        Err(RefreshError::Failed(e)) => return Err(e),
    };
    let held = |kind: Kind, ids: &std::collections::BTreeSet<crate::model::DirectoryId>| {
        let mut n = 0usize;
        for sync in ids {
            let id = mirror.own_id(sync).map_err(storage)?;
            if mirror.holds(kind, &id).map_err(storage)? {
                n += 1;
            }
        }
        Ok::<usize, SourceError>(n)
    };
    let users = delta.users.changed.len() + held(Kind::Users, &delta.users.deleted)?;
    let groups = delta.groups.changed.len() + held(Kind::Groups, &delta.groups.deleted)?;
    let present = delta.users.present.is_some() || delta.groups.present.is_some();
    Ok(Some(format!(
        "changes waiting: {users} users and {groups} groups named since the cookie{}",
        if present {
            " (and a list of every id in scope, which finds deletes)"
        } else {
            ""
        }
    )))
}

/// What `status` and `plan` say of the feed.
pub fn status(snapshot: &Snapshot) -> Option<FeedStatus> {
    let meta = Mirror::of(snapshot).meta().ok().flatten()?;
    Some(FeedStatus {
        kind: meta.kind,
        cookie_at: meta.cookie_at,
        last_full: meta.last_full,
        users: meta.users,
        groups: meta.groups,
        fallback: snapshot.feed_fallback().ok().flatten(),
    })
}
