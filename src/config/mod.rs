//! Configuration: the main TOML file plus one file per target in `targets_dir`.
//!
//! `load` reads everything, resolves secrets, and returns either a parsed [`Config`] or the
//! complete list of problems ([`ConfigErrors`]), each naming its file and key. Nothing else in
//! the program parses configuration: a loaded `Config` holds the schedule compiled in its time
//! zone, scope groups as normalized DNs and the mapping as parsed templates, so the commands
//! and the daemon use what `check` checked. Secrets are held in [`Secret`], whose `Debug` and
//! `Display` never show the value.
//!
//! This file holds the types; the reading is split by what it reads: `walk` (files, sections,
//! typed getters), `values` (one value's text), `schedule`, `template`, `main_file`,
//! `target_file` and `mapping`.

mod main_file;
mod mapping;
mod schedule;
mod target_file;
pub mod template;
mod values;
mod walk;

#[cfg(test)]
mod tests;

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use crate::model::Dialect;
pub use crate::scim::profile::Profile;

pub use main_file::{load, load_with_env, DEFAULT_STATE_DIR};
pub use schedule::Schedule;
pub use template::Template;
pub use values::{parse_duration, parse_size};
pub use walk::{nearest, ConfigError, ConfigErrors};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/ldap2scim/config.toml";

#[derive(Clone, Debug)]
pub struct Config {
    /// The main file this configuration was read from.
    pub path: PathBuf,
    pub daemon: DaemonConfig,
    pub ldap: LdapConfig,
    /// Sorted by name.
    pub targets: Vec<TargetConfig>,
    /// `[ha]`: an active/standby pair; only the holder of the lease writes.
    pub ha: Option<HaConfig>,
}

/// `[ha]`: the lease in PostgreSQL that makes one of two instances the writer.
#[derive(Clone, Debug)]
pub struct HaConfig {
    /// `ha.lease.postgres`: the libpq connection string (a secret: it may hold a password).
    pub dsn: Secret,
    /// `ha.lease_ttl`: how long a lease lasts unless renewed.
    pub lease_ttl: Duration,
    /// `ha.instance`: this instance's name (default: the host name).
    pub instance: String,
}

#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// `daemon.schedule` (5-field crontab) compiled in `daemon.timezone`; displays as written.
    pub schedule: Schedule,
    /// `daemon.timezone` as written (an IANA name).
    pub timezone: String,
    pub state_dir: PathBuf,
    /// Absolute (resolved relative to the main file).
    pub targets_dir: PathBuf,
    pub listen: Option<SocketAddr>,
    /// `daemon.full_schedule`: when a cycle reads the whole directory although a change feed
    /// could say what changed (it repairs whatever a feed could miss).
    pub full_schedule: Schedule,
    /// `daemon.live`: between cycles, apply directory changes as they arrive.
    pub live: bool,
    pub live_interval: Duration,
    pub live_delay: Duration,
}

#[derive(Clone, Debug)]
pub struct LdapConfig {
    /// At least one, parsed once; several = failover list, tried in order.
    pub urls: Vec<LdapServer>,
    pub starttls: bool,
    /// A simple bind may leave in cleartext (`ldap://` without StartTLS to a host that is not
    /// loopback) only when this says so.
    pub allow_plaintext: bool,
    pub ca_file: Option<PathBuf>,
    pub bind_dn: Option<String>,
    pub bind_password: Option<Secret>,
    pub dialect: Dialect,
    pub page_size: i32,
    pub timeout: Duration,
    /// Fraction 0.0..=1.0 (from "20%").
    pub max_shrink: f64,
    /// `ldap.change_feed`: how a cycle learns what changed.
    pub change_feed: ChangeFeed,
    pub users: UsersConfig,
    /// `None` when the file has no `[ldap.groups]`: no groups are read or pushed.
    pub groups: Option<GroupsConfig>,
}

/// `ldap.change_feed`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeFeed {
    /// What the server advertises in its root DSE, else none.
    Auto,
    /// RFC 4533 content synchronisation (OpenLDAP syncprov, 389-DS Content Synchronization).
    Syncrepl,
    /// Active Directory DirSync (object-security mode without the replication right).
    DirSync,
    /// Active Directory `uSNChanged` watermark of one DC, with its `invocationId`.
    Usn,
    /// Every cycle reads the whole directory.
    None,
}

impl ChangeFeed {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeFeed::Auto => "auto",
            ChangeFeed::Syncrepl => "syncrepl",
            ChangeFeed::DirSync => "dirsync",
            ChangeFeed::Usn => "usn",
            ChangeFeed::None => "none",
        }
    }
}

/// One LDAP server of `ldap.url`: the URL as parsed (scheme lowercased), and how its connection
/// is protected, decided from that parsed scheme and `ldap.starttls`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LdapServer {
    pub url: url::Url,
    pub transport: LdapTransport,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LdapTransport {
    /// `ldaps://`: TLS from the first byte.
    Ldaps,
    /// `ldap://` with `starttls = true`: the connection fails unless StartTLS succeeds.
    StartTls,
    /// `ldap://` without StartTLS: allowed to loopback, elsewhere only with `allow_plaintext`.
    Plain,
}

impl LdapServer {
    pub fn as_str(&self) -> &str {
        self.url.as_str()
    }

    /// Whether the host is the local machine (127.0.0.0/8, ::1, `localhost`).
    pub fn is_loopback(&self) -> bool {
        is_loopback_url(&self.url)
    }
}

impl fmt::Display for LdapServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.url.as_str())
    }
}

