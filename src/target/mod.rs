//! SCIM 2.0 targets: the HTTP client of one service provider, with its authentication, rate
//! limit and retry policy. One client per target; every request goes through
//! [`ScimClient::send`], so retries and errors are handled in one place.

pub mod retry;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::sync::Mutex;
use tracing::{debug, warn};

use crate::config::{Auth, TargetConfig};
use crate::model::ScimId;
use retry::{classify, Decision, Outcome, RetryPolicy};

/// Resources per page when listing, unless `/ServiceProviderConfig` says less.
const DEFAULT_PAGE_SIZE: usize = 100;
const MAX_SLOWDOWN: Duration = Duration::from_secs(5);

pub const PATCH_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:PatchOp";
const ERROR_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:Error";

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("target {target}: {method} {path} failed: HTTP {status}{}: {detail}", scim_type.as_deref().map(|t| format!(" ({t})")).unwrap_or_default())]
    Rejected {
        target: String,
        method: String,
        path: String,
        status: u16,
        scim_type: Option<String>,
        detail: String,
    },
    #[error("target {target}: {method} {path} failed after {attempts} attempts: {reason}")]
    Unavailable {
        target: String,
        method: String,
        path: String,
        attempts: usize,
        reason: String,
    },
    #[error("target {target}: {method} {path}: malformed response: {reason}")]
    Malformed {
        target: String,
        method: String,
        path: String,
        reason: String,
    },
    #[error("target {target}: cannot build the HTTP client: {reason}")]
    Client { target: String, reason: String },
}

