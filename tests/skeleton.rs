//! Issue 2, end to end: OpenLDAP (slapd) → ldap2scim → scim2-server and Better Auth, all real
//! servers on loopback. Each SCIM server sits behind a recording proxy so tests can count the
//! write requests ldap2scim sends.

mod support;

use std::collections::BTreeSet;

use support::*;

const SMITH_DN: &str = r#"cn=Smith\, \"Jürgen\",ou=people,dc=example,dc=org"#;

fn seed() -> String {
    let smith = format!(
        "dn: {SMITH_DN}\nobjectClass: inetOrgPerson\nuid: jsmith\ncn: Smith, \"Jürgen\"\nsn: Smith\ngivenName: Jürgen\nmail: jsmith@example.org\ntitle: Analyst\n\n"
    );
    [
        person(
            "alice",
            "Alice Liddell",
            "Liddell",
            "Alice",
            "alice@example.org",
            "Engineer",
        ),
        person(
            "bob",
            "Bob Builder",
            "Builder",
            "Bob",
            "bob@example.org",
            "Builder",
        ),
        person(
            "carol",
            "Carol Ann",
            "Ann",
            "Carol",
            "carol@example.org",
            "",
        ),
        person(
            "dave",
            "Dave Null",
            "Null",
            "Dave",
            "dave@example.org",
            "Intern",
        ),
        smith,
        // eng ⊂ staff ⊂ all, and all ⊂ eng closes a cycle.
        group("eng", &[&person_dn("alice"), SMITH_DN]),
        group("staff", &[&group_dn("eng"), &person_dn("bob")]),
        group("all", &[&group_dn("staff"), &person_dn("carol")]),
        group("loop", &[&group_dn("all")]),
    ]
    .concat()
}

