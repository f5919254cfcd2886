//! Sending one request: the attempt loop of [`ScimClient::send`], with pacing (rate limit
//! and the slow-down 429s teach), the size limit on bodies, redirects refused or kept within
//! the origin, and every attempt's outcome put to the one retry policy ([`retry::classify`]).
//! A create whose answer may have been lost is looked up before it is sent again.
//!
//! It must never decide on its own whether to retry (that is [`retry`]'s), never send a
//! request to a path an id could turn into another one, and never let anything a target
//! says reach a message unredacted.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, LOCATION};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use tracing::{debug, warn};

use super::error::transport_reason;
use super::retry::{self, classify, Decision, Outcome};
use super::{profile, Response, ScimClient, TargetError};
use crate::model::ScimId;

const MAX_SLOWDOWN: Duration = Duration::from_secs(5);

pub(crate) enum BodyError {
    TooLarge,
    Read(reqwest::Error),
}

/// How one attempt ended, once its outcome was classified.
enum Next {
    Done(Result<Response, TargetError>),
    /// The OAuth2 access token was refused: ask for a fresh one and send again, once.
    Reauthorize(String),
    /// Retry (after `after`, else the next backoff delay); `acted`: the server may have done
    /// what was asked.
    Again {
        after: Option<Duration>,
        failure: String,
        acted: bool,
        cause: Option<reqwest::Error>,
    },
    /// Given up without an answer that says why: the request is unavailable.
    Fail {
        failure: String,
        cause: Option<reqwest::Error>,
    },
}

/// Runs a write's attempt only while the lease is still ours: checked at every poll, so a
/// process paused while the request was on its way (connecting, waiting for the connection)
/// drops it on waking instead of sending it under a lease that ended. The answer of a request
/// already written is then lost, which the next holder's plan covers (promise 5).
async fn fenced(w: &crate::ha::Writer, attempt: impl std::future::Future<Output = Next>) -> Next {
    let mut attempt = std::pin::pin!(attempt);
    std::future::poll_fn(|cx| {
        if let Err(failure) = w.fence(Duration::ZERO) {
            return std::task::Poll::Ready(Next::Fail {
                failure,
                cause: None,
            });
        }
        attempt.as_mut().poll(cx)
    })
    .await
}

impl ScimClient {
    /// The request was given up without an answer that says why.
    fn unavailable(
        &self,
        method: &Method,
        path: &str,
        attempts: usize,
        reason: String,
        cause: Option<reqwest::Error>,
    ) -> TargetError {
        TargetError::Unavailable {
            target: self.name.clone(),
            method: method.to_string(),
            path: path.to_string(),
            attempts,
            reason,
            cause: cause.map(|e| Box::new(e) as _),
        }
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
    pub(crate) async fn send_probed(
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
            // The fence, as late as can be: no write starts unless the lease is ours for
            // longer than the request may take (its timeout is cut to fit).
            if let (true, Some(w)) = (method != Method::GET, &self.fence) {
                let limit = w.ha.write_timeout(self.timeout);
                match w.fence(limit) {
                    Ok(_) => req = req.timeout(limit),
                    Err(reason) => {
                        return Err(self.unavailable(&method, path, attempt - 1, reason, None))
                    }
                }
            }
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            if method != Method::GET {
                self.counters.writes.fetch_add(1, Ordering::Relaxed);
            }
            let sending = self.attempt(
                req,
                &method,
                path,
                body,
                oauth_token.filter(|_| !reauthorized),
            );
            let next = match (&self.fence, method != Method::GET) {
                (Some(w), true) => fenced(w, sending).await,
                _ => sending.await,
            };
            let (after, failure, acted, cause) = match next {
                Next::Done(result) => return result,
                Next::Fail { failure, cause } => {
                    return Err(self.unavailable(&method, path, attempt, failure, cause))
                }
                Next::Reauthorize(token) => {
                    reauthorized = true;
                    self.drop_oauth_token(&token).await;
                    warn!(target = %self.name, %method, path, "HTTP 401: the OAuth2 access token was refused; asking for a new one and sending the request once more");
                    continue;
                }
                Next::Again {
                    after,
                    failure,
                    acted,
                    cause,
                } => (after, failure, acted, cause),
            };
            if let (true, Some((resource_type, external_id))) = (acted, probe) {
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
                return Err(self.unavailable(&method, path, attempt, failure, cause));
            };
            let wait = after.unwrap_or(backoff);
            self.counters.retries.fetch_add(1, Ordering::Relaxed);
            warn!(target = %self.name, %method, path, attempt, wait_ms = wait.as_millis() as u64, reason = %failure, "SCIM request failed; retrying");
            tokio::time::sleep(wait).await;
        }
    }

