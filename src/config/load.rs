//! Reading and validating the configuration files.
//!
//! The main file and every target file are parsed into plain TOML tables and walked by hand,
//! so that one pass reports *every* problem in every file (unknown keys with a suggestion, wrong
//! types, missing keys, bad values), each with its file and dotted key. Secrets are resolved
//! here from the environment or from files; their values never appear in an error message.

use std::cell::RefCell;
use std::fmt;
use std::fs;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::{Table, Value};

use super::{
    Auth, ClientAuth, Config, DaemonConfig, Deprovision, Dialect, GroupScope, GroupsConfig,
    LdapConfig, LdapServer, LdapTransport, Limit, MatchRule, Profile, RateLimit, Rebind, Secret,
    TargetConfig, TargetName, UsersConfig,
};

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
type EnvLookup<'a> = dyn Fn(&str) -> Option<String> + 'a;

/// Loads and validates the main file at `path` and every target file, reading secrets from the
/// process environment.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    load_with_env(path, &|name| std::env::var(name).ok())
}

/// Like [`load`], with secrets of the form `{ env = "VAR" }` looked up through `env`.
pub fn load_with_env(path: &Path, env: &EnvLookup<'_>) -> Result<Config, ConfigErrors> {
    let problems = Problems::default();
    let config = read_config(path, env, &problems);
    let errors = problems.0.into_inner();
    match config {
        Some(config) if errors.is_empty() => Ok(config),
        _ => {
            debug_assert!(!errors.is_empty(), "an invalid config must report why");
            Err(ConfigErrors(errors))
        }
    }
}

/// Parses `"500ms"`, `"30s"`, `"15m"`, `"2h"` or `"7d"`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let invalid = || {
        format!("invalid duration \"{text}\"; use a whole number followed by ms, s, m, h or d, like \"30s\"")
    };
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(invalid)?;
    let (number, unit) = text.split_at(digits);
    let number: u64 = number.parse().map_err(|_| invalid())?;
    let seconds_per_unit = match unit {
        "ms" => return Ok(Duration::from_millis(number)),
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(invalid()),
    };
    number
        .checked_mul(seconds_per_unit)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("duration \"{text}\" is too long"))
}

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

// ---------------------------------------------------------------------------------------------
// Keys, defaults and accepted values

const ROOT_KEYS: &[&str] = &["daemon", "ldap"];
const DAEMON_KEYS: &[&str] = &["schedule", "timezone", "state_dir", "targets_dir", "listen"];
const LDAP_KEYS: &[&str] = &[
    "url",
    "starttls",
    "ca_file",
    "bind_dn",
    "bind_password",
    "dialect",
    "page_size",
    "timeout",
    "max_shrink",
    "allow_plaintext",
    "users",
    "groups",
];
const USERS_KEYS: &[&str] = &["base", "filter", "disabled_filter"];
const GROUPS_KEYS: &[&str] = &["base", "filter", "nested"];
const TARGET_KEYS: &[&str] = &[
    "url",
    "auth",
    "profile",
    "scope_groups",
    "groups",
    "deprovision",
    "provision_disabled",
    "delete_after",
    "max_deprovisions",
    "match_existing",
    "protect",
    "rate_limit",
    "concurrency",
    "members_per_request",
    "timeout",
    "mapping",
    "allow_plaintext",
    "ca_file",
    "max_response_size",
    "max_value_length",
    "rebind",
];
const AUTH_KEYS: &[&str] = &["bearer", "basic", "oauth2"];
const BASIC_KEYS: &[&str] = &["username", "password"];
const OAUTH2_KEYS: &[&str] = &[
    "token_url",
    "client_id",
    "client_secret",
    "scope",
    "client_auth",
];
const SECRET_KEYS: &[&str] = &["env", "file"];

const DEFAULT_SCHEDULE: &str = "*/15 * * * *";
const DEFAULT_TIMEZONE: &str = "UTC";
const DEFAULT_STATE_DIR: &str = "/var/lib/ldap2scim";
const DEFAULT_TARGETS_DIR: &str = "targets.d";
const DEFAULT_PAGE_SIZE: i32 = 1000;
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_MAX_SHRINK: f64 = 0.2;
const DEFAULT_DELETE_AFTER: Duration = Duration::from_secs(30 * 86_400);
const DEFAULT_MAX_DEPROVISIONS: Limit = Limit::Percent(0.05);
const DEFAULT_CONCURRENCY: usize = 4;
const DEFAULT_MEMBERS_PER_REQUEST: usize = 100;
const DEFAULT_MAX_RESPONSE_SIZE: u64 = 32 * 1024 * 1024;
const DEFAULT_MAX_VALUE_LENGTH: usize = 64 * 1024;

const INLINE_SECRET: &str =
    "secrets are never written inline; use { env = \"VAR\" } or { file = \"/path\" }";

const DIALECTS: &[(&str, Dialect)] = &[
    ("openldap", Dialect::OpenLdap),
    ("active-directory", Dialect::ActiveDirectory),
];
const PROFILES: &[(&str, Profile)] = &[
    ("generic", Profile::Generic),
    ("aws-identity-center", Profile::AwsIdentityCenter),
    ("slack", Profile::Slack),
    ("github-emu", Profile::GithubEmu),
    ("entra-style", Profile::EntraStyle),
];
const GROUP_SCOPES: &[(&str, GroupScope)] = &[
    ("all", GroupScope::All),
    ("scoped", GroupScope::Scoped),
    ("none", GroupScope::None),
];
const DEPROVISIONS: &[(&str, Deprovision)] = &[
    ("deactivate", Deprovision::Deactivate),
    ("delete", Deprovision::Delete),
    ("deactivate-then-delete", Deprovision::DeactivateThenDelete),
];
const REBINDS: &[(&str, Rebind)] = &[("allow", Rebind::Allow), ("hold", Rebind::Hold)];
const CLIENT_AUTHS: &[(&str, ClientAuth)] =
    &[("basic", ClientAuth::Basic), ("post", ClientAuth::Post)];
const MATCH_RULES: &[(&str, MatchRule)] = &[
    ("externalId", MatchRule::ExternalId),
    ("userName", MatchRule::UserName),
    ("displayName", MatchRule::DisplayName),
];

fn default_users_filter(dialect: Dialect) -> &'static str {
    match dialect {
        Dialect::OpenLdap => "(objectClass=inetOrgPerson)",
        Dialect::ActiveDirectory => "(&(objectCategory=person)(objectClass=user))",
    }
}

fn default_groups_filter(dialect: Dialect) -> &'static str {
    match dialect {
        Dialect::OpenLdap => "(objectClass=groupOfNames)",
        Dialect::ActiveDirectory => "(objectClass=group)",
    }
}

fn default_mapping(dialect: Dialect) -> Vec<(String, String)> {
    let user_name = match dialect {
        Dialect::OpenLdap => "{uid}",
        Dialect::ActiveDirectory => "{userPrincipalName}",
    };
    [
        ("userName", user_name),
        ("name.givenName", "{givenName}"),
        ("name.familyName", "{sn}"),
        ("displayName", "{cn}"),
        ("emails[type eq \"work\"].value", "{mail}"),
        ("title", "{title}"),
    ]
    .into_iter()
    .map(|(path, template)| (path.to_owned(), template.to_owned()))
    .collect()
}

// ---------------------------------------------------------------------------------------------
// The walker: files, sections and typed getters that record every problem they meet

/// The problems found so far in one load, shared by every file and section.
#[derive(Default)]
struct Problems(RefCell<Vec<ConfigError>>);

impl Problems {
    fn contains(&self, file: &Path, key: &str) -> bool {
        self.0
            .borrow()
            .iter()
            .any(|e| e.file == file && e.key == key)
    }
}

/// One configuration file: where it is (relative paths in it resolve against its folder).
struct Source<'a> {
    path: PathBuf,
    dir: PathBuf,
    problems: &'a Problems,
    env: &'a EnvLookup<'a>,
}

impl<'a> Source<'a> {
    fn new(path: &Path, problems: &'a Problems, env: &'a EnvLookup<'a>) -> Self {
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

    fn error(&self, key: impl Into<String>, message: impl Into<String>) {
        self.problems.0.borrow_mut().push(ConfigError {
            file: self.path.clone(),
            key: key.into(),
            message: message.into(),
        });
    }

    fn read(&self) -> Option<String> {
        fs::read_to_string(&self.path)
            .map_err(|e| self.error("(file)", format!("cannot read: {e}")))
            .ok()
    }

    fn parse(&self, text: &str) -> Option<Table> {
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

    fn resolve(&self, path: &str) -> PathBuf {
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
struct Section<'a> {
    src: &'a Source<'a>,
    table: Option<&'a Table>,
    path: String,
}

impl<'a> Section<'a> {
    fn root(src: &'a Source<'a>, table: &'a Table, allowed: &[&str]) -> Self {
        let root = Section {
            src,
            table: Some(table),
            path: String::new(),
        };
        root.check_keys(allowed);
        root
    }

    fn key(&self, name: &str) -> String {
        let name = quote_key(name);
        if self.path.is_empty() {
            name
        } else {
            format!("{}.{name}", self.path)
        }
    }

    fn error(&self, name: &str, message: impl Into<String>) {
        self.src.error(self.key(name), message);
    }

    fn check_keys(&self, allowed: &[&str]) {
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

    fn keys(&self) -> impl Iterator<Item = &'a String> {
        self.table.into_iter().flat_map(Table::keys)
    }

    fn has(&self, name: &str) -> bool {
        self.value(name).is_some()
    }

    fn value(&self, name: &str) -> Option<&'a Value> {
        self.table?.get(name)
    }

    /// The value under `name` if `pick` accepts it; a value of another type is an error.
    fn typed<T>(
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
    fn required<T>(&self, name: &str, get: impl FnOnce(&Self, &str) -> Option<T>) -> Option<T> {
        if !self.has(name) {
            self.error(name, "required key is missing");
            return None;
        }
        get(self, name)
    }

    fn string(&self, name: &str) -> Option<&'a str> {
        self.typed(name, "a string", Value::as_str)
    }

    fn non_empty_string(&self, name: &str) -> Option<&'a str> {
        self.parsed(name, |text| {
            if text.trim().is_empty() {
                Err("must not be empty".to_owned())
            } else {
                Ok(text)
            }
        })
    }

    fn bool(&self, name: &str) -> Option<bool> {
        self.typed(name, "a boolean (true or false)", Value::as_bool)
    }

    fn integer(&self, name: &str, range: RangeInclusive<i64>) -> Option<i64> {
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
    fn parsed<T>(&self, name: &str, parse: impl FnOnce(&'a str) -> Result<T, String>) -> Option<T> {
        let text = self.string(name)?;
        parse(text)
            .map_err(|message| self.error(name, message))
            .ok()
    }

    fn choice<T: Copy>(&self, name: &str, options: &[(&str, T)]) -> Option<T> {
        self.parsed(name, |text| parse_choice(text, options))
    }

    /// A sub-table whose keys are checked against `allowed`.
    fn table(&self, name: &str, allowed: &[&str]) -> Option<Section<'a>> {
        let table = self.open_table(name)?;
        table.check_keys(allowed);
        Some(table)
    }

    /// A sub-table with free-form keys.
    fn open_table(&self, name: &str) -> Option<Section<'a>> {
        let table = self.typed(name, "a table", Value::as_table)?;
        Some(Section {
            src: self.src,
            table: Some(table),
            path: self.key(name),
        })
    }

    /// An optional sub-table: an absent one reads as empty.
    fn optional_table(&self, name: &str, allowed: &[&str]) -> Section<'a> {
        self.table(name, allowed).unwrap_or(Section {
            src: self.src,
            table: None,
            path: self.key(name),
        })
    }

