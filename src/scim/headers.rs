//! What a target's answer headers say about waiting: `Retry-After` in either form, bounded.
//! A leaf: both the retry policy and the profiles read it.

use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::header::HeaderMap;

/// The longest `Retry-After` honoured: a longer one is waited out only this long, so one
/// target's request stays bounded (and the retry budget still ends it).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(120);

/// `Retry-After` (or `X-Retry-After`): delay-seconds or an HTTP date.
/// `now` is the instant an HTTP date is measured from.
pub fn retry_after(headers: &HeaderMap, now: DateTime<Utc>) -> Option<Duration> {
    let raw = headers
        .get("retry-after")
        .or_else(|| headers.get("x-retry-after"))?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = raw.parse::<u64>() {
        return Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER));
    }
    let when = chrono::DateTime::parse_from_rfc2822(raw).ok()?;
    let wait = (when.with_timezone(&Utc) - now)
        .to_std()
        .unwrap_or(Duration::ZERO);
    Some(wait.min(MAX_RETRY_AFTER))
}
