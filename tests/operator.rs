//! Issue 14, operator features: `sync --only` / `plan --only` for one new hire or one leaver
//! with nothing else touched, against slapd (with its change feed), scim2-server and Better
//! Auth.

mod support;

use std::collections::BTreeSet;

use support::*;

fn seed() -> String {
    [
        person(
            "alice",
            "Alice L",
            "L",
            "Alice",
            "alice@example.org",
            "Engineer",
        ),
        person("bob", "Bob B", "B", "Bob", "bob@example.org", "Builder"),
        group("eng", &[&person_dn("alice"), &person_dn("bob")]),
    ]
    .concat()
}

/// The new hire of these tests.
fn nina() -> String {
    person("nina", "Nina N", "N", "Nina", "nina@example.org", "Analyst")
}

fn writes(t: &Target) -> Vec<String> {
    t.proxy
        .requests()
        .into_iter()
        .filter(|r| r.method != "GET")
        .map(|r| format!("{} {}", r.method, r.path))
        .collect()
}

#[test]
fn sync_only_provisions_one_new_hire_and_deprovisions_one_leaver_with_nothing_else_touched() {
    let world = World::start(&seed(), "");
    world.sync_ok();
    // Meanwhile: a new hire in eng, a title change for bob, and alice leaves.
    world.slapd.add(&nina());
    world.slapd.modify(&format!(
        "dn: {}\nchangetype: modify\nadd: member\nmember: {}\n",
        group_dn("eng"),
        person_dn("nina")
    ));
    world.slapd.modify(&format!(
        "dn: {}\nchangetype: modify\nreplace: title\ntitle: Architect\n",
        person_dn("bob")
    ));

    let out = world.run(&["plan", "--only", "nina", "--format", "json"]);
    assert_eq!(out.code, 2, "{out}");
    let plan = out.json();
    for t in &world.targets {
        assert_eq!(
            changes_of(&plan, t.name()),
            vec![
                change("create", "User", "nina"),
                change("add-members", "Group", "eng"),
            ],
            "{}: {plan:#}",
            t.name()
        );
        t.proxy.clear();
    }
    // By DN, as an operator pastes it from the directory.
    world
        .run(&["sync", "--only", &person_dn("nina")])
        .expect_code(0);
    for t in &world.targets {
        let w = writes(t);
        assert!(
            w.len() == 2 && w[0].starts_with("POST") && w[1].starts_with("PATCH"),
            "{}: {w:?}",
            t.name()
        );
        assert!(t.user_states()["nina"]);
        assert_eq!(
            t.memberships()["eng"],
            ["alice", "bob", "nina"].map(String::from).into()
        );
        assert_ne!(t.user("bob")["title"], "Architect", "{}", t.name());
    }

    // A leaver is no longer in the directory: found by its userName on each target.
    world.slapd.delete(&person_dn("alice"));
    let out = world.run(&["plan", "--only", "alice", "--format", "json"]);
    assert_eq!(out.code, 2, "{out}");
    let plan = out.json();
    for t in &world.targets {
        let changes = changes_of(&plan, t.name());
        assert!(
            changes.contains(&change("deactivate", "User", "alice"))
                && changes
                    .iter()
                    .all(|(_, _, name)| name == "alice" || name == "eng"),
            "{}: {changes:?}",
            t.name()
        );
        t.proxy.clear();
    }
    world.run(&["sync", "--only", "alice"]).expect_code(0);
    for t in &world.targets {
        assert!(!t.user_states()["alice"], "{}", t.name());
        assert_ne!(t.user("bob")["title"], "Architect", "{}", t.name());
    }

    // A name found nowhere: said, nothing written, exit 3.
    for t in &world.targets {
        t.proxy.clear();
    }
    let out = world.run(&["sync", "--only", "nobody@example.org"]);
    assert_eq!(out.code, 3, "{out}");
    assert!(
        out.stdout.contains("nobody@example.org") || out.stderr.contains("nobody@example.org"),
        "{out}"
    );
    for t in &world.targets {
        assert!(writes(t).is_empty(), "{}: {:?}", t.name(), writes(t));
    }

    // The partial passes advanced no feed: the next cycle still brings bob's change, and
    // nothing of what --only did is done twice.
    let (_, plan) = world.plan_json();
    for t in &world.targets {
        let changes: BTreeSet<_> = changes_of(&plan, t.name()).into_iter().collect();
        assert_eq!(
            changes,
            [change("update", "User", "bob")].into(),
            "{}",
            t.name()
        );
    }
    world.sync_ok();
    for t in &world.targets {
        assert_eq!(t.user("bob")["title"], "Architect", "{}", t.name());
    }
    world.assert_converged();
}

