//! The main file: `[daemon]` and `[ldap]` walked into [`DaemonConfig`] and [`LdapConfig`], then
//! every target file of `daemon.targets_dir`; [`load`] is the entry point of the whole
//! configuration. The schedule is compiled here (through `schedule`), so a loaded `Config`
//! holds a schedule that runs.
//!
//! It never reads a target file's keys itself (that is `target_file`'s), and never stops at
//! the first problem: every key is read and every problem reported.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Value;

use super::schedule::{self, Schedule};
use super::target_file::load_targets;
use super::values::{
    check_filter, check_ldap_url, has_scheme, parse_duration, parse_percent, readable_file,
};
use super::walk::{describe, ConfigErrors, EnvLookup, Problems, Section, Source};
use super::{
    ChangeFeed, Config, DaemonConfig, Dialect, GroupsConfig, HaConfig, LdapConfig, LdapServer,
    LdapTransport, UsersConfig,
};

/// Loads and validates the main file at `path` and every target file, reading secrets from the
/// process environment.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    load_with_env(path, &|name| std::env::var(name).ok())
}

/// Like [`load`], with secrets of the form `{ env = "VAR" }` looked up through `env`.
pub fn load_with_env(path: &Path, env: &EnvLookup<'_>) -> Result<Config, ConfigErrors> {
    let problems = Problems::default();
    let config = read_config(path, env, &problems);
    let errors = problems.into_errors();
    match config {
        Some(config) if errors.is_empty() => Ok(config),
        _ => {
            debug_assert!(!errors.is_empty(), "an invalid config must report why");
            Err(ConfigErrors(errors))
        }
    }
}

const ROOT_KEYS: &[&str] = &["daemon", "ldap", "ha"];
const HA_KEYS: &[&str] = &["lease", "lease_ttl", "instance"];
const LEASE_KEYS: &[&str] = &["postgres"];
const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(30);
const DAEMON_KEYS: &[&str] = &[
    "schedule",
    "timezone",
    "state_dir",
    "targets_dir",
    "listen",
    "full_schedule",
    "live",
    "live_interval",
    "live_delay",
];
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
    "change_feed",
    "allow_plaintext",
    "users",
    "groups",
];
const USERS_KEYS: &[&str] = &["base", "filter", "disabled_filter"];
const GROUPS_KEYS: &[&str] = &["base", "filter", "nested"];

const DEFAULT_SCHEDULE: &str = "*/15 * * * *";
const DEFAULT_FULL_SCHEDULE: &str = "0 3 * * *";
const DEFAULT_LIVE_INTERVAL: Duration = Duration::from_secs(10);
const DEFAULT_LIVE_DELAY: Duration = Duration::from_secs(2);
const DEFAULT_TIMEZONE: &str = "UTC";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/ldap2scim";
const DEFAULT_TARGETS_DIR: &str = "targets.d";
const DEFAULT_PAGE_SIZE: i32 = 1000;
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_MAX_SHRINK: f64 = 0.2;

const CHANGE_FEEDS: &[(&str, ChangeFeed)] = &[
    ("auto", ChangeFeed::Auto),
    ("syncrepl", ChangeFeed::Syncrepl),
    ("dirsync", ChangeFeed::DirSync),
    ("usn", ChangeFeed::Usn),
    ("none", ChangeFeed::None),
];

const DIALECTS: &[(&str, Dialect)] = &[
    ("openldap", Dialect::OpenLdap),
    ("active-directory", Dialect::ActiveDirectory),
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

fn read_config(path: &Path, env: &EnvLookup<'_>, problems: &Problems) -> Option<Config> {
    let main = Source::new(path, problems, env);
    let text = main.read()?;
    let table = main.parse(&text)?;
    let root = Section::root(&main, &table, ROOT_KEYS);

    let daemon = daemon_config(&root);
    let ha = ha_config(&root);
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
        ha: ha?,
    })
}

