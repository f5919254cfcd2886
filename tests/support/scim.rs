//! Two real SCIM 2.0 servers, one instance per test, and blocking SCIM client helpers.
//!
//! - [`Scim2Server`]: scim2-server (Python), the permissive reference implementation;
//! - [`BetterAuth`]: Better Auth's SCIM plugin (Node, SQLite), strict and limited (email
//!   required, `eq` filters only, at most 100 per page and 100 members per PATCH, rate limits).
//!
//! Both are installed by `scripts/install-deps.sh` under [`super::deps_dir`].

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{deps_dir, free_port, random_token, temp_dir, Process, TempDir, START_ATTEMPTS};

/// How long a SCIM server may take to answer after it was spawned.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A running SCIM server the tests can point ldap2scim at.
pub trait ScimServer: Send {
    /// A short name for messages and target files: `"scim2-server"` or `"betterauth"`.
    fn name(&self) -> &'static str;
    /// The SCIM base URL, without a trailing slash (`…/Users` is below it).
    fn base_url(&self) -> String;
    /// The bearer token it accepts.
    fn token(&self) -> &str;
    /// The server's process id.
    fn pid(&self) -> u32;
    /// What the server printed so far.
    fn log(&self) -> String;
}

/// Starts one instance of every SCIM server (in parallel), for tests that loop over them.
pub fn all_scim_servers() -> Vec<Box<dyn ScimServer>> {
    std::thread::scope(|scope| {
        let scim2 = scope.spawn(|| Box::new(Scim2Server::start()) as Box<dyn ScimServer>);
        let better_auth = scope.spawn(|| Box::new(BetterAuth::start()) as Box<dyn ScimServer>);
        vec![
            scim2.join().expect("start scim2-server"),
            better_auth.join().expect("start Better Auth"),
        ]
    })
}

/// scim2-server (PyPI `scim2-server`) on 127.0.0.1, in memory, with a random bearer token.
///
/// Its base URL ends in `/v2`, the prefix it uses itself in `meta.location` (it also answers
/// without it).
pub struct Scim2Server {
    process: Process,
    port: u16,
    token: String,
    _dir: TempDir,
}

impl Scim2Server {
    /// Starts a fresh, empty scim2-server; panics with its log if it does not come up.
    pub fn start() -> Scim2Server {
        Scim2Server::start_with(&[])
    }

    /// Like [`Scim2Server::start`], with extra command-line arguments (e.g.
    /// `--service-provider-config FILE`).
    pub fn start_with(extra_args: &[&str]) -> Scim2Server {
        let dir = temp_dir("scim2");
        let python = deps_dir().join("venv-scim2/bin/python");
        assert!(
            python.exists(),
            "{} is missing: run scripts/install-deps.sh",
            python.display()
        );
        let token = random_token();
        let log = dir.path().join("scim2-server.log");
        for _ in 0..START_ATTEMPTS {
            let port = free_port();
            let mut cmd = Command::new(&python);
            cmd.args([
                "-m",
                "scim2_server.testserver.cli",
                "--hostname",
                "127.0.0.1",
            ])
            .args(["--port", &port.to_string(), "--bearer-token", &token])
            .args(extra_args);
            let mut process = Process::spawn("scim2-server", &mut cmd, &log);
            let base = format!("http://127.0.0.1:{port}/v2");
            // The token is ours alone: a 200 cannot come from another test's server.
            if wait_ready(&mut process, || {
                scim_try(&base, &token, "/Users?count=1").is_some_and(|(s, _)| s == 200)
            }) {
                return Scim2Server {
                    process,
                    port,
                    token,
                    _dir: dir,
                };
            }
            process.kill();
        }
        panic!(
            "scim2-server did not start after {START_ATTEMPTS} attempts; its log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// Stops the server (SIGTERM, SIGKILL after 2 s) and waits for it.
    pub fn stop(&mut self) {
        self.process.terminate();
    }

    /// Kills the server with SIGKILL and waits for it.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl ScimServer for Scim2Server {
    fn name(&self) -> &'static str {
        "scim2-server"
    }
    fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}/v2", self.port)
    }
    fn token(&self) -> &str {
        &self.token
    }
    fn pid(&self) -> u32 {
        self.process.pid()
    }
    fn log(&self) -> String {
        self.process.log()
    }
}

