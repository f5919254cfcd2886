//! Mapping templates. A template is either the simple form, literal text with `{attribute}`
//! placeholders (each the attribute's first value, absent: nothing), or, when the text holds
//! `{{`, `{%` or `{#`, a minijinja expression over the directory entry. This is the only
//! place that reads template text: the configuration parses each template once at load, `map`
//! renders the parsed form entry by entry, and the directory read asks it which attributes
//! are named.
//!
//! In an expression an attribute name is the attribute's first value as text, matched
//! case-insensitively (`{{ givenName }}` and `{{ givenname }}` are one attribute);
//! `values.<name>` is the list of all its values (empty when it has none); `dn` is the entry's DN. A missing attribute
//! is undefined: `or`, `default` and `if` fall back past it, and printing it is an error, so a
//! template that cannot render for an entry is that entry's problem, never an empty value.
//! Beyond minijinja's builtins (lower, upper, trim, replace, split, join, default, first, …)
//! there are `regex_replace(pattern, replacement)`, the test `matching(pattern)` and
//! `ad_time(format)` (an AD FILETIME such as `accountExpires`, or a GeneralizedTime, as a date;
//! "never" is undefined).
//!
//! It never looks at a configuration file or a SCIM path.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};

use minijinja::value::{Enumerator, Object, ObjectRepr, Value};
use minijinja::{AutoEscape, Environment, ErrorKind, UndefinedBehavior};

use crate::model::Attributes;

/// A template, parsed once.
#[derive(Clone)]
pub struct Template {
    text: String,
    kind: Kind,
}

#[derive(Clone)]
enum Kind {
    Simple(Vec<Piece>),
    Expression(Arc<Expression>),
}

/// A compiled minijinja template, with the attributes it names (as written).
struct Expression {
    env: Environment<'static>,
    attributes: Vec<String>,
}

/// The name the one template of an expression's environment has.
const NAME: &str = "template";

/// The directory entry a template renders: its DN and attributes (keys lowercased). An
/// expression's view of it is built once per entry, on first use.
pub struct Entry<'a> {
    dn: &'a str,
    attrs: &'a Attributes,
    context: std::cell::OnceCell<Value>,
}

impl<'a> Entry<'a> {
    pub fn new(dn: &'a str, attrs: &'a Attributes) -> Self {
        Entry {
            dn,
            attrs,
            context: std::cell::OnceCell::new(),
        }
    }

    fn context(&self) -> Value {
        self.context
            .get_or_init(|| {
                Value::from_object(EntryObject {
                    dn: self.dn.to_owned(),
                    attrs: self.attrs.clone(),
                })
            })
            .clone()
    }
}

/// Literal text, or a placeholder with its attribute name as written and lowercased (the key
/// of [`DirectoryUser::attrs`]).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Piece {
    Text(String),
    Attr { name: String, key: String },
}

/// Whether `text` is an expression rather than the simple form.
fn is_expression(text: &str) -> bool {
    text.contains("{{") || text.contains("{%") || text.contains("{#")
}

impl Template {
    /// Parses `text`, refusing a malformed placeholder, an expression that does not compile,
    /// names an unknown filter, test or function, or a regular expression that does not
    /// compile; the error is the complete message for the mapping key.
    pub fn parse(text: &str) -> Result<Template, String> {
        if is_expression(text) {
            return Expression::compile(text).map(|e| Template {
                text: text.to_owned(),
                kind: Kind::Expression(Arc::new(e)),
            });
        }
        let (template, problem) = scan(text);
        match problem {
            None => Ok(template),
            Some(why) => Err(format!(
                "invalid template \"{text}\": {why}; an expression is written {{{{ … }}}}"
            )),
        }
    }

    /// Parses `text` leniently: a brace that opens or closes nothing is literal text, and an
    /// expression that does not compile is literal text too (tests and hand-built targets).
    /// On a template [`parse`](Self::parse) accepts, both give the same template.
    pub fn lenient(text: &str) -> Template {
        if is_expression(text) {
            if let Ok(template) = Template::parse(text) {
                return template;
            }
            return Template {
                text: text.to_owned(),
                kind: Kind::Simple(vec![Piece::Text(text.to_owned())]),
            };
        }
        scan(text).0
    }