    /// The string elements of an array, each with its own key (`name[i]`) for later errors.
    /// An element of another type is reported and left out.
    fn strings(&self, name: &str) -> Option<Vec<(String, &'a str)>> {
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
    fn parsed_strings<T>(
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

    /// A secret: `{ env = "VAR" }` or `{ file = "PATH" }`, never an inline string.
    fn secret(&self, name: &str) -> Option<Secret> {
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
                        "expected a secret {{ env = \"VAR\" }} or {{ file = \"/path\" }}, found {}",
                        describe(other)
                    ),
                );
                return None;
            }
        }
        let spec = self.table(name, SECRET_KEYS)?;
        match (spec.has("env"), spec.has("file")) {
            (true, false) => {
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
            (false, true) => {
                let path = self.src.resolve(spec.non_empty_string("file")?);
                match fs::read_to_string(&path) {
                    Ok(content) if !content.trim().is_empty() => {
                        Some(Secret::new(content.trim_end().to_owned()))
                    }
                    Ok(_) => {
                        self.error(name, format!("secret file {} is empty", path.display()));
                        None
                    }
                    Err(e) => {
                        self.error(
                            name,
                            format!("cannot read secret file {}: {e}", path.display()),
                        );
                        None
                    }
                }
            }
            _ => {
                self.error(
                    name,
                    "a secret names exactly one source: { env = \"VAR\" } or { file = \"/path\" }",
                );
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

fn describe(value: &Value) -> &'static str {
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

fn parse_choice<T: Copy>(text: &str, options: &[(&str, T)]) -> Result<T, String> {
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

// ---------------------------------------------------------------------------------------------
// The main file

fn read_config(path: &Path, env: &EnvLookup<'_>, problems: &Problems) -> Option<Config> {
    let main = Source::new(path, problems, env);
    let text = main.read()?;
    let table = main.parse(&text)?;
    let root = Section::root(&main, &table, ROOT_KEYS);

    let daemon = daemon_config(&root);
    let (dialect, ldap) = ldap_config(&root);
    // A targets_dir that was itself wrong has been reported; listing it would only add noise.
    let targets = if problems.contains(&main.path, "daemon.targets_dir") {
        None
    } else {
        load_targets(&main, &daemon.targets_dir, dialect)
    };

    Some(Config {
        path: path.to_path_buf(),
        daemon,
        ldap: ldap?,
        targets: targets?,
    })
}

fn daemon_config(root: &Section<'_>) -> DaemonConfig {
    let d = root.optional_table("daemon", DAEMON_KEYS);
    let schedule = d.parsed("schedule", |text| check_schedule(text).map(|()| text));
    let timezone = d.parsed("timezone", check_timezone);
    let path = |text: &str| d.src.resolve(text);
    let state_dir = d.non_empty_string("state_dir").map(path);
    let targets_dir = d.non_empty_string("targets_dir").map(path);
    let listen = d.parsed("listen", |text| {
        text.parse::<SocketAddr>().map_err(|_| {
            format!("invalid address \"{text}\"; expected IP:PORT, like \"127.0.0.1:9464\"")
        })
    });
    DaemonConfig {
        schedule: schedule.unwrap_or(DEFAULT_SCHEDULE).to_owned(),
        timezone: timezone.unwrap_or(DEFAULT_TIMEZONE).to_owned(),
        state_dir: state_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
        targets_dir: targets_dir.unwrap_or_else(|| path(DEFAULT_TARGETS_DIR)),
        listen,
    }
}

/// The dialect is returned even when the rest is invalid: target mappings depend on it.
fn ldap_config(root: &Section<'_>) -> (Dialect, Option<LdapConfig>) {
    let Some(l) = root.required("ldap", |s, name| s.table(name, LDAP_KEYS)) else {
        return (Dialect::OpenLdap, None);
    };
    let dialect = l.choice("dialect", DIALECTS).unwrap_or(Dialect::OpenLdap);

    let urls = l.required("url", ldap_urls);
    let starttls = l.bool("starttls").unwrap_or(false);
    // Judged on the raw values, so the conflict is reported even next to a bad url.
    let any_ldaps = match l.value("url") {
        Some(Value::String(url)) => has_scheme(url, "ldaps"),
        Some(Value::Array(urls)) => urls
            .iter()
            .filter_map(Value::as_str)
            .any(|url| has_scheme(url, "ldaps")),
        _ => false,
    };
    if starttls && any_ldaps {
        l.error(
            "starttls",
            "starttls cannot be combined with an ldaps:// url, which is already TLS",
        );
    }
    let ca_file = l.parsed("ca_file", |text| readable_file(l.src.resolve(text)));
    let allow_plaintext = l.bool("allow_plaintext").unwrap_or(false);
    let urls = urls.map(|urls| ldap_servers(urls, starttls));
    if let Some(plain) = urls.as_ref().and_then(|servers| {
        servers
            .iter()
            .find(|s| s.transport == LdapTransport::Plain && !s.is_loopback())
    }) {
        if !allow_plaintext {
            l.error(
                "url",
                format!("{plain} would send the bind password in cleartext; use ldaps://, set starttls = true, or set allow_plaintext = true if this network is trusted"),
            );
        }
    }
    let bind_dn = l.non_empty_string("bind_dn");
    let bind_password = l.secret("bind_password");
    match (l.has("bind_dn"), l.has("bind_password")) {
        (true, false) => l.error("bind_password", "required when bind_dn is set"),
        (false, true) => l.error(
            "bind_password",
            "set without bind_dn; an anonymous bind takes no password",
        ),
        _ => {}
    }
    let page_size = l.integer("page_size", 1..=100_000).map(|n| n as i32);
    let timeout = l.parsed("timeout", |text| {
        parse_duration(text).and_then(|duration| {
            if duration.is_zero() {
                Err("must be longer than zero".to_owned())
            } else {
                Ok(duration)
            }
        })
    });
    let max_shrink = l.parsed("max_shrink", parse_percent);

    let users = l.required("users", |s, name| s.table(name, USERS_KEYS));
    let users = users.and_then(|u| {
        let base = u.required("base", Section::non_empty_string);
        let filter = u.parsed("filter", check_filter);
        let disabled_filter = u.parsed("disabled_filter", check_filter);
        Some(UsersConfig {
            base: base?.to_owned(),
            filter: filter.unwrap_or(default_users_filter(dialect)).to_owned(),
            disabled_filter: disabled_filter.map(str::to_owned),
        })
    });
    let groups = l.table("groups", GROUPS_KEYS).and_then(|g| {
        let base = g.required("base", Section::non_empty_string);
        let filter = g.parsed("filter", check_filter);
        let nested = g.bool("nested");
        Some(GroupsConfig {
            base: base?.to_owned(),
            filter: filter.unwrap_or(default_groups_filter(dialect)).to_owned(),
            nested: nested.unwrap_or(true),
        })
    });

    let ldap = urls.zip(users).map(|(urls, users)| LdapConfig {
        urls,
        starttls,
        allow_plaintext,
        ca_file,
        bind_dn: bind_dn.map(str::to_owned),
        bind_password,
        dialect,
        page_size: page_size.unwrap_or(DEFAULT_PAGE_SIZE),
        timeout: timeout.unwrap_or(DEFAULT_TIMEOUT),
        max_shrink: max_shrink.unwrap_or(DEFAULT_MAX_SHRINK),
        users,
        groups,
    });
    (dialect, ldap)
}

/// `url` is one string or an array of at least one.
fn ldap_urls(l: &Section<'_>, name: &str) -> Option<Vec<url::Url>> {
    match l.value(name)? {
        Value::String(url) => check_ldap_url(url)
            .map(|url| vec![url])
            .map_err(|message| l.error(name, message))
            .ok(),
        Value::Array(array) if array.is_empty() => {
            l.error(name, "at least one url is needed");
            None
        }
        Value::Array(_) => l.parsed_strings(name, check_ldap_url),
        other => {
            l.error(
                name,
                format!(
                    "expected a string or an array of strings, found {}",
                    describe(other)
                ),
            );
            None
        }
    }
}

/// The parsed servers with their transport, decided from the (lowercased) parsed scheme.
fn ldap_servers(urls: Vec<url::Url>, starttls: bool) -> Vec<LdapServer> {
    urls.into_iter()
        .map(|url| {
            let transport = match (url.scheme(), starttls) {
                ("ldaps", _) => LdapTransport::Ldaps,
                (_, true) => LdapTransport::StartTls,
                _ => LdapTransport::Plain,
            };
            LdapServer { url, transport }
        })
        .collect()
}

fn has_scheme(url: &str, scheme: &str) -> bool {
    url.split_once("://")
        .is_some_and(|(s, _)| s.eq_ignore_ascii_case(scheme))
}

/// An `ldap://` or `ldaps://` URL (the scheme in any case), parsed once.
fn check_ldap_url(text: &str) -> Result<url::Url, String> {
    let url = parse_url(text, &["ldap", "ldaps"])?;
    if url.query().is_some() || !matches!(url.path(), "" | "/") {
        return Err(format!(
            "invalid url \"{text}\"; give only scheme, host and port (the search bases are ldap.users.base and ldap.groups.base)"
        ));
    }
    Ok(url)
}

/// An `http://` or `https://` URL (the scheme in any case), without trailing slash.
fn check_http_url(text: &str) -> Result<String, String> {
    let url = parse_url(text, &["http", "https"])?;
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

/// Parses a URL once with the `url` crate (which lowercases the scheme and host): one of
/// `schemes`, with a host, and without inline credentials.
fn parse_url(text: &str, schemes: &[&str]) -> Result<url::Url, String> {
    let expected = || {
        let names: Vec<String> = schemes.iter().map(|s| format!("{s}://")).collect();
        format!(
            "invalid url \"{}\"; it must start with {}",
            redact_userinfo(text),
            names.join(" or ")
        )
    };
    let url = url::Url::parse(text).map_err(|e| {
        if schemes.iter().any(|s| has_scheme(text, s)) {
            format!("invalid url \"{}\": {e}", redact_userinfo(text))
        } else {
            expected()
        }
    })?;
    if !schemes.contains(&url.scheme()) {
        return Err(expected());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!(
            "the url \"{}\" carries credentials (user:password@); put them in auth (or ldap.bind_dn and ldap.bind_password) as a secret instead",
            redact_userinfo(text)
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("invalid url \"{text}\"; it names no host"));
    }
    Ok(url)
}

/// A URL as it may be printed: anything between `://` and an `@` before the host is hidden.
fn redact_userinfo(text: &str) -> String {
    let Some((scheme, rest)) = text.split_once("://") else {
        return text.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => text.to_owned(),
    }
}

/// A size: `"64KiB"`, `"32MiB"`, `"1GiB"`, `"4096B"` or a plain number of bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let invalid =
        || format!("invalid size \"{text}\"; use a number with B, KiB, MiB or GiB, like \"32MiB\"");
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: u64 = number.parse().map_err(|_| invalid())?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "KB" | "K" => 1 << 10,
        "MiB" | "MB" | "M" => 1 << 20,
        "GiB" | "GB" | "G" => 1 << 30,
        _ => return Err(invalid()),
    };
    let size = number.checked_mul(factor).ok_or_else(invalid)?;
    if size == 0 {
        return Err(format!(
            "invalid size \"{text}\"; it must be more than zero"
        ));
    }
    Ok(size)
}

fn readable_file(path: PathBuf) -> Result<PathBuf, String> {
    match fs::File::open(&path).and_then(|file| file.metadata()) {
        Ok(meta) if meta.is_file() => Ok(path),
        Ok(_) => Err(format!("{} is not a file", path.display())),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// Parses `"20%"` into `0.2`.
fn parse_percent(text: &str) -> Result<f64, String> {
    let invalid = || {
        format!(
            "invalid percentage \"{text}\"; use a number from 0 to 100 followed by %, like \"20%\""
        )
    };
    let number: f64 = text
        .strip_suffix('%')
        .and_then(|number| number.trim().parse().ok())
        .ok_or_else(invalid)?;
    if (0.0..=100.0).contains(&number) {
        Ok(number / 100.0)
    } else {
        Err(invalid())
    }
}

/// An LDAP filter must be one parenthesized expression; the server does the full parse.
fn check_filter(text: &str) -> Result<&str, String> {
    let invalid = |why: &str| format!("invalid LDAP filter \"{text}\": {why}");
    if !text.starts_with('(') {
        return Err(invalid("it must start with \"(\""));
    }
    let mut depth = 0usize;
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| invalid("unbalanced parentheses"))?;
                if depth == 0 && i + 1 != text.len() {
                    return Err(invalid("text after the closing parenthesis"));
                }
            }
            _ => {}
        }
    }
    if depth == 0 {
        Ok(text)
    } else {
        Err(invalid("unbalanced parentheses"))
    }
}

/// Checks the field count and ranges of a 5-field crontab line; the daemon interprets it.
fn check_schedule(text: &str) -> Result<(), String> {
    const FIELDS: [(&str, u32, u32); 5] = [
        ("minute", 0, 59),
        ("hour", 0, 23),
        ("day-of-month", 1, 31),
        ("month", 1, 12),
        ("day-of-week", 0, 7),
    ];
    let fields: Vec<&str> = text.split_whitespace().collect();
    if fields.len() != FIELDS.len() {
        return Err(format!(
            "invalid schedule \"{text}\": expected 5 fields (minute hour day-of-month month day-of-week), found {}",
            fields.len()
        ));
    }
    for (field, (name, min, max)) in fields.iter().zip(FIELDS) {
        for item in field.split(',') {
            check_cron_item(item, min, max).map_err(|why| {
                format!("invalid schedule \"{text}\": {name} field \"{field}\": {why}")
            })?;
        }
    }
    Ok(())
}

fn check_cron_item(item: &str, min: u32, max: u32) -> Result<(), String> {
    let number = |text: &str| -> Result<u32, String> {
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!(
                "\"{item}\" is not *, a number, a range a-b or a step /n"
            ));
        }
        text.parse()
            .map_err(|_| format!("{text} is out of range {min}-{max}"))
    };
    let (range, step) = match item.split_once('/') {
        Some((range, step)) => (range, Some(step)),
        None => (item, None),
    };
    if let Some(step) = step {
        if number(step)? == 0 {
            return Err("a step must be at least 1".to_owned());
        }
    }
    if range == "*" {
        return Ok(());
    }
    let (low, high) = match range.split_once('-') {
        Some((low, high)) => (number(low)?, number(high)?),
        None => {
            let n = number(range)?;
            (n, n)
        }
    };
    for n in [low, high] {
        if !(min..=max).contains(&n) {
            return Err(format!("{n} is out of range {min}-{max}"));
        }
    }
    if low > high {
        return Err(format!("range {low}-{high} runs backwards"));
    }
    Ok(())
}

