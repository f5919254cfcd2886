//! Active Directory specifics: binary ids as text, account state from `userAccountControl` and
//! `accountExpires`. Pure functions over entries already read; no I/O.
//!
//! ldap3 files a value under `attrs` when its bytes happen to be valid UTF-8 and under
//! `bin_attrs` otherwise, so a binary attribute such as `objectGUID` can arrive in either map.
//! Everything here reads the raw bytes from whichever map holds them, and never lets the raw
//! bytes through as an attribute value: templates see the canonical text form.

use chrono::{DateTime, Utc};
use ldap3::SearchEntry;

/// `accountExpires` values that mean "never expires".
const NEVER: [i64; 2] = [0, i64::MAX];
/// Seconds from 1601-01-01 (the Windows FILETIME epoch) to 1970-01-01.
const FILETIME_UNIX_OFFSET_SECS: i64 = 11_644_473_600;
/// FILETIME counts 100-ns intervals.
const FILETIME_TICKS_PER_SEC: i64 = 10_000_000;

/// The first raw value of `attr` (case-insensitive), from whichever map ldap3 put it in.
pub(super) fn raw_value<'a>(entry: &'a SearchEntry, attr: &str) -> Option<&'a [u8]> {
    let bin = entry
        .bin_attrs
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(attr))
        .and_then(|(_, v)| v.first())
        .map(Vec::as_slice);
    bin.or_else(|| {
        entry
            .attrs
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(attr))
            .and_then(|(_, v)| v.first())
            .map(String::as_bytes)
    })
}

/// The entry's `objectGUID` as the canonical lowercase GUID string. A value that arrived as
/// text is used only when it is exactly 16 bytes: text is what ldap3 makes of GUID bytes that
/// happen to be valid UTF-8, and `from_utf8` keeps the bytes as they were.
pub(super) fn object_guid(entry: &SearchEntry) -> Option<String> {
    raw_value(entry, "objectGUID").and_then(super::guid_to_string)
}

/// Formats a binary SID (`objectSid`) as `S-1-5-21-…`.
pub(super) fn sid_to_string(b: &[u8]) -> Option<String> {
    let (&revision, rest) = b.split_first()?;
    let (&count, rest) = rest.split_first()?;
    if rest.len() != 6 + 4 * usize::from(count) {
        return None;
    }
    let authority = rest[..6]
        .iter()
        .fold(0u64, |acc, &byte| (acc << 8) | u64::from(byte));
    let mut out = format!("S-{revision}-{authority}");
    for sub in rest[6..].chunks_exact(4) {
        let sub = u32::from_le_bytes([sub[0], sub[1], sub[2], sub[3]]);
        out.push_str(&format!("-{sub}"));
    }
    Some(out)
}

/// Replaces the binary id attributes of an AD entry by their text forms (`objectGUID` as a
/// canonical GUID, `objectSid` as `S-1-…`), so that mappings and `explain` see text, whichever
/// map ldap3 filed the raw bytes under.
pub(super) fn textualize_ids(entry: &mut SearchEntry) {
    for (attr, format) in [
        (
            "objectGUID",
            super::guid_to_string as fn(&[u8]) -> Option<String>,
        ),
        ("objectSid", sid_to_string),
    ] {
        let text = raw_value(entry, attr).and_then(format);
        entry.attrs.retain(|k, _| !k.eq_ignore_ascii_case(attr));
        entry.bin_attrs.retain(|k, _| !k.eq_ignore_ascii_case(attr));
        if let Some(text) = text {
            entry.attrs.insert(attr.to_string(), vec![text]);
        }
    }
}

/// `userAccountControl` has ACCOUNTDISABLE (bit 2, value 0x2) set.
pub(super) fn uac_disabled(uac: Option<&str>) -> bool {
    uac.and_then(|v| v.trim().parse::<i64>().ok())
        .is_some_and(|uac| uac & 2 != 0)
}

/// When an `accountExpires` value (100-ns intervals since 1601-01-01 UTC) expires the account;
/// `None` for "never" (0 or 9223372036854775807) and for values that are not a number.
pub(super) fn account_expires_at(value: &str) -> Option<DateTime<Utc>> {
    let ticks = value.trim().parse::<i64>().ok()?;
    if NEVER.contains(&ticks) || ticks < 0 {
        return None;
    }
    let secs = ticks / FILETIME_TICKS_PER_SEC - FILETIME_UNIX_OFFSET_SECS;
    let nanos = (ticks % FILETIME_TICKS_PER_SEC) as u32 * 100;
    DateTime::from_timestamp(secs, nanos)
}