    /// The text as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether this is a minijinja expression (not the simple form).
    pub fn is_expression(&self) -> bool {
        matches!(self.kind, Kind::Expression(_))
    }

    /// The directory attributes the template names, as written (`{givenName} {sn}` →
    /// givenName, sn; `{{ mail or values.proxyAddresses | first }}` → mail, proxyAddresses).
    pub fn attributes(&self) -> Box<dyn Iterator<Item = &str> + '_> {
        match &self.kind {
            Kind::Simple(pieces) => Box::new(pieces.iter().filter_map(|p| match p {
                Piece::Attr { name, .. } => Some(name.as_str()),
                Piece::Text(_) => None,
            })),
            Kind::Expression(e) => Box::new(e.attributes.iter().map(String::as_str)),
        }
    }

    /// The first attribute the template names whose value is not valid UTF-8 (lowercased),
    /// given the entry's unreadable attributes.
    pub fn unreadable_attribute(&self, invalid_utf8: &[String]) -> Option<String> {
        if invalid_utf8.is_empty() {
            return None;
        }
        self.attributes()
            .map(str::to_ascii_lowercase)
            .find(|key| invalid_utf8.iter().any(|a| a == key))
    }

    /// The rendered value, trimmed. The simple form never fails: each placeholder is the
    /// attribute's first value (absent: nothing). An expression fails with the reason (an
    /// attribute it prints is missing, a regular expression does not match its use, …).
    pub fn render(&self, entry: &Entry<'_>) -> Result<String, String> {
        let out = match &self.kind {
            Kind::Simple(pieces) => {
                let mut out = String::new();
                for piece in pieces {
                    match piece {
                        Piece::Text(t) => out.push_str(t),
                        Piece::Attr { key, .. } => {
                            if let Some(v) = entry.attrs.get(key).and_then(|v| v.first()) {
                                out.push_str(v);
                            }
                        }
                    }
                }
                out
            }
            Kind::Expression(e) => e.render(entry)?,
        };
        let trimmed = out.trim();
        Ok(if trimmed.len() == out.len() {
            out
        } else {
            trimmed.to_string()
        })
    }
}

impl Expression {
    fn compile(text: &str) -> Result<Expression, String> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::SemiStrict);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        // Operator-written, but a template must never hang a cycle.
        env.set_fuel(Some(100_000));
        env.add_filter("regex_replace", regex_replace);
        env.add_filter("ad_time", ad_time);
        env.add_test("matching", matching);
        let invalid = |why: String| format!("invalid expression \"{text}\": {why}");
        env.add_template_owned(NAME, text.to_owned())
            .map_err(|e| invalid(describe(&e)))?;
        let template = env.get_template(NAME).map_err(|e| invalid(describe(&e)))?;
        let mut attributes: Vec<String> = template
            .undeclared_variables(true)
            .into_iter()
            .filter_map(|name| match name.split_once('.') {
                Some(("values", attr)) => Some(attr.split('.').next().unwrap_or(attr).to_owned()),
                Some((attr, _)) => Some(attr.to_owned()),
                None if name == "values" || name == "dn" => None,
                None => Some(name),
            })
            .filter(|name| !GLOBALS.contains(&name.as_str()))
            .collect();
        attributes.sort_by_key(|a| a.to_ascii_lowercase());
        attributes.dedup_by(|a, b| a.eq_ignore_ascii_case(b));
        // A probe entry that has every attribute: what fails on it is the template's own
        // fault (an unknown filter, test or function, a regular expression that does not
        // compile), not an entry's.
        let probe = Value::from_object(Probe);
        if let Err(e) = template.render(probe) {
            if matches!(
                e.kind(),
                ErrorKind::UnknownFilter
                    | ErrorKind::UnknownTest
                    | ErrorKind::UnknownFunction
                    | ErrorKind::UnknownMethod
                    | ErrorKind::TooManyArguments
                    | ErrorKind::MissingArgument
                    | ErrorKind::SyntaxError
            ) || e
                .detail()
                .is_some_and(|d| d.starts_with(BAD_REGEX) || d.ends_with("is not callable"))
            {
                return Err(invalid(describe(&e)));
            }
        }
        Ok(Expression { env, attributes })
    }

    fn render(&self, entry: &Entry<'_>) -> Result<String, String> {
        let template = self
            .env
            .get_template(NAME)
            .expect("an expression's environment holds its template");
        template.render(entry.context()).map_err(|e| {
            if e.kind() == ErrorKind::UndefinedError {
                let missing: Vec<&str> = self
                    .attributes
                    .iter()
                    .map(String::as_str)
                    .filter(|a| !entry.attrs.contains_key(&a.to_ascii_lowercase()))
                    .collect();
                if !missing.is_empty() {
                    return format!(
                        "its entry has no {} (give a fallback: `or` another attribute, or `| default(…)`)",
                        missing.join(", no ")
                    );
                }
            }
            describe(&e)
        })
    }
}

