//! SCIM 2.0 targets: everything that knows SCIM. One [`ScimClient`] per target, with its
//! authentication (`auth`), rate limit and the one retry policy ([`retry`]); every request
//! goes through [`ScimClient::send`] (`client`), so retries and errors are handled in one
//! place. The messages are typed in [`wire`], resources built and read in [`resource`],
//! per-profile behaviour is in [`profile`], listings in `listing` and [`paging`],
//! capabilities in [`discovery`], and the typed view of what a target holds for ldap2scim in
//! [`observe`].
//!
//! A target is not trusted: nothing it answers may leak a secret (everything taken from a
//! response goes through the target's [`Redactor`]), send data to another origin (writes and
//! the OAuth2 token request never follow a redirect, reads only within the same origin), or
//! grow without bound (response size and paging are limited). Ids it hands out are single
//! path segments ([`ScimId::parse`]), percent-encoded into URLs. This module must never
//! know about directories, snapshots or plans beyond the resources it is handed.

mod auth;
mod client;
pub mod discovery;
mod error;
mod headers;
mod listing;
pub mod observe;
pub mod paging;
pub mod profile;
pub mod redact;
mod requests;
pub mod resource;
pub mod retry;
pub mod wire;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use reqwest::{redirect, StatusCode};
use serde_json::Value;
use tokio::sync::Mutex;

use crate::clock::Clock;
use crate::config::{Auth, TargetConfig};
use crate::model::ScimId;
use auth::TOKEN_PATH;
pub(crate) use client::BodyError;
pub use discovery::Capabilities;
pub use error::{Cause, TargetError};
pub use redact::Redactor;
use retry::RetryPolicy;
pub use wire::{PatchOp, PATCH_SCHEMA};

/// How many same-origin redirects a read follows.
const MAX_READ_REDIRECTS: usize = 5;

/// Resources per page when listing, unless `/ServiceProviderConfig` says less.
const DEFAULT_PAGE_SIZE: usize = 100;

/// A successful response: status, ETag, and the JSON body (Null when there was none).
#[derive(Debug)]
pub struct Response {
    pub status: StatusCode,
    pub etag: Option<String>,
    pub body: Value,
    /// The size of the body as read, in bytes.
    pub size: u64,
}

pub struct ScimClient {
    name: String,
    base: url::Url,
    /// For GET: follows a few redirects within the base URL's origin, never to another one.
    reads: reqwest::Client,
    /// For writes and the OAuth2 token request: never follows a redirect.
    writes: reqwest::Client,
    auth: Auth,
    /// Cuts every secret of this target out of what a response or a transport error says.
    redactor: std::sync::RwLock<Redactor>,
    /// The largest response body read, in bytes.
    max_response_size: u64,
    policy: RetryPolicy,
    /// The target's dialect: what [`retry::classify`] and [`profile`] decide by.
    profile: profile::Profile,
    /// What `Retry-After` dates and rate-limit resets are measured from.
    clock: Clock,
    /// The next instant a request may start (rate limit and adaptive slow-down).
    pacer: Mutex<Instant>,
    /// The target's `proxy`, named when a connection fails.
    proxy: Option<String>,
    /// The configured minimum spacing between requests (`rate_limit`).
    interval: Duration,
    /// Extra spacing learnt from 429s: doubles on each, decays on success.
    slowdown: std::sync::Mutex<Duration>,
    page_size: AtomicUsize,
    /// From `/ServiceProviderConfig`: whether `filter` may be used (else lookups list).
    filter_supported: AtomicBool,
    oauth_token: Mutex<Option<(String, Instant)>>,
    counters: Counters,
    /// `[ha]`: a write starts only while the lease is ours for longer than it can take.
    fence: Option<crate::ha::Writer>,
    /// The target's request timeout (`timeout`).
    timeout: Duration,
}

/// What one client did, for metrics and reports.
#[derive(Debug, Default)]
pub struct Counters {
    /// Write requests (POST, PUT, PATCH, DELETE) sent, retries included.
    pub writes: AtomicUsize,
    /// Requests sent, retries included.
    pub requests: AtomicUsize,
    /// Attempts that were retried.
    pub retries: AtomicUsize,
    /// Answers with HTTP 429.
    pub throttled: AtomicUsize,
}

