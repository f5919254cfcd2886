//! The one time source. Production reads the system clock; tests and operators rehearsing a
//! grace period set `LDAP2SCIM_NOW` (RFC 3339) so nothing has to sleep for 30 days.

use chrono::{DateTime, Utc};

pub const NOW_ENV: &str = "LDAP2SCIM_NOW";

pub fn now() -> DateTime<Utc> {
    std::env::var(NOW_ENV)
        .ok()
        .and_then(|v| DateTime::parse_from_rfc3339(&v).ok())
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_else(Utc::now)
}
