//! RFC 4533 content synchronisation (OpenLDAP's syncprov, 389-DS's Content Synchronization
//! plugin): one `refreshOnly` search from a stored cookie, and what it says changed.
//!
//! The sync request control is sent critical, so a server without it fails the search
//! (unavailableCriticalExtension) instead of answering it as a plain search, which would look
//! like a directory where nothing changed. The sync messages are parsed here, from the raw
//! controls and intermediate responses, without a panic on a malformed one: a message that
//! cannot be read is an incomplete read, and nothing of it is used.

use std::collections::BTreeSet;

use ldap3::asn1::{parse_tag, StructureTag, TagClass, PL};
use ldap3::controls::{MakeCritical, RefreshMode, SyncRequest};
use ldap3::{Ldap, ResultEntry, Scope, SearchEntry};

use super::{describe, result_name, search_entry, SourceError};

const SYNC_STATE_OID: &str = "1.3.6.1.4.1.4203.1.9.1.2";
const SYNC_DONE_OID: &str = "1.3.6.1.4.1.4203.1.9.1.3";
const SYNC_INFO_OID: &str = "1.3.6.1.4.1.4203.1.9.1.4";
/// The sync request control, as a root DSE lists it in `supportedControl`.
pub const SYNC_REQUEST_OID: &str = "1.3.6.1.4.1.4203.1.9.1.1";
/// `e-syncRefreshRequired`: the server cannot serve the cookie; a full refresh is needed.
const SYNC_REFRESH_REQUIRED: u32 = 4096;

/// What one refresh from a cookie returned.
#[derive(Debug, Default)]
pub struct Refresh {
    /// Entries added or changed since the cookie, with every attribute asked for.
    pub changed: Vec<(String, SearchEntry)>,
    /// Ids (entryUUID, lowercase text) of entries deleted or gone out of scope.
    pub deleted: BTreeSet<String>,
    /// When the refresh ended with a present phase: every id still in scope (the changed ones
    /// included). An entry of the local copy that is not here is gone.
    pub present: Option<BTreeSet<String>>,
    /// The cookie to start from next time.
    pub cookie: Option<Vec<u8>>,
}

/// Why a refresh gave nothing usable.
#[derive(Debug)]
pub enum RefreshError {
    /// The server will not continue from this cookie (`e-syncRefreshRequired`, a cookie it
    /// rejects): a full read is needed. Says why, for the log and `status`.
    Required(String),
    /// The read failed or ended early: nothing of it may be used.
    Failed(SourceError),
}

impl From<SourceError> for RefreshError {
    fn from(e: SourceError) -> Self {
        RefreshError::Failed(e)
    }
}

/// How a server's refresh is read where it departs from RFC 4533.
#[derive(Debug, Clone, Copy, Default)]
pub struct Quirks {
    /// 389-DS ends every refresh with `refreshDeletes` FALSE although it sends its deletes one
    /// by one and names no entry present: taken literally, every unchanged entry would be gone.
    /// With this set, a refresh from a cookie is a present phase only if it names entries
    /// present.
    pub present_only_when_named: bool,
}

impl Quirks {
    /// The quirks of the server whose root DSE says `vendor_name`.
    pub fn of(vendor_name: &str) -> Quirks {
        Quirks {
            present_only_when_named: vendor_name.contains("389"),
        }
    }
}

