//! Issue 3: never deprovision by mistake. Every destructive path against slapd and both real
//! SCIM servers: incomplete reads, the shrink guard, max_deprovisions with approve, ownership,
//! adoption, protect, the deprovision lifecycle, and a lost snapshot.

mod support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use support::*;

fn active_count(t: &Target) -> usize {
    t.user_states().values().filter(|a| **a).count()
}

fn held_of(plan: &Value, target: &str) -> Vec<String> {
    let t = plan["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["target"] == target)
        .unwrap();
    t["held"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            format!(
                "{} {}",
                c["action"].as_str().unwrap(),
                c["name"].as_str().unwrap()
            )
        })
        .collect()
}

/// A plain TCP relay in front of slapd that runs `on_request` when the client sends its
/// `nth` request segment (bind = 1, first page = 2, second page = 3 …) and then relays it.
fn relay(upstream_port: u16, nth: usize, on_request: impl Fn() + Send + Sync + 'static) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let on_request = Arc::new(on_request);
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(server) = TcpStream::connect(("127.0.0.1", upstream_port)) else {
                continue;
            };
            let (mut c_read, mut s_write) =
                (client.try_clone().unwrap(), server.try_clone().unwrap());
            let (mut s_read, mut c_write) = (server, client);
            let seen = Arc::new(AtomicUsize::new(0));
            let hook = on_request.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 16384];
                while let Ok(n) = c_read.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if seen.fetch_add(1, Ordering::SeqCst) + 1 == nth {
                        hook();
                    }
                    if s_write.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut s_read, &mut c_write);
                let _ = c_write.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    port
}

#[test]
fn slapd_killed_between_two_pages_deprovisions_nothing() {
    let mut world = World::start(&people(120), "");
    world.sync_ok();
    // Plain LDAP through the relay, small pages: the second page request kills slapd.
    let pid = world.slapd.pid();
    let port = relay(world.slapd.port(), 3, move || {
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status();
        std::thread::sleep(Duration::from_millis(200));
    });
    world
        .config
        .set(
            "ldap",
            "url",
            &toml_str(&format!("ldap://127.0.0.1:{port}")),
        )
        .set("ldap", "starttls", "false")
        .set("ldap", "page_size", "50")
        // The paged full read is what this kills (tests/feed.rs cuts the change feed).
        .set("ldap", "change_feed", "\"none\"");
    for t in &world.targets {
        t.proxy.clear();
    }
    let out = world.run(&["sync"]);
    assert_eq!(out.code, 1, "{out}");
    assert!(
        out.stderr.contains("incomplete"),
        "says the read is incomplete:\n{out}"
    );
    for t in &world.targets {
        assert_eq!(
            t.proxy.writes(),
            0,
            "{}: no write after a failed read",
            t.name()
        );
        assert_eq!(active_count(t), 120, "{}", t.name());
    }
    world.slapd.start_again();
}

#[test]
fn a_size_limited_bind_account_deprovisions_nothing() {
    let world = World::start(&people(30), "");
    world.sync_ok();
    world.slapd.modify(
        "dn: olcDatabase={1}mdb,cn=config\nchangetype: modify\nadd: olcLimits\nolcLimits: dn.exact=\"cn=sync,dc=example,dc=org\" size.soft=10 size.hard=10 size.prtotal=10\n",
    );
    world.slapd.delete(&person_dn("p029"));
    for t in &world.targets {
        t.proxy.clear();
    }
    // A full read (a delta of one change stays under the limit, and is right): with the
    // change feed its first search hits the limit, and so does the paged read without it.
    let out = world.run(&["sync", "--full"]);
    assert_eq!(out.code, 1, "{out}");
    assert!(
        out.stderr.contains("sizeLimitExceeded"),
        "names the failed check:\n{out}"
    );
    let mut world = world;
    world.config.set("ldap", "change_feed", "\"none\"");
    let out = world.run(&["sync"]);
    assert_eq!(out.code, 1, "{out}");
    assert!(
        out.stderr.contains("sizeLimitExceeded"),
        "names the failed check:\n{out}"
    );
    for t in &world.targets {
        assert_eq!(t.proxy.writes(), 0, "{}", t.name());
        assert_eq!(active_count(t), 30, "{}", t.name());
    }
}