impl ScimClient {
    pub fn new(cfg: &TargetConfig) -> Result<Self, TargetError> {
        let client_error = |reason: String, cause: Option<Cause>| TargetError::Client {
            target: cfg.name.0.clone(),
            reason,
            cause,
        };
        let base = url::Url::parse(&cfg.url)
            .map_err(|e| client_error(format!("url {}: {e}", cfg.url), Some(Box::new(e))))?;
        if base.cannot_be_a_base() {
            return Err(client_error(
                format!("url {} cannot be a base URL", cfg.url),
                None,
            ));
        }
        let roots = match &cfg.ca_file {
            Some(path) => {
                Some(ca_roots(path).map_err(|(reason, cause)| client_error(reason, cause))?)
            }
            None => None,
        };
        let build = |policy: redirect::Policy| {
            let mut builder = reqwest::Client::builder()
                .user_agent(concat!("ldap2scim/", env!("CARGO_PKG_VERSION")))
                .timeout(cfg.timeout)
                .connect_timeout(Duration::from_secs(10))
                .redirect(policy);
            if let Some(roots) = &roots {
                builder = builder.tls_certs_only(roots.iter().cloned());
            }
            // Without `proxy`, reqwest follows HTTPS_PROXY / HTTP_PROXY / NO_PROXY itself.
            if let Some(proxy) = &cfg.proxy {
                let proxy = reqwest::Proxy::all(proxy.as_str())
                    .map_err(|e| client_error(format!("proxy {proxy}: {e}"), Some(Box::new(e))))?
                    .no_proxy(reqwest::NoProxy::from_env());
                builder = builder.proxy(proxy);
            }
            builder
                .build()
                .map_err(|e| client_error(e.to_string(), Some(Box::new(e))))
        };
        let reads = build(redirect::Policy::custom(|attempt| {
            let same_origin = attempt
                .previous()
                .first()
                .is_some_and(|first| first.origin() == attempt.url().origin());
            if same_origin && attempt.previous().len() <= MAX_READ_REDIRECTS {
                attempt.follow()
            } else {
                // The 3xx itself comes back, and becomes an error naming where it pointed.
                attempt.stop()
            }
        }))?;
        let writes = build(redirect::Policy::none())?;
        let interval = cfg
            .rate_limit
            .map(|r| Duration::from_secs_f64(1.0 / r.per_second.max(0.001)))
            .unwrap_or(Duration::ZERO);
        Ok(ScimClient {
            name: cfg.name.0.clone(),
            base,
            reads,
            writes,
            auth: cfg.auth.clone(),
            redactor: std::sync::RwLock::new(auth::redactor_for(&cfg.auth)),
            max_response_size: cfg.max_response_size,
            policy: RetryPolicy::default(),
            profile: cfg.profile,
            clock: Clock::system(),
            pacer: Mutex::new(Instant::now()),
            proxy: cfg.proxy.clone(),
            interval,
            slowdown: std::sync::Mutex::new(Duration::ZERO),
            page_size: AtomicUsize::new(DEFAULT_PAGE_SIZE),
            filter_supported: AtomicBool::new(true),
            oauth_token: Mutex::new(None),
            counters: Counters::default(),
            fence: None,
            timeout: cfg.timeout,
        })
    }

    /// Writes only while `ha` holds the lease (with a request timeout it leaves room for).
    pub fn with_fence(mut self, ha: Option<crate::ha::Writer>) -> Self {
        self.fence = ha;
        self
    }

