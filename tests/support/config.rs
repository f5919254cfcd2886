//! ldap2scim configuration files for tests, and LDIF builders for directory seeds.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::{temp_dir, toml_str, Slapd, TempDir};

/// The suffix of every test directory.
pub const BASE_DN: &str = "dc=example,dc=org";

/// The main configuration file and the target files of one test, in a temporary directory.
///
/// The files are rewritten after every change, so [`TestConfig::path`] is always ready to use.
/// Layout: `config.toml`, `targets.d/NAME.toml`, secrets in `ldap.pw` and `NAME.token`, the
/// snapshot in `state/`.
pub struct TestConfig {
    dir: TempDir,
    /// `[section]` → ordered `key = value` lines; values are TOML.
    sections: Vec<(String, Vec<(String, String)>)>,
    main_extra: String,
}

impl TestConfig {
    /// A configuration reading `slapd` as its service account over StartTLS, with no target yet:
    ///
    /// ```toml
    /// [daemon]       state_dir = "<tmp>/state", targets_dir = "targets.d"
    /// [ldap]         url, starttls = true, ca_file, bind_dn, bind_password = { file = … }, page_size = 100
    /// [ldap.users]   base = "ou=people,…", filter = "(objectClass=inetOrgPerson)",
    ///                disabled_filter = "(employeeType=disabled)"
    /// [ldap.groups]  base = "ou=groups,…", filter = "(objectClass=groupOfNames)", nested = true
    /// ```
    pub fn new(slapd: &Slapd) -> TestConfig {
        TestConfig::for_directory(
            &slapd.ldap_url(),
            &slapd.ca_file(),
            slapd.bind_dn(),
            slapd.bind_pw(),
        )
    }

    /// Like [`TestConfig::new`] for any OpenLDAP-like directory at `url` (with StartTLS).
    pub fn for_directory(url: &str, ca_file: &Path, bind_dn: &str, bind_pw: &str) -> TestConfig {
        let dir = temp_dir("config");
        let pw_file = dir.path().join("ldap.pw");
        std::fs::write(&pw_file, bind_pw).expect("write ldap.pw");
        let state_dir = dir.path().join("state");
        std::fs::create_dir_all(dir.path().join("targets.d")).expect("create targets.d");
        let path = |p: &Path| toml_str(&p.to_string_lossy());
        let mut config = TestConfig {
            dir,
            sections: Vec::new(),
            main_extra: String::new(),
        };
        config
            .set("daemon", "state_dir", &path(&state_dir))
            .set("daemon", "targets_dir", &toml_str("targets.d"))
            .set("ldap", "url", &toml_str(url))
            .set("ldap", "starttls", "true")
            .set("ldap", "ca_file", &path(ca_file))
            .set("ldap", "bind_dn", &toml_str(bind_dn))
            .set(
                "ldap",
                "bind_password",
                &format!("{{ file = {} }}", path(&pw_file)),
            )
            .set("ldap", "page_size", "100")
            .set(
                "ldap.users",
                "base",
                &toml_str(&format!("ou=people,{BASE_DN}")),
            )
            .set(
                "ldap.users",
                "filter",
                &toml_str("(objectClass=inetOrgPerson)"),
            )
            // pwdAccountLockedTime needs the ppolicy overlay, which the test slapd lacks.
            .set(
                "ldap.users",
                "disabled_filter",
                &toml_str("(employeeType=disabled)"),
            )
            .set(
                "ldap.groups",
                "base",
                &toml_str(&format!("ou=groups,{BASE_DN}")),
            )
            .set(
                "ldap.groups",
                "filter",
                &toml_str("(objectClass=groupOfNames)"),
            )
            .set("ldap.groups", "nested", "true");
        config
    }