#[test]
fn a_continuation_reference_is_never_followed_and_stops_the_cycle() {
    let world = World::start(&people(5), "");
    world.sync_ok();
    let out = std::process::Command::new("ldapadd")
        .args(["-Q", "-Y", "EXTERNAL", "-M", "-H", &world.slapd.ldapi_url()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().unwrap().write_all(
                b"dn: ou=elsewhere,ou=people,dc=example,dc=org\nobjectClass: referral\nobjectClass: extensibleObject\nou: elsewhere\nref: ldap://127.0.0.1:9/ou=elsewhere,dc=example,dc=org\n\n",
            )?;
            c.wait()
        })
        .unwrap();
    assert!(out.success());
    let out = world.run(&["sync"]);
    assert_eq!(out.code, 1, "{out}");
    assert!(out.stderr.contains("continuation reference"), "{out}");
}

#[test]
fn an_empty_or_much_smaller_read_holds_every_deprovision() {
    let mut world = World::start(&people(10), "");
    world.sync_ok();
    world.config.set("ldap", "max_shrink", &toml_str("20%"));

    // Half the directory gone: more than max_shrink.
    for i in 0..5 {
        world.slapd.delete(&person_dn(&format!("p{i:03}")));
    }
    let (out, plan) = world.plan_json();
    assert_eq!(out.code, 2, "{out}");
    for t in &world.targets {
        let held = held_of(&plan, t.name());
        let deactivations = held.iter().filter(|h| h.starts_with("deactivate")).count();
        assert_eq!(deactivations, 5, "{}: {held:?}", t.name());
        assert!(
            held.contains(&"remove-members everyone".to_string()),
            "their memberships are held too: {held:?}"
        );
        let tp = plan["targets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["target"] == t.name())
            .unwrap();
        assert_eq!(tp["status"], "held");
        assert!(
            tp["held_reason"].as_str().unwrap().contains("max_shrink"),
            "{tp}"
        );
    }
    let out = world.run(&["sync"]);
    assert_eq!(out.code, 4, "{out}");
    for t in &world.targets {
        assert_eq!(active_count(t), 10, "{}: nobody deactivated", t.name());
    }
    // A filter that matches nobody: an empty read is held too.
    world
        .config
        .set("ldap.users", "filter", &toml_str("(uid=nobody-at-all)"));
    let out = world.run(&["sync"]);
    assert_eq!(out.code, 4, "{out}");
    assert!(out.stdout.contains("returned no users"), "{out}");
    for t in &world.targets {
        assert_eq!(active_count(t), 10, "{}", t.name());
    }
    // The operator looked: approve releases the five.
    world.config.set(
        "ldap.users",
        "filter",
        &toml_str("(objectClass=inetOrgPerson)"),
    );
    world.sync_expect(4);
    for t in &world.targets {
        world.run(&["approve", "--target", t.name()]).expect_code(0);
    }
    world.sync_ok();
    for t in &world.targets {
        assert_eq!(active_count(t), 5, "{}", t.name());
    }
}

#[test]
fn max_deprovisions_holds_the_excess_and_approve_releases_exactly_the_held_set() {
    let world = World::start(&people(20), "max_deprovisions = \"10%\"");
    world.sync_ok();
    for i in 0..10 {
        world.slapd.delete(&person_dn(&format!("p{i:03}")));
    }
    world.slapd.modify(&format!(
        "dn: {}\nchangetype: modify\nreplace: title\ntitle: Boss\n",
        person_dn("p015")
    ));
    let out = world.run(&["sync"]);
    assert_eq!(out.code, 4, "{out}");
    assert!(out.stdout.contains("max_deprovisions"), "{out}");
    for t in &world.targets {
        assert_eq!(
            active_count(t),
            20,
            "{}: the deprovisions are held",
            t.name()
        );
        assert_eq!(
            t.user("p015")["title"],
            "Boss",
            "{}: the safe change went ahead",
            t.name()
        );
    }
    let (_, plan) = world.plan_json();
    for t in &world.targets {
        let held = held_of(&plan, t.name());
        assert_eq!(
            held.iter().filter(|h| h.starts_with("deactivate")).count(),
            10,
            "{held:?}"
        );
        assert!(
            held.contains(&"remove-members everyone".to_string()),
            "{held:?}"
        );
    }
    let status = world.run(&["status"]);
    assert!(status.stdout.contains("held"), "{status}");

    for t in &world.targets {
        let out = world.run(&["approve", "--target", t.name()]);
        out.expect_code(0);
        assert!(out.stdout.contains("approved 11"), "{out}");
    }
    // Planned after the approval: three more leavers, over the limit on their own (10% of 20).
    for i in 10..13 {
        world.slapd.delete(&person_dn(&format!("p{i:03}")));
    }
    let out = world.run(&["sync"]);
    assert_eq!(out.code, 4, "the three new ones are held:\n{out}");
    for t in &world.targets {
        let states = t.user_states();
        let inactive: Vec<_> = states
            .iter()
            .filter(|(_, a)| !**a)
            .map(|(n, _)| n.clone())
            .collect();
        let expected: Vec<_> = (0..10).map(|i| format!("p{i:03}")).collect();
        assert_eq!(inactive, expected, "{}: exactly the approved set", t.name());
    }
}

#[test]
fn hand_made_accounts_are_never_touched_without_an_explicit_rule() {
    let seed = people(3)
        + &person(
            "alice",
            "Alice",
            "Liddell",
            "Alice",
            "alice@example.org",
            "Directory Alice",
        );
    let mut world = World::start(&seed, "match_existing = [\"externalId\"]");
    let mut hand_made = BTreeMap::new();
    for t in &world.targets {
        let body = json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": "alice", "title": "Hand Made",
            "emails": [{"value": "alice@example.org", "type": "work", "primary": true}], "active": true});
        let (code, created) = scim_post(&t.server.base_url(), t.server.token(), "/Users", &body);
        assert_eq!(code, 201, "{created}");
        let (code, zed) = scim_post(
            &t.server.base_url(),
            t.server.token(),
            "/Users",
            &json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": "zed@example.org", "active": true}),
        );
        assert_eq!(code, 201, "{zed}");
        hand_made.insert(t.name(), created["id"].as_str().unwrap().to_string());
    }
    // Without a userName rule: the create conflicts, alice is reported, and nothing is adopted.
    let out = world.run(&["sync"]);
    assert_eq!(out.code, 3, "{out}");
    for t in &world.targets {
        let alice = t.user("alice");
        assert_eq!(alice["title"], "Hand Made", "{}: untouched", t.name());
        assert!(alice["externalId"].is_null(), "{}", t.name());
        assert!(
            t.user_states()["zed@example.org"],
            "{}: an account not in the directory is never deactivated",
            t.name()
        );
    }
    // protect wins over a rule.
    let endpoints: Vec<(&str, String, String)> = world
        .targets
        .iter()
        .map(|t| (t.name(), t.proxy.url(), t.server.token().to_string()))
        .collect();
    for (name, url, token) in &endpoints {
        world.config.target(
            name,
            url,
            token,
            "match_existing = [\"externalId\", \"userName\"]\nprotect = [\"ALI*\"]",
        );
    }
    let (_, plan) = world.plan_json();
    for t in &world.targets {
        assert!(
            changes_of(&plan, t.name()).iter().all(|c| c.2 != "alice"),
            "{}: alice is neither adopted nor created",
            t.name()
        );
        let problems = plan["targets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["target"] == t.name())
            .unwrap()["problems"]
            .to_string();
        assert!(problems.contains("protect"), "{}: {problems}", t.name());
    }
    world.sync_ok();
    for t in &world.targets {
        assert_eq!(t.user("alice")["title"], "Hand Made");
    }
    // With the rule and no protection: adopted (same SCIM id), brought in line.
    for (name, url, token) in &endpoints {
        world.config.target(
            name,
            url,
            token,
            "match_existing = [\"externalId\", \"userName\"]",
        );
    }
    let (_, plan) = world.plan_json();
    for t in &world.targets {
        assert_eq!(
            changes_of(&plan, t.name()),
            vec![change("adopt", "User", "alice")],
            "{}",
            t.name()
        );
    }
    world.sync_ok();
    for t in &world.targets {
        let alice = t.user("alice");
        assert_eq!(
            alice["id"].as_str().unwrap(),
            hand_made[t.name()],
            "{}",
            t.name()
        );
        assert_eq!(alice["title"], "Directory Alice");
        assert!(t.user_states()["zed@example.org"], "{}", t.name());
    }
    world.assert_converged();
}

