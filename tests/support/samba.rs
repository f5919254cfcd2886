//! A throwaway Samba Active Directory DC per test, each in a private network namespace.
//!
//! Samba's LDAP ports are fixed (389/636), so two DCs cannot share a network stack. A Samba
//! test therefore runs *itself* in a fresh network namespace: [`SambaDc::start_isolated`],
//! called first in the test, provisions (once per run, cached, see `scripts/samba.sh
//! template`) a template DC, then re-runs the same test binary, filtered to this one test,
//! under `unshare --net` with only `lo` up. In there the test copies the template, starts
//! Samba on 127.0.0.1:389/636, and starts everything else it needs (scim2-server, ldap2scim)
//! the usual way: all of it shares that namespace's loopback, and nothing in it can reach
//! any other address, because the namespace has no other interface. The namespace disappears
//! with its last process; Samba is stopped by PID when the handle drops.
//!
//! When namespaces are not permitted (not root) or Samba is not installed, the test prints
//! why and passes without running; `scripts/install-deps.sh` installs Samba, so CI runs them.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::{repo_dir, temp_dir, Process, TempDir};

/// The domain's base DN.
pub const AD_BASE_DN: &str = "DC=example,DC=org";

/// Set (to the test's name) in the re-run child that lives in the private namespace.
const IN_NETNS_ENV: &str = "LDAP2SCIM_TEST_SAMBA_NETNS";
/// The template the parent provisioned, handed to the child.
const TEMPLATE_ENV: &str = "LDAP2SCIM_TEST_SAMBA_TEMPLATE";
/// How long Samba may take to answer after it was spawned.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the re-run test may take.
const CHILD_TIMEOUT: Duration = Duration::from_secs(900);
const ADMIN_PW: &str = "Passw0rd!Passw0rd";

/// A running Samba AD DC on 127.0.0.1 in this test's private network namespace.
///
/// Realm EXAMPLE.ORG, base `DC=example,DC=org`, `Administrator@example.org` / `Passw0rd!Passw0rd`,
/// password complexity off. Only the LDAP service runs: 389 (simple binds allowed) and 636
/// (LDAPS with the CA in [`SambaDc::ca_file`]).
pub struct SambaDc {
    // Field order matters: the process stops before its directory is removed.
    process: Process,
    dir: TempDir,
}

impl SambaDc {
    /// Call first in a Samba test, with the test function's name:
    ///
    /// ```ignore
    /// let Some(dc) = SambaDc::start_isolated("ad_sync_end_to_end") else { return };
    /// ```
    ///
    /// In the test's own process it returns `None` after re-running the test in a fresh
    /// network namespace and asserting that it passed there (or after printing why it cannot,
    /// which skips the test); in that re-run it returns the started DC.
    pub fn start_isolated(test: &str) -> Option<SambaDc> {
        if let Ok(inside) = std::env::var(IN_NETNS_ENV) {
            assert_eq!(inside, test, "{IN_NETNS_ENV} names another test");
            let template = std::env::var(TEMPLATE_ENV).expect("template path from the parent");
            return Some(SambaDc::start(Path::new(&template)));
        }
        if let Some(reason) = unavailable() {
            println!("SKIPPED {test}: {reason}");
            eprintln!("SKIPPED {test}: {reason}");
            return None;
        }
        let template = template();
        run_in_private_netns(test, &template);
        None
    }

    fn start(template: &Path) -> SambaDc {
        let started = Instant::now();
        let dir = temp_dir("samba");
        let dc = dir.path().join("dc");
        let out = Command::new(repo_dir().join("scripts/samba.sh"))
            .arg("init")
            .arg(&dc)
            .arg(template)
            .output()
            .expect("run scripts/samba.sh init");
        assert!(
            out.status.success(),
            "scripts/samba.sh init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // -i: foreground, so the child is samba itself; -M single: one process;
        // --no-process-group: our signals reach samba only; --maximum-runtime: it cannot
        // outlive a test that was killed.
        let mut cmd = Command::new(sbin("samba"));
        cmd.args(["-i", "-M", "single", "--no-process-group", "-s"])
            .arg(dc.join("etc/smb.conf"))
            .arg(format!("--maximum-runtime={}", CHILD_TIMEOUT.as_secs()))
            .env("KRB5_CONFIG", dc.join("krb5.conf"));
        let process = Process::spawn("samba", &mut cmd, &dc.join("log/samba.out"));
        let mut samba = SambaDc { process, dir };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if samba.answers() {
                break;
            }
            if !samba.process.is_running() || Instant::now() > deadline {
                panic!("samba did not start; its output:\n{}", samba.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("samba ready in {:?}", started.elapsed());
        samba
    }

    fn answers(&self) -> bool {
        Command::new("ldapsearch")
            .args([
                "-x",
                "-LLL",
                "-H",
                "ldap://127.0.0.1",
                "-s",
                "base",
                "-b",
                "",
            ])
            .arg("dnsHostName")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// `ldap://127.0.0.1` (port 389; simple binds allowed).
    pub fn ldap_url(&self) -> &'static str {
        "ldap://127.0.0.1"
    }

    /// `ldaps://127.0.0.1` (port 636).
    pub fn ldaps_url(&self) -> &'static str {
        "ldaps://127.0.0.1"
    }

    /// The PEM file of the CA that signed the DC's certificate (127.0.0.1, localhost).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("dc/tls/ca.pem")
    }

    /// `Administrator@example.org`.
    pub fn admin_dn(&self) -> &'static str {
        "Administrator@example.org"
    }

