//! SCIM 2.0 targets: the HTTP client of one service provider, with its authentication, rate
//! limit and retry policy. One client per target; every request goes through
//! [`ScimClient::send`], so retries and errors are handled in one place.
//!
//! A target is not trusted: nothing it answers may leak a secret (everything taken from a
//! response goes through the target's [`Redactor`]), send data to another origin (writes and
//! the OAuth2 token request never follow a redirect, reads only within the same origin), or
//! grow without bound (response size and paging are limited). Ids it hands out are single
//! path segments ([`ScimId::parse`]), percent-encoded into URLs.

pub mod observe;
pub mod paging;
pub mod profile;
pub mod redact;
pub mod resource;
pub mod retry;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, LOCATION};
use reqwest::{redirect, Method, StatusCode};
use serde_json::{json, Value};
use tokio::sync::Mutex;
use tracing::{debug, warn};

use crate::config::{Auth, ClientAuth, TargetConfig};
use crate::model::ScimId;
use paging::{Pager, Step};
pub use redact::Redactor;
use retry::{classify, Decision, Outcome, RetryPolicy};

/// How many same-origin redirects a read follows.
const MAX_READ_REDIRECTS: usize = 5;
/// What error messages call the OAuth2 token request (never its URL's query).
const TOKEN_PATH: &str = "(oauth2 token_url)";

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
        let client_error = |reason: String| TargetError::Client {
            target: cfg.name.0.clone(),
            reason,
        };
        let base =
            url::Url::parse(&cfg.url).map_err(|e| client_error(format!("url {}: {e}", cfg.url)))?;
        if base.cannot_be_a_base() {
            return Err(client_error(format!(
                "url {} cannot be a base URL",
                cfg.url
            )));
        }
        let roots = match &cfg.ca_file {
            Some(path) => Some(ca_roots(path).map_err(client_error)?),
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
            builder.build().map_err(|e| client_error(e.to_string()))
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
            redactor: std::sync::RwLock::new(redactor_for(&cfg.auth)),
            max_response_size: cfg.max_response_size,
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

    /// Sends one request with the retry policy. `segments` is the path below the base URL
    /// (`["Users", id]`), each element one percent-encoded path segment.
    pub async fn send(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<Response, TargetError> {
        self.send_probed(method, segments, query, body, None, None)
            .await
    }

    /// Like [`send`](Self::send); for a create, `probe` names the resource type and
    /// `externalId`: before a retry after a failure that may have happened after the server
    /// acted (a lost answer), the resource is looked up, and if it is there, that is the answer.
    async fn send_probed(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, String)],
        body: Option<&Value>,
        probe: Option<(&str, &str)>,
        if_match: Option<&str>,
    ) -> Result<Response, TargetError> {
        // For messages: the path as we meant it (ids were validated when they arrived).
        let path = format!("/{}", segments.join("/"));
        let path = path.as_str();
        // Ids are checked again here: one that reached us another way (an old snapshot) must
        // not become another path either (the url crate drops a `..` segment).
        if let Some(reason) = segments.iter().skip(1).find_map(|s| ScimId::parse(s).err()) {
            return Err(TargetError::Malformed {
                target: self.name.clone(),
                method: method.to_string(),
                path: format!("/{}/…", segments.first().unwrap_or(&"")),
                reason: self.redact(&format!(
                    "an id it gave earlier is unusable, nothing sent: {reason}"
                )),
            });
        }
        let url = self.url(segments);
        let http = if method == Method::GET {
            &self.reads
        } else {
            &self.writes
        };
        let mut delays = self.policy.delays();
        let mut attempt = 0;
        // An OAuth2 access token refused with a 401 is dropped and the request sent once more
        // with a fresh one (a rotated or revoked token); a second 401 is final.
        let mut reauthorized = false;
        loop {
            attempt += 1;
            self.pace().await;
            let mut req = http
                .request(method.clone(), url.clone())
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
            let (authorized, oauth_token) = self.authorize(req).await?;
            req = authorized;
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            if method != Method::GET {
                self.counters.writes.fetch_add(1, Ordering::Relaxed);
            }
            let rejected = |status: StatusCode, scim_type: Option<String>, detail: String| {
                TargetError::Rejected {
                    target: self.name.clone(),
                    method: method.to_string(),
                    path: path.to_string(),
                    status: status.as_u16(),
                    scim_type,
                    detail,
                }
            };
            // (retry-after hint, what went wrong, whether the server may have acted)
            let (after, failure, maybe_done) = match req.send().await {
                Ok(mut resp) => {
                    let status = resp.status();
                    if status.is_redirection() && status != StatusCode::NOT_MODIFIED {
                        let detail = self.redirect_detail(&method, resp.headers());
                        return Err(rejected(status, None, detail));
                    }
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
                    match (decision, self.read_body(&mut resp).await) {
                        (_, Err(BodyError::TooLarge)) => {
                            return Err(TargetError::Malformed {
                                target: self.name.clone(),
                                method: method.to_string(),
                                path: path.to_string(),
                                reason: format!(
                                    "HTTP {}: the body is larger than max_response_size ({} bytes); not read further",
                                    status.as_u16(),
                                    self.max_response_size
                                ),
                            });
                        }
                        (Decision::Success, Ok(bytes)) => match parse_body(&bytes) {
                            Ok(body) => {
                                self.speed_up();
                                debug!(target = %self.name, %method, path, status = status.as_u16(), "SCIM request done");
                                return Ok(Response {
                                    status,
                                    etag,
                                    body,
                                    size: bytes.len() as u64,
                                });
                            }
                            Err(reason) => (
                                None,
                                format!(
                                    "HTTP {}: malformed response: {}",
                                    status.as_u16(),
                                    self.redact(&reason)
                                ),
                                true,
                            ),
                        },
                        (Decision::GiveUp, Ok(_))
                            if status == StatusCode::UNAUTHORIZED
                                && !reauthorized
                                && oauth_token.is_some() =>
                        {
                            reauthorized = true;
                            self.drop_oauth_token(oauth_token.as_deref().unwrap_or_default())
                                .await;
                            warn!(target = %self.name, %method, path, "HTTP 401: the OAuth2 access token was refused; asking for a new one and sending the request once more");
                            continue;
                        }
                        (Decision::GiveUp, Ok(bytes)) => {
                            let (scim_type, mut detail) = self.error_detail(&bytes);
                            if status == StatusCode::NOT_IMPLEMENTED {
                                detail.push_str(&self.not_implemented_hint(&method, path, body));
                            }
                            return Err(rejected(status, scim_type, detail));
                        }
                        // A final answer stays final even when its body is unreadable.
                        (Decision::GiveUp, Err(BodyError::Read(e))) => {
                            let detail = format!(
                                "(the body could not be read: {})",
                                self.redact(&transport_reason(&e))
                            );
                            return Err(rejected(status, None, detail));
                        }
                        (Decision::Retry(after), Ok(bytes)) => {
                            let (_, detail) = self.error_detail(&bytes);
                            let code = status.as_u16();
                            (
                                after,
                                format!("HTTP {code}: {detail}"),
                                code != 429 && code != 503,
                            )
                        }
                        (_, Err(BodyError::Read(e))) => (
                            None,
                            format!(
                                "reading the response failed: {}",
                                self.redact(&transport_reason(&e))
                            ),
                            true,
                        ),
                    }
                }
                Err(e) => {
                    let reason = self.redact(&transport_reason(&e));
                    match classify(&Outcome::Transport) {
                        Decision::Retry(after) => (after, reason, !e.is_connect()),
                        Decision::Success | Decision::GiveUp => {
                            return Err(TargetError::Unavailable {
                                target: self.name.clone(),
                                method: method.to_string(),
                                path: path.to_string(),
                                attempts: attempt,
                                reason,
                            })
                        }
                    }
                }
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
                            size: 0,
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

    /// Why a 3xx was not followed, naming only the origin it pointed to (its path and query
    /// may carry anything).
    fn redirect_detail(&self, method: &Method, headers: &HeaderMap) -> String {
        let to = headers
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|l| self.base.join(l).ok())
            .map(|u| u.origin().ascii_serialization());
        let to = match to {
            Some(origin) if origin == self.base.origin().ascii_serialization() => {
                format!("{origin} (the same origin)")
            }
            Some(origin) => origin,
            None => "an unreadable Location".into(),
        };
        let rule = if *method == Method::GET {
            "a read follows redirects only within the target's own origin, a few at most"
        } else {
            "a write never follows a redirect"
        };
        self.redact(&format!("redirected to {to}; not followed: {rule}"))
    }

    /// For a 501: what the target refused (a PATCH's attribute paths) and what to change.
    fn not_implemented_hint(&self, method: &Method, path: &str, body: Option<&Value>) -> String {
        let mut attrs: Vec<String> = Vec::new();
        for op in body
            .and_then(|b| b.get("Operations"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            match op.get("path").and_then(Value::as_str) {
                Some(p) => attrs.push(p.to_string()),
                None => attrs.extend(
                    op.get("value")
                        .and_then(Value::as_object)
                        .into_iter()
                        .flatten()
                        .map(|(k, _)| k.clone()),
                ),
            }
        }
        attrs.dedup();
        let hint = if attrs.is_empty() {
            format!(
                "; the target does not implement {method} {path}: choose a `profile` for it in its target file"
            )
        } else {
            let keys: Vec<String> = attrs.iter().map(|a| format!("`{a}`")).collect();
            format!(
                "; the target does not implement {method} of {}: remove {} from the [mapping] of its target file, or choose a `profile` that leaves it out",
                attrs.join(", "),
                keys.join(", ")
            )
        };
        self.redact(&hint)
    }

    /// The whole body, unless it is larger than `max_response_size` (then no more is read).
    async fn read_body(&self, resp: &mut reqwest::Response) -> Result<Vec<u8>, BodyError> {
        let max = self.max_response_size;
        if resp.content_length().is_some_and(|len| len > max) {
            return Err(BodyError::TooLarge);
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(BodyError::Read)? {
            if (body.len() + chunk.len()) as u64 > max {
                return Err(BodyError::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
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

    /// `req` with this target's credentials, and the OAuth2 access token it carries, if any.
    async fn authorize(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<(reqwest::RequestBuilder, Option<String>), TargetError> {
        Ok(match &self.auth {
            Auth::Bearer(token) => (req.bearer_auth(token.expose()), None),
            Auth::Basic { username, password } => {
                (req.basic_auth(username, Some(password.expose())), None)
            }
            Auth::OAuth2 { .. } => {
                let token = self.oauth_token().await?;
                (req.bearer_auth(&token), Some(token))
            }
        })
    }

    /// Forgets the cached OAuth2 access token if it is still `refused` (a concurrent request
    /// may have fetched a fresh one meanwhile), so the next request asks for a new one.
    async fn drop_oauth_token(&self, refused: &str) {
        let mut cached = self.oauth_token.lock().await;
        if cached.as_ref().is_some_and(|(tok, _)| tok == refused) {
            *cached = None;
        }
    }

    /// OAuth2 client-credentials token, cached until shortly before it expires. The client
    /// authenticates as RFC 6749 §2.3.1 says (`client_secret_basic` unless `client_auth =
    /// "post"`), and the request never follows a redirect: the secret goes to `token_url`
    /// and nowhere else.
    async fn oauth_token(&self) -> Result<String, TargetError> {
        let Auth::OAuth2 {
            token_url,
            client_id,
            client_secret,
            scope,
            client_auth,
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
            if *client_auth == ClientAuth::Post {
                form.append_pair("client_id", client_id);
                form.append_pair("client_secret", client_secret.expose());
            }
            if let Some(s) = scope {
                form.append_pair("scope", s);
            }
            form.finish()
        };
        let fail = |reason: String| TargetError::Unavailable {
            target: self.name.clone(),
            method: "POST".into(),
            path: TOKEN_PATH.into(),
            attempts: 1,
            reason: self.redact(&reason),
        };
        let mut req = self
            .writes
            .post(token_url)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .header("Accept", "application/json")
            .body(form);
        if *client_auth == ClientAuth::Basic {
            let credentials = redact::client_basic_credentials(client_id, client_secret.expose());
            let mut value = HeaderValue::from_str(&format!("Basic {credentials}"))
                .map_err(|_| fail("the client credentials do not fit a header".into()))?;
            value.set_sensitive(true);
            req = req.header(AUTHORIZATION, value);
        }
        let mut resp = req.send().await.map_err(|e| fail(transport_reason(&e)))?;
        let status = resp.status();
        if status.is_redirection() {
            let to = resp
                .headers()
                .get(LOCATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|l| url::Url::parse(token_url).ok()?.join(l).ok())
                .map_or_else(
                    || "an unreadable Location".to_string(),
                    |u| u.origin().ascii_serialization(),
                );
            return Err(fail(format!(
                "the token endpoint answered HTTP {} (a redirect to {to}); a token request never follows a redirect, the client secret would go with it",
                status.as_u16()
            )));
        }
        let bytes = match self.read_body(&mut resp).await {
            Ok(b) => b,
            Err(BodyError::TooLarge) => {
                return Err(fail(format!(
                    "the token response is larger than max_response_size ({} bytes)",
                    self.max_response_size
                )))
            }
            Err(BodyError::Read(e)) => {
                return Err(fail(format!(
                    "reading the token response failed: {}",
                    transport_reason(&e)
                )))
            }
        };
        let body: Option<Value> = serde_json::from_slice(&bytes).ok();
        if !status.is_success() {
            let said = body
                .as_ref()
                .and_then(|b| token_error(b, |t| self.redact(t)));
            return Err(fail(format!(
                "the token endpoint answered HTTP {}{}",
                status.as_u16(),
                said.unwrap_or_default()
            )));
        }
        let body = body.ok_or_else(|| fail("the token response is not JSON".into()))?;
        let token = body["access_token"]
            .as_str()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| fail("the token response has no access_token".into()))?;
        if !usable_token(token) {
            return Err(fail(
                "the token response's access_token cannot be sent in an Authorization header"
                    .into(),
            ));
        }
        self.redactor
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .add_transient(token);
        let now = Instant::now();
        // A target cannot make us keep a token for ever, nor overflow the clock.
        *cached = now
            .checked_add(token_lifetime(body.get("expires_in")))
            .map(|until| (token.to_string(), until));
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
        let external_id = body.get("externalId").and_then(Value::as_str);
        let probe = external_id.map(|e| (resource_type, e));
        let resp = self
            .send_probed(Method::POST, &[resource_type], &[], Some(body), probe, None)
            .await?;
        let id = resource_id(&resp.body).map_err(|reason| TargetError::Malformed {
            target: self.name.clone(),
            method: "POST".into(),
            path: format!("/{resource_type}"),
            reason: self.redact(&format!("the created resource: {reason}")),
        })?;
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
        let segments = [resource_type, id.as_str()];
        match self
            .send_probed(Method::PATCH, &segments, &[], Some(&body), None, etag)
            .await
        {
            Ok(resp) => Ok((etag_of(&resp), resp.body)),
            Err(e) if e.status() == Some(412) && etag.is_some() => {
                let current = self.send(Method::GET, &segments, &[], None).await?;
                let fresh = etag_of(&current);
                warn!(target = %self.name, resource_type, id = %id, "412: the resource changed on the target; refetched its ETag and retrying once");
                let resp = self
                    .send_probed(
                        Method::PATCH,
                        &segments,
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
            .send(Method::PUT, &[resource_type, id.as_str()], &[], Some(body))
            .await?;
        Ok(etag_of(&resp))
    }

    pub async fn delete(&self, resource_type: &str, id: &ScimId) -> Result<(), TargetError> {
        match self
            .send(Method::DELETE, &[resource_type, id.as_str()], &[], None)
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
            .send(Method::GET, &[resource_type, id.as_str()], &[], None)
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
                .send(Method::GET, &[resource_type], &[("filter", filter)], None)
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

    /// Every resource of a type, page by page. Complete or an error: a target whose paging
    /// does not add up (a repeated page, a `startIndex` that does not advance, more pages than
    /// its first `totalResults` allows) fails the listing (see [`paging`]).
    pub async fn list_all(&self, resource_type: &str) -> Result<Vec<Value>, TargetError> {
        let mut all = Vec::new();
        let page = self.page_size.load(Ordering::Relaxed);
        let mut pager = Pager::new(page);
        loop {
            let query = [
                ("startIndex", pager.start().to_string()),
                ("count", page.to_string()),
            ];
            let resp = self
                .send(Method::GET, &[resource_type], &query, None)
                .await?;
            let number = |k: &str| resp.body.get(k).and_then(Value::as_u64);
            let (start_index, total_results) = (number("startIndex"), number("totalResults"));
            let bytes = resp.size;
            let items = self.resources(resource_type, resp.body)?;
            let ids: Vec<Option<&str>> = items
                .iter()
                .map(|r| {
                    resource_id(r)
                        .ok()
                        .map(|_| r["id"].as_str().unwrap_or_default())
                })
                .collect();
            let (fresh, step) = pager
                .take(&paging::Page {
                    start_index,
                    total_results,
                    ids: &ids,
                    bytes,
                })
                .map_err(|reason| TargetError::Malformed {
                    target: self.name.clone(),
                    method: "GET".into(),
                    path: format!("/{resource_type}"),
                    reason: format!("paging: {reason}; the listing is incomplete"),
                })?;
            drop(ids);
            let mut items: Vec<Option<Value>> = items.into_iter().map(Some).collect();
            all.extend(
                fresh
                    .into_iter()
                    .filter_map(|i| items.get_mut(i).and_then(Option::take)),
            );
            if step == Step::Done {
                return Ok(all);
            }
        }
    }

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
                .map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
        };
        self.filter_supported.store(caps.filter, Ordering::Relaxed);
        if let Some(max) = caps.max_results.filter(|m| *m > 0) {
            self.page_size
                .store(max.min(DEFAULT_PAGE_SIZE * 10), Ordering::Relaxed);
        }
        debug!(target = %self.name, ?caps, "service provider capabilities");
        Ok((caps, true))
    }

    /// The resources of a ListResponse, each with a valid id.
    fn resources(&self, resource_type: &str, body: Value) -> Result<Vec<Value>, TargetError> {
        let malformed = |reason: String| TargetError::Malformed {
            target: self.name.clone(),
            method: "GET".into(),
            path: format!("/{resource_type}"),
            reason: self.redact(&reason),
        };
        let items = match body {
            Value::Object(mut obj) => match obj.remove("Resources") {
                Some(Value::Array(items)) => items,
                None if obj.contains_key("totalResults") => Vec::new(),
                _ => return Err(malformed("not a SCIM ListResponse (no Resources)".into())),
            },
            _ => return Err(malformed("not a SCIM ListResponse (no Resources)".into())),
        };
        // A resource without a usable id is passed on: it is a problem for the directory entry
        // it matches (never a reason to create a second account), not for the whole listing.
        Ok(items)
    }

    /// An error message part taken from a response body, with every secret cut out.
    fn error_detail(&self, bytes: &[u8]) -> (Option<String>, String) {
        error_detail(bytes, |t| self.redact(t))
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
    match resource.get("id") {
        Some(Value::String(id)) => ScimId::parse(id),
        Some(_) => Err("the id is not a string".into()),
        None => Err("it has no id".into()),
    }
}

/// Every form in which this target's configured secrets could be echoed back.
fn redactor_for(auth: &Auth) -> Redactor {
    match auth {
        Auth::Bearer(token) => Redactor::new([token.expose()]),
        Auth::Basic { username, password } => Redactor::new([
            password.expose().to_string(),
            redact::basic_credentials(username, password.expose()),
        ]),
        Auth::OAuth2 {
            client_id,
            client_secret,
            ..
        } => Redactor::new([
            client_secret.expose().to_string(),
            redact::client_basic_credentials(client_id, client_secret.expose()),
            redact::basic_credentials(client_id, client_secret.expose()),
        ]),
    }
}

/// The certificates of a PEM file, the only roots a target with `ca_file` is verified
/// against.
fn ca_roots(path: &std::path::Path) -> Result<Vec<reqwest::Certificate>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("ca_file {}: {e}", path.display()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| format!("ca_file {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "ca_file {}: no certificate found in the file",
            path.display()
        ));
    }
    Ok(certs)
}

enum BodyError {
    TooLarge,
    Read(reqwest::Error),
}

/// At most `max` characters of `text`.
fn excerpt(text: &str, max: usize) -> String {
    let mut out: String = text.chars().take(max).collect();
    if out.len() < text.len() {
        out.push('…');
    }
    out
}

/// The most characters of a token endpoint's `error` or `error_description` reported.
const MAX_TOKEN_ERROR_CHARS: usize = 200;

/// What a token endpoint's error answer says (RFC 6749 §5.2: `error`, and maybe
/// `error_description`) as `": error: description"`, each redacted, then shortened.
fn token_error(body: &Value, redact: impl Fn(&str) -> String) -> Option<String> {
    let short = |t: &str| excerpt(&redact(t), MAX_TOKEN_ERROR_CHARS);
    let error = short(body.get("error")?.as_str()?);
    Some(
        match body.get("error_description").and_then(Value::as_str) {
            Some(d) => format!(": {error}: {}", short(d)),
            None => format!(": {error}"),
        },
    )
}

/// Whether an access token can be sent as `Authorization: Bearer …` (no control characters,
/// nothing a header cannot carry).
fn usable_token(token: &str) -> bool {
    token.bytes().all(|b| b.is_ascii_graphic())
        && HeaderValue::from_str(&format!("Bearer {token}")).is_ok()
}

/// The longest an OAuth2 access token is cached, whatever `expires_in` says.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);

/// How long an access token is used: its `expires_in` (300 s when absent or not a number)
/// less a 30 s margin, at least 10 s and at most [`MAX_TOKEN_LIFETIME`].
fn token_lifetime(expires_in: Option<&Value>) -> Duration {
    let secs = expires_in
        .and_then(Value::as_u64)
        .unwrap_or(300)
        .saturating_sub(30)
        .clamp(10, MAX_TOKEN_LIFETIME.as_secs());
    Duration::from_secs(secs)
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

/// The SCIM error's `scimType` and `detail`, or a short excerpt of a non-SCIM body, each
/// passed through `redact` before anything is cut (a cut must not leave half a secret).
fn error_detail(bytes: &[u8], redact: impl Fn(&str) -> String) -> (Option<String>, String) {
    if let Ok(v) = serde_json::from_slice::<Value>(bytes) {
        let is_scim = v["schemas"]
            .as_array()
            .is_some_and(|s| s.iter().any(|x| x == ERROR_SCHEMA));
        let detail = v["detail"].as_str().or_else(|| v["message"].as_str());
        if is_scim || detail.is_some() {
            return (
                v["scimType"].as_str().map(|t| excerpt(&redact(t), 100)),
                excerpt(&redact(detail.unwrap_or("(no detail)")), 1000),
            );
        }
    }
    let text = redact(&String::from_utf8_lossy(bytes));
    let text = text.trim();
    (
        None,
        if text.is_empty() {
            "(empty body)".into()
        } else {
            format!("non-SCIM body: {}", excerpt(text, 200))
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

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(resource_id(&json!({ "id": "../../x?y=" })).is_err());
    }

    #[test]
    fn error_details_are_redacted_before_they_are_cut() {
        let secret = "0123456789abcdef";
        let r = Redactor::new([secret]);
        let redact = |t: &str| r.redact(t);
        // A non-SCIM body whose excerpt would end inside the secret.
        let body = format!("{}{secret}", "x".repeat(190));
        let (_, detail) = error_detail(body.as_bytes(), redact);
        assert!(!detail.contains("01234567"), "{detail}");
        assert!(detail.ends_with("***"), "{detail}");
        let scim = json!({
            "schemas": [ERROR_SCHEMA],
            "scimType": "invalidValue",
            "detail": format!("Authorization: Bearer {secret}"),
        });
        let (kind, detail) = error_detail(scim.to_string().as_bytes(), redact);
        assert_eq!(kind.as_deref(), Some("invalidValue"));
        assert_eq!(detail, "Authorization: Bearer ***");
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
    fn token_endpoint_errors_are_redacted_then_shortened() {
        let secret = "0123456789abcdef";
        let r = Redactor::new([secret]);
        let redact = |t: &str| r.redact(t);
        // The secret straddles the cut: redacting after cutting would leave half of it.
        let description = format!("{}{secret}{}", "d".repeat(190), "e".repeat(5000));
        let said = token_error(
            &json!({ "error": "x".repeat(5000), "error_description": description }),
            redact,
        )
        .unwrap();
        assert!(!said.contains("01234567"), "{said}");
        assert!(said.contains("***"), "{said}");
        assert!(
            said.chars().count() <= 2 * (MAX_TOKEN_ERROR_CHARS + 1) + 4,
            "{said}"
        );
        assert_eq!(
            token_error(&json!({ "error": "invalid_client" }), redact).as_deref(),
            Some(": invalid_client")
        );
        assert_eq!(token_error(&json!({ "error": 7 }), redact), None);
    }

    #[test]
    fn a_token_lifetime_is_bounded_whatever_expires_in_says() {
        let life = |v: Value| token_lifetime(Some(&v));
        assert_eq!(life(json!(3600)), Duration::from_secs(3570));
        assert_eq!(life(json!(u64::MAX)), MAX_TOKEN_LIFETIME);
        assert_eq!(life(json!(0)), Duration::from_secs(10));
        assert_eq!(life(json!(-5)), Duration::from_secs(270));
        assert_eq!(life(json!("3600")), Duration::from_secs(270));
        assert_eq!(token_lifetime(None), Duration::from_secs(270));
        // What was computed fits the clock.
        assert!(Instant::now().checked_add(life(json!(u64::MAX))).is_some());
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
    fn an_access_token_must_fit_a_header() {
        assert!(usable_token("eyJhbGciOi.J9-_~+/="));
        for bad in ["a\r\nX-Injected: 1", "a b", "t\u{0}", "tök"] {
            assert!(!usable_token(bad), "{bad:?}");
        }
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
        }));
    }
}
