//! Range retrieval (Active Directory's answer to large multi-valued attributes): a search
//! returns `member;range=0-1499` instead of `member`, and the client asks for
//! `member;range=1500-*`, then the next range, on that entry alone until a range ends in `*`.
//!
//! A range read is complete or it is an error: a failed request, an answer without the
//! attribute, a range that does not start where the last one ended, or a bounded range whose
//! value count does not match its bounds all make the read [`SourceError::Incomplete`], because
//! a group missing half its members would deprovision half its members.

use ldap3::{Ldap, Scope, SearchEntry};
use tracing::debug;

use super::{describe, SourceError};

/// One attribute description carrying a `range=` option, e.g. `member;range=1500-2999`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct RangedAttr {
    /// The description without the range option (`member`, or `member;binary`).
    pub base: String,
    pub low: u64,
    /// `None` for `*`: this range is the last one.
    pub high: Option<u64>,
}

/// Parses `attr;range=LOW-HIGH` / `attr;range=LOW-*` (options and names case-insensitive);
/// `None` when the description has no range option or the option is malformed.
pub(super) fn parse_range_key(key: &str) -> Option<RangedAttr> {
    let mut parts = key.split(';');
    let name = parts.next()?;
    let mut base = name.to_string();
    let mut range = None;
    for option in parts {
        match option.get(..6) {
            Some(prefix) if prefix.eq_ignore_ascii_case("range=") => {
                if range.is_some() {
                    return None;
                }
                range = Some(&option[6..]);
            }
            _ => {
                base.push(';');
                base.push_str(option);
            }
        }
    }
    let (low, high) = range?.split_once('-')?;
    let low = low.parse::<u64>().ok()?;
    let high = match high {
        "*" => None,
        h => Some(h.parse::<u64>().ok()?),
    };
    if high.is_some_and(|h| h < low) || name.is_empty() {
        return None;
    }
    Some(RangedAttr { base, low, high })
}

/// Whether any attribute of `entry` came back as a range.
pub(super) fn has_ranges(entry: &SearchEntry) -> bool {
    entry
        .attrs
        .keys()
        .chain(entry.bin_attrs.keys())
        .any(|k| is_ranged(k))
}

fn is_ranged(key: &str) -> bool {
    key.split(';')
        .skip(1)
        .any(|o| o.get(..6).is_some_and(|p| p.eq_ignore_ascii_case("range=")))
}

/// Reads every ranged attribute of `entry` to its end and stores the values under the plain
/// attribute name (`member`), replacing the `member;range=…` key.
pub(super) async fn complete(
    ldap: &mut Ldap,
    search_base: &str,
    entry: &mut SearchEntry,
) -> Result<(), SourceError> {
    let incomplete = |reason: String| SourceError::Incomplete {
        base: search_base.to_string(),
        reason,
        source: None,
    };
    if let Some(key) = entry.bin_attrs.keys().find(|k| is_ranged(k)) {
        // Ranged attributes are DN-valued (member); bytes here mean something we cannot read.
        return Err(incomplete(format!(
            "{} of {} came back as a range of non-UTF-8 values",
            key, entry.dn
        )));
    }
    let keys: Vec<String> = entry
        .attrs
        .keys()
        .filter(|k| is_ranged(k))
        .cloned()
        .collect();
    for key in keys {
        let first = parse_range_key(&key).ok_or_else(|| {
            incomplete(format!(
                "entry {} has an attribute {key} whose range cannot be parsed",
                entry.dn
            ))
        })?;
        let mut values = entry.attrs.remove(&key).unwrap_or_default();
        check_count(&first, values.len(), &entry.dn).map_err(incomplete)?;
        let mut high = first.high;
        let mut requests = 0usize;
        while let Some(last) = high {
            let next = last.checked_add(1).ok_or_else(|| {
                incomplete(format!(
                    "entry {} has a range ending at {last}, past any real count",
                    entry.dn
                ))
            })?;
            let wanted = format!("{};range={next}-*", first.base);
            requests += 1;
            let (got, more) =
                fetch_range(ldap, search_base, &entry.dn, &first.base, &wanted).await?;
            if got.low != next {
                return Err(incomplete(format!(
                    "asked for {wanted} of {} but the server answered with range {}-{}; \
                     ranges must continue where the last one ended ({last})",
                    entry.dn,
                    got.low,
                    got.high.map_or("*".to_string(), |h| h.to_string())
                )));
            }
            check_count(&got, more.len(), &entry.dn).map_err(incomplete)?;
            values.extend(more);
            high = got.high;
        }
        debug!(dn = %entry.dn, attribute = %first.base, values = values.len(), requests, "range retrieval done");
        match entry
            .attrs
            .iter_mut()
            .find(|(k, _)| k.eq_ignore_ascii_case(&first.base))
        {
            Some((_, existing)) => existing.extend(values),
            None => {
                entry.attrs.insert(first.base.clone(), values);
            }
        }
    }
    Ok(())
}

