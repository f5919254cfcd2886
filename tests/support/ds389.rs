//! A throwaway 389 Directory Server per test (Debian's 389-ds-base, without systemd): the
//! second RFC 4533 server of the change feed, with its Retro Changelog and Content
//! Synchronization plugins on.
//!
//! `dscreate` wants systemd and listens on every address while it sets the instance up, so it
//! runs with a copy of `defaults.inf` saying `with_systemd = 0` and inside `unshare -n` (a
//! network namespace of its own); the instance then gets `nsslapd-listenhost: 127.0.0.1`
//! before it starts. Its files live where 389-DS keeps them (`/etc/dirsrv/slapd-NAME`,
//! `/var/lib/dirsrv/slapd-NAME`, `/var/log/dirsrv/slapd-NAME`) and are removed with
//! `dsctl NAME remove` when dropped.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, random_u64, temp_dir, Process, TempDir, BASE_DN};

/// The Directory Manager's password.
pub const DS389_PASSWORD: &str = "Secret123!";

/// A running 389-DS instance on 127.0.0.1 with the suffix `dc=example,dc=org`, `ou=people`
/// and `ou=groups`; stopped and removed when dropped.
pub struct Ds389 {
    process: Option<Process>,
    name: String,
    port: u16,
    work: TempDir,
}

impl Ds389 {
    /// Creates and starts an instance; panics with what went wrong if it cannot.
    pub fn start() -> Ds389 {
        let work = temp_dir("ds389");
        let name = format!("l2s{:08x}", random_u64() as u32);
        let port = free_port();
        let inf_dir = work.path().join("prefix/share/dirsrv/inf");
        std::fs::create_dir_all(&inf_dir).expect("create the dirsrv prefix");
        let defaults = std::fs::read_to_string("/usr/share/dirsrv/inf/defaults.inf")
            .expect("389-ds-base is installed (scripts/install-deps.sh)");
        std::fs::write(
            inf_dir.join("defaults.inf"),
            defaults.replace("with_systemd = 1", "with_systemd = 0"),
        )
        .expect("write defaults.inf");
        let inf = work.path().join("instance.inf");
        std::fs::write(
            &inf,
            format!(
                "[general]\nfull_machine_name = localhost\nstart = False\nstrict_host_checking = False\n\
                 [slapd]\ninstance_name = {name}\nport = {port}\nroot_password = {DS389_PASSWORD}\nself_sign_cert = False\n\
                 [backend-userroot]\nsample_entries = no\nsuffix = {BASE_DN}\ncreate_suffix_entry = True\n"
            ),
        )
        .expect("write instance.inf");
        let mut ds = Ds389 {
            process: None,
            name,
            port,
            work,
        };
        let created = Command::new("unshare")
            .args(["-n", "bash", "-c"])
            .arg(format!(
                "ip link set lo up; dscreate from-file '{}'",
                inf.display()
            ))
            .env("PREFIX", ds.prefix())
            .output()
            .expect("run dscreate");
        assert!(
            created.status.success(),
            "dscreate failed: {}{}",
            String::from_utf8_lossy(&created.stdout),
            String::from_utf8_lossy(&created.stderr)
        );
        let dse = ds.config_dir().join("dse.ldif");
        let text = std::fs::read_to_string(&dse).expect("read dse.ldif");
        let text = text.replacen(
            "nsslapd-port:",
            "nsslapd-listenhost: 127.0.0.1\nnsslapd-port:",
            1,
        );
        std::fs::write(&dse, text).expect("write dse.ldif");
        ds.run();
        ds.modify(&format!(
            "dn: cn=Retro Changelog Plugin,cn=plugins,cn=config\nchangetype: modify\n\
             replace: nsslapd-pluginEnabled\nnsslapd-pluginEnabled: on\n-\n\
             replace: nsslapd-attribute\nnsslapd-attribute: nsuniqueid:targetUniqueId\n-\n\
             replace: nsslapd-include-suffix\nnsslapd-include-suffix: {BASE_DN}\n\n\
             dn: cn=Content Synchronization,cn=plugins,cn=config\nchangetype: modify\n\
             replace: nsslapd-pluginEnabled\nnsslapd-pluginEnabled: on\n"
        ));
        // Plugins start with the server.
        ds.stop();
        ds.run();
        ds.add(&format!(
            "dn: ou=people,{BASE_DN}\nobjectClass: organizationalUnit\nou: people\n\n\
             dn: ou=groups,{BASE_DN}\nobjectClass: organizationalUnit\nou: groups\n"
        ));
        ds
    }

    fn prefix(&self) -> PathBuf {
        self.work.path().join("prefix")
    }

    fn config_dir(&self) -> PathBuf {
        PathBuf::from(format!("/etc/dirsrv/slapd-{}", self.name))
    }

    fn run(&mut self) {
        let _ = std::fs::create_dir_all("/run/dirsrv");
        let mut cmd = Command::new("ns-slapd");
        cmd.arg("-D")
            .arg(self.config_dir())
            .arg("-i")
            .arg(format!("/run/dirsrv/slapd-{}.pid", self.name))
            .args(["-d", "0"]);
        let log = self.work.path().join("ns-slapd.log");
        let mut process = Process::spawn("ns-slapd", &mut cmd, &log);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let up = Command::new("ldapsearch")
                .args(["-x", "-LLL", "-H", &self.url(), "-s", "base", "-b", ""])
                .arg("vendorVersion")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if up {
                break;
            }
            assert!(
                process.is_running() && Instant::now() < deadline,
                "ns-slapd did not start: {}",
                process.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.process = Some(process);
    }

    /// Stops the server (it can be started again with [`Ds389::start_again`]).
    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.terminate();
        }
    }

    pub fn start_again(&mut self) {
        self.stop();
        self.run();
    }

    /// `ldap://127.0.0.1:PORT` (no TLS: loopback only).
    pub fn url(&self) -> String {
        format!("ldap://127.0.0.1:{}", self.port)
    }

    pub fn bind_dn(&self) -> &'static str {
        "cn=Directory Manager"
    }

    /// Applies an LDIF of changes as the Directory Manager.
    pub fn modify(&self, ldif: &str) {
        self.tool("ldapmodify", &[], ldif);
    }

    /// Adds entries (no changetype needed) as the Directory Manager.
    pub fn add(&self, ldif: &str) {
        self.tool("ldapmodify", &["-a"], ldif);
    }

    pub fn delete(&self, dn: &str) {
        self.tool("ldapdelete", &[dn], "");
    }

    fn tool(&self, tool: &str, args: &[&str], input: &str) {
        let mut child = Command::new(tool)
            .args([
                "-x",
                "-H",
                &self.url(),
                "-D",
                self.bind_dn(),
                "-w",
                DS389_PASSWORD,
            ])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {tool}: {e}"));
        let mut pipe = child.stdin.take().expect("stdin");
        let text = input.to_string();
        let writer = std::thread::spawn(move || pipe.write_all(text.as_bytes()));
        let out = child.wait_with_output().expect("wait for the LDAP tool");
        let _ = writer.join();
        assert!(
            out.status.success(),
            "{tool} failed: {}{}\ninput:\n{input}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

impl Drop for Ds389 {
    fn drop(&mut self) {
        self.stop();
        let _ = Command::new("dsctl")
            .args([self.name.as_str(), "remove", "--do-it"])
            .env("PREFIX", self.prefix())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