    /// Sends one attempt and classifies how it ended. `oauth_token`: the access token it
    /// carries, when a refusal of it may still be answered with a fresh one.
    async fn attempt(
        &self,
        req: reqwest::RequestBuilder,
        method: &Method,
        path: &str,
        body: Option<&Value>,
        oauth_token: Option<String>,
    ) -> Next {
        let rejected =
            |status: StatusCode, scim_type: Option<String>, detail: String| TargetError::Rejected {
                target: self.name.clone(),
                method: method.to_string(),
                path: path.to_string(),
                status: status.as_u16(),
                scim_type,
                detail,
            };
        let mut resp = match req.send().await {
            Ok(resp) => resp,
            Err(e) => {
                let outcome = Outcome::Transport {
                    sent: !e.is_connect(),
                };
                let mut failure = self.redact(&transport_reason(&e));
                if let (true, Some(proxy)) = (e.is_connect(), &self.proxy) {
                    failure = format!(
                        "{failure} (through the proxy {proxy}, the target's proxy setting)"
                    );
                }
                return match classify(&outcome, self.profile, self.clock.now()) {
                    Decision::Retry(after) => Next::Again {
                        after,
                        failure,
                        acted: retry::may_have_acted(&outcome, self.profile, self.clock.now()),
                        cause: Some(e),
                    },
                    Decision::Success | Decision::GiveUp => Next::Fail {
                        failure,
                        cause: Some(e),
                    },
                };
            }
        };
        let status = resp.status();
        if status.is_redirection() && status != StatusCode::NOT_MODIFIED {
            let detail = self.redirect_detail(method, resp.headers());
            return Next::Done(Err(rejected(status, None, detail)));
        }
        let etag = resp
            .headers()
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        // What the status and headers say; the body may still change it (below).
        let answered = Outcome::Response {
            status,
            headers: resp.headers(),
        };
        let (decision, acted) = (
            classify(&answered, self.profile, self.clock.now()),
            retry::may_have_acted(&answered, self.profile, self.clock.now()),
        );
        let throttled =
            profile::throttled(self.profile, status, resp.headers(), self.clock.now()).is_some();
        if status.as_u16() == 429 || throttled {
            self.counters.throttled.fetch_add(1, Ordering::Relaxed);
            self.slow_down();
        }
        let bytes = match self.read_body(&mut resp).await {
            Ok(bytes) => bytes,
            Err(BodyError::TooLarge) => {
                debug_assert_eq!(
                    classify(&Outcome::TooLarge, self.profile, self.clock.now()),
                    Decision::GiveUp
                );
                return Next::Done(Err(TargetError::Malformed {
                    target: self.name.clone(),
                    method: method.to_string(),
                    path: path.to_string(),
                    reason: format!(
                        "HTTP {}: the body is larger than max_response_size ({} bytes); not read further",
                        status.as_u16(),
                        self.max_response_size
                    ),
                }));
            }
            Err(BodyError::Read(e)) => {
                let outcome = Outcome::BodyUnreadable { status };
                let reason = self.redact(&transport_reason(&e));
                return match classify(&outcome, self.profile, self.clock.now()) {
                    // A final answer stays final even when its body is unreadable.
                    Decision::GiveUp | Decision::Success => Next::Done(Err(rejected(
                        status,
                        None,
                        format!("(the body could not be read: {reason})"),
                    ))),
                    Decision::Retry(after) => Next::Again {
                        after,
                        failure: format!("reading the response failed: {reason}"),
                        acted: retry::may_have_acted(&outcome, self.profile, self.clock.now()),
                        cause: Some(e),
                    },
                };
            }
        };
        match decision {
            Decision::Success => match parse_body(&bytes) {
                Ok(body) => {
                    self.speed_up();
                    debug!(target = %self.name, %method, path, status = status.as_u16(), "SCIM request done");
                    Next::Done(Ok(Response {
                        status,
                        etag,
                        body,
                        size: bytes.len() as u64,
                    }))
                }
                Err(reason) => {
                    let unusable = Outcome::Unusable { status };
                    let failure = format!(
                        "HTTP {}: malformed response: {}",
                        status.as_u16(),
                        self.redact(&reason)
                    );
                    match classify(&unusable, self.profile, self.clock.now()) {
                        Decision::Retry(after) => Next::Again {
                            after,
                            failure,
                            acted: retry::may_have_acted(&unusable, self.profile, self.clock.now()),
                            cause: None,
                        },
                        Decision::Success | Decision::GiveUp => {
                            Next::Done(Err(TargetError::Malformed {
                                target: self.name.clone(),
                                method: method.to_string(),
                                path: path.to_string(),
                                reason: failure,
                            }))
                        }
                    }
                }
            },
            Decision::GiveUp => match oauth_token {
                Some(token) if status == StatusCode::UNAUTHORIZED => Next::Reauthorize(token),
                _ => {
                    let (scim_type, mut detail) = self.error_detail(&bytes);
                    if status == StatusCode::NOT_IMPLEMENTED {
                        detail.push_str(&self.not_implemented_hint(method, path, body));
                    }
                    Next::Done(Err(rejected(status, scim_type, detail)))
                }
            },
            Decision::Retry(after) => {
                let (_, detail) = self.error_detail(&bytes);
                Next::Again {
                    after,
                    failure: format!("HTTP {}: {detail}", status.as_u16()),
                    acted,
                    cause: None,
                }
            }
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
    pub(crate) async fn read_body(
        &self,
        resp: &mut reqwest::Response,
    ) -> Result<Vec<u8>, BodyError> {
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
}

/// An empty body is `Null`; anything else must be JSON.
fn parse_body(bytes: &[u8]) -> Result<Value, String> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    serde_json::from_slice(bytes).map_err(|e| format!("the body is not JSON ({e})"))
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::scim::retry::RetryPolicy;

    /// A server on 127.0.0.1 that answers the n-th connection with `answers[n]` (the last
    /// one from then on) as raw bytes, then closes it; and how many requests it got.
    pub(crate) async fn serve(answers: Vec<&'static str>) -> (String, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/scim", listener.local_addr().unwrap());
        let count = Arc::new(AtomicUsize::new(0));
        let seen = count.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let n = seen.fetch_add(1, Ordering::SeqCst);
                let answer = answers[n.min(answers.len() - 1)];
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => head.extend_from_slice(&buf[..k]),
                    }
                }
                let _ = sock.write_all(answer.as_bytes()).await;
                let _ = sock.shutdown().await;
            }
        });
        (url, count)
    }

    fn client(url: &str) -> ScimClient {
        let mut cfg = crate::plan::tests::target();
        cfg.url = url.to_string();
        quick(&cfg)
    }

    /// A client for `cfg` that retries at once, three attempts at most.
    pub(crate) fn quick(cfg: &crate::config::TargetConfig) -> ScimClient {
        let _ = rustls::crypto::ring::default_provider().install_default();
        ScimClient::new(cfg).unwrap().with_policy(RetryPolicy {
            max_attempts: 3,
            min_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(2),
        })
    }

    const BROKEN_400: &str =
        "HTTP/1.1 400 Bad Request\r\nContent-Length: 500\r\nConnection: close\r\n\r\n{\"detail\": \"cut";
    const BROKEN_500: &str =
        "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 500\r\nConnection: close\r\n\r\n{\"detail\": \"cut";
    pub(crate) const OK: &str = "HTTP/1.1 200 OK\r\nContent-Type: application/scim+json\r\nContent-Length: 11\r\nConnection: close\r\n\r\n{\"id\": \"a\"}";

    #[tokio::test]
    async fn a_4xx_whose_body_breaks_off_is_final() {
        let (url, count) = serve(vec![BROKEN_400, OK]).await;
        let c = client(&url);
        let e = c.get("Users", &ScimId("a".into())).await.unwrap_err();
        assert_eq!(e.status(), Some(400), "{e}");
        assert!(e.to_string().contains("the body could not be read"), "{e}");
        assert_eq!(count.load(Ordering::SeqCst), 1, "not asked again");
        assert_eq!(c.counters().retries.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_5xx_whose_body_breaks_off_is_retried() {
        let (url, count) = serve(vec![BROKEN_500, OK]).await;
        let c = client(&url);
        let body = c.get("Users", &ScimId("a".into())).await.unwrap();
        assert_eq!(body["id"], "a");
        assert_eq!(count.load(Ordering::SeqCst), 2);
        // Always broken: the retry budget ends it, and says how.
        let (url, count) = serve(vec![BROKEN_500]).await;
        let e = client(&url)
            .get("Users", &ScimId("a".into()))
            .await
            .unwrap_err();
        assert!(
            matches!(e, TargetError::Unavailable { attempts: 3, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("reading the response failed"), "{e}");
        assert!(std::error::Error::source(&e).is_some(), "the cause is kept");
        assert_eq!(count.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_429_waits_as_told_and_then_goes_on() {
        const SLOW: &str = "HTTP/1.1 429 Too Many Requests\r\nRetry-After: 0\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
        let (url, count) = serve(vec![SLOW, OK]).await;
        let c = client(&url);
        c.get("Users", &ScimId("a".into())).await.unwrap();
        assert_eq!(count.load(Ordering::SeqCst), 2);
        assert_eq!(c.counters().throttled.load(Ordering::Relaxed), 1);
        assert_eq!(c.counters().retries.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_refused_connection_is_retried_then_unavailable_with_its_cause() {
        // A port nothing listens on any more.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/scim", listener.local_addr().unwrap());
        drop(listener);
        let c = client(&url);
        let e = c.get("Users", &ScimId("a".into())).await.unwrap_err();
        assert!(
            matches!(e, TargetError::Unavailable { attempts: 3, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("connection failed"), "{e}");
        assert!(std::error::Error::source(&e).is_some());
        assert_eq!(c.counters().requests.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn a_github_rate_limit_403_is_waited_out_only_on_github_emu() {
        const LIMITED: &str = "HTTP/1.1 403 Forbidden\r\nRetry-After: 0\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
        let mut cfg = crate::plan::tests::target();
        cfg.profile = crate::scim::profile::Profile::GithubEmu;
        let (url, count) = serve(vec![LIMITED, OK]).await;
        cfg.url = url;
        let c = quick(&cfg);
        c.get("Users", &ScimId("a".into())).await.unwrap();
        assert_eq!(count.load(Ordering::SeqCst), 2);
        assert_eq!(c.counters().throttled.load(Ordering::Relaxed), 1);
        // Generic: a 403 is a refusal, final.
        let (url, count) = serve(vec![LIMITED, OK]).await;
        let e = client(&url)
            .get("Users", &ScimId("a".into()))
            .await
            .unwrap_err();
        assert_eq!(e.status(), Some(403), "{e}");
        assert_eq!(count.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_success_that_is_not_json_is_asked_again() {
        const HTML: &str =
            "HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\n<html>";
        let (url, count) = serve(vec![HTML, OK]).await;
        let body = client(&url)
            .get("Users", &ScimId("a".into()))
            .await
            .unwrap();
        assert_eq!(body["id"], "a");
        assert_eq!(count.load(Ordering::SeqCst), 2);
    }
}