#[test]
fn deactivate_then_delete_follows_the_grace_period_and_a_returner_is_reactivated() {
    let seed = people(4)
        + &group(
            "scope",
            &[&person_dn("p000"), &person_dn("p001"), &person_dn("p002")],
        );
    let extra = "deprovision = \"deactivate-then-delete\"\ndelete_after = \"30d\"\nscope_groups = [\"cn=scope,ou=groups,dc=example,dc=org\"]";
    let world = World::start(&seed, extra);
    world.sync_ok();
    for t in &world.targets {
        assert_eq!(
            t.users().len(),
            3,
            "{}: only the scope group's members",
            t.name()
        );
    }
    let day0 = chrono::Utc::now();
    let run_at = |days: i64, args: &[&str]| {
        let now = (day0 + chrono::Duration::days(days)).to_rfc3339();
        Ldap2scim::new(&world.config.path())
            .args(args)
            .env("LDAP2SCIM_NOW", &now)
            .run()
    };

    // p002 leaves the scope: deactivated now.
    world.slapd.modify(&format!(
        "dn: {}\nchangetype: modify\ndelete: member\nmember: {}\n",
        group_dn("scope"),
        person_dn("p002")
    ));
    run_at(0, &["sync"]).expect_code(0);
    for t in &world.targets {
        assert!(!t.user_states()["p002"], "{}", t.name());
    }
    // Back on day 10: reactivated, same account.
    world.slapd.modify(&format!(
        "dn: {}\nchangetype: modify\nadd: member\nmember: {}\n",
        group_dn("scope"),
        person_dn("p002")
    ));
    let out = run_at(10, &["plan", "--format", "json"]);
    for t in &world.targets {
        assert_eq!(
            changes_of(&out.json(), t.name()),
            vec![
                change("update", "User", "p002"),
                change("add-members", "Group", "scope")
            ]
        );
    }
    run_at(10, &["sync"]).expect_code(0);
    for t in &world.targets {
        assert!(t.user_states()["p002"], "{}", t.name());
    }
    // Leaves again on day 11: 29 days later nothing is due, 31 days later it is deleted.
    world.slapd.modify(&format!(
        "dn: {}\nchangetype: modify\ndelete: member\nmember: {}\n",
        group_dn("scope"),
        person_dn("p002")
    ));
    run_at(11, &["sync"]).expect_code(0);
    let out = run_at(40, &["plan"]);
    assert_eq!(
        out.code, 0,
        "29 days after deactivation nothing is due:\n{out}"
    );
    let out = run_at(42, &["plan", "--format", "json"]);
    for t in &world.targets {
        assert_eq!(
            changes_of(&out.json(), t.name()),
            vec![change("delete", "User", "p002")]
        );
    }
    run_at(42, &["sync"]).expect_code(0);
    for t in &world.targets {
        assert!(
            !t.user_states().contains_key("p002"),
            "{}: deleted after the grace period",
            t.name()
        );
        assert_eq!(t.users().len(), 2);
    }
}