/// A bounded range `low-high` holds exactly `high - low + 1` values; fewer or more means the
/// server skipped or repeated some.
fn check_count(range: &RangedAttr, count: usize, dn: &str) -> Result<(), String> {
    let Some(high) = range.high else {
        return Ok(());
    };
    match high.checked_sub(range.low).and_then(|d| d.checked_add(1)) {
        Some(expected) if expected == count as u64 => Ok(()),
        Some(expected) => Err(format!(
            "range {}-{high} of {} of {dn} holds {count} values instead of {expected}",
            range.low, range.base
        )),
        None => Err(format!(
            "range {}-{high} of {} of {dn} is not a range",
            range.low, range.base
        )),
    }
}

/// One base-scope request for `wanted` (`member;range=1500-*`) on `dn`, during the read of
/// `search_base`.
async fn fetch_range(
    ldap: &mut Ldap,
    search_base: &str,
    dn: &str,
    base_attr: &str,
    wanted: &str,
) -> Result<(RangedAttr, Vec<String>), SourceError> {
    let failed_by = |reason: String, source: Option<ldap3::LdapError>| SourceError::Incomplete {
        base: search_base.to_string(),
        reason: format!("range request {wanted} on {dn} failed: {reason}"),
        source: source.map(Into::into),
    };
    let failed = |reason: String| failed_by(reason, None);
    let ldap_failed = |e: ldap3::LdapError| failed_by(describe(&e), Some(e));
    let (entries, _done) = ldap
        .search(dn, Scope::Base, "(objectClass=*)", vec![wanted])
        .await
        .map_err(ldap_failed)?
        .success()
        .map_err(ldap_failed)?;
    let mut answer = None;
    for re in entries {
        if re.is_ref() || re.is_intermediate() {
            continue;
        }
        let entry = super::search_entry(re).map_err(failed)?;
        for (key, vals) in entry.attrs {
            if let Some(r) = parse_range_key(&key) {
                if r.base.eq_ignore_ascii_case(base_attr) {
                    answer = Some((r, vals));
                }
            }
        }
        if let Some(key) = entry.bin_attrs.keys().find(|k| is_ranged(k)) {
            return Err(failed(format!("{key} came back as non-UTF-8 values")));
        }
    }
    answer.ok_or_else(|| failed(format!("the answer holds no {base_attr};range=… attribute")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(base: &str, low: u64, high: Option<u64>) -> Option<RangedAttr> {
        Some(RangedAttr {
            base: base.into(),
            low,
            high,
        })
    }

    #[test]
    fn range_keys_parse() {
        assert_eq!(
            parse_range_key("member;range=0-1499"),
            r("member", 0, Some(1499))
        );
        assert_eq!(
            parse_range_key("member;Range=1500-*"),
            r("member", 1500, None)
        );
        assert_eq!(
            parse_range_key("member;binary;range=3-4"),
            r("member;binary", 3, Some(4))
        );
        assert_eq!(parse_range_key("member"), None);
        assert_eq!(parse_range_key("member;range=5-4"), None);
        assert_eq!(parse_range_key("member;range=a-4"), None);
        assert_eq!(parse_range_key("member;range=0-"), None);
        assert_eq!(parse_range_key("member;range=0"), None);
        assert_eq!(parse_range_key("member;range=0-1;range=2-3"), None);
        assert_eq!(parse_range_key(";range=0-1"), None);
    }

    #[test]
    fn ranged_entries_are_recognised() {
        let mut e = SearchEntry {
            dn: "CN=g".into(),
            attrs: Default::default(),
            bin_attrs: Default::default(),
        };
        e.attrs.insert("member".into(), vec!["CN=a".into()]);
        e.attrs.insert("rangeNote".into(), vec!["x".into()]);
        assert!(!has_ranges(&e));
        e.attrs
            .insert("member;range=0-0".into(), vec!["CN=b".into()]);
        assert!(has_ranges(&e));
    }

    #[test]
    fn bounded_ranges_must_hold_exactly_their_values() {
        let range = r("member", 1500, Some(2999)).unwrap();
        assert!(check_count(&range, 1500, "CN=g").is_ok());
        assert!(check_count(&range, 1499, "CN=g").is_err());
        let last = r("member", 1500, None).unwrap();
        assert!(check_count(&last, 0, "CN=g").is_ok());
        assert!(check_count(&last, 7, "CN=g").is_ok());
    }

    #[test]
    fn absurd_ranges_are_errors_not_overflows() {
        let huge = r("member", 0, Some(u64::MAX)).unwrap();
        assert!(check_count(&huge, 3, "cn=g").is_err());
        let backwards = r("member", 10, Some(5)).unwrap();
        assert!(check_count(&backwards, 0, "cn=g").is_err());
    }
}
