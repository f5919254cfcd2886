//! What can go wrong with a target, as one error type ([`TargetError`]), and the message
//! parts taken from what a target answered: a SCIM Error body's `scimType` and `detail`, a
//! short excerpt of anything else, a transport error's reason. It owns the wording of every
//! target error (tests and operators grep it: it changes only on purpose).
//!
//! It must never put anything from a response into a message unredacted: every function
//! here that reads a response takes the target's redaction and applies it before cutting.

use super::wire;

/// A lower-level cause kept beside an error's message.
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

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
    /// `reason` renders the cause (redacted); `cause` keeps it for [`std::error::Error::source`]:
    /// the transport error of the last attempt, when there was one.
    #[error("target {target}: {method} {path} failed after {attempts} attempts: {reason}")]
    Unavailable {
        target: String,
        method: String,
        path: String,
        attempts: usize,
        reason: String,
        #[source]
        cause: Option<Cause>,
    },
    #[error("target {target}: {method} {path}: malformed response: {reason}")]
    Malformed {
        target: String,
        method: String,
        path: String,
        reason: String,
    },
    /// `cause`: what failed to build the client (an unparsable URL, an unreadable CA file,
    /// the HTTP library), when there is one.
    #[error("target {target}: cannot build the HTTP client: {reason}")]
    Client {
        target: String,
        reason: String,
        #[source]
        cause: Option<Cause>,
    },
}