#[test]
fn deprovision_delete_removes_a_leaver_at_once() {
    let world = World::start(&people(3), "deprovision = \"delete\"");
    world.sync_ok();
    world.slapd.delete(&person_dn("p002"));
    world.sync_ok();
    for t in &world.targets {
        assert!(!t.user_states().contains_key("p002"), "{}", t.name());
        assert_eq!(t.users().len(), 2);
    }
    world.assert_converged();
}

#[test]
fn a_lost_snapshot_rebuilds_with_zero_creates_and_zero_duplicates() {
    let seed = people(60)
        + &group(
            "half",
            &(0..30)
                .map(|i| person_dn(&format!("p{i:03}")))
                .collect::<Vec<_>>()
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        );
    let world = World::start(&seed, "");
    world.sync_ok();
    let before: Vec<(usize, usize)> = world
        .targets
        .iter()
        .map(|t| (t.users().len(), t.groups().len()))
        .collect();
    std::fs::remove_dir_all(world.config.state_dir()).unwrap();
    let (out, plan) = world.plan_json();
    assert_eq!(out.code, 2, "{out}");
    for t in &world.targets {
        let c = changes_of(&plan, t.name());
        assert!(
            c.iter().all(|x| x.0 == "adopt"),
            "{}: only adoptions: {c:?}",
            t.name()
        );
        assert_eq!(c.len(), 60 + 2, "{}", t.name());
        t.proxy.clear();
    }
    world.sync_ok();
    for (t, (users, groups)) in world.targets.iter().zip(before) {
        assert_eq!(
            t.proxy
                .requests()
                .iter()
                .filter(|r| r.method == "POST")
                .count(),
            0,
            "{}: zero creates",
            t.name()
        );
        assert_eq!(
            (t.users().len(), t.groups().len()),
            (users, groups),
            "{}: zero duplicates",
            t.name()
        );
        assert_eq!(t.memberships()["half"].len(), 30);
    }
    world.assert_converged();
}

