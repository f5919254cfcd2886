//! The one time source, injected wherever time decides something (a pass's `now`, the
//! daemon's schedule, grace periods, retry dates, lock stamps). Production reads the system
//! clock; an operator rehearsing a grace period sets `LDAP2SCIM_NOW` (RFC 3339), which shifts
//! the clock to start at that instant and run on from there (so a daemon still ticks), and
//! unit tests use [`Clock::fixed`].

use chrono::{DateTime, Utc};

pub const NOW_ENV: &str = "LDAP2SCIM_NOW";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Clock(Source);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    System,
    /// The system clock plus an offset.
    Shifted(chrono::Duration),
    Fixed(DateTime<Utc>),
}

impl Clock {
    pub fn system() -> Clock {
        Clock(Source::System)
    }

    /// The system clock, or (with `LDAP2SCIM_NOW` set to an RFC 3339 instant) a clock that
    /// starts at that instant now.
    pub fn from_env() -> Clock {
        match std::env::var(NOW_ENV)
            .ok()
            .and_then(|v| DateTime::parse_from_rfc3339(&v).ok())
        {
            Some(t) => Clock(Source::Shifted(t.with_timezone(&Utc) - Utc::now())),
            None => Clock::system(),
        }
    }

    /// A clock that always says `t` (unit tests).
    pub fn fixed(t: DateTime<Utc>) -> Clock {
        Clock(Source::Fixed(t))
    }

    pub fn now(&self) -> DateTime<Utc> {
        match self.0 {
            Source::System => Utc::now(),
            Source::Shifted(by) => Utc::now() + by,
            Source::Fixed(t) => t,
        }
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::system()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fixed_clock_stands_still_and_a_shifted_one_runs_on() {
        let t = DateTime::parse_from_rfc3339("2100-06-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(Clock::fixed(t).now(), t);
        let shifted = Clock(Source::Shifted(t - Utc::now()));
        let (a, b) = (shifted.now(), shifted.now());
        assert!(a >= t - chrono::Duration::seconds(1) && b >= a);
    }
}