/// Runs one `refreshOnly` sync search of `base` / `filter` from `cookie` (`None`: from the
/// start, every entry in scope is sent as added).
pub async fn refresh_only(
    ldap: &mut Ldap,
    timeout: std::time::Duration,
    base: &str,
    filter: &str,
    attrs: &[&str],
    cookie: Option<&[u8]>,
    quirks: Quirks,
) -> Result<Refresh, RefreshError> {
    let incomplete = |reason: String| SourceError::Incomplete {
        base: base.to_string(),
        reason,
        source: None,
    };
    let request = SyncRequest {
        mode: RefreshMode::RefreshOnly,
        cookie: cookie.map(<[u8]>::to_vec),
        reload_hint: false,
    };
    ldap.with_timeout(timeout);
    let mut stream = ldap
        .with_controls(request.critical())
        .streaming_search(base, Scope::Subtree, filter, attrs.to_vec())
        .await
        .map_err(|e| SourceError::search(base, filter, e))?;
    let mut out = Refresh::default();
    let mut present = BTreeSet::new();
    let mut seen = 0usize;
    let mut failure = None;
    loop {
        let re = match stream.next().await {
            Ok(Some(re)) => re,
            Ok(None) => break,
            Err(e) => {
                let _ = stream.finish().await;
                return Err(SourceError::Incomplete {
                    base: base.to_string(),
                    reason: format!(
                        "the change feed ended early: {} after {seen} messages",
                        describe(&e)
                    ),
                    source: Some(e.into()),
                }
                .into());
            }
        };
        seen += 1;
        if failure.is_some() {
            continue;
        }
        let handled = if re.is_intermediate() {
            sync_info(&re).map(|info| info.apply(&mut out, &mut present))
        } else if re.is_ref() {
            Err("the server returned a continuation reference (referrals are not followed)".into())
        } else {
            entry(re, &mut out, &mut present)
        };
        if let Err(why) = handled {
            failure = Some(why);
        }
    }
    let done = stream.finish().await;
    match done.rc {
        0 => {}
        SYNC_REFRESH_REQUIRED => {
            return Err(RefreshError::Required(
                "the server asked for a full refresh (e-syncRefreshRequired)".into(),
            ))
        }
        12 => {
            return Err(SourceError::Search {
                base: base.into(),
                filter: filter.into(),
                reason: "the server does not support content synchronisation (RFC 4533; unavailableCriticalExtension). Enable the syncprov overlay (OpenLDAP) or the Content Synchronization plugin (389-DS), or set ldap.change_feed = \"none\"".into(),
                source: None,
            }
            .into())
        }
        rc if cookie.is_some() && matches!(rc, 2 | 53 | 80) => {
            return Err(RefreshError::Required(format!(
                "the server rejected the stored cookie ({} (LDAP result code {rc}){}{})",
                result_name(rc),
                if done.text.is_empty() { "" } else { ": " },
                done.text
            )))
        }
        rc => {
            let mut reason = format!(
                "the change feed ended with {} (LDAP result code {rc}) after {seen} messages",
                result_name(rc)
            );
            if !done.text.is_empty() {
                reason.push_str(": ");
                reason.push_str(&done.text);
            }
            return Err(incomplete(reason).into());
        }
    }
    if let Some(why) = failure {
        return Err(incomplete(format!("a change feed message cannot be read ({why})")).into());
    }
    let sync_done = done
        .ctrls
        .iter()
        .find(|c| c.1.ctype == SYNC_DONE_OID)
        .ok_or_else(|| incomplete("the server's answer has no sync done control".into()))?;
    let (done_cookie, refresh_deletes) = parse_sync_done(sync_done.1.val.as_deref().unwrap_or(&[]))
        .map_err(|why| incomplete(format!("the sync done control cannot be read ({why})")))?;
    if done_cookie.is_some() {
        out.cookie = done_cookie;
    }
    // Taken as a delete phase, whatever the flag says, where the quirk applies.
    let deletes_sent = quirks.present_only_when_named && present.is_empty() && cookie.is_some();
    if !refresh_deletes && !deletes_sent {
        // A present phase: what was not named present (or sent) is gone.
        present.extend(out.changed.iter().map(|(id, _)| id.clone()));
        out.present = Some(present);
    }
    // A server may leave the cookie out when it did not move.
    if out.cookie.is_none() {
        out.cookie = cookie.map(<[u8]>::to_vec);
    }
    Ok(out)
}

