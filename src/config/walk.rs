//! The walker: configuration files read into TOML tables, and typed getters over their
//! sections that record every problem they meet (with its file and dotted key) instead of
//! stopping at the first. Secrets are resolved here, from the environment or a file.
//!
//! It knows no key of the configuration and no value's meaning: those live in the files that
//! walk the main file and the target files. It never puts a secret's value in a message, and
//! never quotes a line of a file (which may hold a secret someone wrote inline).

use std::cell::RefCell;
use std::fmt;
use std::fs;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use toml::{Table, Value};

use super::Secret;

/// One problem in one configuration file.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}: {}: {}", .file.display(), .key, .message)]
pub struct ConfigError {
    pub file: PathBuf,
    /// The dotted key, like `ldap.users.base` or `mapping."name.givenName"`; `(syntax)` for a
    /// TOML syntax error, `(file)` for a file that cannot be read.
    pub key: String,
    pub message: String,
}

/// Every problem found in one load, in the order they were found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Looks up an environment variable; injected so tests need not touch the process environment.
pub(super) type EnvLookup<'a> = dyn Fn(&str) -> Option<String> + 'a;

/// The candidate closest to `word` by edit distance, if it is close enough to be a likely typo.
pub fn nearest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let length = word.chars().count();
    candidates
        .iter()
        .map(|candidate| (levenshtein(word, candidate), *candidate))
        // A distance as long as the word itself would "correct" any short word into anything.
        .filter(|(distance, _)| *distance <= 3 && *distance < length)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    previous[b.len()]
}

pub(super) const SECRET_KEYS: &[&str] = &["env", "file", "credential"];

pub(super) const INLINE_SECRET: &str =
    "secrets are never written inline; use { env = \"VAR\" }, { file = \"/path\" } or { credential = \"NAME\" }";

/// The problems found so far in one load, shared by every file and section.
#[derive(Default)]
pub(super) struct Problems(RefCell<Vec<ConfigError>>);

impl Problems {
    pub(super) fn into_errors(self) -> Vec<ConfigError> {
        self.0.into_inner()
    }

    pub(super) fn contains(&self, file: &Path, key: &str) -> bool {
        self.0
            .borrow()
            .iter()
            .any(|e| e.file == file && e.key == key)
    }
}

/// One configuration file: where it is (relative paths in it resolve against its folder).
pub(super) struct Source<'a> {
    pub(super) path: PathBuf,
    dir: PathBuf,
    pub(super) problems: &'a Problems,
    pub(super) env: &'a EnvLookup<'a>,
}

impl<'a> Source<'a> {
    pub(super) fn new(path: &Path, problems: &'a Problems, env: &'a EnvLookup<'a>) -> Self {
        let dir = path
            .parent()
            .filter(|dir| !dir.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
        Source {
            path: path.to_path_buf(),
            dir,
            problems,
            env,
        }
    }

    pub(super) fn error(&self, key: impl Into<String>, message: impl Into<String>) {
        self.problems.0.borrow_mut().push(ConfigError {
            file: self.path.clone(),
            key: key.into(),
            message: message.into(),
        });
    }

    pub(super) fn read(&self) -> Option<String> {
        fs::read_to_string(&self.path)
            .map_err(|e| self.error("(file)", format!("cannot read: {e}")))
            .ok()
    }

    pub(super) fn parse(&self, text: &str) -> Option<Table> {
        toml::from_str::<Table>(text)
            .map_err(|e| {
                // Only toml's own message and our position: its Display quotes the offending
                // line, which may hold a secret someone tried to write inline.
                let position = e
                    .span()
                    .map(|span| line_and_column(text, span.start))
                    .map(|(line, column)| format!("line {line}, column {column}: "))
                    .unwrap_or_default();
                self.error("(syntax)", format!("{position}{}", e.message()));
            })
            .ok()
    }

    pub(super) fn resolve(&self, path: &str) -> PathBuf {
        self.dir.join(path)
    }
}

fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    (line, column)
}

/// A table inside a file, known by its dotted path. `table` is `None` for an optional table
/// the file leaves out, so every key reads as absent.
pub(super) struct Section<'a> {
    pub(super) src: &'a Source<'a>,
    pub(super) table: Option<&'a Table>,
    path: String,
}

impl<'a> Section<'a> {
    pub(super) fn root(src: &'a Source<'a>, table: &'a Table, allowed: &[&str]) -> Self {
        let root = Section {
            src,
            table: Some(table),
            path: String::new(),
        };
        root.check_keys(allowed);
        root
    }

    pub(super) fn key(&self, name: &str) -> String {
        let name = quote_key(name);
        if self.path.is_empty() {
            name
        } else {
            format!("{}.{name}", self.path)
        }
    }

    pub(super) fn error(&self, name: &str, message: impl Into<String>) {
        self.src.error(self.key(name), message);
    }

