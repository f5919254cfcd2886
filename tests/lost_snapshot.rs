//! Issue 11: losing or corrupting the snapshot costs time, never an offboarding (promise 12),
//! and the state directory stays private; plus two command-line mends (`explain` while the
//! state is held, `plan` with entries that cannot be provisioned). Against slapd, scim2-server
//! and Better Auth.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use support::*;

/// Every target's plan holds back exactly the orphan p002, whose account is still active.
fn assert_p002_waits_as_the_only_orphan(world: &World) {
    let (_, plan) = world.plan_json();
    for t in &world.targets {
        assert_eq!(
            held_of(&plan, t.name()),
            vec![("orphan".to_string(), "p002".to_string())],
            "{}",
            t.name()
        );
        assert!(t.user_states()["p002"], "{}", t.name());
    }
}

/// (action, name) of a target's held changes.
fn held_of(plan: &Value, target: &str) -> Vec<(String, String)> {
    target_json(plan, target)["held"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["action"].as_str().unwrap().to_string(),
                c["name"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// Every path under `root` (itself included) with its mode.
fn modes_under(root: &Path) -> Vec<(String, bool, u32)> {
    let mut out = vec![(root.display().to_string(), root.is_dir(), mode(root))];
    if root.is_dir() {
        for entry in std::fs::read_dir(root).unwrap() {
            out.extend(modes_under(&entry.unwrap().path()));
        }
    }
    out
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

/// `explain` while a daemon holds the state directory is answered by the daemon (between its
/// cycles), with the snapshot row, never with no row; once the daemon is gone it reads the
/// snapshot itself, with the same answer.
#[test]
fn explain_while_the_daemon_holds_the_state_is_answered_by_it() {
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
    let by_daemon = world.run(&["explain", "p000"]);
    by_daemon.expect_code(0);
    for t in by_daemon.json()["targets"].as_array().unwrap() {
        assert_eq!(t["snapshot"]["user_name"], "p000", "{t}");
    }
    daemon.stop().expect_code(0);

    let out = world.run(&["explain", "p000"]);
    out.expect_code(0);
    for t in out.json()["targets"].as_array().unwrap() {
        assert_eq!(t["snapshot"]["user_name"], "p000", "{t}");
    }
    assert_eq!(out.json()["targets"], by_daemon.json()["targets"]);
}

/// `sync` under `umask 000` still leaves the state directory 0700 and its files 0600.
#[test]
fn state_files_are_private_whatever_the_umask() {
    let world = World::start(&people(2), "");
    let state = world.config.state_dir();
    // The test harness created it with the default mode; make it wide open.
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
    let script = format!(
        "umask 000; exec {} --config {} sync",
        ldap2scim_binary().display(),
        world.config.path().display()
    );
    for round in 0..2 {
        if round == 1 {
            world.slapd.modify(&format!(
                "dn: {}\nchangetype: modify\nreplace: title\ntitle: Boss\n",
                person_dn("p001")
            ));
        }
        let out = std::process::Command::new("sh")
            .args(["-c", &script])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(mode(&state), 0o700, "state directory");
    assert_eq!(mode(&state.join("audit.jsonl")), 0o600, "audit log");
    assert_eq!(mode(&state.join("ldap2scim.lock")), 0o600, "lock file");
    assert!(modes_under(&state.join("snapshot")).len() > 1);
    // Everything in the state directory: the snapshot, its marker, the audit log, the lock.
    for (path, is_dir, m) in modes_under(&state) {
        assert_eq!(m, if is_dir { 0o700 } else { 0o600 }, "{path}");
    }
}

/// The leaver goes while the snapshot is lost: the rebuild lists it as an orphan, keeps its
/// account active and exits 4; `approve` + `sync` deactivates it; then all is quiet.
#[test]
fn a_leaver_during_a_lost_snapshot_is_an_orphan_deprovisioned_only_through_approve() {
    let world = World::start(&people(3), "");
    // An account made by hand, without an externalId: never an orphan (ownership rule).
    for t in &world.targets {
        let (code, made) = scim_post(
            &t.server.base_url(),
            t.server.token(),
            "/Users",
            &json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": "zed@example.org", "active": true}),
        );
        assert_eq!(code, 201, "{made}");
    }
    world.sync_ok();
    let leaver: Vec<String> = world
        .targets
        .iter()
        .map(|t| {
            let u = t.user("p002");
            assert!(u["active"].as_bool().unwrap_or(true));
            u["externalId"].as_str().unwrap().to_string()
        })
        .collect();

    world.slapd.delete(&person_dn("p002"));
    std::fs::remove_dir_all(world.config.state_dir()).unwrap();

    // A dry run already shows it.
    let (out, plan) = world.plan_json();
    assert_eq!(out.code, 2, "{out}");
    for (t, ext) in world.targets.iter().zip(&leaver) {
        assert_eq!(
            held_of(&plan, t.name()),
            vec![("orphan".to_string(), "p002".to_string())],
            "{}: {}",
            t.name(),
            target_json(&plan, t.name())
        );
        let orphan = &target_json(&plan, t.name())["held"][0];
        assert_eq!(orphan["resource"], "User");
        assert_eq!(orphan["external_id"], ext.as_str());
        assert_eq!(orphan["scim_id"], t.user("p002")["id"]);
        assert!(
            changes_of(&plan, t.name()).iter().all(|c| c.0 == "adopt"),
            "{}: {:?}",
            t.name(),
            changes_of(&plan, t.name())
        );
    }

    let out = world.run(&["sync"]);
    assert_eq!(out.code, 4, "orphans wait for approve:\n{out}");
    assert!(
        out.stderr.contains("snapshot") && out.stderr.contains("rebuilding"),
        "the lost snapshot is said:\n{out}"
    );
    assert!(
        out.stderr
            .contains(&world.config.state_dir().display().to_string()),
        "the warning names the state directory:\n{out}"
    );
    assert!(out.stdout.contains("orphan"), "{out}");
    for t in &world.targets {
        assert!(
            t.user_states()["p002"],
            "{}: an orphan stays active until approve",
            t.name()
        );
        assert!(t.user_states()["zed@example.org"], "{}", t.name());
        t.proxy.clear();
    }

    // Later cycles still show it (persisted), and still hold it.
    let (out, plan) = world.plan_json();
    assert_eq!(out.code, 2, "{out}");
    for t in &world.targets {
        assert_eq!(
            held_of(&plan, t.name()),
            vec![("orphan".to_string(), "p002".to_string())],
            "{}",
            t.name()
        );
        assert!(changes_of(&plan, t.name()).is_empty(), "{}", t.name());
    }
    let status = world.run(&["status"]);
    status.expect_code(0);
    assert!(status.stdout.contains("orphan"), "{status}");
    assert!(status.stdout.contains("rebuilt"), "{status}");
    world.sync_expect(4);
    for t in &world.targets {
        assert_eq!(t.proxy.writes(), 0, "{}: nothing written", t.name());
        assert!(t.user_states()["p002"], "{}", t.name());
    }

    for t in &world.targets {
        let out = world.run(&["approve", "--target", t.name()]);
        out.expect_code(0);
        assert!(out.stdout.contains("approved 1"), "{out}");
        // Each released change is named, before the count: approving deprovisions orphans.
        let listed = out
            .stdout
            .find("orphan User p002")
            .expect("the orphan is listed");
        assert!(listed < out.stdout.find("approved 1").unwrap(), "{out}");
    }
    // A pass for one other entry (`--only`) releases none of them, and keeps the approval.
    world.run(&["sync", "--only", "p000"]).expect_code(0);
    for t in &world.targets {
        assert!(
            t.user_states()["p002"],
            "{}: --only p000 deprovisioned the orphan",
            t.name()
        );
    }
    world.sync_ok();
    for t in &world.targets {
        let states = t.user_states();
        assert!(!states["p002"], "{}: deactivated after approve", t.name());
        assert!(states["p000"] && states["p001"], "{}", t.name());
        assert!(
            states["zed@example.org"],
            "{}: hand-made untouched",
            t.name()
        );
    }
    let status = world.run(&["status"]);
    assert!(!status.stdout.contains("orphan:"), "{status}");
    world.assert_converged();
}

/// A first sync against an empty target, or one with hand-made accounts only, is quiet: no
/// rebuild warning, no orphan, exit 0.
#[test]
fn a_first_sync_is_not_a_lost_snapshot() {
    let world = World::start(&people(2), "");
    for t in &world.targets {
        let (code, made) = scim_post(
            &t.server.base_url(),
            t.server.token(),
            "/Users",
            &json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": "zed@example.org", "externalId": "HR-4711", "active": true}),
        );
        assert_eq!(code, 201, "{made}");
    }
    for _ in 0..2 {
        let out = world.sync_ok();
        assert!(!out.stderr.contains("rebuilding"), "{out}");
        assert!(!out.stdout.contains("orphan"), "{out}");
    }
    let metrics_free = world.run(&["status"]);
    assert!(!metrics_free.stdout.contains("orphan"), "{metrics_free}");
}

/// Rows lost from a snapshot that is still there (its meta survives) are detected from the
/// recorded row counts and said; the rebuild finds the leaver as an orphan.
#[test]
fn a_snapshot_that_lost_rows_is_detected_and_its_leaver_is_an_orphan() {
    let world = World::start(&people(3), "");
    world.sync_ok();
    world.slapd.delete(&person_dn("p002"));
    {
        let snap = ldap2scim::snapshot::Snapshot::open(&world.config.state_dir()).unwrap();
        for t in &world.targets {
            let ts = snap.target(t.name()).unwrap();
            for id in ts.load().unwrap().users.keys() {
                ts.remove_user(id).unwrap();
            }
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(snap.flush()).unwrap();
    }
    let out = world.run(&["sync"]);
    assert_eq!(out.code, 4, "{out}");
    assert!(
        out.stderr.contains("lost") && out.stderr.contains("rebuilding"),
        "{out}"
    );
    assert_p002_waits_as_the_only_orphan(&world);
}

/// A damaged sled data file opens as an empty database; the marker beside it tells, and the
/// rebuild finds the leaver.
#[test]
fn a_damaged_snapshot_that_opens_empty_is_said_and_its_leaver_is_an_orphan() {
    let world = World::start(&people(3), "");
    world.sync_ok();
    world.slapd.delete(&person_dn("p002"));
    std::fs::write(
        world.config.state_dir().join("snapshot/db"),
        vec![0xA5u8; 8192],
    )
    .unwrap();
    let status = world.run(&["status"]);
    assert!(status.stdout.contains("WARNING"), "{status}");
    let out = world.run(&["sync"]);
    assert_eq!(out.code, 4, "{out}");
    assert!(
        out.stderr.contains("replaced or damaged") && out.stderr.contains("rebuilding"),
        "{out}"
    );
    assert_p002_waits_as_the_only_orphan(&world);
}

/// A snapshot sled cannot read stops the cycle with an error naming daemon.state_dir; it is
/// never taken for an empty one.
#[test]
fn an_unreadable_snapshot_stops_the_cycle_and_names_the_state_dir() {
    let world = World::start(&people(3), "");
    world.sync_ok();
    // Replace the snapshot's files by garbage: sled cannot read them.
    let snapshot = world.config.state_dir().join("snapshot");
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&snapshot).unwrap() {
        let p = entry.unwrap().path();
        if p.is_file() {
            files.push(p);
        }
    }
    for f in &files {
        std::fs::write(f, vec![0xA5u8; 4096]).unwrap();
    }
    for t in &world.targets {
        t.proxy.clear();
    }
    let out = world.run(&["sync"]);
    assert_eq!(out.code, 1, "an unreadable snapshot is an error:\n{out}");
    assert!(
        out.stderr.contains("daemon.state_dir")
            && out
                .stderr
                .contains(&world.config.state_dir().display().to_string()),
        "{out}"
    );
    for t in &world.targets {
        assert_eq!(t.proxy.writes(), 0, "{}", t.name());
    }
    let status = world.run(&["status"]);
    status.expect_code(0);
    assert!(status.stdout.contains("cannot be read"), "{status}");
}

/// With `deprovision = "delete"`, an approved orphan is deleted (and nothing else is).
#[test]
fn an_approved_orphan_follows_the_delete_policy() {
    let world = World::start(&people(3), "deprovision = \"delete\"");
    world.sync_ok();
    world.slapd.delete(&person_dn("p001"));
    std::fs::remove_dir_all(world.config.state_dir()).unwrap();
    let out = world.run(&["sync"]);
    assert_eq!(out.code, 4, "{out}");
    let (_, plan) = world.plan_json();
    for t in &world.targets {
        let held = &target_json(&plan, t.name())["held"];
        assert_eq!(held[0]["action"], "orphan", "{held}");
        assert_eq!(held[0]["deprovision"], "delete", "{held}");
        assert!(t.user_states().contains_key("p001"), "{}", t.name());
        world.run(&["approve", "--target", t.name()]).expect_code(0);
    }
    world.sync_ok();
    for t in &world.targets {
        let states = t.user_states();
        assert!(!states.contains_key("p001"), "{}: deleted", t.name());
        assert!(states["p000"] && states["p002"], "{}", t.name());
    }
    world.assert_converged();
}

/// A leaver deactivated before the snapshot was lost is offboarded already: not an orphan,
/// and the rebuild exits 0.
#[test]
fn a_leaver_deactivated_before_the_loss_is_not_an_orphan() {
    let world = World::start(&people(3), "");
    world.sync_ok();
    world.slapd.delete(&person_dn("p002"));
    world.sync_ok();
    std::fs::remove_dir_all(world.config.state_dir()).unwrap();
    let out = world.sync_ok();
    assert!(out.stderr.contains("rebuilding"), "{out}");
    assert!(!out.stdout.contains("orphan"), "{out}");
    for t in &world.targets {
        assert!(!t.user_states()["p002"], "{}", t.name());
    }
    world.assert_converged();
}

/// Loses the snapshot with the leaver p002 still active on every target; the rebuild lists
/// it as an orphan (exit 4).
fn lose_snapshot_with_orphan_p002(world: &World) {
    world.sync_ok();
    world.slapd.delete(&person_dn("p002"));
    std::fs::remove_dir_all(world.config.state_dir()).unwrap();
    world.sync_expect(4);
}

/// An approved orphan is read again before it is deprovisioned: one whose externalId was
/// changed on the target by hand since it was found is no longer that orphan. It is not
/// deactivated, the skip is said, and it is dropped from the orphans. `approve` names what it
/// releases.
#[test]
fn an_approved_orphan_whose_external_id_changed_meanwhile_is_not_deprovisioned() {
    let world = World::start(&people(3), "");
    lose_snapshot_with_orphan_p002(&world);
    for t in &world.targets {
        let out = world.run(&["approve", "--target", t.name()]);
        out.expect_code(0);
        assert!(
            out.stdout.contains("orphan User p002 (externalId "),
            "approve names the orphan it releases:\n{out}"
        );
        // Someone re-keys the account on the target after the approval.
        let id = t.user("p002")["id"].as_str().unwrap().to_string();
        let (code, body) = scim_patch(
            &t.server.base_url(),
            t.server.token(),
            &format!("/Users/{id}"),
            &json!({
                "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
                "Operations": [{"op": "replace", "path": "externalId", "value": "HR-4711"}],
            }),
        );
        assert!(code == 200 || code == 204, "{}: {code} {body}", t.name());
        assert_eq!(t.user("p002")["externalId"], "HR-4711", "{}", t.name());
        t.proxy.clear();
    }
    let out = world.run(&["sync"]);
    assert_eq!(out.code, 3, "the approved orphan was skipped:\n{out}");
    assert!(out.stderr.contains("not deprovisioned"), "{out}");
    assert!(out.stderr.contains("HR-4711"), "{out}");
    for t in &world.targets {
        assert!(
            t.user_states()["p002"],
            "{}: a re-keyed account is not the orphan any more",
            t.name()
        );
        let writes: Vec<_> = t
            .proxy
            .requests()
            .into_iter()
            .filter(|r| r.method != "GET")
            .collect();
        assert!(writes.is_empty(), "{}: {writes:?}", t.name());
    }
    // Dropped from the orphans: nothing waits, nothing is held.
    let status = world.run(&["status"]);
    assert!(!status.stdout.contains("orphan:"), "{status}");
    let (_, plan) = world.plan_json();
    for t in &world.targets {
        assert!(held_of(&plan, t.name()).is_empty(), "{}", t.name());
        assert!(t.user_states()["p002"], "{}", t.name());
    }
    world.assert_converged();
}

/// A `protect` pattern added after an orphan was found (and approved) covers it: the plan
/// drops it from the orphans, and it is never deprovisioned.
#[test]
fn an_approved_orphan_that_became_protected_is_dropped_not_deprovisioned() {
    let world = World::start(&people(3), "");
    lose_snapshot_with_orphan_p002(&world);
    for t in &world.targets {
        world.run(&["approve", "--target", t.name()]).expect_code(0);
        let path = world.config.target_path(t.name());
        let mut text = std::fs::read_to_string(&path).unwrap();
        assert!(
            !text.contains("\n["),
            "a top-level key goes before any table: {text}"
        );
        text.push_str("protect = [\"p002\"]\n");
        std::fs::write(&path, text).unwrap();
    }
    let (_, plan) = world.plan_json();
    for t in &world.targets {
        assert!(held_of(&plan, t.name()).is_empty(), "{}", t.name());
    }
    world.sync_ok();
    for t in &world.targets {
        assert!(
            t.user_states()["p002"],
            "{}: protected, never deprovisioned",
            t.name()
        );
    }
    let status = world.run(&["status"]);
    assert!(!status.stdout.contains("orphan:"), "{status}");
}

/// A snapshot replaced by another one (here: with the leaver's row missing) is noticed by the
/// marker. The loss stays pending when the next sync fails at the directory read (the
/// marker names the new snapshot from then on): status still says so, and the sync after
/// it still rebuilds and finds the leaver as an orphan.
#[test]
fn a_lost_snapshot_is_still_rebuilt_after_a_sync_that_failed_at_the_directory_read() {
    let mut world = World::start(&people(3), "");
    world.sync_ok();
    world.slapd.delete(&person_dn("p002"));
    {
        // Another snapshot in its place, one that never had p002's row, with consistent row
        // counts: only the marker tells.
        let snap = ldap2scim::snapshot::Snapshot::open(&world.config.state_dir()).unwrap();
        snap.stamp_foreign_id("an-older-copy").unwrap();
        for t in &world.targets {
            let ts = snap.target(t.name()).unwrap();
            let rows = ts.load().unwrap();
            let (leaver, _) = rows
                .users
                .iter()
                .find(|(_, r)| r.user_name == "p002")
                .unwrap();
            ts.remove_user(leaver).unwrap();
            let mut counts = snap.row_counts(t.name()).unwrap().unwrap();
            counts.users -= 1;
            snap.set_row_counts(t.name(), counts).unwrap();
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(snap.flush()).unwrap();
    }
    let status = world.run(&["status"]);
    assert!(status.stdout.contains("WARNING"), "{status}");

    world.slapd.stop();
    let out = world.run(&["sync"]);
    assert_ne!(out.code, 0, "{out}");
    assert_ne!(out.code, 4, "{out}");
    let status = world.run(&["status"]);
    assert!(
        status.stdout.contains("WARNING") && status.stdout.contains("not rebuilt yet"),
        "the loss is still said:\n{status}"
    );

    world.slapd.start_again();
    let out = world.run(&["sync"]);
    assert_eq!(out.code, 4, "the orphan is found and held:\n{out}");
    assert!(
        out.stderr.contains("replaced or damaged") && out.stderr.contains("rebuilding"),
        "{out}"
    );
    assert_p002_waits_as_the_only_orphan(&world);
    // Rebuilt: said no more.
    let status = world.run(&["status"]);
    assert!(!status.stdout.contains("not rebuilt yet"), "{status}");
    let out = world.run(&["sync"]);
    assert_eq!(out.code, 4, "{out}");
    assert!(!out.stderr.contains("rebuilding"), "{out}");
}

/// A target whose rows are known to be none (nobody in its scope) is not listed again on every
/// cycle to look for orphans: only a new or lost snapshot is.
#[test]
fn a_target_with_nobody_in_scope_is_not_listed_every_cycle() {
    let seed = staff(2) + &group("outsiders", &[&group_dn("nobody")]);
    let extra = format!("scope_groups = [{}]", toml_str(&group_dn("outsiders")));
    let world = World::start(&seed, &extra);
    world.sync_ok();
    for t in &world.targets {
        t.proxy.clear();
    }
    world.sync_ok();
    for t in &world.targets {
        let listings: Vec<String> = t
            .proxy
            .requests()
            .into_iter()
            .map(|r| r.path)
            .filter(|p| {
                p.starts_with("/Users?") && !p.contains("count=1&") && !p.ends_with("count=1")
            })
            .collect();
        assert!(listings.is_empty(), "{}: {listings:?}", t.name());
    }
}