/// When an entry was written, from its `entryCSN` (OpenLDAP, microseconds) or
/// `modifyTimestamp` (GeneralizedTime, `YYYYmmddHHMMSS[.fff]Z`).
pub fn written_at(entry: &SearchEntry) -> Option<chrono::DateTime<chrono::Utc>> {
    let value = |name: &str| {
        entry
            .attrs
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| v.first())
    };
    value("entryCSN")
        .or_else(|| value("modifyTimestamp"))
        .and_then(|v| generalized_time(v))
}

fn generalized_time(text: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    let seconds = text.get(..14)?;
    let at = chrono::NaiveDateTime::parse_from_str(seconds, "%Y%m%d%H%M%S").ok()?;
    let mut at = at.and_utc();
    if let Some(fraction) = text[14..].strip_prefix('.') {
        let digits: String = fraction
            .chars()
            .take_while(char::is_ascii_digit)
            .take(9)
            .collect();
        if !digits.is_empty() {
            let nanos: i64 = format!("{digits:0<9}").parse().ok()?;
            at += chrono::Duration::nanoseconds(nanos);
        }
    }
    Some(at)
}

/// Keeps a `refreshAndPersist` search of `base` / `filter` open from `cookie`, asking only for
/// when each entry was written, and calls `changed` for every change the server tells of
/// (with that time where the entry carries it). Returns when the search or the connection
/// ends (it never ends on its own while the server keeps it).
pub async fn persist(
    ldap: &mut Ldap,
    base: &str,
    filter: &str,
    cookie: Option<&[u8]>,
    changed: &(dyn Fn(Option<chrono::DateTime<chrono::Utc>>) + Sync),
) -> Result<(), SourceError> {
    let request = SyncRequest {
        mode: RefreshMode::RefreshAndPersist,
        cookie: cookie.map(<[u8]>::to_vec),
        reload_hint: false,
    };
    let mut stream = ldap
        .with_controls(request.critical())
        .streaming_search(
            base,
            Scope::Subtree,
            filter,
            vec!["entryCSN", "modifyTimestamp"],
        )
        .await
        .map_err(|e| SourceError::search(base, filter, e))?;
    loop {
        match stream.next().await {
            Ok(Some(re)) if re.is_intermediate() => {
                if let Ok(SyncInfo::IdSet { ids, .. }) = sync_info(&re) {
                    if !ids.is_empty() {
                        changed(None);
                    }
                }
            }
            Ok(Some(re)) => changed(super::search_entry(re).ok().as_ref().and_then(written_at)),
            Ok(None) => break,
            Err(e) => {
                let _ = stream.finish().await;
                return Err(SourceError::Incomplete {
                    base: base.to_string(),
                    reason: format!("the live change feed ended: {}", describe(&e)),
                    source: Some(e.into()),
                });
            }
        }
    }
    let done = stream.finish().await;
    Err(SourceError::Incomplete {
        base: base.to_string(),
        reason: format!(
            "the server ended the live change feed: {} (LDAP result code {}){}{}",
            result_name(done.rc),
            done.rc,
            if done.text.is_empty() { "" } else { ": " },
            done.text
        ),
        source: None,
    })
}

/// An entry of the refresh, by its sync state control.
fn entry(re: ResultEntry, out: &mut Refresh, present: &mut BTreeSet<String>) -> Result<(), String> {
    let state =
        re.1.iter()
            .find(|c| c.1.ctype == SYNC_STATE_OID)
            .ok_or("an entry came without a sync state control")?;
    let (state, uuid, cookie) = parse_sync_state(state.1.val.as_deref().unwrap_or(&[]))?;
    if cookie.is_some() {
        out.cookie = cookie;
    }
    match state {
        // present
        0 => {
            present.insert(uuid);
        }
        // add, modify
        1 | 2 => {
            let entry = search_entry(re)?;
            out.deleted.remove(&uuid);
            out.changed.push((uuid, entry));
        }
        // delete
        3 => {
            out.changed.retain(|(id, _)| *id != uuid);
            out.deleted.insert(uuid);
        }
        other => return Err(format!("unknown sync state {other}")),
    }
    Ok(())
}