/// Accepts `UTC` or an `Area/Location` name; the daemon resolves it in the time zone database.
fn check_timezone(text: &str) -> Result<&str, String> {
    let segment_ok = |segment: &str| {
        !segment.is_empty()
            && segment
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '+'))
    };
    let segments: Vec<&str> = text.split('/').collect();
    let looks_iana = segments.len() >= 2
        && segments.iter().all(|segment| segment_ok(segment))
        && text.starts_with(|c: char| c.is_ascii_uppercase());
    if text == "UTC" || looks_iana {
        Ok(text)
    } else {
        Err(format!(
            "invalid time zone \"{text}\"; use an IANA name like \"UTC\" or \"Europe/Berlin\""
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// Target files

fn load_targets(main: &Source<'_>, dir: &Path, dialect: Dialect) -> Option<Vec<TargetConfig>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            main.error(
                "daemon.targets_dir",
                format!("cannot read targets directory {}: {e}", dir.display()),
            );
            return None;
        }
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml") && path.is_file())
        .collect();
    files.sort();
    if files.is_empty() {
        main.error(
            "daemon.targets_dir",
            format!("no target files (*.toml) in {}", dir.display()),
        );
        return None;
    }
    // Every file is read before any failure counts, so each one reports its problems.
    let targets: Vec<Option<TargetConfig>> = files
        .iter()
        .map(|file| target_config(file, dialect, main.problems, main.env))
        .collect();
    targets.into_iter().collect()
}

fn target_config(
    file: &Path,
    dialect: Dialect,
    problems: &Problems,
    env: &EnvLookup<'_>,
) -> Option<TargetConfig> {
    let src = Source::new(file, problems, env);
    let name = target_name(file).map_err(|message| src.error("(file name)", message));
    let text = src.read()?;
    let table = src.parse(&text)?;
    let t = Section::root(&src, &table, TARGET_KEYS);

    let url = t.required("url", |s, name| s.parsed(name, check_http_url));
    let auth = t.required("auth", auth);
    let profile = t.choice("profile", PROFILES).unwrap_or(Profile::Generic);
    let scope_groups = t.parsed_strings("scope_groups", normalize_dn);
    let groups = t.choice("groups", GROUP_SCOPES);
    let deprovision = t.choice("deprovision", DEPROVISIONS);
    let provision_disabled = t.bool("provision_disabled");
    let delete_after = t.parsed("delete_after", parse_duration);
    let max_deprovisions = max_deprovisions(&t, "max_deprovisions");
    let match_existing = t.parsed_strings("match_existing", |text| parse_choice(text, MATCH_RULES));
    let protect = t.strings("protect");
    let rate_limit = t.parsed("rate_limit", parse_rate_limit);
    let concurrency = t.integer("concurrency", 1..=64).map(|n| n as usize);
    let members_per_request = t
        .integer("members_per_request", 1..=10_000)
        .map(|n| n as usize);
    let timeout = t.parsed("timeout", parse_duration);
    let mapping = mapping(&t, dialect, &mapping_keys_in_file_order(&text));
    let allow_plaintext = t.bool("allow_plaintext").unwrap_or(false);
    let ca_file = t.parsed("ca_file", |text| readable_file(src.resolve(text)));
    let max_response_size = t.parsed("max_response_size", parse_size);
    let max_value_length = t.parsed("max_value_length", parse_size);
    let rebind = t.choice("rebind", REBINDS);
    if !allow_plaintext {
        let cleartext = |text: &str| {
            url::Url::parse(text).is_ok_and(|u| u.scheme() == "http" && !super::is_loopback_url(&u))
        };
        if url.as_deref().is_some_and(cleartext) {
            t.error(
                "url",
                "http:// to a host that is not loopback would send the credentials in cleartext; use https://, or set allow_plaintext = true if this network is trusted",
            );
        }
        if let Some(Auth::OAuth2 { token_url, .. }) = &auth {
            if cleartext(token_url) {
                t.error(
                    "auth.oauth2.token_url",
                    "http:// to a host that is not loopback would send the client secret in cleartext; use https://, or set allow_plaintext = true if this network is trusted",
                );
            }
        }
    }

    let scope_groups = scope_groups.unwrap_or_default();
    let default_groups = if scope_groups.is_empty() {
        GroupScope::All
    } else {
        GroupScope::Scoped
    };
    let mut members_per_request = members_per_request.unwrap_or(DEFAULT_MEMBERS_PER_REQUEST);
    if let Some(cap) = crate::scim::profile::max_members_per_request(profile) {
        members_per_request = members_per_request.min(cap);
    }
    let mut match_rules = Vec::new();
    for rule in match_existing.unwrap_or_else(|| vec![MatchRule::ExternalId]) {
        if !match_rules.contains(&rule) {
            match_rules.push(rule);
        }
    }

    Some(TargetConfig {
        name: name.ok()?,
        file: file.to_path_buf(),
        url: url?,
        auth: auth?,
        profile,
        scope_groups,
        groups: groups.unwrap_or(default_groups),
        deprovision: deprovision.unwrap_or(Deprovision::Deactivate),
        provision_disabled: provision_disabled.unwrap_or(false),
        delete_after: delete_after.unwrap_or(DEFAULT_DELETE_AFTER),
        max_deprovisions: max_deprovisions.unwrap_or(DEFAULT_MAX_DEPROVISIONS),
        match_existing: match_rules,
        protect: protect
            .unwrap_or_default()
            .into_iter()
            .map(|(_, pattern)| pattern.to_owned())
            .collect(),
        rate_limit: rate_limit.or(crate::scim::profile::default_writes_per_second(profile)
            .map(|per_second| RateLimit { per_second })),
        concurrency: concurrency.unwrap_or(DEFAULT_CONCURRENCY),
        timeout: timeout
            .filter(|t| !t.is_zero())
            .unwrap_or(Duration::from_secs(30)),
        members_per_request,
        mapping,
        allow_plaintext,
        ca_file,
        max_response_size: max_response_size.unwrap_or(DEFAULT_MAX_RESPONSE_SIZE),
        max_value_length: max_value_length
            .map(|n| usize::try_from(n).unwrap_or(usize::MAX))
            .unwrap_or(DEFAULT_MAX_VALUE_LENGTH),
        rebind: rebind.unwrap_or(Rebind::Allow),
    })
}

fn target_name(file: &Path) -> Result<TargetName, String> {
    let stem = file
        .file_stem()
        .and_then(|stem| stem.to_str())
        .unwrap_or("");
    let valid = !stem.is_empty()
        && stem
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if valid {
        Ok(TargetName(stem.to_owned()))
    } else {
        Err(format!(
            "target name \"{stem}\" (the file name without .toml) may use only letters, digits, '-' and '_'"
        ))
    }
}

fn auth(t: &Section<'_>, name: &str) -> Option<Auth> {
    let a = t.table(name, AUTH_KEYS)?;
    let kinds: Vec<&str> = AUTH_KEYS.iter().copied().filter(|k| a.has(k)).collect();
    match kinds.as_slice() {
        ["bearer"] => a.secret("bearer").map(Auth::Bearer),
        ["basic"] => {
            let basic = a.table("basic", BASIC_KEYS)?;
            let username = basic.required("username", Section::non_empty_string);
            let password = basic.required("password", Section::secret);
            Some(Auth::Basic {
                username: username?.to_owned(),
                password: password?,
            })
        }
        ["oauth2"] => {
            let oauth2 = a.table("oauth2", OAUTH2_KEYS)?;
            let token_url = oauth2.required("token_url", |s, k| s.parsed(k, check_http_url));
            let client_id = oauth2.required("client_id", Section::non_empty_string);
            let client_secret = oauth2.required("client_secret", Section::secret);
            let scope = oauth2.non_empty_string("scope");
            let client_auth = oauth2.choice("client_auth", CLIENT_AUTHS);
            Some(Auth::OAuth2 {
                token_url: token_url?,
                client_id: client_id?.to_owned(),
                client_secret: client_secret?,
                scope: scope.map(str::to_owned),
                client_auth: client_auth.unwrap_or(ClientAuth::Basic),
            })
        }
        // Unknown keys inside auth were already reported; say what is expected only if
        // nothing else explains the problem.
        [] if a.table.is_some_and(|table| !table.is_empty()) => None,
        _ => {
            t.error(
                name,
                "expected exactly one of { bearer = SECRET }, { basic = { username, password } } or { oauth2 = { token_url, client_id, client_secret } }",
            );
            None
        }
    }
}

/// A count (`5` or `"5"`) or a percentage of the managed users (`"5%"`).
fn max_deprovisions(t: &Section<'_>, name: &str) -> Option<Limit> {
    let parse = |text: &str| -> Result<Limit, String> {
        if text.ends_with('%') {
            parse_percent(text).map(Limit::Percent)
        } else {
            text.trim().parse().map(Limit::Count).map_err(|_| {
                format!("invalid limit \"{text}\"; use a count like 10 or a percentage like \"5%\"")
            })
        }
    };
    match t.value(name)? {
        Value::Integer(_) => t
            .integer(name, 0..=i64::MAX)
            .map(|n| Limit::Count(n as usize)),
        Value::String(_) => t.parsed(name, parse),
        other => {
            t.error(
                name,
                format!(
                    "expected a count or a percentage string like \"5%\", found {}",
                    describe(other)
                ),
            );
            None
        }
    }
}

/// Parses `"10/s"`, `"180/m"` (or `/min`) and `"3600/h"`.
fn parse_rate_limit(text: &str) -> Result<RateLimit, String> {
    let invalid = || {
        format!(
            "invalid rate limit \"{text}\"; use requests per s, m or h, like \"10/s\" or \"180/m\""
        )
    };
    let (count, unit) = text.split_once('/').ok_or_else(invalid)?;
    let count: f64 = count.trim().parse().map_err(|_| invalid())?;
    let seconds = match unit.trim() {
        "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => return Err(invalid()),
    };
    if count.is_finite() && count > 0.0 {
        Ok(RateLimit {
            per_second: count / seconds,
        })
    } else {
        Err(invalid())
    }
}

/// A simple DN normalization: attribute types and values lowercased, no spaces around `=`,
/// `,` and `+`. Escaped characters (`\,`) are kept as they are.
fn normalize_dn(text: &str) -> Result<String, String> {
    let invalid = || {
        format!("invalid DN \"{text}\"; expected attribute=value pairs like \"cn=staff,ou=groups,dc=example,dc=org\"")
    };
    let mut rdns = Vec::new();
    for rdn in split_unescaped(text, ',') {
        let mut avas = Vec::new();
        for ava in split_unescaped(rdn, '+') {
            let (kind, value) = ava.split_once('=').ok_or_else(invalid)?;
            let kind = kind.trim();
            let value = trim_dn_value(value);
            if kind.is_empty() || value.is_empty() {
                return Err(invalid());
            }
            avas.push(format!("{}={}", kind.to_lowercase(), value.to_lowercase()));
        }
        rdns.push(avas.join("+"));
    }
    Ok(rdns.join(","))
}

fn split_unescaped(text: &str, separator: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut escaped = false;
    for (i, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            _ if c == separator => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

/// Trims a DN value, keeping a trailing space that is escaped (`\ `).
fn trim_dn_value(value: &str) -> String {
    let trimmed = value.trim();
    let trailing_backslashes = trimmed.chars().rev().take_while(|c| *c == '\\').count();
    if trailing_backslashes % 2 == 1 {
        format!("{trimmed} ")
    } else {
        trimmed.to_owned()
    }
}

// ---------------------------------------------------------------------------------------------
// Mapping

const SIMPLE_PATHS: &[&str] = &[
    "userName",
    "displayName",
    "nickName",
    "title",
    "userType",
    "preferredLanguage",
    "locale",
    "timezone",
    "profileUrl",
];
const NAME_PARTS: &[&str] = &[
    "givenName",
    "familyName",
    "middleName",
    "formatted",
    "honorificPrefix",
    "honorificSuffix",
];
const ENTERPRISE_PREFIX: &str = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:";
const ENTERPRISE_PARTS: &[&str] = &[
    "employeeNumber",
    "costCenter",
    "organization",
    "division",
    "department",
];
const TYPED_MULTI_VALUED: &[&str] = &["emails", "phoneNumbers"];

/// Dialect defaults merged with the target's `[mapping]`: a key overrides a default, `""`
/// removes it, new keys follow the defaults in file order.
fn mapping(t: &Section<'_>, dialect: Dialect, file_order: &[String]) -> Vec<(String, String)> {
    let mut merged = default_mapping(dialect);
    let Some(m) = t.open_table("mapping") else {
        return merged;
    };
    let mut keys: Vec<&str> = file_order
        .iter()
        .map(String::as_str)
        .filter(|key| m.has(key))
        .collect();
    for key in m.keys() {
        if !keys.contains(&key.as_str()) {
            keys.push(key);
        }
    }

    for path in keys {
        let Some(template) = m.string(path) else {
            continue;
        };
        if let Err(message) = check_mapping_path(path) {
            m.error(path, message);
            continue;
        }
        if template.is_empty() {
            merged.retain(|(p, _)| p != path);
            continue;
        }
        if let Err(message) = check_template(template) {
            m.error(path, message);
            continue;
        }
        match merged.iter_mut().find(|(p, _)| p == path) {
            Some(entry) => entry.1 = template.to_owned(),
            None => merged.push((path.to_owned(), template.to_owned())),
        }
    }
    if !merged.iter().any(|(path, _)| path == "userName") {
        m.error("userName", "userName must be mapped; it cannot be removed");
    }
    merged
}

/// The keys of the `[mapping]` table in the order the file writes them (`toml::Table` sorts).
fn mapping_keys_in_file_order(text: &str) -> Vec<String> {
    let Ok(document) = toml::de::DeTable::parse(text) else {
        return Vec::new();
    };
    let Some(toml::de::DeValue::Table(mapping)) = document
        .get_ref()
        .iter()
        .find(|(key, _)| key.get_ref() == "mapping")
        .map(|(_, value)| value.get_ref())
    else {
        return Vec::new();
    };
    let mut keys: Vec<(usize, String)> = mapping
        .iter()
        .map(|(key, _)| (key.span().start, key.get_ref().to_string()))
        .collect();
    keys.sort();
    keys.into_iter().map(|(_, key)| key).collect()
}

fn check_mapping_path(path: &str) -> Result<(), String> {
    match path {
        "externalId" => return Err("externalId is always the directory id".to_owned()),
        "active" => return Err("active follows the directory's disabled state".to_owned()),
        _ => {}
    }
    let supported = SIMPLE_PATHS.contains(&path)
        || path
            .strip_prefix("name.")
            .is_some_and(|part| NAME_PARTS.contains(&part))
        || path
            .strip_prefix(ENTERPRISE_PREFIX)
            .is_some_and(|part| ENTERPRISE_PARTS.contains(&part))
        || TYPED_MULTI_VALUED.iter().any(|attribute| {
            path.strip_prefix(attribute)
                .and_then(|rest| rest.strip_prefix("[type eq \""))
                .and_then(|rest| rest.strip_suffix("\"].value"))
                .is_some_and(|kind| {
                    !kind.is_empty() && kind.chars().all(|c| c.is_ascii_alphabetic())
                })
        });
    if supported {
        return Ok(());
    }
    let candidates: Vec<String> = SIMPLE_PATHS
        .iter()
        .map(|path| path.to_string())
        .chain(NAME_PARTS.iter().map(|part| format!("name.{part}")))
        .chain(
            ENTERPRISE_PARTS
                .iter()
                .map(|part| format!("{ENTERPRISE_PREFIX}{part}")),
        )
        .collect();
    let candidates: Vec<&str> = candidates.iter().map(String::as_str).collect();
    Err(match nearest(path, &candidates) {
        Some(near) => format!("unsupported SCIM attribute path \"{path}\"; did you mean \"{near}\"?"),
        None => format!(
            "unsupported SCIM attribute path \"{path}\"; supported: {}, name.<{}>, emails[type eq \"work\"].value, phoneNumbers[type eq \"work\"].value, {ENTERPRISE_PREFIX}<{}>",
            SIMPLE_PATHS.join(", "),
            NAME_PARTS.join("|"),
            ENTERPRISE_PARTS.join("|"),
        ),
    })
}

/// A template is literal text with `{attribute}` placeholders; `{{` and `}}` are literal braces.
fn check_template(template: &str) -> Result<(), String> {
    let invalid = |why: &str| {
        Err(format!(
            "invalid template \"{template}\": {why}; write {{{{ or }}}} for a literal brace"
        ))
    };
    let mut chars = template.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' | '}' if chars.peek() == Some(&c) => {
                chars.next();
            }
            '}' => return invalid("unmatched '}'"),
            '{' => {
                let mut attribute = String::new();
                loop {
                    match chars.next() {
                        Some('}') if attribute.is_empty() => {
                            return invalid("empty placeholder {}")
                        }
                        Some('}') => break,
                        Some(c) if c.is_ascii_alphanumeric() || c == '-' || c == ';' => {
                            attribute.push(c)
                        }
                        Some(c) => {
                            return invalid(&format!("'{c}' cannot appear in an attribute name"))
                        }
                        None => return invalid("unclosed '{'"),
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// Writes `files` (relative path, content) into a fresh temporary directory.
    fn tree(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (path, content) in files {
            let path = dir.path().join(path);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, content).unwrap();
        }
        dir
    }

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| vars.get(name).cloned()
    }

    fn load_ok(dir: &tempfile::TempDir, vars: &[(&str, &str)]) -> Config {
        match load_with_env(&dir.path().join("config.toml"), &env(vars)) {
            Ok(config) => config,
            Err(errors) => panic!("expected a valid config, got:\n{errors}"),
        }
    }

    fn load_err(dir: &tempfile::TempDir, vars: &[(&str, &str)]) -> Vec<ConfigError> {
        match load_with_env(&dir.path().join("config.toml"), &env(vars)) {
            Ok(config) => panic!("expected errors, got {config:#?}"),
            Err(errors) => errors.0,
        }
    }

    /// (file name, key) of each error, sorted.
    fn locations(dir: &tempfile::TempDir, errors: &[ConfigError]) -> Vec<(String, String)> {
        let mut locations: Vec<(String, String)> = errors
            .iter()
            .map(|e| {
                let file = e.file.strip_prefix(dir.path()).unwrap_or(&e.file);
                (file.display().to_string(), e.key.clone())
            })
            .collect();
        locations.sort();
        locations
    }

    fn message<'e>(errors: &'e [ConfigError], key: &str) -> &'e str {
        &errors
            .iter()
            .find(|e| e.key == key)
            .unwrap_or_else(|| panic!("no error on {key} in {errors:#?}"))
            .message
    }

    fn urls(ldap: &LdapConfig) -> Vec<&str> {
        ldap.urls.iter().map(LdapServer::as_str).collect()
    }

    const MINIMAL_MAIN: &str = r#"
[ldap]
url = "ldap://127.0.0.1"

[ldap.users]
base = "ou=people,dc=example,dc=org"
"#;

    const MINIMAL_TARGET: &str = r#"
url = "https://app.example.com/scim/v2/"
auth = { bearer = { env = "APP_TOKEN" } }
"#;

    #[test]
    fn full_config_loads() {
        let dir = tree(&[
            (
                "config.toml",
                r#"
[daemon]
schedule = "0,30 8-18/2 * 1-12 1-5"
timezone = "Europe/Berlin"
state_dir = "state"
targets_dir = "apps"
listen = "127.0.0.1:9464"

[ldap]
url = "ldaps://dc1.corp.example:636"
starttls = false
ca_file = "ca.pem"
bind_dn = "CN=sync,DC=corp,DC=example"
bind_password = { file = "secrets/ldap" }
dialect = "active-directory"
page_size = 500
timeout = "10s"
max_shrink = "12.5%"

[ldap.users]
base = "OU=People,DC=corp,DC=example"
disabled_filter = "(description=left)"

[ldap.groups]
base = "OU=Groups,DC=corp,DC=example"
nested = false
"#,
            ),
            ("ca.pem", "-----BEGIN CERTIFICATE-----\n"),
            ("secrets/ldap", "s3cret\n\n"),
            (
                "apps/slack.toml",
                r#"
url = "https://example.slack.com/scim/v2"
auth = { basic = { username = "sync", password = { env = "SLACK_PASSWORD" } } }
profile = "slack"
scope_groups = ["CN = Slack Users , OU=Groups,DC=corp,DC=example"]
deprovision = "deactivate-then-delete"
provision_disabled = true
delete_after = "7d"
max_deprovisions = 10
match_existing = ["externalId", "userName", "userName"]
protect = ["admin*", "break-glass-*"]
rate_limit = "180/min"
concurrency = 8
members_per_request = 50
"#,
            ),
            (
                "apps/aws.toml",
                r#"
url = "https://scim.us-east-1.amazonaws.com/abc/scim/v2"
auth = { oauth2 = { token_url = "https://login.example.com/token", client_id = "ldap2scim", client_secret = { env = "AWS_SECRET" } } }
profile = "aws-identity-center"
groups = "none"
max_deprovisions = "10%"
members_per_request = 500
"#,
            ),
        ]);
        let config = load_ok(
            &dir,
            &[("SLACK_PASSWORD", "pw"), ("AWS_SECRET", "client-secret")],
        );

        let daemon = &config.daemon;
        assert_eq!(daemon.schedule, "0,30 8-18/2 * 1-12 1-5");
        assert_eq!(daemon.timezone, "Europe/Berlin");
        assert_eq!(daemon.state_dir, dir.path().join("state"));
        assert_eq!(daemon.targets_dir, dir.path().join("apps"));
        assert_eq!(daemon.listen, Some("127.0.0.1:9464".parse().unwrap()));

        let ldap = &config.ldap;
        assert_eq!(urls(ldap), ["ldaps://dc1.corp.example:636"]);
        assert_eq!(ldap.ca_file, Some(dir.path().join("ca.pem")));
        assert_eq!(ldap.bind_dn.as_deref(), Some("CN=sync,DC=corp,DC=example"));
        assert_eq!(ldap.bind_password.as_ref().unwrap().expose(), "s3cret");
        assert_eq!(ldap.dialect, Dialect::ActiveDirectory);
        assert_eq!(ldap.page_size, 500);
        assert_eq!(ldap.timeout, Duration::from_secs(10));
        assert_eq!(ldap.max_shrink, 0.125);
        assert_eq!(
            ldap.users.filter,
            "(&(objectCategory=person)(objectClass=user))"
        );
        assert_eq!(
            ldap.users.disabled_filter.as_deref(),
            Some("(description=left)")
        );
        let groups = ldap.groups.as_ref().unwrap();
        assert_eq!(groups.filter, "(objectClass=group)");
        assert!(!groups.nested);

        let names: Vec<&str> = config.targets.iter().map(|t| t.name.0.as_str()).collect();
        assert_eq!(names, ["aws", "slack"]);

        let aws = &config.targets[0];
        assert_eq!(aws.profile, Profile::AwsIdentityCenter);
        assert_eq!(aws.groups, GroupScope::None);
        assert_eq!(aws.max_deprovisions, Limit::Percent(0.1));
        assert_eq!(aws.members_per_request, 100, "capped by the profile");
        match &aws.auth {
            Auth::OAuth2 {
                token_url,
                client_id,
                client_secret,
                scope,
                client_auth,
            } => {
                assert_eq!(*client_auth, ClientAuth::Basic, "RFC 6749's default");
                assert_eq!(token_url, "https://login.example.com/token");
                assert_eq!(client_id, "ldap2scim");
                assert_eq!(client_secret.expose(), "client-secret");
                assert_eq!(*scope, None);
            }
            other => panic!("unexpected auth {other:?}"),
        }
        assert_eq!(
            aws.mapping[0],
            ("userName".into(), "{userPrincipalName}".into())
        );

        let slack = &config.targets[1];
        assert_eq!(slack.file, dir.path().join("apps/slack.toml"));
        assert_eq!(slack.url, "https://example.slack.com/scim/v2");
        assert!(matches!(
            &slack.auth,
            Auth::Basic { username, password } if username == "sync" && password.expose() == "pw"
        ));
        assert_eq!(slack.profile, Profile::Slack);
        assert_eq!(
            slack.scope_groups,
            ["cn=slack users,ou=groups,dc=corp,dc=example"]
        );
        assert_eq!(slack.groups, GroupScope::Scoped);
        assert_eq!(slack.deprovision, Deprovision::DeactivateThenDelete);
        assert!(slack.provision_disabled);
        assert_eq!(slack.delete_after, Duration::from_secs(7 * 86_400));
        assert_eq!(slack.max_deprovisions, Limit::Count(10));
        assert_eq!(
            slack.match_existing,
            [MatchRule::ExternalId, MatchRule::UserName]
        );
        assert_eq!(slack.protect, ["admin*", "break-glass-*"]);
        assert_eq!(slack.rate_limit, Some(RateLimit { per_second: 3.0 }));
        assert_eq!(slack.concurrency, 8);
        assert_eq!(slack.members_per_request, 50);
    }

    #[test]
    fn defaults_apply() {
        let dir = tree(&[
            ("config.toml", MINIMAL_MAIN),
            ("targets.d/app.toml", MINIMAL_TARGET),
        ]);
        let config = load_ok(&dir, &[("APP_TOKEN", "t")]);

        assert_eq!(config.daemon.schedule, "*/15 * * * *");
        assert_eq!(config.daemon.timezone, "UTC");
        assert_eq!(config.daemon.state_dir, Path::new("/var/lib/ldap2scim"));
        assert_eq!(config.daemon.targets_dir, dir.path().join("targets.d"));
        assert_eq!(config.daemon.listen, None);

        let ldap = &config.ldap;
        assert!(!ldap.starttls);
        assert_eq!(ldap.ca_file, None);
        assert_eq!(ldap.bind_dn, None);
        assert!(ldap.bind_password.is_none());
        assert_eq!(ldap.dialect, Dialect::OpenLdap);
        assert_eq!(ldap.page_size, 1000);
        assert_eq!(ldap.timeout, Duration::from_secs(30));
        assert_eq!(ldap.max_shrink, 0.2);
        assert_eq!(ldap.users.filter, "(objectClass=inetOrgPerson)");
        assert_eq!(ldap.users.disabled_filter, None);
        assert!(ldap.groups.is_none());

        let target = &config.targets[0];
        assert_eq!(target.name, TargetName("app".into()));
        assert_eq!(target.url, "https://app.example.com/scim/v2");
        assert!(matches!(&target.auth, Auth::Bearer(token) if token.expose() == "t"));
        assert_eq!(target.profile, Profile::Generic);
        assert!(target.scope_groups.is_empty());
        assert_eq!(target.groups, GroupScope::All);
        assert_eq!(target.deprovision, Deprovision::Deactivate);
        assert!(!target.provision_disabled);
        assert_eq!(target.delete_after, Duration::from_secs(30 * 86_400));
        assert_eq!(target.max_deprovisions, Limit::Percent(0.05));
        assert_eq!(target.match_existing, [MatchRule::ExternalId]);
        assert!(target.protect.is_empty());
        assert_eq!(target.rate_limit, None);
        assert_eq!(target.concurrency, 4);
        assert_eq!(target.members_per_request, 100);
        let paths: Vec<&str> = target.mapping.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            [
                "userName",
                "name.givenName",
                "name.familyName",
                "displayName",
                "emails[type eq \"work\"].value",
                "title"
            ]
        );
        assert_eq!(target.mapping[0].1, "{uid}");
    }

    #[test]
    fn profiles_bring_their_limits() {
        let slack = format!("{MINIMAL_TARGET}profile = \"slack\"\n");
        let aws = format!(
            "{MINIMAL_TARGET}profile = \"aws-identity-center\"\nmembers_per_request = 500\n"
        );
        let dir = tree(&[
            ("config.toml", MINIMAL_MAIN),
            ("targets.d/slack.toml", &slack),
            ("targets.d/aws.toml", &aws),
        ]);
        let config = load_ok(&dir, &[("APP_TOKEN", "t")]);
        let by = |n: &str| config.targets.iter().find(|t| t.name.0 == n).unwrap();
        assert_eq!(
            by("slack").rate_limit,
            Some(RateLimit { per_second: 3.0 }),
            "180 writes a minute"
        );
        assert_eq!(
            by("aws").members_per_request,
            100,
            "AWS takes at most 100 member changes"
        );
        assert_eq!(by("aws").timeout, Duration::from_secs(30));
    }

    #[test]
    fn groups_table_defaults() {
        let main =
            format!("{MINIMAL_MAIN}\n[ldap.groups]\nbase = \"ou=groups,dc=example,dc=org\"\n");
        let dir = tree(&[
            ("config.toml", &main),
            ("targets.d/app.toml", MINIMAL_TARGET),
        ]);
        let groups = load_ok(&dir, &[("APP_TOKEN", "t")]).ldap.groups.unwrap();
        assert_eq!(groups.base, "ou=groups,dc=example,dc=org");
        assert_eq!(groups.filter, "(objectClass=groupOfNames)");
        assert!(groups.nested);
    }

    #[test]
    fn url_may_be_an_array() {
        let main = MINIMAL_MAIN.replace(
            "url = \"ldap://127.0.0.1\"",
            "url = [\"ldaps://a.example.org\", \"ldaps://b.example.org:636\"]",
        );
        let dir = tree(&[
            ("config.toml", &main),
            ("targets.d/app.toml", MINIMAL_TARGET),
        ]);
        let config = load_ok(&dir, &[("APP_TOKEN", "t")]);
        assert_eq!(
            urls(&config.ldap),
            ["ldaps://a.example.org", "ldaps://b.example.org:636"]
        );

        let main = MINIMAL_MAIN.replace(
            "url = \"ldap://127.0.0.1\"",
            "url = [\"ldaps://a.example.org\", \"http://b\", 7]\nstarttls = true",
        );
        let dir = tree(&[
            ("config.toml", &main),
            ("targets.d/app.toml", MINIMAL_TARGET),
        ]);
        let errors = load_err(&dir, &[("APP_TOKEN", "t")]);
        assert_eq!(
            locations(&dir, &errors),
            [
                ("config.toml".into(), "ldap.starttls".into()),
                ("config.toml".into(), "ldap.url[1]".into()),
                ("config.toml".into(), "ldap.url[2]".into()),
            ]
        );

        let main = MINIMAL_MAIN.replace("url = \"ldap://127.0.0.1\"", "url = []");
        let dir = tree(&[
            ("config.toml", &main),
            ("targets.d/app.toml", MINIMAL_TARGET),
        ]);
        let errors = load_err(&dir, &[("APP_TOKEN", "t")]);
        assert_eq!(message(&errors, "ldap.url"), "at least one url is needed");
    }

    #[test]
    fn mapping_overrides_removes_and_keeps_order() {
        let target = format!(
            "{MINIMAL_TARGET}{}",
            r#"
[mapping]
userName = "{mail}"
title = ""
"urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:department" = "{departmentNumber}"
"phoneNumbers[type eq \"mobile\"].value" = "{mobile}"
nickName = "{{{uid}}}"
"#
        );
        let dir = tree(&[
            ("config.toml", MINIMAL_MAIN),
            ("targets.d/app.toml", &target),
        ]);
        let config = load_ok(&dir, &[("APP_TOKEN", "t")]);
        let mapping: Vec<(&str, &str)> = config.targets[0]
            .mapping
            .iter()
            .map(|(p, t)| (p.as_str(), t.as_str()))
            .collect();
        assert_eq!(
            mapping,
            [
                ("userName", "{mail}"),
                ("name.givenName", "{givenName}"),
                ("name.familyName", "{sn}"),
                ("displayName", "{cn}"),
                ("emails[type eq \"work\"].value", "{mail}"),
                (
                    "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:department",
                    "{departmentNumber}"
                ),
                ("phoneNumbers[type eq \"mobile\"].value", "{mobile}"),
                ("nickName", "{{{uid}}}"),
            ]
        );
    }

    #[test]
    fn mapping_rejects_identity_keys_and_a_missing_user_name() {
        let target = format!(
            "{MINIMAL_TARGET}{}",
            r#"
[mapping]
externalId = "{entryUUID}"
active = "true"
userName = ""
displayName = 3
"#
        );
        let dir = tree(&[
            ("config.toml", MINIMAL_MAIN),
            ("targets.d/app.toml", &target),
        ]);
        let errors = load_err(&dir, &[("APP_TOKEN", "t")]);
        assert_eq!(errors.len(), 4, "{errors:#?}");
        assert_eq!(
            message(&errors, "mapping.externalId"),
            "externalId is always the directory id"
        );
        assert_eq!(
            message(&errors, "mapping.active"),
            "active follows the directory's disabled state"
        );
        assert_eq!(
            message(&errors, "mapping.userName"),
            "userName must be mapped; it cannot be removed"
        );
        assert_eq!(
            message(&errors, "mapping.displayName"),
            "expected a string, found an integer"
        );
    }

    #[test]
    fn every_kind_of_error_is_reported_at_once() {
        let dir = tree(&[
            (
                "config.toml",
                r#"
[daemon]
shedule = "*/5 * * * *"
schedule = "61 * * * *"

[ldap]
url = "ldap://127.0.0.1"
bind_dn = "cn=sync,dc=example,dc=org"
bind_password = "hunter2"
page_size = "big"
timeout = "30x"
max_shrink = "120%"

[ldap.users]
filter = "(uid=*)"
"#,
            ),
            (
                "targets.d/app.toml",
                r#"
url = "ftp://app.example.com/scim"
auth = { bearer = { env = "MISSING_TOKEN" } }
profil = "slack"

[mapping]
"name.nickName" = "{uid}"
title = "{title"
"#,
            ),
        ]);
        let errors = load_err(&dir, &[]);
        let main = "config.toml".to_owned();
        let target = "targets.d/app.toml".to_owned();
        assert_eq!(
            locations(&dir, &errors),
            [
                (main.clone(), "daemon.schedule".to_owned()),
                (main.clone(), "daemon.shedule".to_owned()),
                (main.clone(), "ldap.bind_password".to_owned()),
                (main.clone(), "ldap.max_shrink".to_owned()),
                (main.clone(), "ldap.page_size".to_owned()),
                (main.clone(), "ldap.timeout".to_owned()),
                (main.clone(), "ldap.users.base".to_owned()),
                (target.clone(), "auth.bearer".to_owned()),
                (target.clone(), "mapping.\"name.nickName\"".to_owned()),
                (target.clone(), "mapping.title".to_owned()),
                (target.clone(), "profil".to_owned()),
                (target.clone(), "url".to_owned()),
            ]
        );
        assert_eq!(
            message(&errors, "daemon.shedule"),
            "unknown key \"shedule\"; did you mean \"schedule\"?"
        );
        assert_eq!(
            message(&errors, "profil"),
            "unknown key \"profil\"; did you mean \"profile\"?"
        );
        assert_eq!(
            message(&errors, "ldap.page_size"),
            "expected an integer, found a string"
        );
        assert_eq!(
            message(&errors, "ldap.users.base"),
            "required key is missing"
        );
        assert_eq!(message(&errors, "ldap.bind_password"), INLINE_SECRET);
        assert_eq!(
            message(&errors, "auth.bearer"),
            "environment variable MISSING_TOKEN is not set"
        );
        assert!(message(&errors, "daemon.schedule").contains("61 is out of range 0-59"));
        assert!(message(&errors, "ldap.timeout").contains("invalid duration \"30x\""));
        assert!(message(&errors, "ldap.max_shrink").contains("invalid percentage \"120%\""));
        assert!(message(&errors, "url").contains("http:// or https://"));
        assert!(message(&errors, "mapping.title").contains("unclosed '{'"));
        assert!(message(&errors, "mapping.\"name.nickName\"")
            .starts_with("unsupported SCIM attribute path \"name.nickName\""));

        let everything = ConfigErrors(errors).to_string();
        assert_eq!(everything.lines().count(), 12);
        assert!(
            !everything.contains("hunter2"),
            "a secret leaked: {everything}"
        );
    }

    #[test]
    fn secrets_never_reach_messages() {
        let dir = tree(&[
            (
                "config.toml",
                "[ldap]\nurl = \"ldap://x\"\nbind_password = \"hunter2\"\n[ldap.users]\nbase = \"dc=x\"\n",
            ),
            ("targets.d/a.toml", "url = \"https://a.example\"\nauth = { bearer = \"tok3n\" }\n"),
            ("targets.d/b.toml", "url = \"https://b.example\"\nauth = { bearer = { file = \"missing\" } }\nbroken = \"p4ssw0rd\n"),
        ]);
        let everything = ConfigErrors(load_err(&dir, &[])).to_string();
        assert!(!everything.contains("hunter2"), "{everything}");
        assert!(!everything.contains("tok3n"), "{everything}");
        assert!(!everything.contains("p4ssw0rd"), "{everything}");
        assert!(
            everything.contains("b.toml: (syntax): line 3, column"),
            "{everything}"
        );
    }

    #[test]
    fn secret_from_a_file_relative_to_the_target_file() {
        let target = MINIMAL_TARGET.replace("{ env = \"APP_TOKEN\" }", "{ file = \"token\" }");
        let dir = tree(&[
            ("config.toml", MINIMAL_MAIN),
            ("targets.d/app.toml", &target),
            ("targets.d/token", "abc \n"),
        ]);
        let config = load_ok(&dir, &[]);
        assert!(matches!(&config.targets[0].auth, Auth::Bearer(s) if s.expose() == "abc"));

        let target = MINIMAL_TARGET.replace(
            "{ env = \"APP_TOKEN\" }",
            "{ file = \"nope\", env = \"X\" }",
        );
        let dir = tree(&[
            ("config.toml", MINIMAL_MAIN),
            ("targets.d/app.toml", &target),
        ]);
        let errors = load_err(&dir, &[("X", "x")]);
        assert!(message(&errors, "auth.bearer").contains("exactly one source"));
    }

    #[test]
    fn bind_dn_and_password_go_together() {
        let main = MINIMAL_MAIN.replace("[ldap.users]", "bind_dn = \"cn=sync\"\n[ldap.users]");
        let dir = tree(&[
            ("config.toml", &main),
            ("targets.d/app.toml", MINIMAL_TARGET),
        ]);
        let errors = load_err(&dir, &[("APP_TOKEN", "t")]);
        assert_eq!(
            message(&errors, "ldap.bind_password"),
            "required when bind_dn is set"
        );
    }

    #[test]
    fn targets_dir_problems() {
        let dir = tree(&[("config.toml", MINIMAL_MAIN)]);
        let errors = load_err(&dir, &[]);
        assert_eq!(errors.len(), 1);
        assert!(message(&errors, "daemon.targets_dir").starts_with("cannot read targets directory"));

        let dir = tree(&[("config.toml", MINIMAL_MAIN), ("targets.d/README", "")]);
        let errors = load_err(&dir, &[]);
        assert!(message(&errors, "daemon.targets_dir").starts_with("no target files (*.toml) in "));

        let dir = tree(&[
            ("config.toml", MINIMAL_MAIN),
            ("targets.d/bad name.toml", MINIMAL_TARGET),
        ]);
        let errors = load_err(&dir, &[("APP_TOKEN", "t")]);
        assert_eq!(
            locations(&dir, &errors),
            [("targets.d/bad name.toml".into(), "(file name)".into())]
        );
    }

    #[test]
    fn missing_main_file_and_syntax_errors() {
        let dir = tree(&[]);
        let errors = load_err(&dir, &[]);
        assert_eq!(errors[0].key, "(file)");

        let dir = tree(&[("config.toml", "[ldap]\nurl = \n")]);
        let errors = load_err(&dir, &[]);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].key, "(syntax)");
        assert!(
            errors[0].message.starts_with("line 2, column"),
            "{errors:?}"
        );
    }

    #[test]
    fn auth_needs_exactly_one_kind() {
        let target = MINIMAL_TARGET.replace(
            "auth = { bearer = { env = \"APP_TOKEN\" } }",
            "auth = { bearer = { env = \"APP_TOKEN\" }, basic = { username = \"u\", password = { env = \"APP_TOKEN\" } } }",
        );
        let dir = tree(&[
            ("config.toml", MINIMAL_MAIN),
            ("targets.d/app.toml", &target),
        ]);
        let errors = load_err(&dir, &[("APP_TOKEN", "t")]);
        assert_eq!(errors.len(), 1);
        assert!(message(&errors, "auth").starts_with("expected exactly one of"));

        let target = MINIMAL_TARGET.replace("bearer =", "bearr =");
        let dir = tree(&[
            ("config.toml", MINIMAL_MAIN),
            ("targets.d/app.toml", &target),
        ]);
        let errors = load_err(&dir, &[("APP_TOKEN", "t")]);
        assert_eq!(
            message(&errors, "auth.bearr"),
            "unknown key \"bearr\"; did you mean \"bearer\"?"
        );
        assert_eq!(errors.len(), 1, "{errors:#?}");
    }

    #[test]
    fn example_files_load() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = tempfile::tempdir().unwrap();
        fs::copy(
            root.join("config.example.toml"),
            dir.path().join("config.toml"),
        )
        .unwrap();
        fs::create_dir(dir.path().join("targets.d")).unwrap();
        for entry in fs::read_dir(root.join("examples/targets.d")).unwrap() {
            let entry = entry.unwrap();
            fs::copy(
                entry.path(),
                dir.path().join("targets.d").join(entry.file_name()),
            )
            .unwrap();
        }
        let config = load_ok(
            &dir,
            &[
                ("LDAP2SCIM_LDAP_PASSWORD", "ldap-password"),
                ("EXAMPLE_APP_SCIM_TOKEN", "scim-token"),
            ],
        );
        assert_eq!(config.targets.len(), 1);
        assert_eq!(config.targets[0].name.0, "example-app");
        assert!(config.ldap.groups.is_some());
    }

    #[test]
    fn hardening_keys_and_their_defaults() {
        let dir = tree(&[
            ("config.toml", MINIMAL_MAIN),
            ("targets.d/app.toml", MINIMAL_TARGET),
        ]);
        let config = load_ok(&dir, &[("APP_TOKEN", "t")]);
        assert!(!config.ldap.allow_plaintext);
        assert_eq!(config.ldap.urls[0].transport, LdapTransport::Plain);
        let t = &config.targets[0];
        assert!(!t.allow_plaintext);
        assert_eq!(t.ca_file, None);
        assert_eq!(t.max_response_size, 32 * 1024 * 1024);
        assert_eq!(t.max_value_length, 64 * 1024);
        assert_eq!(t.rebind, Rebind::Allow);

        let target = r#"
url = "https://app.example.com/scim/v2/"
auth = { oauth2 = { token_url = "https://login.example.com/t", client_id = "c", client_secret = { env = "APP_TOKEN" }, client_auth = "post" } }
ca_file = "ca.pem"
max_response_size = "1MiB"
max_value_length = "100B"
rebind = "hold"
"#;
        let dir = tree(&[
            ("config.toml", MINIMAL_MAIN),
            ("targets.d/app.toml", target),
            ("targets.d/ca.pem", "not checked here"),
        ]);
        let config = load_ok(&dir, &[("APP_TOKEN", "t")]);
        let t = &config.targets[0];
        assert_eq!(t.ca_file, Some(dir.path().join("targets.d/ca.pem")));
        assert_eq!(t.max_response_size, 1 << 20);
        assert_eq!(t.max_value_length, 100);
        assert_eq!(t.rebind, Rebind::Hold);
        assert!(matches!(
            t.auth,
            Auth::OAuth2 {
                client_auth: ClientAuth::Post,
                ..
            }
        ));
    }

    #[test]
    fn schemes_are_case_insensitive_and_cleartext_needs_allow_plaintext() {
        // `LDAP://` is ldap://: with starttls it is StartTLS, not a cleartext bind.
        let main = MINIMAL_MAIN.replace(
            "url = \"ldap://127.0.0.1\"",
            "url = [\"LDAP://ldap.example.org\", \"LDAPS://b.example.org\"]\nstarttls = true",
        );
        let dir = tree(&[
            ("config.toml", &main),
            ("targets.d/app.toml", MINIMAL_TARGET),
        ]);
        let errors = load_err(&dir, &[("APP_TOKEN", "t")]);
        assert_eq!(
            locations(&dir, &errors),
            [("config.toml".into(), "ldap.starttls".into())],
            "{errors:?}"
        );
        let main = MINIMAL_MAIN.replace(
            "url = \"ldap://127.0.0.1\"",
            "url = \"LDAP://ldap.example.org\"\nstarttls = true",
        );
        let dir = tree(&[
            ("config.toml", &main),
            ("targets.d/app.toml", MINIMAL_TARGET),
        ]);
        let config = load_ok(&dir, &[("APP_TOKEN", "t")]);
        assert_eq!(config.ldap.urls[0].transport, LdapTransport::StartTls);
        assert_eq!(config.ldap.urls[0].as_str(), "ldap://ldap.example.org");

        // Cleartext to another host: refused unless allow_plaintext says so.
        let plain = MINIMAL_MAIN.replace("ldap://127.0.0.1", "Ldap://ldap.example.org");
        let target =
            "url = \"HTTP://app.example.com/scim\"\nauth = { bearer = { env = \"APP_TOKEN\" } }\n";
        let dir = tree(&[("config.toml", &plain), ("targets.d/app.toml", target)]);
        let errors = load_err(&dir, &[("APP_TOKEN", "t")]);
        assert_eq!(
            locations(&dir, &errors),
            [
                ("config.toml".into(), "ldap.url".into()),
                ("targets.d/app.toml".into(), "url".into()),
            ]
        );
        assert!(message(&errors, "ldap.url").contains("allow_plaintext"));
        let allowed = plain.replace("[ldap.users]", "allow_plaintext = true\n[ldap.users]");
        let dir = tree(&[
            ("config.toml", &allowed),
            (
                "targets.d/app.toml",
                &format!("{target}allow_plaintext = true\n"),
            ),
        ]);
        let config = load_ok(&dir, &[("APP_TOKEN", "t")]);
        assert!(config.ldap.allow_plaintext);
        assert_eq!(config.targets[0].url, "http://app.example.com/scim");

        // Loopback needs nothing.
        let target =
            "url = \"http://[::1]:8080/scim\"\nauth = { bearer = { env = \"APP_TOKEN\" } }\n";
        let dir = tree(&[
            ("config.toml", MINIMAL_MAIN),
            ("targets.d/app.toml", target),
        ]);
        load_ok(&dir, &[("APP_TOKEN", "t")]);
    }

    #[test]
    fn urls_with_inline_credentials_point_at_auth() {
        let target = "url = \"https://svc:hunter2@app.example.com/scim\"\nauth = { bearer = { env = \"APP_TOKEN\" } }\n";
        let dir = tree(&[
            ("config.toml", MINIMAL_MAIN),
            ("targets.d/app.toml", target),
        ]);
        let errors = load_err(&dir, &[("APP_TOKEN", "t")]);
        let m = message(&errors, "url");
        assert!(m.contains("auth"), "{m}");
        assert!(!m.contains("hunter2"), "{m}");
        assert!(!ConfigErrors(errors.clone()).to_string().contains("hunter2"));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64KiB"), Ok(64 * 1024));
        assert_eq!(parse_size("32MiB"), Ok(32 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("10B"), Ok(10));
        assert!(parse_size("0KiB").is_err());
        assert!(parse_size("lots").is_err());
        assert!(parse_size("5 parsecs").is_err());
        assert!(parse_size("99999999999999GiB").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(604_800)));
        for bad in [
            "",
            "30",
            "s",
            "-1s",
            "1.5h",
            "30 s",
            "1w",
            "99999999999999999999d",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn percentages_limits_and_rates() {
        assert_eq!(parse_percent("20%"), Ok(0.2));
        assert_eq!(parse_percent("0%"), Ok(0.0));
        assert_eq!(parse_percent("100%"), Ok(1.0));
        for bad in ["20", "101%", "-1%", "x%"] {
            assert!(parse_percent(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(parse_rate_limit("10/s").unwrap().per_second, 10.0);
        assert_eq!(parse_rate_limit("180/m").unwrap().per_second, 3.0);
        assert_eq!(parse_rate_limit("180/min").unwrap().per_second, 3.0);
        assert_eq!(parse_rate_limit("3600/h").unwrap().per_second, 1.0);
        for bad in ["10", "0/s", "10/d", "x/s"] {
            assert!(parse_rate_limit(bad).is_err(), "{bad:?} accepted");
        }

        for (value, expected) in [
            ("7", Some(Limit::Count(7))),
            ("\"7\"", Some(Limit::Count(7))),
            ("\"5%\"", Some(Limit::Percent(0.05))),
            ("-1", None),
            ("\"many\"", None),
            ("true", None),
        ] {
            let target = format!("{MINIMAL_TARGET}max_deprovisions = {value}\n");
            let dir = tree(&[
                ("config.toml", MINIMAL_MAIN),
                ("targets.d/app.toml", &target),
            ]);
            let result =
                load_with_env(&dir.path().join("config.toml"), &env(&[("APP_TOKEN", "t")]));
            match (result, expected) {
                (Ok(config), Some(limit)) => assert_eq!(config.targets[0].max_deprovisions, limit),
                (Err(errors), None) => assert_eq!(errors.0[0].key, "max_deprovisions"),
                (result, _) => panic!("{value}: unexpected {result:?}"),
            }
        }
    }

    #[test]
    fn schedules() {
        for good in [
            "*/15 * * * *",
            "0 0 * * 0",
            "0 0 * * 7",
            "5,10-20/5 0-23 1-31 1-12 0-7",
            "0 9-17 * * 1-5",
        ] {
            assert_eq!(check_schedule(good), Ok(()), "{good}");
        }
        for bad in [
            "* * * *",
            "* * * * * *",
            "60 * * * *",
            "* 24 * * *",
            "* * 0 * *",
            "* * * 13 *",
            "* * * * 8",
            "*/0 * * * *",
            "10-5 * * * *",
            "a * * * *",
            "1, * * * *",
            "* * * JAN *",
        ] {
            assert!(check_schedule(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn timezones() {
        for good in [
            "UTC",
            "Europe/Berlin",
            "America/Argentina/Buenos_Aires",
            "Etc/GMT+5",
        ] {
            assert!(check_timezone(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "utc",
            "Berlin",
            "Europe/",
            "europe/berlin",
            "Europe Berlin",
        ] {
            assert!(check_timezone(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn filters() {
        for good in ["(uid=*)", "(&(objectClass=user)(!(cn=a\\29b)))"] {
            assert!(check_filter(good).is_ok(), "{good}");
        }
        for bad in ["uid=*", "(uid=*", "(uid=*))", "(a)(b)", ""] {
            assert!(check_filter(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn templates_and_paths() {
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
        for good in [
            "userName",
            "name.honorificSuffix",
            "emails[type eq \"home\"].value",
            "phoneNumbers[type eq \"work\"].value",
            "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:costCenter",
        ] {
            assert_eq!(check_mapping_path(good), Ok(()), "{good}");
        }
        for bad in [
            "emails[type eq \"\"].value",
            "emails[type eq \"work 2\"].value",
            "addresses[type eq \"work\"].value",
            "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:manager",
            "name",
        ] {
            assert!(check_mapping_path(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            check_mapping_path("displayname"),
            Err(
                "unsupported SCIM attribute path \"displayname\"; did you mean \"displayName\"?"
                    .into()
            )
        );
    }

    #[test]
    fn dns_are_normalized() {
        assert_eq!(
            normalize_dn("CN=Slack Users, OU = Groups ,DC=Example,DC=org"),
            Ok("cn=slack users,ou=groups,dc=example,dc=org".into())
        );
        assert_eq!(
            normalize_dn("cn=Smith\\, John + uid=JS,dc=x"),
            Ok("cn=smith\\, john+uid=js,dc=x".into())
        );
        assert_eq!(
            normalize_dn("cn=trailing\\ ,dc=x"),
            Ok("cn=trailing\\ ,dc=x".into())
        );
        for bad in ["", "slack-users", "cn=,dc=x", "=x"] {
            assert!(normalize_dn(bad).is_err(), "{bad:?} accepted");
        }
    }

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
