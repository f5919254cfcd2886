//! Target files: one `*.toml` per target in `daemon.targets_dir`, each walked into a
//! [`TargetConfig`] (its name is the file's stem). Scope groups are stored as normalized DNs
//! (read by `model::dn`, the one DN reader) and the mapping as parsed templates.
//!
//! It never reads the main file's keys, and every target file is read before any failure
//! counts, so each one reports its problems in the same load.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Value;

use super::mapping::{mapping, mapping_keys_in_file_order};
use super::values::{
    check_http_url, parse_duration, parse_percent, parse_rate_limit, parse_size, readable_file,
};
use super::walk::{describe, parse_choice, EnvLookup, Problems, Section, Source};
use super::{
    Auth, ClientAuth, Deprovision, Dialect, GroupScope, GroupsFilter, Limit, MatchRule, Profile,
    RateLimit, Rebind, TargetConfig, TargetName, Template,
};
use crate::model::dn;
use crate::model::filter::Filter;

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
    "proxy",
    "max_response_size",
    "max_value_length",
    "rebind",
    "groups_filter",
    "group_mapping",
];
const GROUP_MAPPING_KEYS: &[&str] = &["displayName"];
const AUTH_KEYS: &[&str] = &["bearer", "basic", "oauth2"];
const BASIC_KEYS: &[&str] = &["username", "password"];
const OAUTH2_KEYS: &[&str] = &[
    "token_url",
    "client_id",
    "client_secret",
    "scope",
    "client_auth",
];

const DEFAULT_DELETE_AFTER: Duration = Duration::from_secs(30 * 86_400);
const DEFAULT_MAX_DEPROVISIONS: Limit = Limit::Percent(0.05);
const DEFAULT_CONCURRENCY: usize = 4;
const DEFAULT_MEMBERS_PER_REQUEST: usize = 100;
const DEFAULT_MAX_RESPONSE_SIZE: u64 = 32 * 1024 * 1024;
const DEFAULT_MAX_VALUE_LENGTH: usize = 64 * 1024;

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
// Target files

pub(super) fn load_targets(
    main: &Source<'_>,
    dir: &Path,
    dialect: Dialect,
) -> Option<Vec<TargetConfig>> {
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
    let profile = t
        .choice("profile", crate::scim::profile::NAMES)
        .unwrap_or(Profile::Generic);
    let scope_groups = t.parsed_strings("scope_groups", dn::normalize_strict);
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
    let proxy = t.parsed("proxy", super::values::check_proxy_url);
    let max_response_size = t.parsed("max_response_size", parse_size);
    let max_value_length = t.parsed("max_value_length", parse_size);
    let rebind = t.choice("rebind", REBINDS);
    let groups_filter = groups_filter(&t);
    let group_display_name = t
        .table("group_mapping", GROUP_MAPPING_KEYS)
        .and_then(|g| g.parsed("displayName", Template::parse));
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
        proxy,
        max_response_size: max_response_size.unwrap_or(DEFAULT_MAX_RESPONSE_SIZE),
        max_value_length: max_value_length
            .map(|n| usize::try_from(n).unwrap_or(usize::MAX))
            .unwrap_or(DEFAULT_MAX_VALUE_LENGTH),
        rebind: rebind.unwrap_or(Rebind::Allow),
        groups_filter,
        group_display_name,
    })
}

/// `groups_filter`: an LDAP filter (`"(cn=app-*)"`), or name patterns (one string or an
/// array, `*` and `?`) over the group's directory name.
fn groups_filter(t: &Section<'_>) -> Option<GroupsFilter> {
    let value = t.value("groups_filter")?;
    if let Some(text) = value.as_str() {
        if text.trim_start().starts_with('(') {
            return t.parsed("groups_filter", |text| {
                Filter::parse(text)
                    .map(GroupsFilter::Ldap)
                    .map_err(|why| format!("invalid LDAP filter \"{text}\": {why}"))
            });
        }
        return t
            .non_empty_string("groups_filter")
            .map(|pattern| GroupsFilter::Names(vec![pattern.to_owned()]));
    }
    if value.is_array() {
        let patterns = t.strings("groups_filter")?;
        if patterns.is_empty() {
            t.error(
                "groups_filter",
                "an empty list would send no group; remove the key to send every group",
            );
            return None;
        }
        return Some(GroupsFilter::Names(
            patterns.into_iter().map(|(_, p)| p.to_owned()).collect(),
        ));
    }
    t.error(
        "groups_filter",
        format!(
            "expected an LDAP filter or name patterns (a string or an array of strings), found {}",
            describe(value)
        ),
    );
    None
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
