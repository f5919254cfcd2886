//! The one retry policy: every outcome of every attempt of every target (an HTTP answer, a
//! body that could not be read or used, a transport error, and the OAuth2 token request's
//! outcomes too) is classified by [`classify`], and nowhere else, into success, retry
//! (after a server-given delay or the next backoff delay), or give up. 429 and 503 wait for
//! `Retry-After` (or the non-standard `X-Retry-After`); other 5xx, 408, timeouts and
//! connection errors back off exponentially with jitter (backon); any other 4xx is final,
//! and so is 501 (the target does not implement the operation: asking again cannot change
//! that). A final answer stays final even when its body cannot be read.
//!
//! It must never do I/O, sleep or build an error message: it only decides.

use std::time::Duration;

use chrono::{DateTime, Utc};

use backon::{BackoffBuilder, ExponentialBuilder};
use reqwest::header::HeaderMap;
use reqwest::StatusCode;

pub use super::headers::{retry_after, MAX_RETRY_AFTER};
use super::profile::{self, Profile};

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Success,
    /// Retry after the server-given delay, or after the backoff's next delay when `None`.
    Retry(Option<Duration>),
    GiveUp,
}

/// What came back from one attempt, reduced to what the policy needs.
#[derive(Debug)]
pub enum Outcome<'a> {
    /// An answer whose body was read in full.
    Response {
        status: StatusCode,
        headers: &'a HeaderMap,
    },
    /// A success whose body is not what it must be (not JSON): the server may have acted.
    Unusable { status: StatusCode },
    /// The status came, then reading the body failed (a reset, a timeout, a broken chunk).
    BodyUnreadable { status: StatusCode },
    /// The body is larger than `max_response_size`: not read further, and not asked again
    /// (the next answer would be as large).
    TooLarge,
    /// No answer at all: timeout, refused or reset connection. `sent` is false when the
    /// connection was never made (the server cannot have acted).
    Transport { sent: bool },
}

/// The decision for `outcome` on a target of `profile` (a profile may say that an answer
/// which is otherwise final asks to slow down: [`profile::throttled`]).
pub fn classify(outcome: &Outcome<'_>, profile: Profile, now: DateTime<Utc>) -> Decision {
    match outcome {
        Outcome::Transport { .. } | Outcome::Unusable { .. } => Decision::Retry(None),
        Outcome::TooLarge => Decision::GiveUp,
        Outcome::BodyUnreadable { status } => match by_status(*status, None, profile, now) {
            // A final answer stays final: what its body said is lost, not its status.
            Decision::GiveUp => Decision::GiveUp,
            // The body is needed (a success) or the answer was retryable anyway; what the
            // headers asked for is not trusted from an answer that broke off.
            Decision::Success | Decision::Retry(_) => Decision::Retry(None),
        },
        Outcome::Response { status, headers } => by_status(*status, Some(headers), profile, now),
    }
}

fn by_status(
    status: StatusCode,
    headers: Option<&HeaderMap>,
    profile: Profile,
    now: DateTime<Utc>,
) -> Decision {
    let code = status.as_u16();
    if status.is_success() || code == 304 {
        Decision::Success
    } else if code == 429 || code == 503 {
        Decision::Retry(headers.and_then(|h| retry_after(h, now)))
    } else if code == 501 {
        Decision::GiveUp
    } else if code == 408 || status.is_server_error() {
        Decision::Retry(None)
    } else if let Some(wait) = headers.and_then(|h| profile::throttled(profile, status, h, now)) {
        Decision::Retry(wait)
    } else {
        Decision::GiveUp
    }
}