/// The account has expired by `now` (an `accountExpires` at or before it).
pub(super) fn account_expired(value: Option<&str>, now: DateTime<Utc>) -> bool {
    value
        .and_then(account_expires_at)
        .is_some_and(|at| at <= now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::tests::entry_with as entry;

    /// GUID bytes that are valid UTF-8 (all ASCII here) arrive from ldap3 as text.
    const UTF8_GUID: &[u8; 16] = b"ABCDabcd01234567";

    #[test]
    fn guid_whose_bytes_are_valid_utf8_arrives_as_text_and_still_converts() {
        let text = std::str::from_utf8(UTF8_GUID).unwrap();
        let e = entry(&[("objectGUID", text)], &[]);
        assert_eq!(
            object_guid(&e).as_deref(),
            Some("44434241-6261-6463-3031-323334353637")
        );
        // The same bytes as binary give the same id.
        let e = entry(&[], &[("objectGUID", UTF8_GUID)]);
        assert_eq!(
            object_guid(&e).as_deref(),
            Some("44434241-6261-6463-3031-323334353637")
        );
        // Multi-byte UTF-8 that is 16 bytes long: still 16 raw bytes.
        let text = "é1234567890abcd"; // 2 + 14 bytes
        assert_eq!(text.len(), 16);
        assert!(object_guid(&entry(&[("objectguid", text)], &[])).is_some());
    }

    #[test]
    fn text_that_is_not_16_bytes_is_no_guid() {
        let e = entry(
            &[("objectGUID", "{00112233-4455-6677-8899-aabbccddeeff}")],
            &[],
        );
        assert_eq!(object_guid(&e), None);
        assert_eq!(object_guid(&entry(&[], &[])), None);
    }

    #[test]
    fn ids_become_text_attributes() {
        let sid: &[u8] = &[
            1, 4, 0, 0, 0, 0, 0, 5, 21, 0, 0, 0, 0xd1, 0x07, 0, 0, 0x2a, 0, 0, 0, 0xf4, 0x01, 0, 0,
        ];
        let text = std::str::from_utf8(UTF8_GUID).unwrap();
        let mut e = entry(&[("objectGUID", text)], &[("objectSid", sid)]);
        textualize_ids(&mut e);
        assert!(e.bin_attrs.is_empty());
        assert_eq!(
            e.attrs["objectGUID"],
            vec!["44434241-6261-6463-3031-323334353637".to_string()]
        );
        assert_eq!(
            e.attrs["objectSid"],
            vec!["S-1-5-21-2001-42-500".to_string()]
        );
    }

    #[test]
    fn sid_formats_like_windows() {
        let sid = [1u8, 1, 0, 0, 0, 0, 0, 5, 18, 0, 0, 0];
        assert_eq!(sid_to_string(&sid).as_deref(), Some("S-1-5-18"));
        assert_eq!(sid_to_string(&sid[..11]), None);
    }

    #[test]
    fn user_account_control_bit_2_disables() {
        assert!(uac_disabled(Some("514")));
        assert!(uac_disabled(Some("546")));
        assert!(!uac_disabled(Some("512")));
        assert!(!uac_disabled(Some("544")));
        assert!(!uac_disabled(Some("nonsense")));
        assert!(!uac_disabled(None));
    }

    #[test]
    fn account_expires_converts_from_filetime() {
        // 2000-01-01T00:00:00Z
        let y2k = "125911584000000000";
        assert_eq!(
            account_expires_at(y2k).unwrap().to_rfc3339(),
            "2000-01-01T00:00:00+00:00"
        );
        // 100-ns precision survives.
        assert_eq!(
            account_expires_at("125911584000000001")
                .unwrap()
                .timestamp_subsec_nanos(),
            100
        );
        assert_eq!(account_expires_at("0"), None);
        assert_eq!(account_expires_at("9223372036854775807"), None);
        assert_eq!(account_expires_at("never"), None);
    }

    #[test]
    fn account_expired_compares_with_now() {
        let now: DateTime<Utc> = "2024-06-01T12:00:00Z".parse().unwrap();
        assert!(account_expired(Some("125911584000000000"), now));
        // 2030-01-01T00:00:00Z
        assert!(!account_expired(Some("135379296000000000"), now));
        assert!(!account_expired(Some("0"), now));
        assert!(!account_expired(Some("9223372036854775807"), now));
        assert!(!account_expired(None, now));
        // Expiry exactly now counts as expired.
        let at = account_expires_at("125911584000000000").unwrap();
        assert!(account_expired(Some("125911584000000000"), at));
    }
}