/// minijinja's global functions, which are not attributes.
const GLOBALS: &[&str] = &["range", "dict", "namespace", "debug", "loop", "self"];

/// An error without minijinja's template name (`template` means nothing to an operator).
fn describe(e: &minijinja::Error) -> String {
    let mut text = match e.detail() {
        Some(detail) => format!("{}: {detail}", e.kind()),
        None => e.kind().to_string(),
    };
    if let Some(line) = e.line() {
        if line > 1 {
            text.push_str(&format!(" (line {line})"));
        }
    }
    text
}

/// An expression's entry: `dn`, each attribute's first value by its name in any case, and
/// `values.<name>` for all of them.
#[derive(Debug)]
struct EntryObject {
    dn: String,
    attrs: Attributes,
}

impl Object for EntryObject {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let key = key.as_str()?;
        match key {
            "dn" => Some(Value::from(self.dn.as_str())),
            "values" => Some(Value::from_object(AllValues(self.clone()))),
            _ => {
                let first = self.attrs.get(&key.to_ascii_lowercase())?.first()?;
                Some(Value::from(first.as_str()))
            }
        }
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::NonEnumerable
    }
}

/// `values`: every value of an attribute, as a list.
#[derive(Debug)]
struct AllValues(Arc<EntryObject>);

impl Object for AllValues {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        // An absent attribute has no values: an empty list, so `values.mail[1]` is
        // undefined (and `default` applies) rather than an error.
        let values = self
            .0
            .attrs
            .get(&key.as_str()?.to_ascii_lowercase())
            .map(Vec::as_slice)
            .unwrap_or_default();
        Some(Value::from(
            values
                .iter()
                .map(|v| Value::from(v.as_str()))
                .collect::<Vec<_>>(),
        ))
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::NonEnumerable
    }
}

/// The compile-time probe: every attribute is present.
#[derive(Debug)]
struct Probe;

impl Object for Probe {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        Some(match key.as_str()? {
            "values" => Value::from_object(ProbeValues),
            global if GLOBALS.contains(&global) => return None,
            _ => Value::from("probe"),
        })
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::NonEnumerable
    }
}

#[derive(Debug)]
struct ProbeValues;

impl Object for ProbeValues {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, _key: &Value) -> Option<Value> {
        Some(Value::from(vec![Value::from("probe")]))
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::NonEnumerable
    }
}

/// How a regular expression that does not compile is told apart from an entry's problem.
const BAD_REGEX: &str = "invalid regular expression";

/// Compiled patterns, shared by every expression (a pattern is compiled once, not per entry).
fn regex(pattern: &str) -> Result<regex::Regex, minijinja::Error> {
    static CACHE: OnceLock<Mutex<HashMap<String, regex::Regex>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(re) = cache.lock().expect("regex cache").get(pattern) {
        return Ok(re.clone());
    }
    let re = regex::Regex::new(pattern).map_err(|e| {
        minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("{BAD_REGEX} {pattern:?}: {e}"),
        )
    })?;
    let mut cache = cache.lock().expect("regex cache");
    if cache.len() < 256 {
        cache.insert(pattern.to_owned(), re.clone());
    }
    Ok(re)
}

/// `{{ mail | regex_replace('@old\\.example$', '@example') }}`: every match replaced
/// (`$1` names a group).
fn regex_replace(
    value: String,
    pattern: String,
    replacement: String,
) -> Result<String, minijinja::Error> {
    Ok(regex(&pattern)?
        .replace_all(&value, replacement.as_str())
        .into_owned())
}

/// `{% if title is matching('^Senior') %}`: the pattern matches somewhere in the value.
fn matching(value: String, pattern: String) -> Result<bool, minijinja::Error> {
    Ok(regex(&pattern)?.is_match(&value))
}