#[test]
fn a_saved_plan_is_applied_exactly_and_a_stale_change_is_refused() {
    let world = World::start(&seed(), "");
    let file = world.config.dir().join("first.json");
    let out = world.run(&["plan", "--out", file.to_str().unwrap()]);
    assert_eq!(out.code, 2, "{out}");
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert!(saved["saved"]["configuration"].is_string(), "{saved:#}");
    for t in saved["targets"].as_array().unwrap() {
        for c in t["changes"].as_array().unwrap() {
            assert!(c["fingerprint"].is_string(), "{c}");
        }
    }
    // A review takes time: meanwhile the directory gets a new hire the plan does not have.
    world.slapd.add(&person(
        "erin",
        "Erin E",
        "E",
        "Erin",
        "erin@example.org",
        "",
    ));
    let out = world.run(&["sync", "--plan", file.to_str().unwrap()]);
    assert_eq!(out.code, 0, "{out}");
    for t in &world.targets {
        assert_eq!(
            t.user_states().into_keys().collect::<BTreeSet<_>>(),
            ["alice", "bob"].map(String::from).into(),
            "{}: exactly the saved changes",
            t.name()
        );
        assert_eq!(
            t.memberships()["eng"],
            ["alice", "bob"].map(String::from).into()
        );
    }
    world.sync_ok();

    // Second review: carol and dave join, bob's title changes; before the apply, dave's
    // entry changes again: his create is stale, the rest is applied.
    world.slapd.add(&person(
        "carol",
        "Carol C",
        "C",
        "Carol",
        "carol@example.org",
        "",
    ));
    world.slapd.add(&person(
        "dave",
        "Dave D",
        "D",
        "Dave",
        "dave@example.org",
        "",
    ));
    world.slapd.modify(&format!(
        "dn: {}\nchangetype: modify\nreplace: title\ntitle: Architect\n",
        person_dn("bob")
    ));
    let file = world.config.dir().join("second.json");
    world
        .run(&["plan", "--format", "json", "--out", file.to_str().unwrap()])
        .expect_code(2);
    let path = file.to_str().unwrap();
    world.slapd.modify(&format!(
        "dn: {}\nchangetype: modify\nreplace: mail\nmail: dave.d@example.org\n",
        person_dn("dave")
    ));
    for t in &world.targets {
        t.proxy.clear();
    }
    // Older than --max-age, or from another configuration: refused, nothing written.
    let out = world.run(&["sync", "--plan", path, "--max-age", "0s"]);
    assert_eq!(out.code, 1, "{out}");
    assert!(out.stderr.contains("--max-age"), "{out}");
    let target_file = world.config.target_path(world.targets[0].name());
    let original = std::fs::read_to_string(&target_file).unwrap();
    std::fs::write(&target_file, format!("{original}\nrate_limit = \"50/s\"\n")).unwrap();
    let out = world.run(&["sync", "--plan", path]);
    assert_eq!(out.code, 1, "{out}");
    assert!(out.stderr.contains("another configuration"), "{out}");
    std::fs::write(&target_file, original).unwrap();
    for t in &world.targets {
        assert!(writes(t).is_empty(), "{}: {:?}", t.name(), writes(t));
    }

    let out = world.run(&["sync", "--plan", path]);
    assert_eq!(out.code, 5, "{out}");
    assert!(out.stdout.contains("stale: create User dave"), "{out}");
    for t in &world.targets {
        let users = t.user_states();
        assert!(
            users.contains_key("carol") && !users.contains_key("dave"),
            "{}: {users:?}",
            t.name()
        );
        assert_eq!(t.user("bob")["title"], "Architect", "{}", t.name());
    }
    // What is left is exactly the stale change.
    let (_, plan) = world.plan_json();
    for t in &world.targets {
        assert_eq!(
            changes_of(&plan, t.name()),
            vec![change("create", "User", "dave")],
            "{}",
            t.name()
        );
    }
    world.sync_ok();
    world.assert_converged();
}

