//! The one retry policy: every HTTP outcome of every target is classified here, and nowhere
//! else. 429 and 503 wait for `Retry-After` (or the non-standard `X-Retry-After`); other 5xx,
//! 408, timeouts and connection errors back off exponentially with jitter (backon); any other
//! 4xx is final, and so is 501 (the target does not implement the operation: asking again
//! cannot change that).

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use reqwest::header::HeaderMap;
use reqwest::StatusCode;

/// The longest `Retry-After` honoured: a longer one is waited out only this long, so one
/// target's request stays bounded (and the retry budget still ends it).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Success,
    /// Retry after the server-given delay, or after the backoff's next delay when `None`.
    Retry(Option<Duration>),
    GiveUp,
}

/// What came back from one attempt, reduced to what the policy needs.
pub enum Outcome<'a> {
    Response {
        status: StatusCode,
        headers: &'a HeaderMap,
    },
    /// Timeout, refused or reset connection, broken body.
    Transport,
}

pub fn classify(outcome: &Outcome<'_>) -> Decision {
    match outcome {
        Outcome::Transport => Decision::Retry(None),
        Outcome::Response { status, headers } => {
            let code = status.as_u16();
            if status.is_success() || status.as_u16() == 304 {
                Decision::Success
            } else if code == 429 || code == 503 {
                Decision::Retry(retry_after(headers))
            } else if code == 501 {
                Decision::GiveUp
            } else if code == 408 || status.is_server_error() {
                Decision::Retry(None)
            } else {
                Decision::GiveUp
            }
        }
    }
}

/// `Retry-After` (or `X-Retry-After`): delay-seconds or an HTTP date.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
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
    let wait = (when.with_timezone(&chrono::Utc) - chrono::Utc::now())
        .to_std()
        .unwrap_or(Duration::ZERO);
    Some(wait.min(MAX_RETRY_AFTER))
}

/// The bounded retry schedule of one request.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub max_attempts: usize,
    pub min_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            min_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// Backoff delays between attempts (exponential, jittered), `max_attempts - 1` of them.
    pub fn delays(&self) -> impl Iterator<Item = Duration> {
        ExponentialBuilder::default()
            .with_jitter()
            .with_min_delay(self.min_delay)
            .with_max_delay(self.max_delay)
            .with_max_times(self.max_attempts.saturating_sub(1))
            .build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn decide(code: u16, headers: &[(&'static str, &str)]) -> Decision {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        classify(&Outcome::Response {
            status: StatusCode::from_u16(code).unwrap(),
            headers: &h,
        })
    }

    #[test]
    fn classification_follows_the_contract() {
        assert_eq!(decide(200, &[]), Decision::Success);
        assert_eq!(decide(204, &[]), Decision::Success);
        assert_eq!(
            decide(429, &[("retry-after", "2")]),
            Decision::Retry(Some(Duration::from_secs(2)))
        );
        assert_eq!(
            decide(429, &[("x-retry-after", "3")]),
            Decision::Retry(Some(Duration::from_secs(3)))
        );
        assert_eq!(decide(503, &[]), Decision::Retry(None));
        assert_eq!(decide(500, &[]), Decision::Retry(None));
        assert_eq!(decide(502, &[]), Decision::Retry(None));
        assert_eq!(decide(408, &[]), Decision::Retry(None));
        for code in [400, 401, 403, 404, 409, 412, 413, 501] {
            assert_eq!(decide(code, &[]), Decision::GiveUp, "{code}");
        }
        assert!(matches!(
            classify(&Outcome::Transport),
            Decision::Retry(None)
        ));
    }

    #[test]
    fn retry_after_accepts_http_dates_and_caps_delays() {
        let mut h = HeaderMap::new();
        let later = (chrono::Utc::now() + chrono::Duration::seconds(5)).to_rfc2822();
        h.insert("retry-after", HeaderValue::from_str(&later).unwrap());
        let d = retry_after(&h).unwrap();
        assert!(
            d <= Duration::from_secs(5) && d >= Duration::from_secs(3),
            "{d:?}"
        );
        h.insert("retry-after", HeaderValue::from_static("99999"));
        assert_eq!(retry_after(&h), Some(MAX_RETRY_AFTER));
    }

    #[test]
    fn backoff_is_bounded() {
        let p = RetryPolicy::default();
        let delays: Vec<_> = p.delays().collect();
        assert_eq!(delays.len(), 4);
        assert!(delays.iter().all(|d| *d <= p.max_delay * 2));
    }
}
