//! Issue 6, packaging: the systemd unit passes `systemd-analyze verify` and rates "OK" or
//! better in `systemd-analyze security` (exposure ≤ 2.5); `cargo deb` builds a package that,
//! unpacked into a scratch root, holds the binary, the unit, the example configuration (also
//! as the conffile /etc/ldap2scim/config.toml) and the man pages.
//!
//! Each test is skipped, with a note on stderr, where its tool is missing (scripts/test.sh
//! installs both: the `systemd` apt package and `cargo install cargo-deb`).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::*;

fn have(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn run(command: &mut Command) -> String {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{command:?} failed:\n{text}");
    text
}

fn unit_file() -> PathBuf {
    repo_dir().join("systemd/ldap2scim.service")
}

#[test]
fn the_unit_passes_systemd_analyze_verify_and_security() {
    if !have("systemd-analyze", "--version") {
        eprintln!("SKIPPED: systemd-analyze is not installed (apt-get install systemd)");
        return;
    }
    // verify checks that ExecStart exists: point it at the binary under test, in a copy
    // with the same unit name. Man pages are checked by the package test, not here.
    let dir = temp_dir("unit");
    let unit = std::fs::read_to_string(unit_file()).unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/ldap2scim "));
    let copy = dir.path().join("ldap2scim.service");
    std::fs::write(
        &copy,
        unit.replace("/usr/bin/ldap2scim", &ldap2scim_binary().to_string_lossy()),
    )
    .unwrap();
    let verify = run(Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&copy));
    assert!(
        verify.trim().is_empty(),
        "systemd-analyze verify warns:\n{verify}"
    );

    let security = run(Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&copy));
    let line = security
        .lines()
        .find(|l| l.contains("Overall exposure level for ldap2scim.service"))
        .unwrap_or_else(|| panic!("no exposure level:\n{security}"));
    let score: f64 = line
        .rsplit(':')
        .next()
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the score in {line:?}"));
    eprintln!("systemd-analyze security: {}", line.trim());
    assert!(
        score <= 2.5,
        "exposure {score} is worse than OK (2.5):\n{security}"
    );

    for key in [
        "Type=notify",
        "DynamicUser=yes",
        "StateDirectory=ldap2scim",
        "ConfigurationDirectory=ldap2scim",
        "WatchdogSec=",
        "LoadCredential=",
        "/run/credentials/ldap2scim.service/",
    ] {
        assert!(unit.contains(key), "the unit lacks {key}");
    }
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_dir().join("target"))
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

#[test]
fn cargo_deb_builds_a_package_with_the_binary_unit_config_and_man_pages() {
    if !have("cargo-deb", "--version") || !have("dpkg-deb", "--version") {
        eprintln!(
            "SKIPPED: cargo-deb or dpkg-deb is not installed (cargo install cargo-deb --locked)"
        );
        return;
    }
    let out = temp_dir("deb");
    let deb = out.path().join("ldap2scim.deb");
    run(Command::new("cargo")
        .current_dir(repo_dir())
        .env("CARGO_TARGET_DIR", target_dir())
        .args(["deb", "--quiet", "--output"])
        .arg(&deb));
    let root = out.path().join("root");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root));

    let bin = root.join("usr/bin/ldap2scim");
    assert_eq!(mode(&bin), 0o755);
    let version = run(Command::new(&bin).arg("--version"));
    assert!(version.starts_with("ldap2scim "), "{version}");
    assert_eq!(
        std::fs::read_to_string(root.join("lib/systemd/system/ldap2scim.service")).unwrap(),
        std::fs::read_to_string(unit_file()).unwrap()
    );
    let example = std::fs::read_to_string(repo_dir().join("config.example.toml")).unwrap();
    for conf in [
        "usr/share/doc/ldap2scim/config.example.toml",
        "etc/ldap2scim/config.toml",
    ] {
        assert_eq!(
            std::fs::read_to_string(root.join(conf)).unwrap(),
            example,
            "{conf}"
        );
    }
    // Readable by the service's dynamic user; it holds no secret.
    assert_eq!(mode(&root.join("etc/ldap2scim/config.toml")), 0o644);
    assert!(root
        .join("usr/share/doc/ldap2scim/examples/targets.d/example-app.toml")
        .is_file());
    for (shipped, source) in [
        (
            "usr/share/ldap2scim/prometheus/ldap2scim.rules.yml",
            "contrib/prometheus/ldap2scim.rules.yml",
        ),
        (
            "usr/share/ldap2scim/prometheus/ldap2scim.rules.test.yml",
            "contrib/prometheus/ldap2scim.rules.test.yml",
        ),
        (
            "usr/share/ldap2scim/grafana/ldap2scim.json",
            "contrib/grafana/ldap2scim.json",
        ),
    ] {
        assert_eq!(
            std::fs::read(root.join(shipped)).unwrap(),
            std::fs::read(repo_dir().join(source)).unwrap(),
            "{shipped}"
        );
    }

    let man_dir = root.join("usr/share/man/man1");
    let page = |name: &str| -> String {
        let plain = man_dir.join(name);
        if plain.is_file() {
            return std::fs::read_to_string(plain).unwrap();
        }
        run(Command::new("gzip")
            .arg("-dc")
            .arg(man_dir.join(format!("{name}.gz"))))
    };
    let main = page("ldap2scim.1");
    assert!(main.contains(".TH ldap2scim"), "{main}");
    for command in [
        "run", "sync", "plan", "check", "status", "explain", "approve",
    ] {
        assert!(
            main.contains(command),
            "the man page does not list {command}"
        );
        let sub = page(&format!("ldap2scim-{command}.1"));
        assert!(sub.contains(".SH"), "ldap2scim-{command}.1 is empty");
    }
    assert!(page("ldap2scim-plan.1").contains("markdown"));

    let control = out.path().join("control");
    run(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control));
    let conffiles = std::fs::read_to_string(control.join("conffiles")).unwrap();
    assert!(
        conffiles.lines().any(|l| l == "/etc/ldap2scim/config.toml"),
        "{conffiles}"
    );
}

/// The shipped alerting rules pass their own `promtool test rules` cases (one firing and one
/// quiet evaluation per alert), and `promtool check rules`.
#[test]
fn the_prometheus_rules_pass_promtool() {
    assert!(
        have("promtool", "--version"),
        "promtool is not installed (scripts/install-deps.sh installs Debian's prometheus package)"
    );
    let dir = repo_dir().join("contrib/prometheus");
    let check = run(Command::new("promtool").current_dir(&dir).args([
        "check",
        "rules",
        "ldap2scim.rules.yml",
    ]));
    assert!(check.contains("SUCCESS: 12 rules found"), "{check}");
    let test = run(Command::new("promtool").current_dir(&dir).args([
        "test",
        "rules",
        "ldap2scim.rules.test.yml",
    ]));
    assert!(test.contains("SUCCESS"), "{test}");
}