#[test]
fn a_running_daemon_answers_plan_explain_status_approve_and_sync_without_any_secret() {
    let mut world = World::start(&seed(), "");
    // The bind password only the daemon's environment has.
    world
        .config
        .set("ldap", "bind_password", "{ env = \"L2S_TEST_BIND_PW\" }")
        .set("daemon", "schedule", &toml_str("0 0 1 1 *"));
    let daemon = Ldap2scim::new(&world.config.path())
        .env("L2S_TEST_BIND_PW", world.slapd.bind_pw())
        .args(["run", "--now"])
        .spawn();
    assert!(
        wait_until(std::time::Duration::from_secs(30), || daemon
            .stderr()
            .contains("next cycle scheduled")),
        "{}",
        daemon.stderr()
    );
    let socket = std::fs::read_to_string(world.config.state_dir().join("control")).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(socket.trim())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o077,
            0,
            "the control socket is owner-only: {mode:o}"
        );
    }
    // Run by hand without the secret: answered by the daemon.
    let status = world.run(&["status"]);
    assert_eq!(status.code, 0, "{status}");
    assert!(status.stdout.contains("held by ldap2scim"), "{status}");
    world.run(&["plan"]).expect_code(0);

    world.slapd.add(&nina());
    // The live watch may apply it first; either way the answers agree with the targets.
    let out = world.run(&["explain", "nina"]);
    assert_eq!(out.code, 0, "{out}");
    assert!(out.stdout.contains("nina@example.org"), "{out}");
    let file = world.config.dir().join("by-daemon.json");
    let out = world.run(&["plan", "--out", file.to_str().unwrap()]);
    assert!(out.code == 0 || out.code == 2, "{out}");
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert!(saved["saved"]["configuration"].is_string(), "{saved:#}");
    // The caller's plan file travels to the daemon; the live watch may have applied nina
    // meanwhile, which makes its create stale (5), never an error.
    let out = world.run(&["sync", "--plan", file.to_str().unwrap()]);
    assert!(out.code == 0 || out.code == 5, "{out}");
    let leftovers: Vec<_> = std::fs::read_dir(world.config.state_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("plan-"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "the daemon's copy of the plan is removed"
    );
    world.run(&["sync", "--only", "nina"]).expect_code(0);
    for t in &world.targets {
        assert!(t.user_states()["nina"], "{}", t.name());
    }
    world
        .run(&["approve", "--target", world.targets[0].name()])
        .expect_code(0);
    world.run(&["sync"]).expect_code(0);
    // A bad command is answered with the same exit code and message as alone.
    let out = world.run(&["explain", "nobody-at-all"]);
    assert_eq!(out.code, 1, "{out}");
    assert!(out.stderr.contains("matches no user or group"), "{out}");
    let stopped = daemon.stop();
    assert_eq!(stopped.code, 0, "{stopped}");
    assert!(!world.config.state_dir().join("control").exists());
    // Without the daemon, the same command needs the secret.
    let out = world.run(&["status"]);
    assert!(
        out.code == 0 || out.stderr.contains("L2S_TEST_BIND_PW"),
        "{out}"
    );
    let out = world.run(&["plan"]);
    assert_eq!(out.code, 1, "{out}");
    assert!(out.stderr.contains("L2S_TEST_BIND_PW"), "{out}");
    world.targets.clear();
}
