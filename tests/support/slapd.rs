//! A throwaway OpenLDAP slapd per test, in its own temporary directory.
//!
//! The directory layout, TLS material and cn=config come from `scripts/slapd.sh init` (the
//! same script the demo uses); this module starts slapd itself, as its own child process, on
//! random loopback ports, and seeds it.

use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, repo_dir, temp_dir, Process, TempDir, BASE_DN, START_ATTEMPTS};

/// How long slapd may take to answer after it was spawned.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// A running OpenLDAP slapd on 127.0.0.1; stopped and removed when dropped.
///
/// Suffix `dc=example,dc=org` with `ou=people` and `ou=groups`; root DN
/// `cn=admin,dc=example,dc=org` / `secret`; a read-only service account (see [`Slapd::bind_dn`]);
/// the memberof (with refint) and syncprov overlays; no size limit. It listens on plain LDAP
/// (StartTLS available), LDAPS, and an ldapi socket where the harness itself is root through
/// SASL EXTERNAL.
pub struct Slapd {
    // Field order matters: the process stops before its directory is removed.
    process: Process,
    port: u16,
    tls_port: u16,
    dir: TempDir,
}

impl Slapd {
    /// Starts an empty directory (the base entries only), then adds `seed_ldif` online over
    /// ldapi, so that the memberof overlay fills `memberOf`: the seed must not contain it.
    ///
    /// Panics, with slapd's log, if slapd does not start or the seed is refused.
    pub fn start(seed_ldif: &str) -> Slapd {
        let slapd = Slapd::launch(None);
        if !seed_ldif.trim().is_empty() {
            slapd.add(seed_ldif);
        }
        slapd
    }

    /// Loads `seed_ldif` with `slapadd -q -w` before starting: much faster for big directories
    /// (see [`super::bulk_directory`]), but overlays do not run under slapadd, so the seed must
    /// carry its own `memberOf` values.
    pub fn start_bulk(seed_ldif: &str) -> Slapd {
        Slapd::launch(Some(seed_ldif))
    }

    fn launch(bulk_seed: Option<&str>) -> Slapd {
        let mut dir = temp_dir("slapd");
        let mut init = Command::new(repo_dir().join("scripts/slapd.sh"));
        init.arg("init").arg(dir.path());
        if let Some(seed) = bulk_seed {
            let seed_path = dir.path().join("seed.ldif");
            std::fs::write(&seed_path, seed).expect("write seed.ldif");
            init.arg(&seed_path);
        }
        let out = init.output().expect("run scripts/slapd.sh init");
        assert!(
            out.status.success(),
            "scripts/slapd.sh init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for _ in 0..START_ATTEMPTS {
            let port = free_port();
            let tls_port = free_port();
            let process = spawn_slapd(dir.path(), port, tls_port);
            let mut slapd = Slapd {
                process,
                port,
                tls_port,
                dir,
            };
            if slapd.wait_ready() {
                return slapd;
            }
            // With -d 0 slapd exits silently when a port is taken: try other ports.
            slapd.process.kill();
            dir = std::mem::replace(&mut slapd.dir, TempDir(None));
        }
        let log = std::fs::read_to_string(dir.path().join("slapd.log")).unwrap_or_default();
        panic!("slapd did not start after {START_ATTEMPTS} attempts; its log:\n{log}");
    }

