//! Mapping templates: literal text with `{attribute}` placeholders, `{{` and `}}` for literal
//! braces. This is the only place that reads template text: the configuration parses each
//! template once at load (and reports the first problem), `map` renders the parsed form user
//! by user, and the directory read asks it which attributes are named.
//!
//! It never looks at a configuration file or a SCIM path, and never renders anything but a
//! [`DirectoryUser`]'s first values. A new template engine replaces this file and nothing else.

use std::fmt;

use crate::model::DirectoryUser;

/// A template, parsed once.
#[derive(Clone, PartialEq, Eq)]
pub struct Template {
    text: String,
    pieces: Vec<Piece>,
}

/// Literal text, or a placeholder with its attribute name as written and lowercased (the key
/// of [`DirectoryUser::attrs`]).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Piece {
    Text(String),
    Attr { name: String, key: String },
}

impl Template {
    /// Parses `text`, refusing anything but well-formed placeholders (the configuration's
    /// reading); the error is the complete message for the mapping key.
    pub fn parse(text: &str) -> Result<Template, String> {
        let (template, problem) = scan(text);
        match problem {
            None => Ok(template),
            Some(why) => Err(format!(
                "invalid template \"{text}\": {why}; write {{{{ or }}}} for a literal brace"
            )),
        }
    }

    /// Parses `text` leniently: a brace that opens or closes nothing is literal text. On a
    /// template [`parse`](Self::parse) accepts, both give the same template.
    pub fn lenient(text: &str) -> Template {
        scan(text).0
    }

    /// The text as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The directory attributes the template names, as written (`{givenName} {sn}` →
    /// givenName, sn).
    pub fn attributes(&self) -> impl Iterator<Item = &str> {
        self.pieces.iter().filter_map(|p| match p {
            Piece::Attr { name, .. } => Some(name.as_str()),
            Piece::Text(_) => None,
        })
    }

    /// The first attribute the template names whose value is not valid UTF-8 (lowercased).
    pub fn unreadable_attribute(&self, user: &DirectoryUser) -> Option<&str> {
        if user.invalid_utf8.is_empty() {
            return None;
        }
        self.pieces.iter().find_map(|p| match p {
            Piece::Attr { key, .. } if user.invalid_utf8.iter().any(|a| a == key) => {
                Some(key.as_str())
            }
            _ => None,
        })
    }

    /// Each placeholder replaced by the attribute's first value (absent: nothing), the result
    /// trimmed.
    pub fn render(&self, user: &DirectoryUser) -> String {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Attr { key, .. } => {
                    if let Some(v) = user.attrs.get(key).and_then(|v| v.first()) {
                        out.push_str(v);
                    }
                }
            }
        }
        let trimmed = out.trim();
        if trimmed.len() == out.len() {
            out
        } else {
            trimmed.to_string()
        }
    }
}

/// The one template reader: the lenient pieces, and the first problem a strict reading finds.
/// Up to that problem both readings agree, so a template without one reads the same either way.
fn scan(template: &str) -> (Template, Option<String>) {
    let bad_char = |name: &str| {
        name.chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == ';'))
    };
    let mut problem: Option<String> = None;
    let mut note = |why: String| {
        problem.get_or_insert(why);
    };
    let mut pieces = Vec::new();
    let mut text = String::new();
    let mut rest = template;
    while let Some(pos) = rest.find(['{', '}']) {
        text.push_str(&rest[..pos]);
        let tail = &rest[pos..];
        if tail.starts_with("{{") || tail.starts_with("}}") {
            text.push_str(&tail[..1]);
            rest = &tail[2..];
        } else if let (true, Some(end)) = (tail.starts_with('{'), tail.find('}')) {
            let name = &tail[1..end];
            if name.is_empty() {
                note("empty placeholder {}".to_owned());
            } else if let Some(c) = bad_char(name) {
                note(format!("'{c}' cannot appear in an attribute name"));
            }
            if !text.is_empty() {
                pieces.push(Piece::Text(std::mem::take(&mut text)));
            }
            pieces.push(Piece::Attr {
                name: name.to_owned(),
                key: name.to_ascii_lowercase(),
            });
            rest = &tail[end + 1..];
        } else {
            if let Some(name) = tail.strip_prefix('{') {
                match bad_char(name) {
                    Some(c) => note(format!("'{c}' cannot appear in an attribute name")),
                    None => note("unclosed '{'".to_owned()),
                }
            } else {
                note("unmatched '}'".to_owned());
            }
            text.push_str(&tail[..1]);
            rest = &tail[1..];
        }
    }
    text.push_str(rest);
    if !text.is_empty() {
        pieces.push(Piece::Text(text));
    }
    let template = Template {
        text: template.to_owned(),
        pieces,
    };
    (template, problem)
}