/// `{{ accountExpires | ad_time('%Y-%m-%d') }}`: an AD FILETIME (100 ns since 1601, as in
/// `accountExpires`, `pwdLastSet`) or a GeneralizedTime (`whenCreated`, `20240131120000.0Z`)
/// as a date, RFC 3339 without a format. 0 and the largest value mean never: undefined.
fn ad_time(value: String, format: Option<String>) -> Result<Value, minijinja::Error> {
    use chrono::{DateTime, NaiveDateTime, Utc};
    let bad = || {
        minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("{value:?} is not an AD time (a FILETIME number or a GeneralizedTime)"),
        )
    };
    let text = value.trim();
    let time: DateTime<Utc> = if let Ok(ticks) = text.parse::<i64>() {
        if ticks <= 0 || ticks == i64::MAX {
            return Ok(Value::UNDEFINED);
        }
        // 1601-01-01 to 1970-01-01 is 11,644,473,600 seconds.
        let seconds = ticks / 10_000_000 - 11_644_473_600;
        let nanos = (ticks % 10_000_000) as u32 * 100;
        DateTime::from_timestamp(seconds, nanos).ok_or_else(bad)?
    } else {
        let digits = text.trim_end_matches('Z');
        let digits = digits.split(['.', ',']).next().unwrap_or(digits);
        NaiveDateTime::parse_from_str(digits, "%Y%m%d%H%M%S")
            .map_err(|_| bad())?
            .and_utc()
    };
    Ok(Value::from(match format {
        None => time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        Some(format) => {
            use chrono::format::{Item, StrftimeItems};
            let items: Vec<Item> = StrftimeItems::new(&format).collect();
            if items.iter().any(|i| matches!(i, Item::Error)) {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("{format:?} is not a strftime format"),
                ));
            }
            time.format_with_items(items.into_iter()).to_string()
        }
    }))
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
        kind: Kind::Simple(pieces),
    };
    (template, problem)
}

/// Lenient, like [`Template::lenient`] (tests and hand-built targets).
impl From<&str> for Template {
    fn from(text: &str) -> Self {
        Template::lenient(text)
    }
}

impl PartialEq for Template {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text && self.is_expression() == other.is_expression()
    }
}