    /// Polls until slapd answers on the ldapi socket and both TCP ports; false if it exited or
    /// did not answer in time.
    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline {
            if !self.process.is_running() {
                return false;
            }
            // The socket is ours alone, and slapd binds every listener before serving any, so an
            // answer here means both TCP ports are ours too.
            let answered = Command::new("ldapsearch")
                .args(["-Q", "-Y", "EXTERNAL", "-LLL", "-H", &self.ldapi_url()])
                .args(["-s", "base", "-b", "", "namingContexts"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if answered {
                return [self.port, self.tls_port]
                    .iter()
                    .all(|port| TcpStream::connect(("127.0.0.1", *port)).is_ok());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// `ldap://127.0.0.1:PORT` (StartTLS available).
    pub fn ldap_url(&self) -> String {
        format!("ldap://127.0.0.1:{}", self.port)
    }

    /// `ldaps://127.0.0.1:PORT`.
    pub fn ldaps_url(&self) -> String {
        format!("ldaps://127.0.0.1:{}", self.tls_port)
    }

    /// The ldapi URL of its Unix socket (root with `-Y EXTERNAL`).
    pub fn ldapi_url(&self) -> String {
        let socket = self.dir.path().join("ldapi");
        format!("ldapi://{}", socket.to_string_lossy().replace('/', "%2F"))
    }

    /// The plain LDAP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The LDAPS port.
    pub fn tls_port(&self) -> u16 {
        self.tls_port
    }

    /// The PEM file of the CA that signed the server certificate (localhost, 127.0.0.1, ::1).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("tls/ca.pem")
    }

    /// The read-only service account: `cn=sync,dc=example,dc=org`.
    pub fn bind_dn(&self) -> &'static str {
        "cn=sync,dc=example,dc=org"
    }

    /// The service account's password: `syncpw`.
    pub fn bind_pw(&self) -> &'static str {
        "syncpw"
    }

    /// The root DN: `cn=admin,dc=example,dc=org`.
    pub fn admin_dn(&self) -> &'static str {
        "cn=admin,dc=example,dc=org"
    }