fn loop_cycle(world: &World) {
    world.slapd.modify(&format!(
        "dn: {}\nchangetype: modify\nadd: member\nmember: {}\n",
        group_dn("eng"),
        group_dn("loop")
    ));
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

#[test]
fn first_sync_creates_users_and_nested_groups_then_nothing_more() {
    let world = World::start(&seed(), "");
    loop_cycle(&world);

    let (out, plan) = world.plan_json();
    assert_eq!(out.code, 2, "changes pending:\n{out}");
    assert_eq!(plan["source"]["users"], 5);
    assert_eq!(plan["source"]["groups"], 4);
    world.sync_ok();

    let everyone = set(&["alice", "bob", "carol", "dave", "jsmith"]);
    let in_cycle = set(&["alice", "bob", "carol", "jsmith"]);
    for t in &world.targets {
        let users = t.user_states();
        assert_eq!(
            users.keys().cloned().collect::<BTreeSet<_>>(),
            everyone,
            "{}",
            t.name()
        );
        assert!(
            users.values().all(|a| *a),
            "{}: all active: {users:?}",
            t.name()
        );
        let smith = t.user("jsmith");
        assert_eq!(smith["name"]["givenName"], "Jürgen", "{}", t.name());
        assert_eq!(smith["title"], "Analyst");
        assert_eq!(smith["emails"][0]["value"], "jsmith@example.org");
        assert_eq!(t.user("alice")["title"], "Engineer");
        let m = t.memberships();
        // The cycle eng → loop → all → staff → eng makes all four groups equal.
        for g in ["eng", "staff", "all", "loop"] {
            assert_eq!(
                m.get(g),
                Some(&in_cycle),
                "{}: members of {g}: {m:?}",
                t.name()
            );
        }
        assert_eq!(m.len(), 4);
    }
    world.assert_converged();
}

#[test]
fn each_directory_change_reaches_both_targets_in_one_sync() {
    let world = World::start(&seed(), "");
    world.sync_ok();
    let names = |w: &World| w.targets.iter().map(|t| t.name()).collect::<Vec<_>>();

    // 1. A title.
    world.slapd.modify(&format!(
        "dn: {}\nchangetype: modify\nreplace: title\ntitle: Staff Engineer\n",
        person_dn("alice")
    ));
    let (_, plan) = world.plan_json();
    for n in names(&world) {
        assert_eq!(
            changes_of(&plan, n),
            vec![change("update", "User", "alice")],
            "{n}"
        );
        let t = plan["targets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["target"] == n)
            .unwrap();
        assert_eq!(t["changes"][0]["attributes"]["title"]["from"], "Engineer");
        assert_eq!(
            t["changes"][0]["attributes"]["title"]["to"],
            "Staff Engineer"
        );
        assert_eq!(t["summary"]["users_updated"], 1);
    }
    world.sync_ok();
    for t in &world.targets {
        assert_eq!(t.user("alice")["title"], "Staff Engineer", "{}", t.name());
    }
    world.assert_converged();

    // 2. A rename (modrdn): an update of userName; the SCIM id stays.
    let ids_before: Vec<String> = world
        .targets
        .iter()
        .map(|t| t.user("bob")["id"].as_str().unwrap().to_string())
        .collect();
    world.slapd.modify(&format!(
        "dn: {}\nchangetype: modrdn\nnewrdn: uid=robert\ndeleteoldrdn: 1\n",
        person_dn("bob")
    ));
    let (_, plan) = world.plan_json();
    for n in names(&world) {
        assert_eq!(
            changes_of(&plan, n),
            vec![change("update", "User", "robert")],
            "{n}"
        );
    }
    world.sync_ok();
    for (t, id) in world.targets.iter().zip(&ids_before) {
        assert_eq!(
            t.user("robert")["id"].as_str().unwrap(),
            id,
            "{}: same SCIM id after a rename",
            t.name()
        );
        assert!(!t.user_states().contains_key("bob"));
    }
    world.assert_converged();

    // 3. A member removed, 4. a member added (nested groups follow).
    world.slapd.modify(&format!(
        "dn: {}\nchangetype: modify\ndelete: member\nmember: {}\n",
        group_dn("eng"),
        person_dn("alice")
    ));
    let (_, plan) = world.plan_json();
    for n in names(&world) {
        let c: BTreeSet<_> = changes_of(&plan, n).into_iter().collect();
        let want: BTreeSet<_> = ["eng", "staff", "all", "loop"]
            .iter()
            .map(|g| change("remove-members", "Group", g))
            .collect();
        assert_eq!(
            c, want,
            "{n}: alice leaves eng and every group that nests it"
        );
    }
    world.sync_ok();
    for t in &world.targets {
        let m = t.memberships();
        assert_eq!(m["eng"], set(&["jsmith"]), "{}", t.name());
        assert_eq!(
            m["all"],
            set(&["carol", "jsmith", "robert"]),
            "{}",
            t.name()
        );
    }
    world.assert_converged();

    world.slapd.modify(&format!(
        "dn: {}\nchangetype: modify\nadd: member\nmember: {}\n",
        group_dn("eng"),
        person_dn("dave")
    ));
    let (_, plan) = world.plan_json();
    for n in names(&world) {
        let c = changes_of(&plan, n);
        assert!(c.iter().all(|x| x.0 == "add-members"), "{n}: {c:?}");
        assert!(
            c.contains(&change("add-members", "Group", "eng")),
            "{n}: {c:?}"
        );
    }
    world.sync_ok();
    for t in &world.targets {
        let m = t.memberships();
        assert_eq!(m["eng"], set(&["dave", "jsmith"]), "{}", t.name());
        assert!(m["all"].contains("dave"), "{}", t.name());
    }
    world.assert_converged();

    // 5. A user disabled in the directory is deactivated.
    world.slapd.modify(&format!(
        "dn: {}\nchangetype: modify\nadd: employeeType\nemployeeType: disabled\n",
        person_dn("carol")
    ));
    let (_, plan) = world.plan_json();
    for n in names(&world) {
        assert_eq!(
            changes_of(&plan, n),
            vec![change("deactivate", "User", "carol")],
            "{n}"
        );
    }
    world.sync_ok();
    for t in &world.targets {
        assert!(!t.user_states()["carol"], "{}", t.name());
    }
    world.assert_converged();

    // 6. A user deleted from the directory is deactivated, and leaves its groups.
    world.slapd.delete(&person_dn("dave"));
    let (_, plan) = world.plan_json();
    for n in names(&world) {
        let c = changes_of(&plan, n);
        assert_eq!(
            c.last(),
            Some(&change("deactivate", "User", "dave")),
            "{n}: {c:?}"
        );
        assert!(
            c[..c.len() - 1].iter().all(|x| x.0 == "remove-members"),
            "{n}: {c:?}"
        );
    }
    world.sync_ok();
    for t in &world.targets {
        assert!(!t.user_states()["dave"], "{}", t.name());
        assert!(!t.memberships()["eng"].contains("dave"), "{}", t.name());
    }
    world.assert_converged();
}

#[test]
fn a_person_who_comes_back_gets_the_old_account_reactivated() {
    let world = World::start(&seed(), "");
    world.sync_ok();
    let old_ids: Vec<String> = world
        .targets
        .iter()
        .map(|t| t.user("dave")["id"].as_str().unwrap().to_string())
        .collect();
    world.slapd.delete(&person_dn("dave"));
    world.sync_ok();
    for t in &world.targets {
        assert!(!t.user_states()["dave"]);
    }
    // A new directory entry (new entryUUID) with the same uid.
    world.slapd.add(&person(
        "dave",
        "Dave Again",
        "Again",
        "Dave",
        "dave@example.org",
        "Returner",
    ));
    // The old account moves to the new entry: a visible rebind (issue 11), not a silent
    // adoption.
    let (_, plan) = world.plan_json();
    for t in &world.targets {
        assert_eq!(
            changes_of(&plan, t.name()),
            vec![change("rebind", "User", "dave")],
            "{}",
            t.name()
        );
    }
    world.sync_ok();
    for (t, old) in world.targets.iter().zip(&old_ids) {
        let dave = t.user("dave");
        assert_eq!(
            dave["id"].as_str().unwrap(),
            old,
            "{}: the old account, not a second one",
            t.name()
        );
        assert_eq!(dave["active"], true);
        assert_eq!(dave["title"], "Returner");
        assert_eq!(t.users().len(), 5, "{}", t.name());
    }
    world.assert_converged();
}

#[test]
fn a_large_group_is_sent_in_batches_and_a_target_limit_fails_only_that_group() {
    let mut seed = String::new();
    let mut dns = Vec::new();
    for i in 0..2500 {
        let uid = format!("m{i:04}");
        seed.push_str(&person(
            &uid,
            &format!("Member {i}"),
            "Member",
            "",
            &format!("{uid}@example.org"),
            "",
        ));
        dns.push(person_dn(&uid));
    }
    let refs: Vec<&str> = dns.iter().map(String::as_str).collect();
    seed.push_str(&group("big", &refs));
    seed.push_str(&group("small", &refs[..3]));
    let world = World::start(&seed, "");
    let out = world.run(&["sync"]);
    assert_eq!(
        out.code, 3,
        "Better Auth refuses the big group: partial failure:\n{out}"
    );
    assert!(
        out.stdout.contains("cannot contain more than 1000"),
        "the target's reason is reported:\n{out}"
    );

    for t in &world.targets {
        assert_eq!(t.users().len(), 2500, "{}", t.name());
        let m = t.memberships();
        assert_eq!(m["small"].len(), 3, "{}", t.name());
        let patches = t
            .proxy
            .requests()
            .iter()
            .filter(|r| r.method == "PATCH" && r.path.starts_with("/Groups/"))
            .count();
        match t.name() {
            "scim2-server" => {
                assert_eq!(m["big"].len(), 2500);
                // 25 batches of 100 for big, 1 for small.
                assert_eq!(
                    patches, 26,
                    "member changes go in batches of members_per_request"
                );
            }
            _ => assert_eq!(m["big"].len(), 1000, "Better Auth's own limit"),
        }
    }
    // Everything but the refused group converged: a plan shows only what is left of it.
    let (_, plan) = world.plan_json();
    assert!(changes_of(&plan, "scim2-server").is_empty());
    assert_eq!(
        changes_of(&plan, "betterauth"),
        vec![change("add-members", "Group", "big")]
    );
}

#[test]
fn bad_input_gives_a_clear_error_and_leaves_the_snapshot_unchanged() {
    let world = World::start(&seed(), "");
    world.sync_ok();
    // A broken config: every problem at once, with file and key.
    let mut broken = TestConfig::new(&world.slapd);
    broken
        .set("ldap", "page_sise", "10")
        .set("daemon", "schedule", "\"61 * * * *\"");
    broken.target("t", "ftp://nowhere", "x", "concurency = 2");
    let out = ldap2scim(&broken.path(), &["sync"]);
    assert_eq!(out.code, 1, "{out}");
    assert!(
        out.stderr.contains("page_sise") && out.stderr.contains("page_size"),
        "nearest key:\n{out}"
    );
    assert!(out.stderr.contains("concurrency"), "{out}");
    assert!(out.stderr.contains("schedule"), "{out}");
    assert!(
        out.stderr.contains("t.toml"),
        "names the target file:\n{out}"
    );

    // Unreachable LDAP server.
    let mut cfg = TestConfig::new(&world.slapd);
    cfg.set(
        "daemon",
        "state_dir",
        &toml_str(&world.config.state_dir().to_string_lossy()),
    );
    for t in &world.targets {
        cfg.target(t.name(), &t.proxy.url(), t.server.token(), "");
    }
    cfg.set(
        "ldap",
        "url",
        &toml_str(&format!("ldap://127.0.0.1:{}", free_port())),
    );
    let out = ldap2scim(&cfg.path(), &["sync"]);
    assert_eq!(out.code, 1, "{out}");
    assert!(
        out.stderr.contains("cannot connect to LDAP server"),
        "{out}"
    );
    assert_eq!(
        out.stderr
            .trim()
            .lines()
            .filter(|l| l.contains("error"))
            .count(),
        1,
        "one paragraph:\n{out}"
    );

    // A wrong bind password.
    cfg.set("ldap", "url", &toml_str(&world.slapd.ldap_url()));
    std::fs::write(cfg.dir().join("ldap.pw"), "wrong-password").unwrap();
    let out = ldap2scim(&cfg.path(), &["sync"]);
    assert_eq!(out.code, 1, "{out}");
    assert!(out.stderr.contains("bind as cn=sync"), "{out}");
    assert!(out.stderr.contains("invalidCredentials"), "{out}");
    assert!(
        !out.stderr.contains("wrong-password"),
        "no secret in messages:\n{out}"
    );

    // An unreachable target: that target fails (exit 3), the other converges, nothing is lost.
    std::fs::write(cfg.dir().join("ldap.pw"), world.slapd.bind_pw()).unwrap();
    world.slapd.modify(&format!(
        "dn: {}\nchangetype: modify\nreplace: title\ntitle: Moved\n",
        person_dn("alice")
    ));
    cfg.target(
        "betterauth",
        &format!("http://127.0.0.1:{}/scim/v2", free_port()),
        "tok",
        "",
    );
    let out = ldap2scim(&cfg.path(), &["sync"]);
    assert_eq!(out.code, 3, "{out}");
    assert!(out.stdout.contains("target betterauth: error"), "{out}");
    assert!(out.stdout.contains("target scim2-server: ok"), "{out}");
    assert!(out.stdout.contains("connection failed"), "{out}");

    // The snapshot did not move for what failed: with the real target back, exactly the
    // pending change is planned.
    let (_, plan) = world.plan_json();
    assert!(changes_of(&plan, "scim2-server").is_empty());
    assert_eq!(
        changes_of(&plan, "betterauth"),
        vec![change("update", "User", "alice")]
    );
    world.sync_ok();
    world.assert_converged();
}

#[test]
fn check_and_explain_tell_the_operator_what_they_need() {
    let mut world = World::start(&seed(), "");
    let out = world.run(&["check", "--connect"]);
    assert_eq!(out.code, 0, "{out}");
    assert!(out.stdout.contains("ldap: bound"), "{out}");
    for t in &world.targets {
        assert!(
            out.stdout.contains(&format!(
                "target {}: /ServiceProviderConfig answered",
                t.name()
            )),
            "{out}"
        );
    }
    world.sync_ok();

    let out = world.run(&["explain", &person_dn("alice")]);
    assert_eq!(out.code, 0, "{out}");
    let doc = out.json();
    assert_eq!(doc["kind"], "user");
    for t in doc["targets"].as_array().unwrap() {
        assert_eq!(t["mapped"]["userName"], "alice");
        assert_eq!(t["snapshot"]["user_name"], "alice");
        assert_eq!(t["pending"].as_array().unwrap().len(), 0);
    }
    world.slapd.modify(&format!(
        "dn: {}\nchangetype: modify\nreplace: title\ntitle: Chief\n",
        person_dn("alice")
    ));
    let doc = world.run(&["explain", "alice"]).json();
    for t in doc["targets"].as_array().unwrap() {
        assert_eq!(t["pending"][0]["action"], "update", "{t}");
    }
    let out = world.run(&["explain", "nobody-by-that-name"]);
    assert_eq!(out.code, 1, "{out}");

    // check --connect with a target that does not answer and a wrong password: both named.
    world.config.target(
        "down",
        &format!("http://127.0.0.1:{}/scim", free_port()),
        "tok",
        "",
    );
    std::fs::write(world.config.dir().join("ldap.pw"), "not-the-password").unwrap();
    let out = world.run(&["check", "--connect"]);
    assert_eq!(out.code, 1, "{out}");
    assert!(out.stderr.contains("bind as cn=sync"), "{out}");
    assert!(out.stderr.contains("target down"), "{out}");
    assert!(
        !out.stderr.contains("not-the-password") && !out.stdout.contains("not-the-password"),
        "{out}"
    );
}

/// Issue 14: secrets as systemd credentials (`{ credential = "NAME" }`, read from
/// `$CREDENTIALS_DIRECTORY/NAME`), for the LDAP bind and a target's token.
#[test]
fn secrets_come_from_systemd_credentials() {
    let slapd = Slapd::start(&seed());
    let scim = Scim2Server::start();
    let mut config = TestConfig::new(&slapd);
    config.set(
        "ldap",
        "bind_password",
        "{ credential = \"ldap-password\" }",
    );
    config.target(
        "app",
        &scim.base_url(),
        scim.token(),
        "auth = { bearer = { credential = \"app-token\" } }\n",
    );
    let creds = temp_dir("credentials");
    std::fs::write(creds.path().join("ldap-password"), slapd.bind_pw()).unwrap();
    std::fs::write(
        creds.path().join("app-token"),
        format!("{}\n", scim.token()),
    )
    .unwrap();
    let dir = creds.path().to_str().unwrap().to_string();
    Ldap2scim::new(&config.path())
        .args(["sync"])
        .env("CREDENTIALS_DIRECTORY", &dir)
        .run()
        .expect_code(0);
    assert_eq!(scim_list(&scim.base_url(), scim.token(), "Users").len(), 5);
    // Outside systemd the configuration says what is missing, and names no secret.
    let out = Ldap2scim::new(&config.path())
        .args(["check"])
        .env("CREDENTIALS_DIRECTORY", "")
        .run();
    assert_eq!(out.code, 1, "{out}");
    assert!(
        out.stderr.contains("$CREDENTIALS_DIRECTORY is not set")
            && out.stderr.contains("ldap.bind_password")
            && out.stderr.contains("auth.bearer"),
        "{out}"
    );
    assert!(
        !out.stderr.contains(scim.token()) && !out.stderr.contains(slapd.bind_pw()),
        "{out}"
    );
}
