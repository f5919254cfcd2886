//! Issue 11, the directory side: a directory cannot silently move or drop an account, nor
//! break a report. URL schemes are read case-insensitively (StartTLS really used with
//! `LDAP://`), two entries with one id stop the read, values that are not UTF-8 or longer than
//! `max_value_length` are problems for their entry (the target keeps what it has), and control
//! characters in names and values cannot break a text or Markdown plan. Against a real slapd,
//! a fake LDAP server for raw bytes, and a real SCIM server.

mod support;

use serde_json::Value;
use support::*;

/// Scim2Server behind a recording proxy, as target `app` of `config`.
struct App {
    server: Scim2Server,
    proxy: RecordingProxy,
}

impl App {
    fn start(config: &mut TestConfig, extra: &str) -> App {
        let server = Scim2Server::start();
        let proxy = RecordingProxy::start(&server.base_url());
        config.target("app", &proxy.url(), server.token(), extra);
        App { server, proxy }
    }

    fn users(&self) -> Vec<Value> {
        scim_list(&self.server.base_url(), self.server.token(), "Users")
    }

    fn user(&self, user_name: &str) -> Value {
        let found: Vec<Value> = self
            .users()
            .into_iter()
            .filter(|u| u["userName"] == user_name)
            .collect();
        assert_eq!(found.len(), 1, "users named {user_name}: {found:?}");
        found.into_iter().next().unwrap()
    }

    fn group_member_count(&self, display_name: &str) -> usize {
        let groups = scim_list(&self.server.base_url(), self.server.token(), "Groups");
        let g = groups
            .iter()
            .find(|g| g["displayName"] == display_name)
            .unwrap_or_else(|| panic!("no group {display_name}: {groups:?}"));
        let full = scim_get(
            &self.server.base_url(),
            self.server.token(),
            &format!("/Groups/{}", g["id"].as_str().unwrap()),
        );
        full["members"].as_array().map_or(0, Vec::len)
    }
}

fn work_email(user: &Value) -> Option<String> {
    user["emails"]
        .as_array()?
        .iter()
        .find(|e| e["type"] == "work")
        .and_then(|e| e["value"].as_str())
        .map(str::to_string)
}

fn b64(s: &str) -> String {
    ldif_base64(s.as_bytes())
}

fn target_plan(plan: &Value) -> &Value {
    &plan["targets"][0]
}

fn seed() -> String {
    person(
        "alice",
        "Alice",
        "Liddell",
        "Alice",
        "alice@example.org",
        "Engineer",
    ) + &person("bob", "Bob", "Builder", "Bob", "bob@example.org", "Builder")
        + &group("eng", &[&person_dn("alice"), &person_dn("bob")])
}

// ---------------------------------------------------------------------------------------------
// 1. URL schemes

/// `LDAP://` (upper case) with `starttls = true` must use StartTLS: slapd here refuses a simple
/// bind in cleartext, so a bind that works was protected. Before the URL was parsed once, the
/// scheme test was case-sensitive and this bind went out in cleartext.
#[test]
fn an_upper_case_ldap_scheme_with_starttls_binds_over_tls() {
    let slapd = Slapd::start(&seed());
    slapd.require_tls_for_simple_bind();
    let mut config = TestConfig::new(&slapd);
    let app = App::start(&mut config, "");
    let upper = format!("LDAP://127.0.0.1:{}", slapd.port());
    config.set("ldap", "url", &toml_str(&upper));

    ldap2scim(&config.path(), &["check", "--connect"]).expect_code(0);
    ldap2scim(&config.path(), &["sync"]).expect_code(0);
    assert_eq!(app.users().len(), 2);
    assert_eq!(
        work_email(&app.user("alice")).as_deref(),
        Some("alice@example.org")
    );

    // The control: the same URL without StartTLS is refused by slapd, so the test can tell.
    config.set("ldap", "starttls", "false");
    let out = ldap2scim(&config.path(), &["check", "--connect"]);
    out.expect_code(1);
    assert!(
        out.stderr.contains("result code 13"),
        "slapd refused the cleartext bind:\n{out}"
    );
    // LDAPS, in capitals too.
    config.set(
        "ldap",
        "url",
        &toml_str(&format!("LDAPS://127.0.0.1:{}", slapd.tls_port())),
    );
    ldap2scim(&config.path(), &["check", "--connect"]).expect_code(0);
}

// ---------------------------------------------------------------------------------------------
// 2. Duplicate ids

