//! What a target supports and whether its credentials work: `/ServiceProviderConfig` read
//! into [`ServiceProviderConfig`], reduced to [`Capabilities`], and the client adapted
//! to it (page size, filtering); one user listed so that a refused credential shows even in
//! a cycle with nothing to change.
//!
//! It must never fail a target for a missing or odd `/ServiceProviderConfig` (defaults are
//! used), and never hide an authentication failure behind those defaults.

use std::sync::atomic::Ordering;

use reqwest::Method;
use serde_json::Value;
use tracing::debug;

use super::wire::ServiceProviderConfig;
use super::{is_auth_failure, ScimClient, TargetError, DEFAULT_PAGE_SIZE};

/// What a target's `/ServiceProviderConfig` says it supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    pub patch: bool,
    pub filter: bool,
    pub etag: bool,
    pub bulk: bool,
    pub max_results: Option<usize>,
}

impl Default for Capabilities {
    fn default() -> Self {
        Capabilities {
            patch: true,
            filter: true,
            etag: false,
            bulk: false,
            max_results: None,
        }
    }
}

impl Capabilities {
    /// What a `/ServiceProviderConfig` says, each feature it does not state (or states
    /// unreadably) at its default.
    pub fn from_config(spc: &ServiceProviderConfig) -> Capabilities {
        let d = Capabilities::default();
        Capabilities {
            patch: spc.patch().unwrap_or(d.patch),
            filter: spc.filter().unwrap_or(d.filter),
            etag: spc.etag().unwrap_or(d.etag),
            bulk: spc.bulk().unwrap_or(d.bulk),
            max_results: spc
                .max_results()
                .map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
        }
    }
}

impl ScimClient {
    pub async fn service_provider_config(&self) -> Result<Value, TargetError> {
        Ok(self
            .send(Method::GET, &["ServiceProviderConfig"], &[], None)
            .await?
            .body)
    }

    /// Reads `/ServiceProviderConfig` and adapts to it (page size from `filter.maxResults`).
    /// A target without one is used with defaults. Every cycle thus reads each target at least
    /// once with its credentials (and, since some servers serve that document to anyone, lists
    /// one user too): a revoked or wrong credential (401, 403, a refused OAuth2 token) is an
    /// error even in a cycle with nothing to change.
    pub async fn discover(&self) -> Result<Capabilities, TargetError> {
        Ok(self.discover_with(false).await?.0)
    }

    /// For `check --connect`: [`discover`](Self::discover), but any failure to reach the
    /// target or to list one user with its credentials is an error, not a reason to use
    /// defaults. Also says whether `/ServiceProviderConfig` answered.
    pub async fn check_connection(&self) -> Result<(Capabilities, bool), TargetError> {
        self.discover_with(true).await
    }

    async fn discover_with(&self, strict: bool) -> Result<(Capabilities, bool), TargetError> {
        let spc = match self.service_provider_config().await {
            Ok(v) => Some(v),
            Err(e) if is_auth_failure(&e) => return Err(e),
            Err(e @ TargetError::Unavailable { .. }) if strict => return Err(e),
            // Unreachable: the probe below would only wait as long again.
            Err(e @ TargetError::Unavailable { .. }) => {
                debug!(target = %self.name, error = %e, "no usable /ServiceProviderConfig; using defaults");
                return Ok((Capabilities::default(), false));
            }
            Err(e) => {
                debug!(target = %self.name, error = %e, "no usable /ServiceProviderConfig; using defaults");
                None
            }
        };
        let probe = [("startIndex", "1".to_string()), ("count", "1".to_string())];
        match self.send(Method::GET, &["Users"], &probe, None).await {
            Err(e) if strict || is_auth_failure(&e) => return Err(e),
            Err(e) => debug!(target = %self.name, error = %e, "listing one user failed"),
            Ok(_) => {}
        }
        let Some(spc) = spc else {
            return Ok((Capabilities::default(), false));
        };
        let caps = Capabilities::from_config(&ServiceProviderConfig::parse(spc));
        self.filter_supported.store(caps.filter, Ordering::Relaxed);
        if let Some(max) = caps.max_results.filter(|m| *m > 0) {
            self.page_size
                .store(max.min(DEFAULT_PAGE_SIZE * 10), Ordering::Relaxed);
        }
        debug!(target = %self.name, ?caps, "service provider capabilities");
        Ok((caps, true))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn caps(body: Value) -> Capabilities {
        Capabilities::from_config(&ServiceProviderConfig::parse(body))
    }

    #[test]
    fn capabilities_default_where_the_config_says_nothing_usable() {
        assert_eq!(caps(json!({})), Capabilities::default());
        assert_eq!(caps(Value::Null), Capabilities::default());
        assert_eq!(caps(json!(["patch"])), Capabilities::default());
        assert_eq!(
            caps(json!({
                "patch": {"supported": false},
                "filter": {"supported": false, "maxResults": 200},
                "etag": {"supported": true},
                "bulk": {"supported": true},
            })),
            Capabilities {
                patch: false,
                filter: false,
                etag: true,
                bulk: true,
                max_results: Some(200),
            }
        );
        // Wrong types: that feature is at its default, the others are read.
        assert_eq!(
            caps(json!({
                "patch": {"supported": "false"},
                "filter": "yes",
                "etag": {"supported": true},
                "bulk": [true],
            })),
            Capabilities {
                etag: true,
                ..Capabilities::default()
            }
        );
        assert_eq!(
            caps(json!({"filter": {"maxResults": u64::MAX}})).max_results,
            Some(usize::try_from(u64::MAX).unwrap_or(usize::MAX))
        );
    }
}