/// Lenient, like [`Template::lenient`] (tests and hand-built targets).
impl From<&str> for Template {
    fn from(text: &str) -> Self {
        Template::lenient(text)
    }
}

impl PartialEq<&str> for Template {
    fn eq(&self, other: &&str) -> bool {
        self.text == *other
    }
}

impl fmt::Debug for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.text, f)
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user() -> DirectoryUser {
        crate::model::tests::jdoe()
    }

    fn check_template(text: &str) -> Result<(), String> {
        Template::parse(text).map(|_| ())
    }

    fn render(text: &str, user: &DirectoryUser) -> String {
        Template::lenient(text).render(user)
    }

    fn template_attributes(text: &str) -> Vec<String> {
        Template::lenient(text)
            .attributes()
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn templates() {
        for good in [
            "{uid}",
            "{givenName} {sn}",
            "literal",
            "{{x}}",
            "{x;binary}@{mail-host}",
            "",
        ] {
            assert_eq!(check_template(good), Ok(()), "{good}");
        }
        for bad in ["{uid", "uid}", "{}", "{a b}", "{a{b}}"] {
            assert!(check_template(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn a_strict_reading_reports_the_first_problem() {
        for (bad, why) in [
            ("{uid", "unclosed '{'"),
            ("uid}", "unmatched '}'"),
            ("{}", "empty placeholder {}"),
            ("{a b}", "' ' cannot appear in an attribute name"),
            ("{a b", "' ' cannot appear in an attribute name"),
            ("{a{b}}", "'{' cannot appear in an attribute name"),
            ("{a}}", "unmatched '}'"),
        ] {
            assert_eq!(
                Template::parse(bad),
                Err(format!(
                    "invalid template \"{bad}\": {why}; write {{{{ or }}}} for a literal brace"
                )),
                "{bad}"
            );
        }
        for good in ["{givenName} {{x}} {sn}", "{{{uid}}}", "plain"] {
            assert_eq!(Template::parse(good), Ok(Template::lenient(good)), "{good}");
        }
    }

    #[test]
    fn compiled_templates_render_like_the_text() {
        let u = user();
        for (template, rendered) in [
            ("{givenName} {sn}", "Jane Doe"),
            (" {uid} ", "jdoe"),
            ("{{x}} {mail}", "{x} jdoe@example.org"),
            ("a}b{c", "a}b{c"),
            ("{", "{"),
            ("x{uid", "x{uid"),
            ("{missing}", ""),
            ("{UID}@{missing}", "jdoe@"),
        ] {
            assert_eq!(render(template, &u), rendered, "{template}");
        }
    }

    #[test]
    fn templates_name_their_attributes() {
        assert_eq!(
            template_attributes("{givenName} {{x}} {sn}"),
            vec!["givenName", "sn"]
        );
        assert!(template_attributes("plain").is_empty());
    }

    #[test]
    fn templates_render_first_values_and_escapes() {
        let u = user();
        assert_eq!(render("{givenName} {sn}", &u), "Jane Doe");
        assert_eq!(render("{{literal}} {uid}", &u), "{literal} jdoe");
        assert_eq!(render("{missing}", &u), "");
    }
}