/// A second entry with alice's entryUUID (a restore or an import that kept operational
/// attributes) must not take over her account nor drop one of them: the read stops, naming both
/// DNs, and nothing is written. The same for a group with a user's id.
#[test]
fn two_entries_with_one_entry_uuid_stop_the_cycle_and_change_nothing() {
    let slapd = Slapd::start(&seed());
    let mut config = TestConfig::new(&slapd);
    config.set("ldap", "max_shrink", &toml_str("100%"));
    let app = App::start(&mut config, "");
    ldap2scim(&config.path(), &["sync"]).expect_code(0);
    let before = app.users();
    assert_eq!(before.len(), 2);

    let alice_id = slapd.entry_uuid(&person_dn("alice"));
    slapd.add_relaxed(&format!(
        "dn: {}\nobjectClass: inetOrgPerson\nuid: mallory\ncn: Mallory\nsn: M\nmail: mallory@example.org\nentryUUID: {alice_id}\n\n",
        person_dn("mallory")
    ));
    app.proxy.clear();
    for command in [&["sync"][..], &["plan"][..]] {
        let out = ldap2scim(&config.path(), command);
        out.expect_code(1);
        for part in [
            person_dn("alice").as_str(),
            person_dn("mallory").as_str(),
            "entryUUID",
            "nothing was changed",
        ] {
            assert!(out.stderr.contains(part), "names {part}:\n{out}");
        }
    }
    assert_eq!(app.proxy.writes(), 0, "{:?}", app.proxy.requests());
    assert_eq!(app.users(), before, "the target is as it was");

    // A group with bob's id.
    slapd.delete(&person_dn("mallory"));
    let bob_id = slapd.entry_uuid(&person_dn("bob"));
    slapd.add_relaxed(&format!(
        "dn: {}\nobjectClass: groupOfNames\ncn: ops\nmember: {}\nentryUUID: {bob_id}\n\n",
        group_dn("ops"),
        person_dn("alice")
    ));
    let out = ldap2scim(&config.path(), &["sync"]);
    out.expect_code(1);
    assert!(
        out.stderr.contains(&person_dn("bob")) && out.stderr.contains(&group_dn("ops")),
        "{out}"
    );
    assert_eq!(app.proxy.writes(), 0, "{:?}", app.proxy.requests());
    assert_eq!(app.users(), before);

    // Fixed in the directory: the next cycle goes ahead.
    slapd.delete(&group_dn("ops"));
    ldap2scim(&config.path(), &["sync"]).expect_code(0);
}

// ---------------------------------------------------------------------------------------------
// 3. Values that are not UTF-8

const PEOPLE: &str = "ou=people,dc=example,dc=org";
const GROUPS: &str = "ou=groups,dc=example,dc=org";

fn fake_user(uid: &str, uuid: &str, mail: Option<&[u8]>) -> FakeEntry {
    let cn = format!("User {uid}");
    let e = FakeEntry::new(
        &format!("uid={uid},{PEOPLE}"),
        &[
            ("objectClass", &["inetOrgPerson"]),
            ("entryUUID", &[uuid]),
            ("uid", &[uid]),
            ("cn", &[&cn]),
            ("sn", &["User"]),
        ],
    );
    match mail {
        Some(mail) => e.with_bytes("mail", mail),
        None => e,
    }
}

fn fake_directory(jdoe_mail: &[u8]) -> Vec<FakeEntry> {
    vec![
        fake_user(
            "jdoe",
            "00000000-0000-4000-8000-000000000001",
            Some(jdoe_mail),
        ),
        // A binary attribute no mapping names is none of the sync's business.
        fake_user(
            "ann",
            "00000000-0000-4000-8000-000000000002",
            Some(b"ann@example.org"),
        )
        .with_bytes("jpegPhoto", b"\xff\xd8\xff\xe0 not text"),
        FakeEntry::new(
            &format!("cn=eng,{GROUPS}"),
            &[
                ("objectClass", &["groupOfNames"]),
                ("entryUUID", &["00000000-0000-4000-8000-0000000000e1"]),
                ("cn", &["eng"]),
                (
                    "member",
                    &[&format!("uid=jdoe,{PEOPLE}"), &format!("uid=ann,{PEOPLE}")],
                ),
            ],
        ),
    ]
}

/// The fake speaks no TLS and evaluates no filter (so no disabled filter either).
fn point_at_fake(config: &mut TestConfig, fake: &FakeLdap) {
    config
        .set("ldap", "url", &toml_str(&fake.url()))
        .set("ldap", "starttls", "false")
        .unset("ldap", "ca_file")
        .unset("ldap.users", "disabled_filter");
}

