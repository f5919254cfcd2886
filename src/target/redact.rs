//! The redactor of one target: every secret the client sends (bearer token, Basic password
//! and header, OAuth2 client secret and access token) is cut out of anything taken from a
//! response or a transport error before it becomes part of an error, a log line or a report.
//! A target that echoes a request back must not turn our credentials into its error message.

use base64::Engine as _;

const MASK: &str = "***";

#[derive(Debug, Clone, Default)]
pub struct Redactor {
    /// Every form a secret may come back in, longest first (a secret containing another is
    /// cut whole).
    forms: Vec<String>,
}

impl Redactor {
    pub fn new<I, S>(secrets: I) -> Redactor
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut r = Redactor::default();
        for s in secrets {
            r.add(s.as_ref());
        }
        r
    }

    /// Adds a secret, with the forms it may be echoed in: as sent, form/percent-encoded, and
    /// with `/` JSON-escaped (base64 and tokens contain slashes).
    pub fn add(&mut self, secret: &str) {
        if secret.is_empty() {
            return;
        }
        let encoded: String = url::form_urlencoded::byte_serialize(secret.as_bytes()).collect();
        for form in [
            secret.to_string(),
            encoded.clone(),
            encoded.replace('+', "%20"),
            secret.replace('/', "\\/"),
        ] {
            if !self.forms.contains(&form) {
                self.forms.push(form);
            }
        }
        self.forms
            .sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
    }

    /// `text` with every secret replaced by `***`.
    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_string();
        for form in &self.forms {
            if out.contains(form.as_str()) {
                out = out.replace(form.as_str(), MASK);
            }
        }
        out
    }
}

/// The credentials of an HTTP Basic `Authorization` header: base64 of `user:password`.
pub fn basic_credentials(user: &str, password: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
}

/// The credentials of `client_secret_basic` (RFC 6749 §2.3.1): the client id and secret are
/// form-urlencoded first, then joined and base64-encoded.
pub fn client_basic_credentials(client_id: &str, client_secret: &str) -> String {
    let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    basic_credentials(&enc(client_id), &enc(client_secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_form_of_a_secret_is_cut() {
        let r = Redactor::new(["s3cr/et+x", "tok"]);
        assert_eq!(r.redact("a s3cr/et+x b"), "a *** b");
        assert_eq!(r.redact("a s3cr%2Fet%2Bx b"), "a *** b");
        assert_eq!(r.redact(r#"{"h":"s3cr\/et+x"}"#), r#"{"h":"***"}"#);
        assert_eq!(r.redact("Bearer tok."), "Bearer ***.");
        assert_eq!(r.redact("nothing here"), "nothing here");
    }

    #[test]
    fn a_longer_secret_is_cut_whole() {
        let r = Redactor::new(["abc", "abcdef"]);
        assert_eq!(r.redact("xabcdefx abc"), "x***x ***");
    }

    #[test]
    fn empty_secrets_are_ignored() {
        let r = Redactor::new([""]);
        assert_eq!(r.redact("text"), "text");
    }

    #[test]
    fn basic_forms_follow_the_rfcs() {
        assert_eq!(
            basic_credentials("Aladdin", "open sesame"),
            "QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
        );
        // RFC 6749 §2.3.1: form-urlencoded before base64 (a space becomes '+', ':' '%3A').
        assert_eq!(
            client_basic_credentials("my:id", "a b"),
            basic_credentials("my%3Aid", "a+b")
        );
    }
}
