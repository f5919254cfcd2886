//! The redactor of one target: every secret the client sends (bearer token, Basic password
//! and header, OAuth2 client secret and access token) is cut out of anything taken from a
//! response or a transport error before it becomes part of an error, a log line or a report.
//! A target that echoes a request back must not turn our credentials into its error message.

use base64::Engine as _;

const MASK: &str = "***";
/// How many access tokens (secrets added with [`Redactor::add_transient`]) are remembered:
/// the latest ones, so a target that makes us fetch token after token cannot grow this
/// without bound.
pub const MAX_TRANSIENT: usize = 64;

#[derive(Debug, Clone, Default)]
pub struct Redactor {
    /// Every form a secret may come back in, longest first (a secret containing another is
    /// cut whole): those of `permanent` and of `transient`.
    forms: Vec<String>,
    /// The forms of the configured secrets.
    permanent: Vec<String>,
    /// The latest access tokens and their forms, oldest first.
    transient: std::collections::VecDeque<(String, Vec<String>)>,
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

    /// Adds a secret, with the forms it may be echoed in (built once, here): as sent;
    /// form-urlencoded (space as `+`) and percent-encoded (space as `%20`), each with upper-
    /// and lowercase hex digits; and JSON-escaped (`\"`, `\\`, control characters), also with
    /// `/` as `\/`, and with every other non-alphanumeric ASCII character as `\u00xx` (lower-
    /// and uppercase hex).
    pub fn add(&mut self, secret: &str) {
        for form in forms_of(secret) {
            if !self.permanent.contains(&form) {
                self.permanent.push(form);
            }
        }
        self.rebuild();
    }

    /// Adds a secret that is replaced now and then (an OAuth2 access token): only the
    /// [`MAX_TRANSIENT`] latest ones are kept.
    pub fn add_transient(&mut self, secret: &str) {
        if secret.is_empty() || self.transient.iter().any(|(s, _)| s == secret) {
            return;
        }
        self.transient
            .push_back((secret.to_string(), forms_of(secret)));
        while self.transient.len() > MAX_TRANSIENT {
            self.transient.pop_front();
        }
        self.rebuild();
    }

    fn rebuild(&mut self) {
        let mut forms = self.permanent.clone();
        for form in self.transient.iter().flat_map(|(_, f)| f) {
            if !forms.contains(form) {
                forms.push(form.clone());
            }
        }
        forms.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        self.forms = forms;
    }

    /// `text` with every secret replaced by `***`; when none is there (the usual case), a
    /// copy of `text` after one search per form, nothing else.
    pub fn redact(&self, text: &str) -> String {
        let Some(first) = self.forms.iter().position(|f| text.contains(f.as_str())) else {
            return text.to_string();
        };
        let mut out = text.replace(self.forms[first].as_str(), MASK);
        for form in &self.forms[first + 1..] {
            if out.contains(form.as_str()) {
                out = out.replace(form.as_str(), MASK);
            }
        }
        out
    }
}

/// Every form `secret` may be echoed in (see [`Redactor::add`]); none for an empty one.
fn forms_of(secret: &str) -> Vec<String> {
    let mut forms: Vec<String> = Vec::new();
    if secret.is_empty() {
        return forms;
    }
    let form: String = url::form_urlencoded::byte_serialize(secret.as_bytes()).collect();
    let percent = form.replace('+', "%20");
    let json = serde_json::to_string(secret).unwrap_or_default();
    let json = json
        .strip_prefix('"')
        .and_then(|j| j.strip_suffix('"'))
        .unwrap_or(secret)
        .to_string();
    let unicode = |upper: bool| -> String {
        secret
            .chars()
            .map(|c| {
                if c.is_ascii() && !c.is_ascii_alphanumeric() {
                    let hex = format!("\\u{:04x}", c as u32);
                    if upper {
                        hex.to_uppercase().replacen("\\U", "\\u", 1)
                    } else {
                        hex
                    }
                } else {
                    c.to_string()
                }
            })
            .collect()
    };
    for form in [
        secret.to_string(),
        lower_hex(&form),
        form,
        lower_hex(&percent),
        percent,
        json.replace('/', "\\/"),
        json,
        unicode(false),
        unicode(true),
    ] {
        if !forms.contains(&form) {
            forms.push(form);
        }
    }
    forms
}

/// `text` with the hex digits of every `%XX` escape in lowercase.
fn lower_hex(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut hex_left = 0;
    for c in text.chars() {
        if hex_left > 0 {
            out.push(c.to_ascii_lowercase());
            hex_left -= 1;
        } else {
            if c == '%' {
                hex_left = 2;
            }
            out.push(c);
        }
    }
    out
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
    fn echoed_encodings_of_a_secret_are_cut() {
        // Characters every encoding changes: `/`, `+`, `=`, `"`, a space, a backslash.
        let secret = r#"a/b+c=d"e f\g"#;
        let r = Redactor::new([secret]);
        for echoed in [
            secret,
            // form-urlencoded (space as '+'), upper- and lowercase hex
            "a%2Fb%2Bc%3Dd%22e+f%5Cg",
            "a%2fb%2bc%3dd%22e+f%5cg",
            // percent-encoded (space as %20)
            "a%2Fb%2Bc%3Dd%22e%20f%5Cg",
            "a%2fb%2bc%3dd%22e%20f%5cg",
            // JSON string escapes, with and without `\/`
            r#"a/b+c=d\"e f\\g"#,
            r#"a\/b+c=d\"e f\\g"#,
            // JSON \u escapes of every non-alphanumeric character
            r#"a\u002fb\u002bc\u003dd\u0022e\u0020f\u005cg"#,
            r#"a\u002Fb\u002Bc\u003Dd\u0022e\u0020f\u005Cg"#,
        ] {
            assert_eq!(r.redact(&format!("<{echoed}>")), "<***>", "{echoed}");
        }
        // What a JSON serializer makes of a message quoting the secret.
        let quoted = serde_json::to_string(&format!("you sent {secret}")).unwrap();
        assert!(!r.redact(&quoted).contains("e f"), "{}", r.redact(&quoted));
        // Base64 forms (`+`, `/`, `=`) of the Basic credentials.
        let basic = basic_credentials("svc", "???>>>");
        let r = Redactor::new([basic.as_str()]);
        let form: String = url::form_urlencoded::byte_serialize(basic.as_bytes()).collect();
        assert_eq!(r.redact(&lower_hex(&form)), "***");
        assert_eq!(r.redact(&basic.replace('/', "\\/")), "***");
    }

    #[test]
    fn only_the_latest_transient_secrets_are_kept() {
        let mut r = Redactor::new(["configured-secret"]);
        let tokens: Vec<String> = (0..MAX_TRANSIENT + 5)
            .map(|i| format!("access-token-{i:04}"))
            .collect();
        for t in &tokens {
            r.add_transient(t);
            r.add_transient(t);
        }
        assert_eq!(r.transient.len(), MAX_TRANSIENT);
        assert_eq!(r.redact(&tokens[0]), tokens[0], "the oldest is forgotten");
        assert_eq!(r.redact(tokens.last().unwrap()), "***");
        assert_eq!(r.redact(&tokens[5]), "***");
        assert_eq!(r.redact("configured-secret"), "***", "configured ones stay");
    }

    #[test]
    fn lower_hex_changes_only_escapes() {
        assert_eq!(lower_hex("AB%2FCD%3d+E"), "AB%2fCD%3d+E");
        assert_eq!(lower_hex("%"), "%");
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
