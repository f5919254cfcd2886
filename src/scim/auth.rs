//! How a client proves who it is: bearer token, Basic credentials, or an OAuth2
//! client-credentials access token (fetched, cached, dropped when refused), and the
//! [`Redactor`] of every secret those involve. The token request goes through the same
//! retry policy as every SCIM request ([`retry::classify`]).
//!
//! It must never send a secret anywhere but where it is configured to go: the token request
//! never follows a redirect, and no secret or access token reaches a message unredacted.

use std::time::{Duration, Instant};

use reqwest::header::{HeaderValue, AUTHORIZATION, LOCATION};
use serde_json::Value;
use tracing::warn;

use super::error::{excerpt, transport_reason};
use super::redact::{self, Redactor};
use super::retry::{classify, Decision, Outcome};
use super::{BodyError, ScimClient, TargetError};
use crate::config::{Auth, ClientAuth};

/// What error messages call the OAuth2 token request (never its URL's query).
pub(crate) const TOKEN_PATH: &str = "(oauth2 token_url)";

/// The most characters of a token endpoint's `error` or `error_description` reported.
const MAX_TOKEN_ERROR_CHARS: usize = 200;

/// The longest an OAuth2 access token is cached, whatever `expires_in` says.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);

/// Every form in which this target's configured secrets could be echoed back.
pub(crate) fn redactor_for(auth: &Auth) -> Redactor {
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

impl ScimClient {
    /// `req` with this target's credentials, and the OAuth2 access token it carries, if any.
    pub(crate) async fn authorize(
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
    pub(crate) async fn drop_oauth_token(&self, refused: &str) {
        let mut cached = self.oauth_token.lock().await;
        if cached.as_ref().is_some_and(|(tok, _)| tok == refused) {
            *cached = None;
        }
    }

    /// OAuth2 client-credentials token, cached until shortly before it expires. The client
    /// authenticates as RFC 6749 §2.3.1 says (`client_secret_basic` unless `client_auth =
    /// "post"`), and the request never follows a redirect: the secret goes to `token_url`
    /// and nowhere else. Each attempt's outcome is classified by the one retry policy; what
    /// a successful answer says (not JSON, no usable `access_token`) is final.
    async fn oauth_token(&self) -> Result<String, TargetError> {
        let mut cached = self.oauth_token.lock().await;
        if let Some((tok, until)) = cached.as_ref() {
            if Instant::now() < *until {
                return Ok(tok.clone());
            }
        }
        let mut delays = self.policy.delays();
        let mut attempt = 0;
        let (token, lifetime) = loop {
            attempt += 1;
            let fail = |reason: String, cause: Option<reqwest::Error>| TargetError::Unavailable {
                target: self.name.clone(),
                method: "POST".into(),
                path: TOKEN_PATH.into(),
                attempts: attempt,
                reason: self.redact(&reason),
                cause: cause.map(|e| Box::new(e) as _),
            };
            let (decision, failure) = match self.token_attempt().await {
                Attempt::Token(token, lifetime) => break (token, lifetime),
                Attempt::Final(reason) => return Err(fail(reason, None)),
                Attempt::Failed {
                    outcome,
                    reason,
                    cause,
                } => (outcome, (reason, cause)),
            };
            let (reason, cause) = failure;
            let Decision::Retry(after) = decision else {
                return Err(fail(reason, cause));
            };
            let Some(backoff) = delays.next() else {
                return Err(fail(reason, cause));
            };
            let wait = after.unwrap_or(backoff);
            self.counters
                .retries
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            warn!(target = %self.name, attempt, wait_ms = wait.as_millis() as u64, reason = %self.redact(&reason), "OAuth2 token request failed; retrying");
            tokio::time::sleep(wait).await;
        };
        self.redactor
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .add_transient(&token);
        // A target cannot make us keep a token for ever, nor overflow the clock.
        *cached = Instant::now()
            .checked_add(lifetime)
            .map(|until| (token.clone(), until));
        Ok(token)
    }

    /// One token request, classified.
    async fn token_attempt(&self) -> Attempt {
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
        let mut req = self
            .writes
            .post(token_url)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .header("Accept", "application/json")
            .body(form);
        if *client_auth == ClientAuth::Basic {
            let credentials = redact::client_basic_credentials(client_id, client_secret.expose());
            let Ok(mut value) = HeaderValue::from_str(&format!("Basic {credentials}")) else {
                return Attempt::Final("the client credentials do not fit a header".into());
            };
            value.set_sensitive(true);
            req = req.header(AUTHORIZATION, value);
        }
        let mut resp = match req.send().await {
            Ok(resp) => resp,
            Err(e) => {
                return Attempt::Failed {
                    outcome: classify(
                        &Outcome::Transport {
                            sent: !e.is_connect(),
                        },
                        self.profile,
                        self.clock.now(),
                    ),
                    reason: transport_reason(&e),
                    cause: Some(e),
                }
            }
        };
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
            return Attempt::Final(format!(
                "the token endpoint answered HTTP {} (a redirect to {to}); a token request never follows a redirect, the client secret would go with it",
                status.as_u16()
            ));
        }
        let decision = classify(
            &Outcome::Response {
                status,
                headers: resp.headers(),
            },
            self.profile,
            self.clock.now(),
        );
        let bytes = match self.read_body(&mut resp).await {
            Ok(b) => b,
            Err(BodyError::TooLarge) => {
                return Attempt::Failed {
                    outcome: classify(&Outcome::TooLarge, self.profile, self.clock.now()),
                    reason: format!(
                        "the token response is larger than max_response_size ({} bytes)",
                        self.max_response_size
                    ),
                    cause: None,
                }
            }
            Err(BodyError::Read(e)) => {
                return Attempt::Failed {
                    outcome: classify(
                        &Outcome::BodyUnreadable { status },
                        self.profile,
                        self.clock.now(),
                    ),
                    reason: format!(
                        "reading the token response failed: {}",
                        transport_reason(&e)
                    ),
                    cause: Some(e),
                }
            }
        };
        let body: Option<Value> = serde_json::from_slice(&bytes).ok();
        match decision {
            Decision::Success => {}
            decision => {
                let said = body
                    .as_ref()
                    .and_then(|b| token_error(b, |t| self.redact(t)));
                return Attempt::Failed {
                    outcome: decision,
                    reason: format!(
                        "the token endpoint answered HTTP {}{}",
                        status.as_u16(),
                        said.unwrap_or_default()
                    ),
                    cause: None,
                };
            }
        }
        let Some(body) = body else {
            return Attempt::Final("the token response is not JSON".into());
        };
        let Some(token) = body["access_token"].as_str().filter(|t| !t.is_empty()) else {
            return Attempt::Final("the token response has no access_token".into());
        };
        if !usable_token(token) {
            return Attempt::Final(
                "the token response's access_token cannot be sent in an Authorization header"
                    .into(),
            );
        }
        Attempt::Token(token.to_string(), token_lifetime(body.get("expires_in")))
    }
}

/// How one token request ended.
enum Attempt {
    Token(String, Duration),
    /// Classified by the retry policy; `reason` is not yet redacted.
    Failed {
        outcome: Decision,
        reason: String,
        cause: Option<reqwest::Error>,
    },
    /// Final whatever the policy says: a redirect, or a success that carries no token.
    Final(String),
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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

    fn oauth_client(url: &str) -> ScimClient {
        let mut cfg = crate::plan::tests::target();
        cfg.url = url.to_string();
        cfg.auth = Auth::OAuth2 {
            token_url: format!("{url}/token"),
            client_id: "app".into(),
            client_secret: crate::config::Secret::new("s3cr3t-value".into()),
            scope: None,
            client_auth: ClientAuth::Basic,
        };
        crate::scim::client::tests::quick(&cfg)
    }

    const TOKEN: &str = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 41\r\nConnection: close\r\n\r\n{\"access_token\": \"t0k\", \"expires_in\": 60}";

    #[tokio::test]
    async fn the_token_request_goes_through_the_retry_policy() {
        use crate::scim::client::tests::{serve, OK};
        use crate::scim::is_auth_failure;
        const BUSY: &str = "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 0\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
        // 503, then a token, then the SCIM answer.
        let (url, count) = serve(vec![BUSY, TOKEN, OK]).await;
        let c = oauth_client(&url);
        let body = c
            .get("Users", &crate::model::ScimId("a".into()))
            .await
            .unwrap();
        assert_eq!(body["id"], "a");
        assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 3);
        // A refused client is final at once, and an authentication failure.
        const REFUSED: &str = "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: 27\r\nConnection: close\r\n\r\n{\"error\": \"invalid_client\"}";
        let (url, count) = serve(vec![REFUSED]).await;
        let e = oauth_client(&url)
            .get("Users", &crate::model::ScimId("a".into()))
            .await
            .unwrap_err();
        assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(is_auth_failure(&e), "{e}");
        let name = crate::plan::tests::target().name.0;
        assert_eq!(
            e.to_string(),
            format!("target {name}: POST (oauth2 token_url) failed after 1 attempts: the token endpoint answered HTTP 401: invalid_client")
        );
        // Always busy: the budget ends it.
        let (url, count) = serve(vec![BUSY]).await;
        let e = oauth_client(&url)
            .get("Users", &crate::model::ScimId("a".into()))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("failed after 3 attempts"), "{e}");
        assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 3);
    }

    #[test]
    fn an_access_token_must_fit_a_header() {
        assert!(usable_token("eyJhbGciOi.J9-_~+/="));
        for bad in ["a\r\nX-Injected: 1", "a b", "t\u{0}", "tök"] {
            assert!(!usable_token(bad), "{bad:?}");
        }
    }
}