    pub(super) fn check_keys(&self, allowed: &[&str]) {
        for key in self.keys() {
            if !allowed.contains(&key.as_str()) {
                let message = match nearest(key, allowed) {
                    Some(near) => format!("unknown key \"{key}\"; did you mean \"{near}\"?"),
                    None => format!(
                        "unknown key \"{key}\"; valid keys are: {}",
                        allowed.join(", ")
                    ),
                };
                self.error(key, message);
            }
        }
    }

    pub(super) fn keys(&self) -> impl Iterator<Item = &'a String> {
        self.table.into_iter().flat_map(Table::keys)
    }

    pub(super) fn has(&self, name: &str) -> bool {
        self.value(name).is_some()
    }

    pub(super) fn value(&self, name: &str) -> Option<&'a Value> {
        self.table?.get(name)
    }

    /// The value under `name` if `pick` accepts it; a value of another type is an error.
    pub(super) fn typed<T>(
        &self,
        name: &str,
        expected: &str,
        pick: impl FnOnce(&'a Value) -> Option<T>,
    ) -> Option<T> {
        let value = self.value(name)?;
        let picked = pick(value);
        if picked.is_none() {
            self.error(
                name,
                format!("expected {expected}, found {}", describe(value)),
            );
        }
        picked
    }

    /// Reports a missing key, otherwise reads it with `get`.
    pub(super) fn required<T>(
        &self,
        name: &str,
        get: impl FnOnce(&Self, &str) -> Option<T>,
    ) -> Option<T> {
        if !self.has(name) {
            self.error(name, "required key is missing");
            return None;
        }
        get(self, name)
    }

    pub(super) fn string(&self, name: &str) -> Option<&'a str> {
        self.typed(name, "a string", Value::as_str)
    }

    pub(super) fn non_empty_string(&self, name: &str) -> Option<&'a str> {
        self.parsed(name, |text| {
            if text.trim().is_empty() {
                Err("must not be empty".to_owned())
            } else {
                Ok(text)
            }
        })
    }

    pub(super) fn bool(&self, name: &str) -> Option<bool> {
        self.typed(name, "a boolean (true or false)", Value::as_bool)
    }

    pub(super) fn integer(&self, name: &str, range: RangeInclusive<i64>) -> Option<i64> {
        let number = self.typed(name, "an integer", Value::as_integer)?;
        if range.contains(&number) {
            Some(number)
        } else {
            self.error(
                name,
                format!(
                    "must be between {} and {}, found {number}",
                    range.start(),
                    range.end()
                ),
            );
            None
        }
    }

    /// A string turned into a value by `parse`, whose error message is reported as is.
    pub(super) fn parsed<T>(
        &self,
        name: &str,
        parse: impl FnOnce(&'a str) -> Result<T, String>,
    ) -> Option<T> {
        let text = self.string(name)?;
        parse(text)
            .map_err(|message| self.error(name, message))
            .ok()
    }

    pub(super) fn choice<T: Copy>(&self, name: &str, options: &[(&str, T)]) -> Option<T> {
        self.parsed(name, |text| parse_choice(text, options))
    }

    /// A sub-table whose keys are checked against `allowed`.
    pub(super) fn table(&self, name: &str, allowed: &[&str]) -> Option<Section<'a>> {
        let table = self.open_table(name)?;
        table.check_keys(allowed);
        Some(table)
    }

    /// A sub-table with free-form keys.
    pub(super) fn open_table(&self, name: &str) -> Option<Section<'a>> {
        let table = self.typed(name, "a table", Value::as_table)?;
        Some(Section {
            src: self.src,
            table: Some(table),
            path: self.key(name),
        })
    }

    /// An optional sub-table: an absent one reads as empty.
    pub(super) fn optional_table(&self, name: &str, allowed: &[&str]) -> Section<'a> {
        self.table(name, allowed).unwrap_or(Section {
            src: self.src,
            table: None,
            path: self.key(name),
        })
    }

    /// The string elements of an array, each with its own key (`name[i]`) for later errors.
    /// An element of another type is reported and left out.
    pub(super) fn strings(&self, name: &str) -> Option<Vec<(String, &'a str)>> {
        let array = self.typed(name, "an array of strings", Value::as_array)?;
        let key = self.key(name);
        let mut strings = Vec::with_capacity(array.len());
        for (i, value) in array.iter().enumerate() {
            let element = format!("{key}[{i}]");
            match value.as_str() {
                Some(text) => strings.push((element, text)),
                None => self.src.error(
                    element,
                    format!("expected a string, found {}", describe(value)),
                ),
            }
        }
        Some(strings)
    }

    /// Each element of a string array through `parse`; `None` if any element was wrong.
    pub(super) fn parsed_strings<T>(
        &self,
        name: &str,
        mut parse: impl FnMut(&'a str) -> Result<T, String>,
    ) -> Option<Vec<T>> {
        let expected = self.value(name)?.as_array().map_or(0, Vec::len);
        let parsed: Vec<T> = self
            .strings(name)?
            .into_iter()
            .filter_map(|(key, text)| parse(text).map_err(|m| self.src.error(key, m)).ok())
            .collect();
        (parsed.len() == expected).then_some(parsed)
    }

    /// A secret: `{ env = "VAR" }`, `{ file = "PATH" }` or `{ credential = "NAME" }` (a
    /// systemd credential in `$CREDENTIALS_DIRECTORY`), never an inline string.
    pub(super) fn secret(&self, name: &str) -> Option<Secret> {
        match self.value(name)? {
            Value::String(_) => {
                self.error(name, INLINE_SECRET);
                return None;
            }
            Value::Table(_) => {}
            other => {
                self.error(
                    name,
                    format!(
                        "expected a secret {{ env = \"VAR\" }}, {{ file = \"/path\" }} or {{ credential = \"NAME\" }}, found {}",
                        describe(other)
                    ),
                );
                return None;
            }
        }
        let spec = self.table(name, SECRET_KEYS)?;
        match (spec.has("env"), spec.has("file"), spec.has("credential")) {
            (true, false, false) => {
                let var = spec.non_empty_string("env")?;
                match (self.src.env)(var) {
                    Some(value) if !value.is_empty() => Some(Secret::new(value)),
                    Some(_) => {
                        self.error(name, format!("environment variable {var} is empty"));
                        None
                    }
                    None => {
                        self.error(name, format!("environment variable {var} is not set"));
                        None
                    }
                }
            }
            (false, true, false) => {
                let path = self.src.resolve(spec.non_empty_string("file")?);
                self.secret_file(name, &path, "secret file")
            }
            (false, false, true) => {
                let credential = spec.non_empty_string("credential")?;
                if credential.contains('/') || credential == "." || credential == ".." {
                    self.error(
                        name,
                        format!("\"{credential}\" is not a systemd credential name (a file name in $CREDENTIALS_DIRECTORY, without /)"),
                    );
                    return None;
                }
                match (self.src.env)("CREDENTIALS_DIRECTORY").filter(|d| !d.is_empty()) {
                    Some(dir) => {
                        let path = std::path::Path::new(&dir).join(credential);
                        self.secret_file(name, &path, &format!("systemd credential {credential}"))
                    }
                    None => {
                        self.error(
                            name,
                            format!("the systemd credential {credential} cannot be read: $CREDENTIALS_DIRECTORY is not set (run under systemd with LoadCredential={credential}:/path or SetCredentialEncrypted=, or use {{ file = \"/path\" }})"),
                        );
                        None
                    }
                }
            }
            _ => {
                self.error(
                    name,
                    "a secret names exactly one source: { env = \"VAR\" }, { file = \"/path\" } or { credential = \"NAME\" }",
                );
                None
            }
        }
    }

    /// A secret's file (trailing newline dropped), or the error naming it.
    fn secret_file(&self, name: &str, path: &std::path::Path, what: &str) -> Option<Secret> {
        match fs::read_to_string(path) {
            Ok(content) if !content.trim().is_empty() => {
                Some(Secret::new(content.trim_end().to_owned()))
            }
            Ok(_) => {
                self.error(name, format!("{what} {} is empty", path.display()));
                None
            }
            Err(e) => {
                self.error(name, format!("cannot read {what} {}: {e}", path.display()));
                None
            }
        }
    }
}