/// `[ha]`: absent is `Some(None)`; `None` when it was wrong (reported).
fn ha_config(root: &Section<'_>) -> Option<Option<HaConfig>> {
    if !root.has("ha") {
        return Some(None);
    }
    let h = root.table("ha", HA_KEYS)?;
    let dsn = h.required("lease", |s, name| {
        let lease = s.table(name, LEASE_KEYS)?;
        lease.required("postgres", |l, name| l.secret(name))
    });
    let ttl = h.parsed("lease_ttl", |text| {
        parse_duration(text).and_then(|t| {
            if t < Duration::from_secs(2) {
                Err("must be at least 2s: writes stop half a lease before it ends, and it is renewed every third".to_owned())
            } else {
                Ok(t)
            }
        })
    });
    let bad_ttl = h.has("lease_ttl") && ttl.is_none();
    let instance = match h.has("instance") {
        true => Some(h.parsed("instance", |text| {
            let t = text.trim();
            if t.is_empty() || t.len() > 200 || t.chars().any(char::is_control) {
                Err("must be a name of 1 to 200 printable characters".to_owned())
            } else {
                Ok(t.to_owned())
            }
        })?),
        false => None,
    };
    let instance = match instance {
        Some(i) => i,
        None => match host_name() {
            Some(h) => h,
            None => {
                h.error("instance", "the host name cannot be read; set ha.instance");
                return None;
            }
        },
    };
    if bad_ttl {
        return None;
    }
    Some(Some(HaConfig {
        dsn: dsn?,
        lease_ttl: ttl.unwrap_or(DEFAULT_LEASE_TTL),
        instance,
    }))
}

/// The kernel's host name.
pub fn host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
}

fn daemon_config(root: &Section<'_>) -> DaemonConfig {
    let d = root.optional_table("daemon", DAEMON_KEYS);
    let crontab = d.parsed("schedule", |text| {
        schedule::crontab(text).map(|cron| (text, cron))
    });
    let full_crontab = d.parsed("full_schedule", |text| {
        schedule::crontab(text).map(|cron| (text, cron))
    });
    let live = d.bool("live");
    let positive = |text: &str| parse_duration(text);
    let live_interval = d.parsed("live_interval", |text| {
        positive(text).and_then(|t| {
            if t.is_zero() {
                Err("must be longer than zero".to_owned())
            } else {
                Ok(t)
            }
        })
    });
    let live_delay = d.parsed("live_delay", positive);
    let zone = d.parsed("timezone", |text| {
        schedule::time_zone(text).map(|tz| (text, tz))
    });
    let path = |text: &str| d.src.resolve(text);
    let state_dir = d.non_empty_string("state_dir").map(path);
    let targets_dir = d.non_empty_string("targets_dir").map(path);
    let listen = d.parsed("listen", |text| {
        text.parse::<SocketAddr>().map_err(|_| {
            format!("invalid address \"{text}\"; expected IP:PORT, like \"127.0.0.1:9464\"")
        })
    });
    // A wrong schedule or zone has been reported (the load fails); the default stands in.
    let (text, cron) = crontab.unwrap_or_else(|| {
        let cron = schedule::crontab(DEFAULT_SCHEDULE).expect("the default schedule reads");
        (DEFAULT_SCHEDULE, cron)
    });
    let (timezone, tz) = zone.unwrap_or((DEFAULT_TIMEZONE, chrono_tz::Tz::UTC));
    let (full_text, full_cron) = full_crontab.unwrap_or_else(|| {
        let cron = schedule::crontab(DEFAULT_FULL_SCHEDULE).expect("the default schedule reads");
        (DEFAULT_FULL_SCHEDULE, cron)
    });
    DaemonConfig {
        schedule: Schedule::from_parts(text, cron, timezone, tz),
        full_schedule: Schedule::from_parts(full_text, full_cron, timezone, tz),
        live: live.unwrap_or(true),
        live_interval: live_interval.unwrap_or(DEFAULT_LIVE_INTERVAL),
        live_delay: live_delay.unwrap_or(DEFAULT_LIVE_DELAY),
        timezone: timezone.to_owned(),
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
    let change_feed = l.choice("change_feed", CHANGE_FEEDS);
    match (change_feed, dialect) {
        (Some(ChangeFeed::Syncrepl), Dialect::ActiveDirectory) => l.error(
            "change_feed",
            "\"syncrepl\" is OpenLDAP's and 389-DS's feed; Active Directory offers \"dirsync\" or \"usn\" (or use \"auto\")",
        ),
        (Some(ChangeFeed::DirSync | ChangeFeed::Usn), Dialect::OpenLdap) => l.error(
            "change_feed",
            "\"dirsync\" and \"usn\" are Active Directory's feeds; OpenLDAP and 389-DS offer \"syncrepl\" (or use \"auto\")",
        ),
        _ => {}
    }

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
        change_feed: change_feed.unwrap_or(ChangeFeed::Auto),
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
