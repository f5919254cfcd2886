//! Issue 11: losing or corrupting the snapshot costs time, never an offboarding (promise 12),
//! and the state directory stays private; plus two command-line mends (`explain` while the
//! state is held, `plan` with entries that cannot be provisioned). Against slapd, scim2-server
//! and Better Auth.

mod support;

use std::time::Duration;

use support::*;

fn people(n: usize) -> String {
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
        .collect::<String>()
        + &group("everyone", &[&person_dn("p000"), &person_dn("p001")])
}

/// `plan` exits 2, not 0, when `sync` would report an entry it cannot provision (exit 3).
#[test]
fn plan_exits_2_when_an_entry_cannot_be_provisioned() {
    let world = World::start(
        &people(3),
        "max_deprovisions = \"100%\"\n[mapping]\nuserName = \"{mail}\"",
    );
    world.sync_ok();
    world.slapd.modify(&format!(
        "dn: {}\nchangetype: modify\ndelete: mail\n",
        person_dn("p001")
    ));
    let (out, plan) = world.plan_json();
    for t in &world.targets {
        assert!(changes_of(&plan, t.name()).is_empty(), "{}", t.name());
    }
    assert_eq!(out.code, 2, "{out}");
    world.run(&["plan"]).expect_code(2);
    world.sync_expect(3);
}

/// `explain` while a daemon holds the state directory says so and fails, instead of showing
/// no snapshot row; once the daemon is gone it shows the row.
#[test]
fn explain_while_the_daemon_holds_the_state_says_so() {
    let mut world = World::start(&people(2), "");
    world
        .config
        .set("daemon", "schedule", &toml_str("0 2 * * 1"));
    let daemon = Ldap2scim::new(&world.config.path())
        .args(["run", "--now"])
        .spawn();
    assert!(
        wait_until(Duration::from_secs(60), || daemon
            .stderr()
            .contains("cycle summary")),
        "{}",
        daemon.stderr()
    );
    let pid = daemon.pid();
    let out = world.run(&["explain", "p000"]);
    assert_ne!(out.code, 0, "{out}");
    assert!(
        out.stderr
            .contains(&format!("in use by ldap2scim (pid {pid}, `run`)")),
        "{out}"
    );
    assert!(out.stdout.is_empty(), "no half answer: {out}");
    daemon.stop().expect_code(0);

    let out = world.run(&["explain", "p000"]);
    out.expect_code(0);
    for t in out.json()["targets"].as_array().unwrap() {
        assert_eq!(t["snapshot"]["user_name"], "p000", "{t}");
    }
}