    /// The Administrator's password.
    pub fn admin_pw(&self) -> &'static str {
        ADMIN_PW
    }

    /// The samba process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// What samba printed so far.
    pub fn log(&self) -> String {
        self.process.log()
    }

    /// Adds the entries of an LDIF as Administrator over LDAPS (`unicodePwd` needs TLS).
    /// Panics with ldapadd's output on failure.
    pub fn add(&self, ldif: &str) {
        self.tool("ldapadd", &[], ldif);
    }

    /// Applies an LDIF of changes (`changetype: modify | delete | …`) as Administrator.
    pub fn modify(&self, ldif: &str) {
        self.tool("ldapmodify", &[], ldif);
    }

    /// Searches as Administrator (`ldapsearch -LLL`, no wrapping) and returns the LDIF; binary
    /// or non-ASCII values come back base64-encoded (`objectGUID:: …`).
    pub fn search(&self, base: &str, filter: &str, attrs: &[&str]) -> String {
        let mut args = vec!["-LLL", "-o", "ldif-wrap=no", "-b", base, filter];
        args.extend_from_slice(attrs);
        self.tool("ldapsearch", &args, "")
    }

    fn tool(&self, tool: &str, args: &[&str], stdin: &str) -> String {
        let mut child = Command::new(tool)
            .env("LDAPTLS_CACERT", self.ca_file())
            .env("LDAPTLS_REQCERT", "demand")
            .args(["-x", "-H", self.ldaps_url(), "-D", self.admin_dn(), "-w"])
            .arg(ADMIN_PW)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {tool}: {e}"));
        // Feed stdin from another thread: ldapadd answers every entry on stdout meanwhile.
        let mut pipe = child.stdin.take().expect("stdin piped");
        let input = stdin.to_string();
        let writer = std::thread::spawn(move || pipe.write_all(input.as_bytes()));
        let out = child.wait_with_output().expect("wait for LDAP tool");
        writer
            .join()
            .expect("LDIF writer thread")
            .unwrap_or_else(|e| panic!("write LDIF to {tool}: {e}"));
        if !out.status.success() {
            let head: String = stdin.chars().take(2000).collect();
            panic!(
                "{tool} failed ({}): {}{}\ninput (start):\n{head}",
                out.status,
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// Why Samba tests cannot run here, if they cannot.
fn unavailable() -> Option<String> {
    for tool in ["samba", "samba-tool"] {
        if !sbin(tool).exists() && !on_path(tool) {
            return Some(format!(
                "{tool} is not installed (scripts/install-deps.sh installs samba)"
            ));
        }
    }
    for tool in ["unshare", "ip", "ldapsearch", "flock"] {
        if !on_path(tool) && !sbin(tool).exists() {
            return Some(format!("{tool} is not installed"));
        }
    }
    let netns = Command::new("unshare")
        .args(["--net", "--", "ip", "link", "set", "lo", "up"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output();
    match netns {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!(
            "cannot create a network namespace (needs root or CAP_SYS_ADMIN): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Some(format!("cannot run unshare: {e}")),
    }
}

/// The provisioned template: once per test process (OnceLock), and once per samba version and
/// `scripts/samba.sh` version across processes (the script caches it under cargo's
/// `CARGO_TARGET_TMPDIR`, behind a file lock).
fn template() -> PathBuf {
    static TEMPLATE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    TEMPLATE
        .get_or_init(|| {
            let started = Instant::now();
            let out = Command::new(repo_dir().join("scripts/samba.sh"))
                .arg("template")
                .arg(env!("CARGO_TARGET_TMPDIR"))
                .output()
                .map_err(|e| format!("run scripts/samba.sh template: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "scripts/samba.sh template failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
            eprintln!("samba template {path} ready in {:?}", started.elapsed());
            Ok(PathBuf::from(path))
        })
        .clone()
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Re-runs `test` of this test binary in a new network namespace with only `lo` (up), and
/// fails unless it ran there and passed.
fn run_in_private_netns(test: &str, template: &Path) {
    let exe = std::env::current_exe().expect("path of the test binary");
    let dir = temp_dir("netns-run");
    let log = dir.path().join("output");
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--net",
        "--",
        "sh",
        "-c",
        "ip link set lo up && exec \"$@\"",
        "sh",
    ])
    .arg(&exe)
    .args([test, "--exact", "--nocapture", "--test-threads=1"])
    .env(IN_NETNS_ENV, test)
    .env(TEMPLATE_ENV, template);
    let started = Instant::now();
    let mut child = Process::spawn("test in a network namespace", &mut cmd, &log);
    let status = child.wait_timeout(CHILD_TIMEOUT);
    if status.is_none() {
        child.kill();
    }
    let output = child.log();
    println!("--- {test}, run in a private network namespace ---\n{output}");
    let status = status.unwrap_or_else(|| {
        panic!("{test} ran longer than {CHILD_TIMEOUT:?} in its network namespace")
    });
    assert!(
        status.success(),
        "{test} failed in its network namespace ({status})"
    );
    assert!(
        output.contains("1 passed"),
        "{test} did not run in its network namespace (wrong test name?)"
    );
    eprintln!(
        "{test}: passed in a private network namespace in {:?}",
        started.elapsed()
    );
}

fn sbin(tool: &str) -> PathBuf {
    Path::new("/usr/sbin").join(tool)
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
}

/// Standard base64 (RFC 4648, with padding), e.g. for `unicodePwd::` in LDIF.
pub fn ldif_base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &b)| acc | (u32::from(b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