/// Whether the server may have acted on a request whose attempt ended in `outcome`, so that
/// a create is looked up before it is sent again (a lost answer must not become a
/// duplicate). A 429 or 503 (or a profile's other way to say "slow down") says it did not;
/// a connection never made cannot have.
pub fn may_have_acted(outcome: &Outcome<'_>, profile: Profile, now: DateTime<Utc>) -> bool {
    match outcome {
        Outcome::Response { status, headers } => {
            !matches!(status.as_u16(), 429 | 503)
                && profile::throttled(profile, *status, headers, now).is_none()
        }
        Outcome::Unusable { .. } | Outcome::BodyUnreadable { .. } | Outcome::TooLarge => true,
        Outcome::Transport { sent } => *sent,
    }
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

    const G: Profile = Profile::Generic;

    fn decide(code: u16, headers: &[(&'static str, &str)]) -> Decision {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        classify(
            &Outcome::Response {
                status: StatusCode::from_u16(code).unwrap(),
                headers: &h,
            },
            Profile::Generic,
            chrono::Utc::now(),
        )
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
            classify(&Outcome::Transport { sent: true }, G, chrono::Utc::now()),
            Decision::Retry(None)
        ));
    }

    #[test]
    fn every_outcome_has_one_decision() {
        let status = |c| StatusCode::from_u16(c).unwrap();
        // 429 with and without Retry-After; 503 likewise.
        assert_eq!(decide(429, &[]), Decision::Retry(None));
        assert_eq!(
            decide(503, &[("retry-after", "7")]),
            Decision::Retry(Some(Duration::from_secs(7)))
        );
        assert_eq!(
            decide(429, &[("retry-after", "soon")]),
            Decision::Retry(None)
        );
        // 304 is a success (a conditional read); a redirect is final (never followed here).
        assert_eq!(decide(304, &[]), Decision::Success);
        assert_eq!(decide(307, &[]), Decision::GiveUp);
        // Transport errors, connected or not, are retried.
        for sent in [true, false] {
            assert_eq!(
                classify(&Outcome::Transport { sent }, G, chrono::Utc::now()),
                Decision::Retry(None)
            );
        }
        // A body that broke off: after a 4xx (401, 403, 404, 409 too) the answer is final;
        // after a 5xx or a success it is asked again.
        let broke_off = |code| {
            let outcome = Outcome::BodyUnreadable {
                status: status(code),
            };
            classify(&outcome, G, chrono::Utc::now())
        };
        for code in [400, 401, 403, 404, 409, 412, 501] {
            assert_eq!(broke_off(code), Decision::GiveUp, "{code}");
        }
        for code in [200, 201, 408, 429, 500, 502, 503] {
            assert_eq!(broke_off(code), Decision::Retry(None), "{code}");
        }
        assert_eq!(
            classify(
                &Outcome::Unusable {
                    status: status(200)
                },
                G,
                chrono::Utc::now()
            ),
            Decision::Retry(None)
        );
        assert_eq!(
            classify(&Outcome::TooLarge, G, chrono::Utc::now()),
            Decision::GiveUp
        );
    }

    #[test]
    fn a_retry_knows_whether_the_server_may_have_acted() {
        let h = HeaderMap::new();
        let answered = |c| Outcome::Response {
            status: StatusCode::from_u16(c).unwrap(),
            headers: &h,
        };
        assert!(may_have_acted(&answered(500), G, chrono::Utc::now()));
        assert!(may_have_acted(&answered(408), G, chrono::Utc::now()));
        assert!(!may_have_acted(&answered(429), G, chrono::Utc::now()));
        assert!(!may_have_acted(&answered(503), G, chrono::Utc::now()));
        assert!(may_have_acted(
            &Outcome::Transport { sent: true },
            G,
            chrono::Utc::now()
        ));
        assert!(!may_have_acted(
            &Outcome::Transport { sent: false },
            G,
            chrono::Utc::now()
        ));
        let ok = StatusCode::OK;
        assert!(may_have_acted(
            &Outcome::BodyUnreadable { status: ok },
            G,
            chrono::Utc::now()
        ));
        assert!(may_have_acted(
            &Outcome::Unusable { status: ok },
            G,
            chrono::Utc::now()
        ));
    }

    #[test]
    fn retry_after_accepts_http_dates_and_caps_delays() {
        let mut h = HeaderMap::new();
        let later = (chrono::Utc::now() + chrono::Duration::seconds(5)).to_rfc2822();
        h.insert("retry-after", HeaderValue::from_str(&later).unwrap());
        let d = retry_after(&h, chrono::Utc::now()).unwrap();
        assert!(
            d <= Duration::from_secs(5) && d >= Duration::from_secs(3),
            "{d:?}"
        );
        h.insert("retry-after", HeaderValue::from_static("99999"));
        assert_eq!(retry_after(&h, chrono::Utc::now()), Some(MAX_RETRY_AFTER));
    }

    #[test]
    fn backoff_is_bounded() {
        let p = RetryPolicy::default();
        let delays: Vec<_> = p.delays().collect();
        assert_eq!(delays.len(), 4);
        assert!(delays.iter().all(|d| *d <= p.max_delay * 2));
    }
}