    pub fn with_policy(mut self, policy: RetryPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Measures server-given dates (`Retry-After`, rate-limit resets) from `clock`.
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Number of write requests (POST, PUT, PATCH, DELETE) this client sent, retries included.
    pub fn writes(&self) -> usize {
        self.counters.writes.load(Ordering::Relaxed)
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// `text` without any secret of this target (configured ones and the latest OAuth2
    /// access tokens), in any form it may be echoed in. For anything taken from a response
    /// that may reach a report or a log: values read from listings too (a hostile target can
    /// put what we sent it into a `userName`). Cheap when nothing matches: the forms are built
    /// once per client, and a text without any of them is copied as it is.
    pub fn redact(&self, text: &str) -> String {
        self.redactor
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .redact(text)
    }

    /// The URL of `segments` below the base URL, each one percent-encoded as one segment.
    fn url(&self, segments: &[&str]) -> url::Url {
        below(&self.base, segments)
    }

    /// An error message part taken from a response body, with every secret cut out.
    fn error_detail(&self, bytes: &[u8]) -> (Option<String>, String) {
        error::error_detail(bytes, |t| self.redact(t))
    }
}

/// `base` with `segments` appended, each percent-encoded as exactly one path segment.
fn below(base: &url::Url, segments: &[&str]) -> url::Url {
    let mut url = base.clone();
    if let Ok(mut path) = url.path_segments_mut() {
        path.pop_if_empty().extend(segments);
    }
    url
}

/// Whether an error says the credentials were refused: 401, 403, or no OAuth2 token.
pub fn is_auth_failure(e: &TargetError) -> bool {
    match e {
        TargetError::Rejected { status, .. } => matches!(status, 401 | 403),
        TargetError::Unavailable { path, .. } => path == TOKEN_PATH,
        _ => false,
    }
}

/// The id of a resource a target sent, validated ([`ScimId::parse`]); the reason when it is
/// missing or malformed.
pub fn resource_id(resource: &Value) -> Result<ScimId, String> {
    match wire::User::view(resource).id {
        wire::Field::Value(id) => ScimId::parse(&id),
        wire::Field::Invalid => Err("the id is not a string".into()),
        wire::Field::Missing => Err("it has no id".into()),
    }
}

/// The certificates of a PEM file, the only roots a target with `ca_file` is verified
/// against.
fn ca_roots(path: &std::path::Path) -> Result<Vec<reqwest::Certificate>, (String, Option<Cause>)> {
    let pem = std::fs::read(path).map_err(|e| {
        (
            format!("ca_file {}: {e}", path.display()),
            Some(Box::new(e) as Cause),
        )
    })?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
        (
            format!("ca_file {}: {e}", path.display()),
            Some(Box::new(e) as Cause),
        )
    })?;
    if certs.is_empty() {
        return Err((
            format!(
                "ca_file {}: no certificate found in the file",
                path.display()
            ),
            None,
        ));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ids_stay_one_path_segment() {
        let base = url::Url::parse("https://t.example/scim/v2").unwrap();
        assert_eq!(
            below(&base, &["Users", "a b%/..?#"]).as_str(),
            "https://t.example/scim/v2/Users/a%20b%25%2F..%3F%23"
        );
        let slash = url::Url::parse("https://t.example/scim/v2/").unwrap();
        assert_eq!(
            below(&slash, &["Users"]).as_str(),
            "https://t.example/scim/v2/Users"
        );
    }

    #[test]
    fn resource_ids_are_validated_with_a_reason() {
        assert_eq!(
            resource_id(&json!({ "id": "abc" })).unwrap(),
            ScimId("abc".into())
        );
        assert!(resource_id(&json!({})).unwrap_err().contains("no id"));
        assert!(resource_id(&json!({ "id": 7 }))
            .unwrap_err()
            .contains("not a string"));
        assert!(resource_id(&json!({ "id": null }))
            .unwrap_err()
            .contains("not a string"));
        assert!(resource_id(&json!({ "id": "../../x?y=" })).is_err());
        // Not a resource at all: no id.
        for body in [Value::Null, json!(["id"]), json!("abc")] {
            assert!(resource_id(&body).unwrap_err().contains("no id"), "{body}");
        }
    }

    #[test]
    fn scim_ids_are_single_path_segments() {
        assert_eq!(
            ScimId::parse("2819c223-7f76").unwrap().as_str(),
            "2819c223-7f76"
        );
        for bad in ["", ".", "..", "a/b", "a\\b", "a?b", "a#b", "a\u{7}b"] {
            assert!(ScimId::parse(bad).is_err(), "{bad:?}");
        }
        let long = "x".repeat(crate::model::MAX_SCIM_ID_LEN + 1);
        assert!(ScimId::parse(&long).is_err());
    }

    #[tokio::test]
    async fn a_malformed_id_from_anywhere_is_never_sent() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        // Nothing listens there, and nothing must be tried.
        let client = ScimClient::new(&crate::plan::tests::target()).unwrap();
        for id in ["..", ".", "../x", "a/b", "a?b", ""] {
            let id = ScimId(id.into());
            let e = client.delete("Users", &id).await.unwrap_err();
            assert!(matches!(e, TargetError::Malformed { .. }), "{e}");
            let e = client.get("Users", &id).await.unwrap_err();
            assert!(e.to_string().contains("nothing sent"), "{e}");
        }
        assert_eq!(client.counters().requests.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_client_redacts_values_taken_from_a_target() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut cfg = crate::plan::tests::target();
        let token = r#"tok/en+with="quote" and space"#;
        cfg.auth = Auth::Bearer(crate::config::Secret::new(token.to_string()));
        let client = ScimClient::new(&cfg).unwrap();
        let encoded: String = url::form_urlencoded::byte_serialize(token.as_bytes()).collect();
        for value in [
            token.to_string(),
            encoded.to_lowercase(),
            serde_json::to_string(token).unwrap(),
        ] {
            let from = format!("userName from {value}");
            let cut = client.redact(&from);
            assert!(cut.contains("***"), "{cut}");
            assert!(!cut.contains("quote"), "{cut}");
        }
        assert_eq!(client.redact("alice@example.org"), "alice@example.org");
    }

    #[test]
    fn a_client_that_cannot_be_built_keeps_the_cause() {
        use std::error::Error as _;
        let mut cfg = crate::plan::tests::target();
        cfg.url = "not a url".into();
        let e = ScimClient::new(&cfg).err().unwrap();
        assert!(
            e.to_string().starts_with("target ")
                && e.to_string()
                    .contains("cannot build the HTTP client: url not a url: "),
            "{e}"
        );
        assert!(e.source().is_some());
    }

    #[test]
    fn auth_failures_are_told_apart() {
        let rejected = |status| TargetError::Rejected {
            target: "t".into(),
            method: "GET".into(),
            path: "/Users".into(),
            status,
            scim_type: None,
            detail: String::new(),
        };
        assert!(is_auth_failure(&rejected(401)));
        assert!(is_auth_failure(&rejected(403)));
        assert!(!is_auth_failure(&rejected(404)));
        assert!(is_auth_failure(&TargetError::Unavailable {
            target: "t".into(),
            method: "POST".into(),
            path: TOKEN_PATH.into(),
            attempts: 1,
            reason: String::new(),
            cause: None,
        }));
    }
}