/// ldap3 files a value that is not UTF-8 under `bin_attrs`; read as text only, jdoe's mail
/// looked absent and the plan removed it from the target. It is a problem for jdoe instead:
/// the target keeps her mail, her account and her membership.
#[test]
fn a_mapped_value_that_is_not_utf8_is_a_problem_and_the_target_keeps_its_value() {
    let fake = FakeLdap::start(fake_directory(b"jdoe@example.org"), 1000);
    let mut config = TestConfig::for_directory(
        &fake.url(),
        std::path::Path::new("/nonexistent"),
        "cn=sync,dc=example,dc=org",
        "pw",
    );
    point_at_fake(&mut config, &fake);
    config.set("ldap", "max_shrink", &toml_str("100%"));
    let app = App::start(&mut config, "");
    ldap2scim(&config.path(), &["sync"]).expect_code(0);
    assert_eq!(
        work_email(&app.user("jdoe")).as_deref(),
        Some("jdoe@example.org")
    );
    assert_eq!(app.group_member_count("eng"), 2);

    let broken = FakeLdap::start(fake_directory(b"jdoe@ex\xe4mple.org"), 1000);
    point_at_fake(&mut config, &broken);
    let out = ldap2scim(&config.path(), &["plan", "--format", "json"]);
    let plan = out.json();
    let t = target_plan(&plan);
    assert!(
        t["changes"].as_array().unwrap().is_empty(),
        "no update to null, nothing else either:\n{out}"
    );
    let problems = t["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{out}");
    let reason = problems[0]["reason"].as_str().unwrap();
    assert_eq!(problems[0]["name"], format!("uid=jdoe,{PEOPLE}"));
    assert!(
        reason.contains("mail") && reason.contains("UTF-8"),
        "{reason}"
    );
    let text = ldap2scim(&config.path(), &["plan"]);
    assert!(
        text.stdout.contains(&format!("problem: uid=jdoe,{PEOPLE}")),
        "{text}"
    );

    app.proxy.clear();
    let out = ldap2scim(&config.path(), &["sync"]);
    out.expect_code(3);
    assert_eq!(app.proxy.writes(), 0, "{:?}", app.proxy.requests());
    let jdoe = app.user("jdoe");
    assert_eq!(work_email(&jdoe).as_deref(), Some("jdoe@example.org"));
    assert_eq!(jdoe["active"], true);
    assert_eq!(app.group_member_count("eng"), 2);
}

// ---------------------------------------------------------------------------------------------
// 4. max_value_length