#[test]
fn an_entry_whose_id_cannot_be_read_stops_the_cycle() {
    let world = World::start(&people(5), "");
    world.sync_ok();
    // The service account may no longer read one entry's entryUUID.
    world.slapd.modify(&format!(
        "dn: olcDatabase={{1}}mdb,cn=config\nchangetype: modify\nadd: olcAccess\nolcAccess: {{0}}to dn.exact=\"{}\" attrs=entryUUID by dn.exact=\"cn=sync,dc=example,dc=org\" none by * break\n",
        person_dn("p003")
    ));
    for t in &world.targets {
        t.proxy.clear();
    }
    // An access rule changes no entry, so a change feed has nothing to say: the full read
    // (daemon.full_schedule, or by hand) is what finds it.
    let out = world.run(&["sync", "--full"]);
    assert_eq!(out.code, 1, "{out}");
    assert!(
        out.stderr.contains("uid=p003") && out.stderr.contains("has no entryUUID"),
        "names the entry:\n{out}"
    );
    for t in &world.targets {
        assert_eq!(t.proxy.writes(), 0, "{}", t.name());
        assert_eq!(active_count(t), 5, "{}", t.name());
    }
}

#[test]
fn a_user_whose_mapping_breaks_is_reported_not_deprovisioned() {
    let world = World::start(
        &people(5),
        "max_deprovisions = \"100%\"\n[mapping]\nuserName = \"{mail}\"",
    );
    world.sync_ok();
    // A mailbox migration clears p001's mail: its userName template renders empty.
    world.slapd.modify(&format!(
        "dn: {}\nchangetype: modify\ndelete: mail\n",
        person_dn("p001")
    ));
    let (_, plan) = world.plan_json();
    for t in &world.targets {
        assert!(
            changes_of(&plan, t.name()).is_empty(),
            "{}: nothing planned for it",
            t.name()
        );
        let tp = plan["targets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["target"] == t.name())
            .unwrap();
        assert!(
            tp["problems"]
                .to_string()
                .contains("userName template renders empty"),
            "{tp}"
        );
    }
    let out = world.sync_expect(3);
    assert!(
        out.stdout.contains("problem: "),
        "an entry that cannot be provisioned is a partial failure:\n{out}"
    );
    for t in &world.targets {
        assert_eq!(active_count(t), 5, "{}: still active", t.name());
        assert!(
            t.memberships()["everyone"].contains("p001@example.org"),
            "{}: still a member",
            t.name()
        );
    }
}