impl TargetError {
    pub fn status(&self) -> Option<u16> {
        match self {
            TargetError::Rejected { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A successful response: status, ETag, and the JSON body (Null when there was none).
#[derive(Debug)]
pub struct Response {
    pub status: StatusCode,
    pub etag: Option<String>,
    pub body: Value,
}

pub struct ScimClient {
    name: String,
    base: String,
    http: reqwest::Client,
    auth: Auth,
    policy: RetryPolicy,
    /// The next instant a request may start (rate limit and adaptive slow-down).
    pacer: Mutex<Instant>,
    /// The configured minimum spacing between requests (`rate_limit`).
    interval: Duration,
    /// Extra spacing learnt from 429s: doubles on each, decays on success.
    slowdown: std::sync::Mutex<Duration>,
    page_size: AtomicUsize,
    /// From `/ServiceProviderConfig`: whether `filter` may be used (else lookups list).
    filter_supported: std::sync::atomic::AtomicBool,
    oauth_token: Mutex<Option<(String, Instant)>>,
    counters: Counters,
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
        let http = reqwest::Client::builder()
            .user_agent(concat!("ldap2scim/", env!("CARGO_PKG_VERSION")))
            .timeout(cfg.timeout)
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| TargetError::Client {
                target: cfg.name.0.clone(),
                reason: e.to_string(),
            })?;
        let interval = cfg
            .rate_limit
            .map(|r| Duration::from_secs_f64(1.0 / r.per_second.max(0.001)))
            .unwrap_or(Duration::ZERO);
        Ok(ScimClient {
            name: cfg.name.0.clone(),
            base: cfg.url.trim_end_matches('/').to_string(),
            http,
            auth: cfg.auth.clone(),
            policy: RetryPolicy::default(),
            pacer: Mutex::new(Instant::now()),
            interval,
            slowdown: std::sync::Mutex::new(Duration::ZERO),
            page_size: AtomicUsize::new(DEFAULT_PAGE_SIZE),
            filter_supported: std::sync::atomic::AtomicBool::new(true),
            oauth_token: Mutex::new(None),
            counters: Counters::default(),
        })
    }

    pub fn with_policy(mut self, policy: RetryPolicy) -> Self {
        self.policy = policy;
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

    /// Sends one request with the retry policy. `path` is relative to the base URL.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<Response, TargetError> {
        self.send_probed(method, path, query, body, None, None)
            .await
    }

    /// Like [`send`](Self::send); for a create, `probe` names the resource type and
    /// `externalId`: before a retry after a failure that may have happened after the server
    /// acted (a lost answer), the resource is looked up, and if it is there, that is the answer.
    async fn send_probed(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
        probe: Option<(&str, &str)>,
        if_match: Option<&str>,
    ) -> Result<Response, TargetError> {
        let url = format!("{}{}", self.base, path);
        let mut delays = self.policy.delays();
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.pace().await;
            let mut req = self
                .http
                .request(method.clone(), &url)
                .header("Accept", "application/scim+json, application/json");
            if !query.is_empty() {
                req = req.query(query);
            }
            if let Some(etag) = if_match {
                req = req.header("If-Match", etag);
            }
            if let Some(b) = body {
                req = req
                    .header("Content-Type", "application/scim+json")
                    .body(serde_json::to_vec(b).expect("JSON values serialize"));
            }
            req = self.authorize(req).await?;
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            if method != Method::GET {
                self.counters.writes.fetch_add(1, Ordering::Relaxed);
            }
            // (retry-after hint, what went wrong, whether the server may have acted)
            let (after, failure, maybe_done) = match req.send().await {
                Ok(resp) => {
                    let status = resp.status();
                    let decision = classify(&Outcome::Response {
                        status,
                        headers: resp.headers(),
                    });
                    let etag = resp
                        .headers()
                        .get("etag")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    if status.as_u16() == 429 {
                        self.counters.throttled.fetch_add(1, Ordering::Relaxed);
                        self.slow_down();
                    }
                    match (decision, resp.bytes().await) {
                        (Decision::Success, Ok(bytes)) => match parse_body(&bytes) {
                            Ok(body) => {
                                self.speed_up();
                                debug!(target = %self.name, %method, path, status = status.as_u16(), "SCIM request done");
                                return Ok(Response { status, etag, body });
                            }
                            Err(reason) => (
                                None,
                                format!("HTTP {}: malformed response: {reason}", status.as_u16()),
                                true,
                            ),
                        },
                        (Decision::GiveUp, Ok(bytes)) => {
                            let (scim_type, detail) = error_detail(&bytes);
                            return Err(TargetError::Rejected {
                                target: self.name.clone(),
                                method: method.to_string(),
                                path: path.to_string(),
                                status: status.as_u16(),
                                scim_type,
                                detail,
                            });
                        }
                        (Decision::Retry(after), Ok(bytes)) => {
                            let (_, detail) = error_detail(&bytes);
                            let code = status.as_u16();
                            (
                                after,
                                format!("HTTP {code}: {detail}"),
                                code != 429 && code != 503,
                            )
                        }
                        (_, Err(e)) => (None, format!("reading the response failed: {e}"), true),
                    }
                }
                Err(e) => (None, transport_reason(&e), !e.is_connect()),
            };
            if let (true, Some((resource_type, external_id))) = (maybe_done, probe) {
                if let Ok(found) =
                    Box::pin(self.find_eq(resource_type, "externalId", external_id)).await
                {
                    if let Some(existing) = found.into_iter().next() {
                        warn!(target = %self.name, %method, path, reason = %failure, "the answer was lost but the resource exists; not sending it again");
                        return Ok(Response {
                            status: StatusCode::OK,
                            etag: None,
                            body: existing,
                        });
                    }
                }
            }
            let Some(backoff) = delays.next() else {
                return Err(TargetError::Unavailable {
                    target: self.name.clone(),
                    method: method.to_string(),
                    path: path.to_string(),
                    attempts: attempt,
                    reason: failure,
                });
            };
            let wait = after.unwrap_or(backoff);
            self.counters.retries.fetch_add(1, Ordering::Relaxed);
            warn!(target = %self.name, %method, path, attempt, wait_ms = wait.as_millis() as u64, reason = %failure, "SCIM request failed; retrying");
            tokio::time::sleep(wait).await;
        }
    }

    fn slow_down(&self) {
        let mut s = self.slowdown.lock().unwrap_or_else(|e| e.into_inner());
        *s = (*s * 2).max(Duration::from_millis(100)).min(MAX_SLOWDOWN);
    }

    fn speed_up(&self) {
        let mut s = self.slowdown.lock().unwrap_or_else(|e| e.into_inner());
        if !s.is_zero() {
            *s = if *s < Duration::from_millis(20) {
                Duration::ZERO
            } else {
                *s * 3 / 4
            };
        }
    }

    /// Waits for the target's rate limit and for any slow-down 429s taught us.
    async fn pace(&self) {
        let spacing = self
            .interval
            .max(*self.slowdown.lock().unwrap_or_else(|e| e.into_inner()));
        if spacing.is_zero() {
            return;
        }
        let slot = {
            let mut next = self.pacer.lock().await;
            let slot = (*next).max(Instant::now());
            *next = slot + spacing;
            slot
        };
        tokio::time::sleep_until(slot.into()).await;
    }

    async fn authorize(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::RequestBuilder, TargetError> {
        Ok(match &self.auth {
            Auth::Bearer(token) => req.bearer_auth(token.expose()),
            Auth::Basic { username, password } => req.basic_auth(username, Some(password.expose())),
            Auth::OAuth2 { .. } => req.bearer_auth(self.oauth_token().await?),
        })
    }

    /// OAuth2 client-credentials token, cached until shortly before it expires.
    async fn oauth_token(&self) -> Result<String, TargetError> {
        let Auth::OAuth2 {
            token_url,
            client_id,
            client_secret,
            scope,
            ..
        } = &self.auth
        else {
            unreachable!("only called for OAuth2")
        };
        let mut cached = self.oauth_token.lock().await;
        if let Some((tok, until)) = cached.as_ref() {
            if Instant::now() < *until {
                return Ok(tok.clone());
            }
        }
        // Built apart: the serializer is not `Send`, so it must not live across an await.
        let form = {
            let mut form = url::form_urlencoded::Serializer::new(String::new());
            form.append_pair("grant_type", "client_credentials");
            form.append_pair("client_id", client_id);
            form.append_pair("client_secret", client_secret.expose());
            if let Some(s) = scope {
                form.append_pair("scope", s);
            }
            form.finish()
        };
        let fail = |reason: String| TargetError::Unavailable {
            target: self.name.clone(),
            method: "POST".into(),
            path: "(oauth2 token_url)".into(),
            attempts: 1,
            reason,
        };
        let resp = self
            .http
            .post(token_url)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(form)
            .send()
            .await
            .map_err(|e| fail(transport_reason(&e)))?;
        if !resp.status().is_success() {
            return Err(fail(format!(
                "token endpoint answered HTTP {}",
                resp.status().as_u16()
            )));
        }
        let body: Value = resp
            .json()
            .await
            .map_err(|e| fail(format!("token response is not JSON: {e}")))?;
        let token = body["access_token"]
            .as_str()
            .ok_or_else(|| fail("token response has no access_token".into()))?;
        let ttl = body["expires_in"]
            .as_u64()
            .unwrap_or(300)
            .saturating_sub(30)
            .max(10);
        *cached = Some((token.to_string(), Instant::now() + Duration::from_secs(ttl)));
        Ok(token.to_string())
    }

    /// Creates a resource. A lost answer is not turned into a duplicate: before a retry the
    /// resource is looked up by its `externalId`.
    pub async fn create(
        &self,
        resource_type: &str,
        body: &Value,
    ) -> Result<(ScimId, Option<String>), TargetError> {
        let (id, etag, _) = self.create_returning(resource_type, body).await?;
        Ok((id, etag))
    }

    /// [`create`](Self::create), also returning the resource the target answered with (what
    /// it kept of what we sent).
    pub async fn create_returning(
        &self,
        resource_type: &str,
        body: &Value,
    ) -> Result<(ScimId, Option<String>, Value), TargetError> {
        let path = format!("/{resource_type}");
        let external_id = body.get("externalId").and_then(Value::as_str);
        let probe = external_id.map(|e| (resource_type, e));
        let resp = self
            .send_probed(Method::POST, &path, &[], Some(body), probe, None)
            .await?;
        let id =
            resp.body
                .get("id")
                .and_then(Value::as_str)
                .ok_or_else(|| TargetError::Malformed {
                    target: self.name.clone(),
                    method: "POST".into(),
                    path: path.clone(),
                    reason: "the created resource has no id".into(),
                })?;
        let id = ScimId(id.to_string());
        let etag = etag_of(&resp);
        Ok((id, etag, resp.body))
    }

    pub async fn patch(
        &self,
        resource_type: &str,
        id: &ScimId,
        ops: Vec<Value>,
    ) -> Result<Option<String>, TargetError> {
        self.patch_if_match(resource_type, id, ops, None).await
    }

    /// PATCH with `If-Match: etag` when one is known. A 412 (someone changed the resource since
    /// we last saw it) refetches its current ETag and tries once more: our change still wins,
    /// but never blindly over a version we did not see.
    pub async fn patch_if_match(
        &self,
        resource_type: &str,
        id: &ScimId,
        ops: Vec<Value>,
        etag: Option<&str>,
    ) -> Result<Option<String>, TargetError> {
        let (etag, _) = self.patch_returning(resource_type, id, ops, etag).await?;
        Ok(etag)
    }

    /// [`patch_if_match`](Self::patch_if_match), also returning the answer's body (the
    /// resource, or `Null` for a 204).
    pub async fn patch_returning(
        &self,
        resource_type: &str,
        id: &ScimId,
        ops: Vec<Value>,
        etag: Option<&str>,
    ) -> Result<(Option<String>, Value), TargetError> {
        let body = json!({ "schemas": [PATCH_SCHEMA], "Operations": ops });
        let path = format!("/{resource_type}/{}", id.0);
        match self
            .send_probed(Method::PATCH, &path, &[], Some(&body), None, etag)
            .await
        {
            Ok(resp) => Ok((etag_of(&resp), resp.body)),
            Err(e) if e.status() == Some(412) && etag.is_some() => {
                let current = self.send(Method::GET, &path, &[], None).await?;
                let fresh = etag_of(&current);
                warn!(target = %self.name, path, "412: the resource changed on the target; refetched its ETag and retrying once");
                let resp = self
                    .send_probed(
                        Method::PATCH,
                        &path,
                        &[],
                        Some(&body),
                        None,
                        fresh.as_deref(),
                    )
                    .await?;
                Ok((etag_of(&resp), resp.body))
            }
            Err(e) => Err(e),
        }
    }

    /// Replaces a whole resource (for targets without PATCH).
    pub async fn put(
        &self,
        resource_type: &str,
        id: &ScimId,
        body: &Value,
    ) -> Result<Option<String>, TargetError> {
        let resp = self
            .send(
                Method::PUT,
                &format!("/{resource_type}/{}", id.0),
                &[],
                Some(body),
            )
            .await?;
        Ok(etag_of(&resp))
    }

    pub async fn delete(&self, resource_type: &str, id: &ScimId) -> Result<(), TargetError> {
        match self
            .send(
                Method::DELETE,
                &format!("/{resource_type}/{}", id.0),
                &[],
                None,
            )
            .await
        {
            Ok(_) => Ok(()),
            // Already gone is what we wanted.
            Err(e) if e.status() == Some(404) => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub async fn get(&self, resource_type: &str, id: &ScimId) -> Result<Value, TargetError> {
        Ok(self
            .send(
                Method::GET,
                &format!("/{resource_type}/{}", id.0),
                &[],
                None,
            )
            .await?
            .body)
    }

    /// Resources whose top-level `attr` equals `value` (`externalId` exactly; `userName` and
    /// `displayName` ignoring case, as RFC 7643 defines them). Asks with `attr eq "value"` (the
    /// one filter every provider supports), or lists everything where filtering is not
    /// supported, and in both cases keeps only true matches: a target that ignores or
    /// misreads the filter never makes someone else's account look like ours.
    pub async fn find_eq(
        &self,
        resource_type: &str,
        attr: &str,
        value: &str,
    ) -> Result<Vec<Value>, TargetError> {
        let candidates = if self.filter_supported.load(Ordering::Relaxed) {
            let escaped = value.replace('\\', "\\\\").replace('"', "\\\"");
            let filter = format!("{attr} eq \"{escaped}\"");
            let resp = self
                .send(
                    Method::GET,
                    &format!("/{resource_type}"),
                    &[("filter", filter)],
                    None,
                )
                .await?;
            self.resources(resource_type, resp.body)?
        } else {
            self.list_all(resource_type).await?
        };
        let exact = attr == "externalId";
        Ok(candidates
            .into_iter()
            .filter(|r| {
                r.get(attr).and_then(Value::as_str).is_some_and(|v| {
                    if exact {
                        v == value
                    } else {
                        v.to_lowercase() == value.to_lowercase()
                    }
                })
            })
            .collect())
    }

    /// Every resource of a type, page by page.
    pub async fn list_all(&self, resource_type: &str) -> Result<Vec<Value>, TargetError> {
        let mut all = Vec::new();
        let page = self.page_size.load(Ordering::Relaxed);
        loop {
            let query = [
                ("startIndex", (all.len() + 1).to_string()),
                ("count", page.to_string()),
            ];
            let resp = self
                .send(Method::GET, &format!("/{resource_type}"), &query, None)
                .await?;
            let total = resp
                .body
                .get("totalResults")
                .and_then(Value::as_u64)
                .map(|n| n as usize);
            let items = self.resources(resource_type, resp.body)?;
            let got = items.len();
            all.extend(items);
            // Without totalResults, a full page means there may be more.
            let done = match total {
                Some(total) => all.len() >= total,
                None => got < page,
            };
            if got == 0 || done {
                return Ok(all);
            }
        }
    }

    pub async fn service_provider_config(&self) -> Result<Value, TargetError> {
        Ok(self
            .send(Method::GET, "/ServiceProviderConfig", &[], None)
            .await?
            .body)
    }

    /// Reads `/ServiceProviderConfig` and adapts to it (page size from `filter.maxResults`).
    /// A target without one is used with defaults.
    pub async fn discover(&self) -> Capabilities {
        let spc = match self.service_provider_config().await {
            Ok(v) => v,
            Err(e) => {
                debug!(target = %self.name, error = %e, "no usable /ServiceProviderConfig; using defaults");
                return Capabilities::default();
            }
        };
        let flag = |k: &str| {
            spc.get(k)
                .and_then(|v| v.get("supported"))
                .and_then(Value::as_bool)
        };
        let caps = Capabilities {
            patch: flag("patch").unwrap_or(true),
            filter: flag("filter").unwrap_or(true),
            etag: flag("etag").unwrap_or(false),
            bulk: flag("bulk").unwrap_or(false),
            max_results: spc
                .pointer("/filter/maxResults")
                .and_then(Value::as_u64)
                .map(|n| n as usize),
        };
        self.filter_supported.store(caps.filter, Ordering::Relaxed);
        if let Some(max) = caps.max_results.filter(|m| *m > 0) {
            self.page_size
                .store(max.min(DEFAULT_PAGE_SIZE * 10), Ordering::Relaxed);
        }
        debug!(target = %self.name, ?caps, "service provider capabilities");
        caps
    }

    fn resources(&self, resource_type: &str, body: Value) -> Result<Vec<Value>, TargetError> {
        match body.get("Resources") {
            Some(Value::Array(items)) => Ok(items.clone()),
            None if body.get("totalResults").is_some() => Ok(Vec::new()),
            _ => Err(TargetError::Malformed {
                target: self.name.clone(),
                method: "GET".into(),
                path: format!("/{resource_type}"),
                reason: "not a SCIM ListResponse (no Resources)".into(),
            }),
        }
    }
}

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

/// An empty body is `Null`; anything else must be JSON.
fn parse_body(bytes: &[u8]) -> Result<Value, String> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    serde_json::from_slice(bytes).map_err(|e| format!("the body is not JSON ({e})"))
}

fn etag_of(resp: &Response) -> Option<String> {
    resp.etag.clone().or_else(|| {
        resp.body
            .pointer("/meta/version")
            .and_then(Value::as_str)
            .map(str::to_string)
    })
}

/// The SCIM error's `scimType` and `detail`, or a short excerpt of a non-SCIM body.
fn error_detail(bytes: &[u8]) -> (Option<String>, String) {
    if let Ok(v) = serde_json::from_slice::<Value>(bytes) {
        let is_scim = v["schemas"]
            .as_array()
            .is_some_and(|s| s.iter().any(|x| x == ERROR_SCHEMA));
        let detail = v["detail"].as_str().or_else(|| v["message"].as_str());
        if is_scim || detail.is_some() {
            return (
                v["scimType"].as_str().map(str::to_string),
                detail.unwrap_or("(no detail)").to_string(),
            );
        }
    }
    let text = String::from_utf8_lossy(bytes);
    let excerpt: String = text.chars().take(200).collect();
    (
        None,
        if excerpt.trim().is_empty() {
            "(empty body)".into()
        } else {
            format!("non-SCIM body: {}", excerpt.trim())
        },
    )
}

fn transport_reason(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        let mut reason = "connection failed".to_string();
        let mut src = std::error::Error::source(e);
        while let Some(s) = src {
            reason = format!("connection failed: {s}");
            src = s.source();
        }
        reason
    } else {
        let mut reason = e.to_string();
        if let Some(url) = e.url() {
            reason = reason.replace(url.as_str(), "");
        }
        reason
    }
}