/// One Sync Info message.
enum SyncInfo {
    Cookie(Vec<u8>),
    /// The end of a refresh phase (delete or present), maybe with a cookie.
    Phase(Option<Vec<u8>>),
    IdSet {
        cookie: Option<Vec<u8>>,
        deletes: bool,
        ids: Vec<String>,
    },
}

impl SyncInfo {
    fn apply(self, out: &mut Refresh, present: &mut BTreeSet<String>) {
        match self {
            SyncInfo::Cookie(c) => out.cookie = Some(c),
            SyncInfo::Phase(c) => {
                if c.is_some() {
                    out.cookie = c;
                }
            }
            SyncInfo::IdSet {
                cookie,
                deletes,
                ids,
            } => {
                if cookie.is_some() {
                    out.cookie = cookie;
                }
                for id in ids {
                    if deletes {
                        out.changed.retain(|(c, _)| *c != id);
                        out.deleted.insert(id);
                    } else {
                        present.insert(id);
                    }
                }
            }
        }
    }
}

pub(super) fn tag(bytes: &[u8]) -> Result<StructureTag, String> {
    match parse_tag(bytes) {
        Ok((&[], tag)) => Ok(tag),
        Ok(_) => Err("trailing bytes after the value".into()),
        Err(_) => Err("not valid BER".into()),
    }
}

pub(super) fn parts(t: StructureTag) -> Result<Vec<StructureTag>, String> {
    match t.payload {
        PL::C(parts) => Ok(parts),
        PL::P(_) => Err("a sequence was expected".into()),
    }
}

pub(super) fn bytes(t: StructureTag) -> Result<Vec<u8>, String> {
    match t.payload {
        PL::P(b) => Ok(b),
        PL::C(_) => Err("a primitive value was expected".into()),
    }
}

fn boolean(t: StructureTag) -> Result<bool, String> {
    let b = bytes(t)?;
    match b.as_slice() {
        [v] => Ok(*v != 0),
        _ => Err("a boolean was expected".into()),
    }
}

fn universal(t: &StructureTag, id: u64) -> bool {
    t.class == TagClass::Universal && t.id == id
}

const BOOLEAN: u64 = 1;
const OCTET_STRING: u64 = 4;
const ENUMERATED: u64 = 10;
const SET: u64 = 17;

/// The 16 bytes of a syncUUID as entryUUID text.
fn uuid_text(b: &[u8]) -> Result<String, String> {
    if b.len() != 16 {
        return Err(format!("a syncUUID of {} bytes (16 expected)", b.len()));
    }
    let h: Vec<String> = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        h[0..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..16].concat()
    ))
}

/// syncStateValue ::= SEQUENCE { state ENUMERATED, entryUUID syncUUID, cookie OPTIONAL }
fn parse_sync_state(val: &[u8]) -> Result<(u64, String, Option<Vec<u8>>), String> {
    let mut it = parts(tag(val)?)?.into_iter();
    let state = it.next().ok_or("sync state without a state")?;
    if !universal(&state, ENUMERATED) {
        return Err("sync state without a state".into());
    }
    let state = bytes(state)?;
    if state.len() != 1 {
        return Err("sync state with an unknown state".into());
    }
    let uuid = it.next().ok_or("sync state without an entryUUID")?;
    let uuid = uuid_text(&bytes(uuid)?)?;
    let cookie = it.next().map(bytes).transpose()?;
    Ok((u64::from(state[0]), uuid, cookie))
}

/// syncDoneValue ::= SEQUENCE { cookie OPTIONAL, refreshDeletes BOOLEAN DEFAULT FALSE }
fn parse_sync_done(val: &[u8]) -> Result<(Option<Vec<u8>>, bool), String> {
    let mut cookie = None;
    let mut deletes = false;
    if val.is_empty() {
        return Ok((cookie, deletes));
    }
    for part in parts(tag(val)?)? {
        if universal(&part, OCTET_STRING) {
            cookie = Some(bytes(part)?);
        } else if universal(&part, BOOLEAN) {
            deletes = boolean(part)?;
        } else {
            return Err("unexpected component".into());
        }
    }
    Ok((cookie, deletes))
}