/// Better Auth with its SCIM plugin (`tests/support/betterauth/server.mjs`, installed into
/// `.deps/betterauth`), on 127.0.0.1 with a SQLite file in its temporary directory.
pub struct BetterAuth {
    process: Process,
    port: u16,
    token: String,
    dir: TempDir,
}

impl BetterAuth {
    /// Starts a fresh Better Auth without rate limiting.
    pub fn start() -> BetterAuth {
        BetterAuth::start_with(None)
    }

    /// Starts a fresh Better Auth; `rate_limit` is `"WINDOW_SECONDS:MAX_REQUESTS"` (e.g. `"10:5"`),
    /// after which it answers 429 with an `X-Retry-After` header and a non-SCIM body.
    /// Better Auth counts requests per client IP and path.
    pub fn start_with(rate_limit: Option<&str>) -> BetterAuth {
        let dir = temp_dir("betterauth");
        let app = deps_dir().join("betterauth");
        let launcher = app.join("server.mjs");
        assert!(
            launcher.exists() && app.join("node_modules").exists(),
            "{} is missing: run scripts/install-deps.sh",
            launcher.display()
        );
        let token = random_token();
        let db = dir.path().join("ba.db");
        for attempt in 0..START_ATTEMPTS {
            let port = free_port();
            let log = dir.path().join(format!("betterauth-{attempt}.log"));
            let mut cmd = Command::new("node");
            cmd.arg(&launcher)
                .current_dir(&app)
                .env("PORT", port.to_string())
                .env("SCIM_TOKEN", &token)
                .env("DB", &db);
            match rate_limit {
                Some(limit) => cmd.env("RATE_LIMIT", limit),
                None => cmd.env_remove("RATE_LIMIT"),
            };
            let mut process = Process::spawn("betterauth", &mut cmd, &log);
            let base = format!("http://127.0.0.1:{port}/api/auth/scim/v2");
            // The launcher prints `ready PORT` once it listens (a taken port makes it exit).
            let ready_line = format!("ready {port}");
            if wait_ready(&mut process, || {
                std::fs::read_to_string(&log).is_ok_and(|l| l.contains(&ready_line))
                    && scim_try(&base, &token, "/ServiceProviderConfig")
                        .is_some_and(|(s, _)| s == 200)
            }) {
                return BetterAuth {
                    process,
                    port,
                    token,
                    dir,
                };
            }
            process.kill();
            let _ = std::fs::remove_file(&db);
        }
        let logs: Vec<String> = (0..START_ATTEMPTS)
            .map(|a| {
                std::fs::read_to_string(dir.path().join(format!("betterauth-{a}.log")))
                    .unwrap_or_default()
            })
            .collect();
        panic!(
            "Better Auth did not start after {START_ATTEMPTS} attempts; its logs:\n{}",
            logs.join("\n---\n")
        );
    }

    /// Stops the server (SIGTERM, SIGKILL after 2 s) and waits for it.
    pub fn stop(&mut self) {
        self.process.terminate();
    }

    /// Kills the server with SIGKILL and waits for it.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The SQLite database file.
    pub fn db_path(&self) -> std::path::PathBuf {
        self.dir.path().join("ba.db")
    }
}

impl ScimServer for BetterAuth {
    fn name(&self) -> &'static str {
        "betterauth"
    }
    fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}/api/auth/scim/v2", self.port)
    }
    fn token(&self) -> &str {
        &self.token
    }
    fn pid(&self) -> u32 {
        self.process.pid()
    }
    fn log(&self) -> String {
        self.process.log()
    }
}