impl TargetError {
    pub fn status(&self) -> Option<u16> {
        match self {
            TargetError::Rejected { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether the target (or its OAuth2 token endpoint) refused ldap2scim's credential: a
    /// 401 on any request, or a token endpoint answering 401 or one of RFC 6749's client
    /// errors (`invalid_client`, `unauthorized_client`, `invalid_grant`). It needs a person
    /// (a renewed secret), not a retry.
    pub fn refuses_credential(&self) -> bool {
        match self {
            TargetError::Rejected { status, .. } => *status == 401,
            TargetError::Unavailable { path, reason, .. } if path == super::auth::TOKEN_PATH => {
                reason.contains("answered HTTP 401")
                    || ["invalid_client", "unauthorized_client", "invalid_grant"]
                        .iter()
                        .any(|e| reason.contains(&format!("answered HTTP 400: {e}")))
            }
            _ => false,
        }
    }
}

/// At most `max` characters of `text`.
pub(crate) fn excerpt(text: &str, max: usize) -> String {
    let mut out: String = text.chars().take(max).collect();
    if out.len() < text.len() {
        out.push('…');
    }
    out
}

/// The SCIM error's `scimType` and `detail`, or a short excerpt of a non-SCIM body, each
/// passed through `redact` before anything is cut (a cut must not leave half a secret).
pub(crate) fn error_detail(
    bytes: &[u8],
    redact: impl Fn(&str) -> String,
) -> (Option<String>, String) {
    if let Some(e) = wire::Error::parse(bytes) {
        let detail = e.detail();
        if e.is_scim() || detail.is_some() {
            return (
                e.scim_type.get().map(|t| excerpt(&redact(t), 100)),
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

/// What a transport error says, without the URL it was for (its query may carry anything).
pub(crate) fn transport_reason(e: &reqwest::Error) -> String {
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
    use crate::scim::Redactor;
    use serde_json::json;
    use wire::ERROR_SCHEMA;

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

    #[test]
    fn error_bodies_of_every_kind_become_a_short_detail() {
        let none = |t: &str| t.to_string();
        // A SCIM Error without detail.
        let (kind, detail) = error_detail(
            json!({"schemas": [ERROR_SCHEMA], "scimType": 5})
                .to_string()
                .as_bytes(),
            none,
        );
        assert_eq!((kind, detail.as_str()), (None, "(no detail)"));
        // Not SCIM, but with a `message`.
        let (_, detail) = error_detail(br#"{"message": "no such user"}"#, none);
        assert_eq!(detail, "no such user");
        // JSON that says nothing of an error is shown as a body.
        let (_, detail) = error_detail(br#"{"ok": false}"#, none);
        assert_eq!(detail, r#"non-SCIM body: {"ok": false}"#);
        // Not JSON at all; empty; not UTF-8.
        let (_, detail) = error_detail(b"  <html>Bad Gateway</html>\n", none);
        assert_eq!(detail, "non-SCIM body: <html>Bad Gateway</html>");
        assert_eq!(error_detail(b" \n", none).1, "(empty body)");
        assert!(error_detail(b"\xff\xfe", none)
            .1
            .starts_with("non-SCIM body: "));
        // Huge: cut, whatever the kind.
        let huge = "y".repeat(100_000);
        let (_, detail) = error_detail(huge.as_bytes(), none);
        assert_eq!(detail.chars().count(), "non-SCIM body: ".len() + 200 + 1);
        let scim = json!({"schemas": [ERROR_SCHEMA], "scimType": huge, "detail": huge});
        let (kind, detail) = error_detail(scim.to_string().as_bytes(), none);
        assert_eq!(kind.unwrap().chars().count(), 101);
        assert_eq!(detail.chars().count(), 1001);
        assert!(detail.ends_with('…'));
    }

    #[test]
    fn secrets_echoed_anywhere_in_an_error_body_are_cut() {
        let secret = "s3cr3t-t0ken-value";
        let r = Redactor::new([secret]);
        let redact = |t: &str| r.redact(t);
        let scim = json!({"schemas": [ERROR_SCHEMA], "scimType": secret, "detail": secret});
        let (kind, detail) = error_detail(scim.to_string().as_bytes(), redact);
        assert_eq!(kind.as_deref(), Some("***"));
        assert_eq!(detail, "***");
        let (_, detail) = error_detail(format!("bad token {secret}").as_bytes(), redact);
        assert_eq!(detail, "non-SCIM body: bad token ***");
    }

    #[test]
    fn messages_keep_their_wording_and_their_cause() {
        use std::error::Error as _;
        let rejected = TargetError::Rejected {
            target: "t".into(),
            method: "POST".into(),
            path: "/Users".into(),
            status: 409,
            scim_type: Some("uniqueness".into()),
            detail: "taken".into(),
        };
        assert_eq!(
            rejected.to_string(),
            "target t: POST /Users failed: HTTP 409 (uniqueness): taken"
        );
        let io = std::io::Error::other("reset");
        let unavailable = TargetError::Unavailable {
            target: "t".into(),
            method: "GET".into(),
            path: "/Users".into(),
            attempts: 5,
            reason: "connection failed: reset".into(),
            cause: Some(Box::new(io)),
        };
        assert_eq!(
            unavailable.to_string(),
            "target t: GET /Users failed after 5 attempts: connection failed: reset"
        );
        assert_eq!(unavailable.source().unwrap().to_string(), "reset");
        let malformed = TargetError::Malformed {
            target: "t".into(),
            method: "GET".into(),
            path: "/Users".into(),
            reason: "x".into(),
        };
        assert_eq!(
            malformed.to_string(),
            "target t: GET /Users: malformed response: x"
        );
        let client = TargetError::Client {
            target: "t".into(),
            reason: "url x: bad".into(),
            cause: None,
        };
        assert_eq!(
            client.to_string(),
            "target t: cannot build the HTTP client: url x: bad"
        );
        assert!(client.source().is_none());
    }
}

#[cfg(test)]
mod credential_tests {
    use super::*;

    fn token_failure(reason: &str) -> TargetError {
        TargetError::Unavailable {
            target: "app".into(),
            method: "POST".into(),
            path: super::super::auth::TOKEN_PATH.into(),
            attempts: 1,
            reason: reason.into(),
            cause: None,
        }
    }

    #[test]
    fn a_refused_credential_is_a_401_anywhere_or_a_token_client_error() {
        let rejected = |status| TargetError::Rejected {
            target: "app".into(),
            method: "PATCH".into(),
            path: "/Users/1".into(),
            status,
            scim_type: None,
            detail: String::new(),
        };
        assert!(rejected(401).refuses_credential());
        assert!(!rejected(403).refuses_credential());
        assert!(
            token_failure("the token endpoint answered HTTP 401: invalid_client")
                .refuses_credential()
        );
        assert!(
            token_failure("the token endpoint answered HTTP 400: invalid_client")
                .refuses_credential()
        );
        assert!(
            token_failure("the token endpoint answered HTTP 400: invalid_grant")
                .refuses_credential()
        );
        assert!(
            !token_failure("the token endpoint answered HTTP 400: invalid_scope")
                .refuses_credential()
        );
        assert!(!token_failure("the token endpoint answered HTTP 503").refuses_credential());
        assert!(!token_failure("connection refused").refuses_credential());
    }
}