/// A key as it is written in a dotted path: bare when TOML allows, quoted otherwise.
fn quote_key(key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        key.to_owned()
    } else {
        format!("\"{}\"", key.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

pub(super) fn describe(value: &Value) -> &'static str {
    match value {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a float",
        Value::Boolean(_) => "a boolean",
        Value::Datetime(_) => "a date-time",
        Value::Array(_) => "an array",
        Value::Table(_) => "a table",
    }
}

pub(super) fn parse_choice<T: Copy>(text: &str, options: &[(&str, T)]) -> Result<T, String> {
    if let Some((_, value)) = options.iter().find(|(name, _)| *name == text) {
        return Ok(*value);
    }
    let names: Vec<&str> = options.iter().map(|(name, _)| *name).collect();
    Err(match nearest(text, &names) {
        Some(near) => format!("unknown value \"{text}\"; did you mean \"{near}\"?"),
        None => format!(
            "unknown value \"{text}\"; expected one of {}",
            names
                .iter()
                .map(|name| format!("\"{name}\""))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_suggests_only_close_words() {
        let keys = ["schedule", "timezone", "state_dir", "targets_dir", "listen"];
        assert_eq!(nearest("shedule", &keys), Some("schedule"));
        assert_eq!(nearest("target_dir", &keys), Some("targets_dir"));
        assert_eq!(nearest("xyz", &keys), None);
        assert_eq!(nearest("completely-different", &keys), None);
        assert_eq!(levenshtein("kitten", "sitting"), 3);
    }

    #[test]
    fn error_display() {
        let error = ConfigError {
            file: PathBuf::from("/etc/ldap2scim/config.toml"),
            key: "ldap.users.base".into(),
            message: "required key is missing".into(),
        };
        assert_eq!(
            error.to_string(),
            "/etc/ldap2scim/config.toml: ldap.users.base: required key is missing"
        );
        let errors = ConfigErrors(vec![error.clone(), error]);
        assert_eq!(errors.to_string().lines().count(), 2);
    }
}