    /// Sets `key = value` in `[section]` (e.g. `"daemon"`, `"ldap"`, `"ldap.users"`), replacing
    /// an earlier value; `value` is TOML (`"\"text\""`, `"true"`, `"[1, 2]"`, `"{ env = \"X\" }"`).
    pub fn set(&mut self, section: &str, key: &str, value: &str) -> &mut Self {
        let entries = match self.sections.iter().position(|(s, _)| s == section) {
            Some(i) => &mut self.sections[i].1,
            None => {
                self.sections.push((section.to_string(), Vec::new()));
                &mut self.sections.last_mut().expect("just pushed").1
            }
        };
        match entries.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value.to_string(),
            None => entries.push((key.to_string(), value.to_string())),
        }
        self.write_main();
        self
    }

    /// Removes `key` from `[section]`.
    pub fn unset(&mut self, section: &str, key: &str) -> &mut Self {
        for (s, entries) in &mut self.sections {
            if s == section {
                entries.retain(|(k, _)| k != key);
            }
        }
        self.write_main();
        self
    }

    /// Appends raw TOML (new tables) at the end of the main file.
    pub fn main_extra(&mut self, toml: &str) -> &mut Self {
        self.main_extra.push_str(toml);
        self.main_extra.push('\n');
        self.write_main();
        self
    }

    /// Writes `targets.d/NAME.toml` (replacing it) and the token file `NAME.token`:
    ///
    /// ```toml
    /// url = "<base_url>"
    /// auth = { bearer = { file = "<tmp>/NAME.token" } }
    /// max_deprovisions = "100%"
    /// match_existing = ["externalId", "userName"]
    /// <extra_toml>
    /// ```
    ///
    /// A top-level `key = …` line in `extra_toml` (before any `[table]`) replaces the default
    /// line with the same key, e.g. `max_deprovisions = "2"`.
    pub fn target(
        &mut self,
        name: &str,
        base_url: &str,
        token: &str,
        extra_toml: &str,
    ) -> &mut Self {
        let token_file = self.dir.path().join(format!("{name}.token"));
        std::fs::write(&token_file, token).expect("write token file");
        let defaults = [
            ("url", toml_str(base_url)),
            (
                "auth",
                format!(
                    "{{ bearer = {{ file = {} }} }}",
                    toml_str(&token_file.to_string_lossy())
                ),
            ),
            ("max_deprovisions", toml_str("100%")),
            (
                "match_existing",
                r#"["externalId", "userName"]"#.to_string(),
            ),
        ];
        let overridden = top_level_keys(extra_toml);
        let mut text = String::new();
        for (key, value) in defaults {
            if !overridden.iter().any(|k| k == key) {
                let _ = writeln!(text, "{key} = {value}");
            }
        }
        text.push_str(extra_toml);
        text.push('\n');
        std::fs::write(self.target_path(name), text).expect("write target file");
        self
    }

    /// Switches to the `active-directory` dialect: users and groups under the given bases, AD's
    /// object filters, pages of 500, no disabled filter (userAccountControl covers it), and no
    /// shrink guard (test directories change by large fractions).
    pub fn active_directory(&mut self, people: &str, groups: &str) -> &mut Self {
        self.set("ldap", "dialect", &toml_str("active-directory"))
            .set("ldap", "page_size", "500")
            .set("ldap", "max_shrink", &toml_str("100%"))
            .set("ldap.users", "base", &toml_str(people))
            .set(
                "ldap.users",
                "filter",
                &toml_str("(&(objectCategory=person)(objectClass=user))"),
            )
            .unset("ldap.users", "disabled_filter")
            .set("ldap.groups", "base", &toml_str(groups))
            .set("ldap.groups", "filter", &toml_str("(objectClass=group)"))
    }

    /// Deletes `targets.d/NAME.toml`.
    pub fn remove_target(&mut self, name: &str) -> &mut Self {
        let _ = std::fs::remove_file(self.target_path(name));
        self
    }

    /// The main configuration file.
    pub fn path(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    /// The `targets.d` directory.
    pub fn targets_dir(&self) -> PathBuf {
        self.dir.path().join("targets.d")
    }

    /// The file of target `name`.
    pub fn target_path(&self, name: &str) -> PathBuf {
        self.targets_dir().join(format!("{name}.toml"))
    }

    /// `daemon.state_dir` (created empty).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The temporary directory holding everything.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The main file's current text.
    pub fn main_toml(&self) -> String {
        std::fs::read_to_string(self.path()).expect("read config.toml")
    }

    fn write_main(&self) {
        let mut text = String::new();
        for (section, entries) in &self.sections {
            let _ = writeln!(text, "[{section}]");
            for (key, value) in entries {
                let _ = writeln!(text, "{key} = {value}");
            }
            text.push('\n');
        }
        text.push_str(&self.main_extra);
        std::fs::create_dir_all(self.state_dir()).expect("create state_dir");
        std::fs::write(self.path(), text).expect("write config.toml");
    }
}

/// The keys of the `key = value` lines before the first `[table]` of a TOML snippet.
fn top_level_keys(toml: &str) -> Vec<String> {
    toml.lines()
        .map(str::trim)
        .take_while(|line| !line.starts_with('['))
        .filter_map(|line| line.split_once('='))
        .map(|(key, _)| key.trim().trim_matches('"').to_string())
        .collect()
}