/// An intermediate response carrying a syncInfoValue.
fn sync_info(re: &ResultEntry) -> Result<SyncInfo, String> {
    let PL::C(parts_) = &re.0.payload else {
        return Err("an intermediate response that is not a sequence".into());
    };
    let mut value = None;
    for p in parts_ {
        match (p.class, p.id, &p.payload) {
            (TagClass::Context, 0, PL::P(oid)) if oid.as_slice() != SYNC_INFO_OID.as_bytes() => {
                return Err(format!(
                    "an intermediate response {} that is not a Sync Info",
                    String::from_utf8_lossy(oid)
                ));
            }
            (TagClass::Context, 1, PL::P(v)) => value = Some(v.clone()),
            _ => {}
        }
    }
    let info = tag(&value.ok_or("a Sync Info without a value")?)?;
    if info.class != TagClass::Context {
        return Err("a Sync Info of an unknown kind".into());
    }
    let id = info.id;
    if id == 0 {
        return Ok(SyncInfo::Cookie(bytes(info)?));
    }
    let mut cookie = None;
    let mut flag = id != 3;
    let mut ids = Vec::new();
    for part in parts(info)? {
        if universal(&part, OCTET_STRING) {
            cookie = Some(bytes(part)?);
        } else if universal(&part, BOOLEAN) {
            flag = boolean(part)?;
        } else if universal(&part, SET) {
            for u in parts(part)? {
                ids.push(uuid_text(&bytes(u)?)?);
            }
        } else {
            return Err("a Sync Info with an unexpected component".into());
        }
    }
    match id {
        1 | 2 => Ok(SyncInfo::Phase(cookie)),
        3 => Ok(SyncInfo::IdSet {
            cookie,
            deletes: flag,
            ids,
        }),
        _ => Err("a Sync Info of an unknown kind".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_uuids_read_as_entry_uuid_text() {
        let b: Vec<u8> = (0u8..16).collect();
        assert_eq!(
            uuid_text(&b).unwrap(),
            "00010203-0405-0607-0809-0a0b0c0d0e0f"
        );
        assert!(uuid_text(&b[..15]).is_err());
    }

    #[test]
    fn write_times_come_from_entry_csn_or_modify_timestamp() {
        let at = |text: &str| generalized_time(text).map(|t| t.to_rfc3339());
        assert_eq!(
            at("20261202185401.123456Z#000000#000#000000").as_deref(),
            Some("2026-12-02T18:54:01.123456+00:00")
        );
        assert_eq!(
            at("20261202185401Z").as_deref(),
            Some("2026-12-02T18:54:01+00:00")
        );
        assert_eq!(at("2026120218"), None);
        assert_eq!(at("not a time at all"), None);
        assert_eq!(at("20261302185401Z"), None);
    }

    #[test]
    fn malformed_sync_controls_are_errors_not_panics() {
        for bad in [
            &b""[..],
            b"\x30",
            b"\x30\x03\x0a\x01",
            b"\x04\x00",
            b"\x30\x02\x01\x00",
        ] {
            assert!(parse_sync_state(bad).is_err(), "{bad:?}");
        }
        // SEQUENCE { ENUMERATED 1, OCTET STRING (16 bytes) }
        let mut ok = vec![0x30, 0x15, 0x0a, 0x01, 0x01, 0x04, 0x10];
        ok.extend(0u8..16);
        let (state, uuid, cookie) = parse_sync_state(&ok).unwrap();
        assert_eq!((state, cookie), (1, None));
        assert!(uuid.starts_with("00010203-"));
        assert_eq!(parse_sync_done(b"").unwrap(), (None, false));
        assert_eq!(
            parse_sync_done(b"\x30\x06\x04\x01c\x01\x01\xff").unwrap(),
            (Some(b"c".to_vec()), true)
        );
        assert!(parse_sync_done(b"\x30\x03\x02\x01\x00").is_err());
    }
}