#[test]
fn a_value_longer_than_max_value_length_is_a_problem_not_a_push() {
    let slapd = Slapd::start(&seed());
    let mut config = TestConfig::new(&slapd);
    let app = App::start(&mut config, "max_value_length = \"64B\"");
    ldap2scim(&config.path(), &["sync"]).expect_code(0);
    assert_eq!(app.user("alice")["title"], "Engineer");

    let long = "Senior ".repeat(20) + "Engineer";
    slapd.modify(&format!(
        "dn: {}\nchangetype: modify\nreplace: title\ntitle: {long}\n-\nreplace: sn\nsn: Hargreaves\n",
        person_dn("alice")
    ));
    slapd.modify(&format!(
        "dn: {}\nchangetype: modify\nreplace: title\ntitle: Architect\n",
        person_dn("bob")
    ));
    let out = ldap2scim(&config.path(), &["plan", "--format", "json"]);
    out.expect_code(2);
    let plan = out.json();
    let t = target_plan(&plan);
    let names: Vec<&str> = t["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["bob"], "only bob's change is pushed:\n{out}");
    let problems = t["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{out}");
    assert_eq!(problems[0]["name"], person_dn("alice"));
    let reason = problems[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("title") && reason.contains("max_value_length"),
        "{reason}"
    );

    ldap2scim(&config.path(), &["sync"]).expect_code(3);
    let alice = app.user("alice");
    assert_eq!(alice["title"], "Engineer", "the target keeps its value");
    assert_eq!(
        alice["name"]["familyName"], "Liddell",
        "nothing of hers moves"
    );
    assert_eq!(app.user("bob")["title"], "Architect");
    assert_eq!(app.group_member_count("eng"), 2);

    // A target that allows more takes it.
    config.target("app", &app.proxy.url(), app.server.token(), "");
    ldap2scim(&config.path(), &["sync"]).expect_code(0);
    assert_eq!(app.user("alice")["title"], long);
}

// ---------------------------------------------------------------------------------------------
// 5. Reports

/// A group whose name (and DN) holds a newline and pipes, a user whose title holds a newline
/// and a terminal escape: each change is still one line of the text plan and one row of the
/// Markdown table.
#[test]
fn control_characters_in_the_directory_cannot_break_text_or_markdown_plans() {
    let evil_title = "Boss\n  deactivate User ceo\r\u{1b}[2J";
    let slapd = Slapd::start(&person(
        "alice",
        "Alice",
        "Liddell",
        "Alice",
        "alice@example.org",
        "Engineer",
    ));
    let mut config = TestConfig::new(&slapd);
    let app = App::start(&mut config, "");
    ldap2scim(&config.path(), &["sync"]).expect_code(0);
    slapd.modify(&format!(
        "dn: {}\nchangetype: modify\nreplace: title\ntitle:: {}\n",
        person_dn("alice"),
        b64(evil_title)
    ));
    for cn in ["evil\n| delete | User | ceo |", "two\nlines\t\u{7f}"] {
        slapd.add(&format!(
            "dn:: {}\nobjectClass: groupOfNames\ncn:: {}\nmember: {}\n\n",
            b64(&format!("cn={cn},ou=groups,dc=example,dc=org")),
            b64(cn),
            person_dn("alice")
        ));
    }

    let json = ldap2scim(&config.path(), &["plan", "--format", "json"]);
    json.expect_code(2);
    let changes = target_plan(&json.json())["changes"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(
        changes, 5,
        "an update, two creates and two add-members:\n{json}"
    );

    let text = ldap2scim(&config.path(), &["plan", "--format", "text"]);
    text.expect_code(2);
    let change_lines: Vec<&str> = text
        .stdout
        .lines()
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .collect();
    assert_eq!(change_lines.len(), changes, "one line per change:\n{text}");
    for line in text.stdout.lines() {
        assert!(!line.contains(|c: char| c.is_control()), "{line:?}");
        assert!(
            line.is_empty()
                || line.starts_with("Directory: ")
                || line.starts_with("Target app ")
                || line.starts_with("  "),
            "a line the report did not write: {line:?}\n{text}"
        );
    }
    assert!(
        text.stdout.contains(r"create Group two\nlines\t\u{7f}"),
        "{text}"
    );
    assert!(text.stdout.contains(r"\u{1b}[2J"), "{text}");

    let md = ldap2scim(&config.path(), &["plan", "--format", "markdown"]);
    md.expect_code(2);
    let rows: Vec<&str> = md.stdout.lines().filter(|l| l.starts_with('|')).collect();
    assert_eq!(
        rows.len(),
        changes + 2,
        "header, separator, one row per change:\n{md}"
    );
    for row in &rows {
        assert_eq!(
            row.replace("\\|", "").matches('|').count(),
            5,
            "four cells: {row:?}\n{md}"
        );
    }
    for line in md.stdout.lines() {
        assert!(!line.contains(|c: char| c.is_control()), "{line:?}");
    }
    assert!(
        md.stdout.contains(r"evil\n\| delete \| User \| ceo \|"),
        "{md}"
    );
    drop(app);
}

// ---------------------------------------------------------------------------------------------
// Entries ldap3 cannot take apart

/// ldap3 panics on an entry whose DN is not UTF-8: the read must fail as incomplete instead,
/// and nothing change.
#[test]
fn an_entry_whose_dn_is_not_utf8_stops_the_read_without_a_crash() {
    let mut entries = fake_directory(b"jdoe@example.org");
    let fake = FakeLdap::start(entries.clone(), 1000);
    let mut config = TestConfig::for_directory(
        &fake.url(),
        std::path::Path::new("/nonexistent"),
        "cn=sync,dc=example,dc=org",
        "pw",
    );
    point_at_fake(&mut config, &fake);
    let app = App::start(&mut config, "");
    ldap2scim(&config.path(), &["sync"]).expect_code(0);

    entries[1] = entries[1]
        .clone()
        .with_dn_bytes(b"uid=\xffann,ou=people,dc=example,dc=org");
    let broken = FakeLdap::start(entries, 1000);
    point_at_fake(&mut config, &broken);
    app.proxy.clear();
    let out = ldap2scim(&config.path(), &["sync"]);
    out.expect_code(1);
    assert!(
        out.stderr.contains("incomplete") && out.stderr.contains("not valid UTF-8"),
        "{out}"
    );
    assert!(!out.stderr.contains("panicked"), "{out}");
    assert_eq!(app.proxy.writes(), 0, "{:?}", app.proxy.requests());
    assert_eq!(app.users().len(), 2);
}