/// `uid=UID,ou=people,dc=example,dc=org`.
pub fn person_dn(uid: &str) -> String {
    format!("uid={uid},ou=people,{BASE_DN}")
}

/// `cn=CN,ou=groups,dc=example,dc=org`.
pub fn group_dn(cn: &str) -> String {
    format!("cn={cn},ou=groups,{BASE_DN}")
}

/// `n` people `p000`, `p001`, … ("Person i", mail `uid@example.org`, title Staff).
pub fn staff(n: usize) -> String {
    (0..n)
        .map(|i| {
            let uid = format!("p{i:03}");
            person(
                &uid,
                &format!("Person {i}"),
                "Person",
                "P",
                &format!("{uid}@example.org"),
                "Staff",
            )
        })
        .collect()
}

/// [`staff`] and a group `everyone` of `p000` and `p001`.
pub fn people(n: usize) -> String {
    staff(n) + &group("everyone", &[&person_dn("p000"), &person_dn("p001")])
}

/// An LDIF record (ending with a blank line) for an inetOrgPerson under `ou=people`.
///
/// An empty `given`, `mail` or `title` leaves that attribute out (`cn` and `sn` are required).
pub fn person(uid: &str, cn: &str, sn: &str, given: &str, mail: &str, title: &str) -> String {
    let mut ldif = format!(
        "dn: {}\nobjectClass: inetOrgPerson\nuid: {uid}\ncn: {cn}\nsn: {sn}\n",
        person_dn(uid)
    );
    for (attr, value) in [("givenName", given), ("mail", mail), ("title", title)] {
        if !value.is_empty() {
            let _ = writeln!(ldif, "{attr}: {value}");
        }
    }
    ldif.push('\n');
    ldif
}

/// An LDIF record (ending with a blank line) for a groupOfNames under `ou=groups`, whose
/// `member` values are full DNs (people or other groups, for nesting).
///
/// groupOfNames requires at least one member, so `member_dns` must not be empty (panics);
/// to empty a group, delete it or keep a placeholder member.
pub fn group(cn: &str, member_dns: &[&str]) -> String {
    assert!(
        !member_dns.is_empty(),
        "groupOfNames {cn} needs at least one member"
    );
    let mut ldif = format!(
        "dn: {}\nobjectClass: groupOfNames\ncn: {cn}\n",
        group_dn(cn)
    );
    for dn in member_dns {
        let _ = writeln!(ldif, "member: {dn}");
    }
    ldif.push('\n');
    ldif
}

/// A big directory for [`Slapd::start_bulk`], with `memberOf` written in (slapadd runs no
/// overlay): users `u000001…` (`cn` "User N", `mail` uNNNNNN@example.org), groups `g-0001…` of
/// `group_size` consecutive users each, and a group `g-all` whose members are the `g-K` groups.
pub fn bulk_directory(users: usize, group_size: usize) -> String {
    let group_size = group_size.max(1);
    let groups = users.div_ceil(group_size);
    let mut ldif = String::with_capacity(users * 260);
    for i in 1..=users {
        let uid = format!("u{i:06}");
        let _ = write!(
            ldif,
            "dn: {}\nobjectClass: inetOrgPerson\nuid: {uid}\ncn: User {i}\nsn: {i}\n\
             givenName: User\nmail: {uid}@example.org\nmemberOf: {}\n\n",
            person_dn(&uid),
            group_dn(&format!("g-{:04}", (i - 1) / group_size + 1)),
        );
    }
    for g in 1..=groups {
        let cn = format!("g-{g:04}");
        let _ = write!(
            ldif,
            "dn: {}\nobjectClass: groupOfNames\ncn: {cn}\n",
            group_dn(&cn)
        );
        for i in (g - 1) * group_size + 1..=(g * group_size).min(users) {
            let _ = writeln!(ldif, "member: {}", person_dn(&format!("u{i:06}")));
        }
        let _ = write!(ldif, "memberOf: {}\n\n", group_dn("g-all"));
    }
    if groups > 0 {
        let _ = write!(
            ldif,
            "dn: {}\nobjectClass: groupOfNames\ncn: g-all\n",
            group_dn("g-all")
        );
        for g in 1..=groups {
            let _ = writeln!(ldif, "member: {}", group_dn(&format!("g-{g:04}")));
        }
        ldif.push('\n');
    }
    ldif
}