    /// The root DN's password: `secret`.
    pub fn admin_pw(&self) -> &'static str {
        "secret"
    }

    /// The suffix: `dc=example,dc=org`.
    pub fn base_dn(&self) -> &'static str {
        BASE_DN
    }

    /// The slapd process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Its temporary directory (config, data, TLS material, log, socket).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// What slapd logged (little: it runs with `-d 0`).
    pub fn log(&self) -> String {
        self.process.log()
    }

    /// Whether slapd is still running.
    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// Applies an LDIF of changes as root over ldapi (`ldapmodify -Y EXTERNAL`); records may use
    /// `changetype: add | modify | delete | modrdn`. Panics with ldapmodify's stderr on failure.
    pub fn modify(&self, ldif: &str) {
        self.ldap_tool("ldapmodify", &[], Some(ldif));
    }

    /// Adds the entries of an LDIF (no `changetype` needed) as root over ldapi.
    pub fn add(&self, ldif: &str) {
        self.ldap_tool("ldapmodify", &["-a"], Some(ldif));
    }

    /// Adds the entries of an LDIF as root over ldapi with the Relax Rules control
    /// (`ldapadd -e relax`), which lets a seed set operational attributes such as `entryUUID`
    /// (e.g. two entries with one id, as a botched restore leaves them).
    pub fn add_relaxed(&self, ldif: &str) {
        self.ldap_tool("ldapmodify", &["-a", "-e", "relax"], Some(ldif));
    }

    /// Applies an LDIF of changes as root over ldapi with the Relax Rules control, which lets
    /// it rewrite operational attributes such as `entryUUID`.
    pub fn modify_relaxed(&self, ldif: &str) {
        self.ldap_tool("ldapmodify", &["-e", "relax"], Some(ldif));
    }

    /// The `entryUUID` of one entry.
    pub fn entry_uuid(&self, dn: &str) -> String {
        let ldif = self.ldap_tool(
            "ldapsearch",
            &[
                "-LLL",
                "-s",
                "base",
                "-b",
                dn,
                "(objectClass=*)",
                "entryUUID",
            ],
            None,
        );
        ldif.lines()
            .find_map(|l| l.strip_prefix("entryUUID: "))
            .unwrap_or_else(|| panic!("no entryUUID for {dn}: {ldif}"))
            .trim()
            .to_string()
    }

    /// From now on a simple bind needs a protected connection (`olcSecurity:
    /// simple_bind=128` on cn=config): one in cleartext fails with confidentialityRequired (13),
    /// so a bind that succeeds proves TLS (LDAPS or StartTLS) was in use.
    pub fn require_tls_for_simple_bind(&self) {
        self.modify(
            "dn: cn=config\nchangetype: modify\nadd: olcSecurity\nolcSecurity: simple_bind=128\n",
        );
    }

    /// Deletes one entry as root over ldapi.
    pub fn delete(&self, dn: &str) {
        self.ldap_tool("ldapdelete", &[dn], None);
    }

    /// Searches as root over ldapi (`ldapsearch -LLL`, no line wrapping) and returns the LDIF.
    /// `attrs` may include `+` for operational attributes (memberOf, entryUUID…). Values that are
    /// not plain ASCII come back base64-encoded (`cn:: …`), as LDIF wants.
    pub fn search(&self, base: &str, filter: &str, attrs: &[&str]) -> String {
        let mut args = vec!["-LLL", "-o", "ldif-wrap=no", "-b", base, filter];
        args.extend_from_slice(attrs);
        self.ldap_tool("ldapsearch", &args, None)
    }

    /// Runs `ldapsearch` as the service account over StartTLS, verifying the server certificate
    /// with [`Slapd::ca_file`], optionally with the paged-results control (`-E pr=N/noprompt`).
    /// Returns the full output; panics on failure.
    pub fn sync_search(
        &self,
        base: &str,
        filter: &str,
        attrs: &[&str],
        page_size: Option<u32>,
    ) -> String {
        let mut cmd = Command::new("ldapsearch");
        cmd.env("LDAPTLS_CACERT", self.ca_file())
            .env("LDAPTLS_REQCERT", "demand")
            .args([
                "-ZZ",
                "-x",
                "-LLL",
                "-o",
                "ldif-wrap=no",
                "-H",
                &self.ldap_url(),
            ])
            .args(["-D", self.bind_dn(), "-w", self.bind_pw(), "-b", base]);
        if let Some(size) = page_size {
            cmd.args(["-E", &format!("pr={size}/noprompt")]);
        }
        cmd.arg(filter).args(attrs);
        let out = cmd.output().expect("run ldapsearch");
        check_tool("ldapsearch (StartTLS, sync account)", &out, None);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn ldap_tool(&self, tool: &str, args: &[&str], stdin: Option<&str>) -> String {
        let mut child = Command::new(tool)
            .args(["-Q", "-Y", "EXTERNAL", "-H", &self.ldapi_url()])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {tool}: {e}"));
        // Feed stdin from another thread: a large LDIF fills the stdout pipe ("adding new
        // entry …") while we are still writing, and both sides would wait forever.
        let mut pipe = child.stdin.take().expect("stdin piped");
        let input = stdin.unwrap_or_default().to_string();
        let writer = std::thread::spawn(move || pipe.write_all(input.as_bytes()));
        let out = child.wait_with_output().expect("wait for LDAP tool");
        writer
            .join()
            .expect("LDIF writer thread")
            .unwrap_or_else(|e| panic!("write LDIF to {tool}: {e}"));
        check_tool(tool, &out, stdin);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Stops slapd (SIGTERM, SIGKILL after 2 s) and waits for it; the directory stays until drop.
    pub fn stop(&mut self) {
        self.process.terminate();
    }

    /// Kills slapd with SIGKILL (for failure tests) and waits for it.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts slapd again, after [`Slapd::stop`] or [`Slapd::kill`], on the same ports and with
    /// the same data. Panics if it does not come back (e.g. another process took a port).
    pub fn start_again(&mut self) {
        self.process.terminate();
        self.process = spawn_slapd(self.dir.path(), self.port, self.tls_port);
        if !self.wait_ready() {
            panic!("slapd did not start again; its log:\n{}", self.log());
        }
    }
}

fn spawn_slapd(dir: &Path, port: u16, tls_port: u16) -> Process {
    let socket = dir.join("ldapi").to_string_lossy().replace('/', "%2F");
    let urls = format!("ldap://127.0.0.1:{port}/ ldaps://127.0.0.1:{tls_port}/ ldapi://{socket}");
    // -d 0 keeps slapd in the foreground, so the child is slapd itself (no fork).
    let mut cmd = Command::new(slapd_binary());
    cmd.args(["-d", "0", "-F"])
        .arg(dir.join("slapd.d"))
        .args(["-h", &urls]);
    Process::spawn("slapd", &mut cmd, &dir.join("slapd.log"))
}

/// `slapd` lives in /usr/sbin, which is not on every PATH.
fn slapd_binary() -> PathBuf {
    let sbin = Path::new("/usr/sbin/slapd");
    if sbin.exists() {
        sbin.to_path_buf()
    } else {
        PathBuf::from("slapd")
    }
}

fn check_tool(tool: &str, out: &Output, input: Option<&str>) {
    if !out.status.success() {
        panic!(
            "{tool} failed ({}): {}{}\ninput:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout),
            input.unwrap_or("")
        );
    }
}