/// Whether a URL's host is the local machine (127.0.0.0/8, ::1, `localhost`): the only place a
/// secret may go in cleartext without `allow_plaintext`.
pub fn is_loopback_url(url: &url::Url) -> bool {
    // For schemes the url crate does not know (ldap, ldaps) the host stays opaque text, so
    // addresses are parsed here.
    let Some(host) = url.host_str() else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => host.eq_ignore_ascii_case("localhost"),
    }
}

#[derive(Clone, Debug)]
pub struct UsersConfig {
    pub base: String,
    pub filter: String,
    pub disabled_filter: Option<String>,
}

#[derive(Clone, Debug)]
pub struct GroupsConfig {
    pub base: String,
    pub filter: String,
    pub nested: bool,
}

/// The name of a target: the stem of its file in `targets_dir`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TargetName(pub String);

impl fmt::Display for TargetName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Clone, Debug)]
pub struct TargetConfig {
    pub name: TargetName,
    pub file: PathBuf,
    /// SCIM base URL without trailing slash.
    pub url: String,
    pub auth: Auth,
    pub profile: Profile,
    /// Normalized DNs; empty = every user is in scope.
    pub scope_groups: Vec<String>,
    pub groups: GroupScope,
    pub deprovision: Deprovision,
    pub provision_disabled: bool,
    pub delete_after: Duration,
    pub max_deprovisions: Limit,
    pub match_existing: Vec<MatchRule>,
    /// Glob patterns (`*` and `?`) over userName / displayName.
    pub protect: Vec<String>,
    pub rate_limit: Option<RateLimit>,
    pub concurrency: usize,
    pub members_per_request: usize,
    /// Per-request timeout (default 30 s).
    pub timeout: Duration,
    /// SCIM attribute path → parsed template, in file order. Dialect defaults are already
    /// merged in.
    pub mapping: Vec<(String, Template)>,
    /// `http://` to a host that is not loopback is allowed only when this says so.
    pub allow_plaintext: bool,
    /// A private CA for this target's TLS (verified as strictly as the system roots).
    pub ca_file: Option<PathBuf>,
    /// An egress proxy for this target's requests (`HTTPS_PROXY` / `NO_PROXY` otherwise, as
    /// usual); LDAP never goes through it.
    pub proxy: Option<String>,
    /// The largest response body accepted, in bytes (default 32 MiB).
    pub max_response_size: u64,
    /// The longest directory value pushed, in bytes (default 64 KiB); a longer one is a
    /// problem for its entry.
    pub max_value_length: usize,
    /// What happens when an owned account would move to another directory entry.
    pub rebind: Rebind,
    /// Which groups go to this target (`None`: every group `groups` allows).
    pub groups_filter: Option<GroupsFilter>,
    /// `[group_mapping] displayName`: the group's SCIM name (default: its `cn`).
    pub group_display_name: Option<Template>,
}

/// The mapping path of the enterprise extension's manager: its template renders the
/// manager's DN, sent as the manager's SCIM id on the target.
pub const MANAGER_PATH: &str = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:manager";

impl TargetConfig {
    /// Whether the mapping links users to their managers.
    pub fn maps_manager(&self) -> bool {
        self.mapping.iter().any(|(path, _)| path == MANAGER_PATH)
    }
}

/// `groups_filter`: which directory groups a target gets.
#[derive(Clone, Debug)]
pub enum GroupsFilter {
    /// An LDAP filter, evaluated over the group entry as read.
    Ldap(crate::model::filter::Filter),
    /// Glob patterns (`*`, `?`, case-insensitive) over the group's directory name (`cn`).
    Names(Vec<String>),
}

/// `rebind`: an account ldap2scim manages for one directory entry is claimed by another one
/// (same userName: an entry deleted and a new one made).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rebind {
    /// Planned as a `rebind` change, counted against `max_deprovisions`.
    Allow,
    /// Held until `approve`, like a destructive change over a limit.
    Hold,
}

/// How the OAuth2 client authenticates to the token endpoint (RFC 6749 §2.3.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// HTTP Basic with the client id and secret (`client_secret_basic`), which every server
    /// must accept.
    Basic,
    /// The id and secret in the form body (`client_secret_post`).
    Post,
}

#[derive(Clone, Debug)]
pub enum Auth {
    Bearer(Secret),
    Basic {
        username: String,
        password: Secret,
    },
    OAuth2 {
        token_url: String,
        client_id: String,
        client_secret: Secret,
        scope: Option<String>,
        client_auth: ClientAuth,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupScope {
    All,
    Scoped,
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deprovision {
    Deactivate,
    Delete,
    DeactivateThenDelete,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Limit {
    Count(usize),
    /// Fraction 0.0..=1.0 of managed users.
    Percent(f64),
}

impl Limit {
    /// The largest number allowed out of `total`.
    pub fn allowed(&self, total: usize) -> usize {
        match *self {
            Limit::Count(n) => n,
            Limit::Percent(p) => (p * total as f64).floor() as usize,
        }
    }
}

/// How a resource on a target is matched to a directory entry (`match_existing`); also
/// how a found one did match, in plans and reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum MatchRule {
    #[serde(rename = "externalId")]
    ExternalId,
    #[serde(rename = "userName")]
    UserName,
    #[serde(rename = "displayName")]
    DisplayName,
}

impl MatchRule {
    /// The SCIM attribute the rule compares.
    pub fn as_str(self) -> &'static str {
        match self {
            MatchRule::ExternalId => "externalId",
            MatchRule::UserName => "userName",
            MatchRule::DisplayName => "displayName",
        }
    }
}

impl fmt::Display for MatchRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
}

/// A secret value read from the environment or a file. Never printed.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Secret(value)
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}
