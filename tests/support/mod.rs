//! Test harness for ldap2scim's integration tests: real servers on loopback, one set per test.
//!
//! Every integration test file uses it as `mod support;`. It starts what a test needs, each in
//! its own temporary directory and on its own random loopback ports, and stops it (by PID) and
//! removes the directory when the handle is dropped, so tests run in parallel, as threads
//! (`cargo test`) or as processes (`cargo nextest`):
//!
//! - [`Slapd`]: a fresh OpenLDAP slapd (StartTLS, LDAPS, ldapi, memberOf, syncprov);
//! - [`Postgres`]: a fresh PostgreSQL server (superuser `postgres`, trust auth on loopback);
//! - [`Scim2Server`] and [`BetterAuth`]: two independent SCIM 2.0 servers, behind the
//!   [`ScimServer`] trait; [`all_scim_servers`] starts both;
//! - [`RecordingProxy`]: an HTTP reverse proxy that records requests and injects faults;
//! - [`TestConfig`]: the ldap2scim configuration files for a slapd and some targets;
//! - [`ldap2scim`] / [`Ldap2scim`]: runs the binary under test;
//! - [`person`] / [`group`]: LDIF builders for seeds.
//!
//! It never talks to anything but 127.0.0.1, and never signals a process it did not start.
//! The servers come from `scripts/install-deps.sh` (see [`deps_dir`]).
//! Set `LDAP2SCIM_TEST_KEEP=1` to keep the temporary directories for a post-mortem.
#![allow(dead_code)]

mod config;
mod ds389;
mod fake_ldap;
mod fake_scim;
mod hostile;
mod postgres;
mod process;
mod proxy;
mod relay;
mod run;
mod samba;
mod scim;
mod slapd;
mod tinyproxy;
mod world;

use std::collections::hash_map::RandomState;
use std::collections::HashSet;
use std::hash::{BuildHasher, Hasher};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

// Re-exported for the test files; each uses only some of them.
#[allow(unused_imports)]
pub use config::{
    bulk_directory, group, group_dn, people, person, person_dn, staff, TestConfig, BASE_DN,
};
#[allow(unused_imports)]
pub use ds389::{Ds389, DS389_PASSWORD};
#[allow(unused_imports)]
pub use fake_ldap::{FakeEntry, FakeLdap, FakeLog, RangeFault};
#[allow(unused_imports)]
pub use fake_scim::{FakeRequest, FakeScim, FakeScimOptions};
#[allow(unused_imports)]
pub use hostile::{
    list_response, Body, HostileServer, HttpRequest, HttpResponse, ThrowawayCa, SCIM_PREFIX,
};
#[allow(unused_imports)]
pub use postgres::Postgres;
#[allow(unused_imports)]
pub use process::{is_reaped, Process};
#[allow(unused_imports)]
pub use proxy::{Fault, Recorded, RecordedRequest, RecordingProxy};
#[allow(unused_imports)]
pub use relay::TcpRelay;
#[allow(unused_imports)]
pub use run::{ldap2scim, ldap2scim_binary, Daemon, Ldap2scim, Output};
#[allow(unused_imports)]
pub use samba::{ldif_base64, SambaDc, AD_BASE_DN};
#[allow(unused_imports)]
pub use scim::{
    all_scim_servers, scim_agent, scim_delete, scim_get, scim_list, scim_list_paged, scim_patch,
    scim_post, scim_request, scim_send, scim_try_request, BetterAuth, Scim2Server, ScimServer,
};
#[allow(unused_imports)]
pub use slapd::Slapd;
#[allow(unused_imports)]
pub use tinyproxy::Tinyproxy;
#[allow(unused_imports)]
pub use world::{change, changes_of, target_json, Target, World};

/// The repository root (the crate's manifest directory).
pub fn repo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Where `scripts/install-deps.sh` put the SCIM servers: `$LDAP2SCIM_DEPS`, else `<repo>/.deps`.
pub fn deps_dir() -> PathBuf {
    match std::env::var_os("LDAP2SCIM_DEPS") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => repo_dir().join(".deps"),
    }
}

/// A new temporary directory whose name starts with `prefix`.
///
/// Removed on drop, unless `LDAP2SCIM_TEST_KEEP` is set (then its path is printed).
pub fn temp_dir(prefix: &str) -> TempDir {
    let dir = tempfile::Builder::new()
        .prefix(&format!("ldap2scim-{prefix}-"))
        .tempdir()
        .expect("create a temporary directory");
    TempDir(Some(dir))
}

/// A temporary directory, see [`temp_dir`].
pub struct TempDir(Option<tempfile::TempDir>);

impl TempDir {
    /// The directory's path.
    pub fn path(&self) -> &Path {
        self.0.as_ref().expect("temporary directory present").path()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            if std::env::var_os("LDAP2SCIM_TEST_KEEP").is_some() {
                eprintln!("keeping {}", dir.keep().display());
            }
        }
    }
}

/// A random number, different on every call, in every thread and every process.
pub fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_u32(std::process::id());
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    hasher.write_u128(now.as_nanos());
    hasher.finish()
}

/// A random secret of 32 hex digits, e.g. a bearer token.
pub fn random_token() -> String {
    format!("{:016x}{:016x}", random_u64(), random_u64())
}

/// A loopback TCP port in 20000–31999 (below the kernel's ephemeral range) that nobody was
/// listening on when checked, and that this process has not handed out before.
///
/// Another process may still take it before the server binds it: server starts retry on
/// other ports when that happens.
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    loop {
        let port = 20000 + (random_u64() % 12000) as u16;
        let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        let handed_out = handed_out.get_or_insert_with(HashSet::new);
        if handed_out.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed_out.insert(port);
            return port;
        }
    }
}

/// How many times a server start is tried on fresh ports before the test fails.
pub(crate) const START_ATTEMPTS: usize = 5;

/// Polls `condition` every 20 ms until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `s` as a TOML basic string, quoted and escaped.
pub fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A plain HTTP/1.1 GET to `127.0.0.1:port` (the daemon's `/metrics`, `/readyz`): (status,
/// body); status 0 when nothing answers.
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    );
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}