impl Eq for Template {}

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
    use crate::model::DirectoryUser;

    fn user() -> DirectoryUser {
        let mut u = crate::model::tests::jdoe();
        u.attrs.insert(
            "mailalternateaddress".into(),
            vec!["j@old.example.org".into(), "jane@example.org".into()],
        );
        u.attrs
            .insert("title".into(), vec!["  Senior Engineer ".into()]);
        // 2026-01-31T12:00:00Z as a FILETIME.
        u.attrs
            .insert("accountexpires".into(), vec!["134143344000000000".into()]);
        u.attrs
            .insert("never".into(), vec!["9223372036854775807".into()]);
        u.attrs
            .insert("whencreated".into(), vec!["20240131120000.0Z".into()]);
        u
    }

    fn check_template(text: &str) -> Result<(), String> {
        Template::parse(text).map(|_| ())
    }

    fn render(text: &str, user: &DirectoryUser) -> String {
        Template::lenient(text)
            .render(&Entry::new(&user.dn, &user.attrs))
            .unwrap()
    }

    fn try_render(text: &str, user: &DirectoryUser) -> Result<String, String> {
        Template::parse(text)
            .unwrap()
            .render(&Entry::new(&user.dn, &user.attrs))
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
            "{x;binary}@{mail-host}",
            "",
            "{{ mail | lower }}",
            "{% if title %}{{ title }}{% endif %}",
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
                    "invalid template \"{bad}\": {why}; an expression is written {{{{ … }}}}"
                )),
                "{bad}"
            );
        }
        for good in ["{givenName} {sn}", "plain", "{{ uid }}"] {
            assert_eq!(Template::parse(good), Ok(Template::lenient(good)), "{good}");
        }
    }

    #[test]
    fn simple_templates_render_like_the_text() {
        let u = user();
        for (template, rendered) in [
            ("{givenName} {sn}", "Jane Doe"),
            (" {uid} ", "jdoe"),
            ("a}b{c", "a}b{c"),
            ("{", "{"),
            ("x{uid", "x{uid"),
            ("{missing}", ""),
            ("{UID}@{missing}", "jdoe@"),
            ("{mailAlternateAddress}", "j@old.example.org"),
        ] {
            assert_eq!(render(template, &u), rendered, "{template}");
        }
    }

    #[test]
    fn templates_name_their_attributes() {
        assert_eq!(
            template_attributes("{givenName} {sn}"),
            vec!["givenName", "sn"]
        );
        assert!(template_attributes("plain").is_empty());
        assert_eq!(
            template_attributes(
                "{{ Mail or userPrincipalName }} {{ values.proxyAddresses | join(',') }} {{ dn }} {% for x in range(2) %}{{ x }}{% endfor %}"
            ),
            vec!["Mail", "proxyAddresses", "userPrincipalName"]
        );
    }

    #[test]
    fn expressions_filter_and_fall_back() {
        let u = user();
        for (template, rendered) in [
            ("{{ givenName | lower }}.{{ SN | upper }}", "jane.DOE"),
            ("{{ givenname }}", "Jane"),
            ("{{ title | trim }}", "Senior Engineer"),
            (
                "{{ mail | replace('@example.org', '@corp.example') }}",
                "jdoe@corp.example",
            ),
            (
                "{{ values.mailAlternateAddress | first | regex_replace('@old\\.(.*)$', '@$1') }}",
                "j@example.org",
            ),
            (
                "{{ values.mailAlternateAddress | join(';') }}",
                "j@old.example.org;jane@example.org",
            ),
            ("{{ values.mailAlternateAddress | length }}", "2"),
            ("{{ values.mailAlternateAddress[1] }}", "jane@example.org"),
            ("{{ values.missing[0] | default('none') }}", "none"),
            ("{{ values.missing | join(',') }}", ""),
            ("{{ (mail | split('@') | list)[1] }}", "example.org"),
            ("{{ userPrincipalName or mail }}", "jdoe@example.org"),
            ("{{ missing | default(uid) }}", "jdoe"),
            ("{{ missing or other or 'nobody' }}", "nobody"),
            (
                "{% if title is matching('^\\s*Senior') %}senior{% else %}other{% endif %}",
                "senior",
            ),
            ("{% if missing %}x{% else %}y{% endif %}", "y"),
            ("{{ accountExpires | ad_time }}", "2026-01-31T12:00:00Z"),
            ("{{ accountExpires | ad_time('%Y-%m-%d') }}", "2026-01-31"),
            ("{{ whenCreated | ad_time('%d.%m.%Y') }}", "31.01.2024"),
            ("{{ never | ad_time | default('never') }}", "never"),
            ("{{ dn }}", "uid=jdoe,dc=x"),
            ("{{ '{' }}{{ uid }}{{ '}' }}", "{jdoe}"),
        ] {
            assert_eq!(
                try_render(template, &u),
                Ok(rendered.to_owned()),
                "{template}"
            );
        }
    }

    #[test]
    fn an_expression_that_fails_for_an_entry_says_why() {
        let u = user();
        assert_eq!(
            try_render("{{ givenName }} {{ initials }}", &u),
            Err("its entry has no initials (give a fallback: `or` another attribute, or `| default(…)`)".into())
        );
        let err = try_render("{{ mail | ad_time }}", &u).unwrap_err();
        assert!(err.contains("is not an AD time"), "{err}");
    }

    #[test]
    fn a_bad_expression_is_refused_when_read() {
        for (bad, why) in [
            ("{{ mail | lowr }}", "unknown filter"),
            (
                "{{ mail | regex_replace('(', '') }}",
                "invalid regular expression",
            ),
            ("{{ mail ", "syntax error"),
            ("{% if mail %}x", "syntax error"),
            ("{{ nosuch(mail) }}", "not callable"),
            ("{% if mail is nosuch %}x{% endif %}", "unknown test"),
        ] {
            let err = Template::parse(bad).map(|_| ()).expect_err(bad);
            assert!(
                err.starts_with(&format!("invalid expression \"{bad}\": ")) && err.contains(why),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn a_runaway_expression_stops() {
        let u = user();
        let err = try_render(
            "{% for a in range(10000) %}{% for b in range(10000) %}x{% endfor %}{% endfor %}",
            &u,
        )
        .unwrap_err();
        assert!(err.contains("fuel"), "{err}");
    }
}