/// Polls `ready` until it holds (true), the process exits or the timeout passes (false).
fn wait_ready(process: &mut Process, mut ready: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + READY_TIMEOUT;
    while Instant::now() < deadline {
        if !process.is_running() {
            return false;
        }
        if ready() {
            return process.is_running();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A ureq agent for the harness (keep-alive; statuses are answers, not errors).
pub fn scim_agent() -> ureq::Agent {
    agent()
}

/// Sends one request with a JSON body through `agent` (the load generator's keep-alive
/// connection); panics if the server cannot be reached.
pub fn scim_send(
    agent: &ureq::Agent,
    method: &str,
    base: &str,
    token: &str,
    path: &str,
    body: &Value,
) -> (u16, Value) {
    request(agent, method, base, token, path, Some(body))
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .new_agent()
}

/// The full URL of `path` (e.g. `/Users?count=1`) below `base`; refuses anything but loopback.
fn url(base: &str, path: &str) -> String {
    assert!(
        base.starts_with("http://127.0.0.1:") || base.starts_with("http://localhost:"),
        "the harness only talks to loopback, not {base}"
    );
    if path.is_empty() || path.starts_with('/') || path.starts_with('?') {
        format!("{}{path}", base.trim_end_matches('/'))
    } else {
        format!("{}/{path}", base.trim_end_matches('/'))
    }
}

/// One request, or `None` if the server could not be reached.
fn scim_try(base: &str, token: &str, path: &str) -> Option<(u16, Value)> {
    request(&agent(), "GET", base, token, path, None).ok()
}

fn request(
    agent: &ureq::Agent,
    method: &str,
    base: &str,
    token: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<(u16, Value), ureq::Error> {
    let builder = ureq::http::Request::builder()
        .method(method)
        .uri(url(base, path))
        .header("Authorization", format!("Bearer {token}"))
        .header("Accept", "application/scim+json, application/json");
    let response = match body {
        Some(body) => agent.run(
            builder
                .header("Content-Type", "application/scim+json")
                .body(body.to_string())
                .expect("build request"),
        )?,
        None => agent.run(builder.body(()).expect("build request"))?,
    };
    let status = response.status().as_u16();
    let text = response.into_body().read_to_string()?;
    let value = if text.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    Ok((status, value))
}

/// Sends `method path` (path below the base, e.g. `/Users/ID`) with an optional JSON body and
/// returns the status and the body (`Null` if empty, a `String` if not JSON).
/// Panics if the server cannot be reached.
pub fn scim_request(
    method: &str,
    base: &str,
    token: &str,
    path: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    request(&agent(), method, base, token, path, body)
        .unwrap_or_else(|e| panic!("{method} {}: {e}", url(base, path)))
}

/// Like [`scim_request`], but returns an error instead of panicking when there is no HTTP
/// answer (connection refused, reset, closed without a response, timeout).
pub fn scim_try_request(
    method: &str,
    base: &str,
    token: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<(u16, Value), String> {
    request(&agent(), method, base, token, path, body).map_err(|e| e.to_string())
}

/// GETs `path` and returns the body; panics unless the status is 200.
pub fn scim_get(base: &str, token: &str, path: &str) -> Value {
    let (status, body) = scim_request("GET", base, token, path, None);
    assert_eq!(status, 200, "GET {path}: {body}");
    body
}

/// POSTs `body` to `path` (e.g. `/Users`); returns the status and the response body.
pub fn scim_post(base: &str, token: &str, path: &str, body: &Value) -> (u16, Value) {
    scim_request("POST", base, token, path, Some(body))
}

/// PATCHes `path` with `body` (a PatchOp); returns the status and the response body.
pub fn scim_patch(base: &str, token: &str, path: &str, body: &Value) -> (u16, Value) {
    scim_request("PATCH", base, token, path, Some(body))
}

/// DELETEs `path`; returns the status.
pub fn scim_delete(base: &str, token: &str, path: &str) -> u16 {
    scim_request("DELETE", base, token, path, None).0
}

/// Every resource of `kind` (`"Users"` or `"Groups"`), reading pages of 100 (Better Auth's
/// maximum) until `totalResults` are read.
pub fn scim_list(base: &str, token: &str, kind: &str) -> Vec<Value> {
    scim_list_paged(base, token, kind, 100)
}

/// Like [`scim_list`] with pages of `count` (scim2-server allows up to 1000). Advances by what
/// each page returned, so a server that caps `count` still gets read whole.
pub fn scim_list_paged(base: &str, token: &str, kind: &str, count: usize) -> Vec<Value> {
    let agent = agent();
    let mut all = Vec::new();
    loop {
        let path = format!("/{kind}?startIndex={}&count={count}", all.len() + 1);
        let (status, page) = request(&agent, "GET", base, token, &path, None)
            .unwrap_or_else(|e| panic!("GET {}: {e}", url(base, &path)));
        assert_eq!(status, 200, "GET {path}: {page}");
        let total = page["totalResults"].as_u64().unwrap_or(0) as usize;
        let resources = page["Resources"].as_array().cloned().unwrap_or_default();
        let got = resources.len();
        all.extend(resources);
        if got == 0 || all.len() >= total {
            return all;
        }
    }
}
