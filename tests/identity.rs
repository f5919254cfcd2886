//! Issue 11, the plan side: the directory cannot silently move an account (a re-bind is a
//! visible, counted change), `protect` covers creates, a listed resource we cannot address
//! never turns into a second account, and an adoption sends only what its plan shows (a
//! target's own shape of a value is no difference). Against slapd and both real SCIM servers,
//! and a small fake SCIM target for what they cannot show.

mod support;

use serde_json::{json, Value};
use support::*;

fn entry_uuid(slapd: &Slapd, uid: &str) -> String {
    slapd.entry_uuid(&person_dn(uid))
}

fn target_plan<'a>(plan: &'a Value, target: &str) -> &'a Value {
    plan["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["target"] == target)
        .unwrap_or_else(|| panic!("{target} in {plan}"))
}

fn rebinds(list: &Value) -> Vec<(String, String, String)> {
    list.as_array()
        .unwrap()
        .iter()
        .filter(|c| c["action"] == "rebind")
        .map(|c| {
            assert_eq!(c["resource"], "User", "{c}");
            (
                c["name"].as_str().unwrap().to_string(),
                c["external_id"].as_str().unwrap().to_string(),
                c["from_external_id"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Deletes `uid`'s entry and adds a new one with the same uid and mail (a new entryUUID).
fn replace_entry(world: &World, uid: &str) -> String {
    world.slapd.delete(&person_dn(uid));
    add_newcomer(world, uid)
}

/// Adds a new entry with `uid`'s uid and mail.
fn add_newcomer(world: &World, uid: &str) -> String {
    world.slapd.add(&person(
        uid,
        "Someone Else",
        "Else",
        "Someone",
        &format!("{uid}@example.org"),
        "Newcomer",
    ));
    entry_uuid(&world.slapd, uid)
}

fn set_targets(world: &mut World, extra: &str) {
    let endpoints: Vec<(&str, String, String)> = world
        .targets
        .iter()
        .map(|t| (t.name(), t.proxy.url(), t.server.token().to_string()))
        .collect();
    for (name, url, token) in &endpoints {
        world.config.target(name, url, token, extra);
    }
}

fn audit_lines(world: &World) -> Vec<Value> {
    std::fs::read_to_string(world.config.state_dir().join("audit.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn an_entry_replaced_under_the_same_uid_is_a_visible_counted_rebind() {
    let seed = staff(4)
        + &group("team", &[&person_dn("p001"), &person_dn("p002")])
        + &group("pair", &[&person_dn("p000"), &person_dn("p003")]);
    let mut world = World::start(&seed, "");
    world.sync_ok();
    let old = entry_uuid(&world.slapd, "p001");
    let scim_ids: Vec<String> = world
        .targets
        .iter()
        .map(|t| t.user("p001")["id"].as_str().unwrap().to_string())
        .collect();

    // Same cycle: the entry is deleted and another one with the same uid appears (and is in
    // the group, whether or not the directory dropped the old entry's membership).
    let new = replace_entry(&world, "p001");
    assert_ne!(old, new);
    let team = world
        .slapd
        .search(&group_dn("team"), "(objectClass=*)", &["member"]);
    if !team.contains(&person_dn("p001")) {
        world.slapd.modify(&format!(
            "dn: {}\nchangetype: modify\nadd: member\nmember: {}\n",
            group_dn("team"),
            person_dn("p001")
        ));
    }
    let (out, plan) = world.plan_json();
    assert_eq!(out.code, 2, "{out}");
    for t in &world.targets {
        let tp = target_plan(&plan, t.name());
        assert_eq!(
            rebinds(&tp["changes"]),
            vec![("p001".to_string(), new.clone(), old.clone())],
            "{}: {tp}",
            t.name()
        );
        assert!(
            tp["changes"]
                .as_array()
                .unwrap()
                .iter()
                .all(|c| c["action"] != "adopt" && c["action"] != "deactivate"),
            "{}: neither a silent adoption nor a second change: {tp}",
            t.name()
        );
        assert_eq!(tp["summary"]["users_rebound"], 1, "{tp}");
    }
    for format in ["text", "markdown"] {
        let out = world.run(&["plan", "--format", format]);
        assert!(
            out.stdout.contains("rebind") && out.stdout.contains(&old) && out.stdout.contains(&new),
            "{format} names both ids:\n{out}"
        );
    }

    // It counts against max_deprovisions: with 0 it is held.
    set_targets(&mut world, "max_deprovisions = \"0\"");
    let (_, plan) = world.plan_json();
    for t in &world.targets {
        let tp = target_plan(&plan, t.name());
        assert_eq!(tp["status"], "held", "{tp}");
        assert_eq!(rebinds(&tp["held"]).len(), 1, "{tp}");
        assert!(rebinds(&tp["changes"]).is_empty(), "{tp}");
    }
    world.sync_expect(4);
    for (t, sid) in world.targets.iter().zip(&scim_ids) {
        let u = t.user("p001");
        assert_eq!(u["id"], *sid);
        assert_eq!(u["externalId"], old, "{}: still the old entry's", t.name());
    }

    // rebind = "hold": held whatever the limit, until approve.
    set_targets(&mut world, "rebind = \"hold\"");
    let (_, plan) = world.plan_json();
    for t in &world.targets {
        let tp = target_plan(&plan, t.name());
        assert_eq!(rebinds(&tp["held"]).len(), 1, "{tp}");
        assert!(
            tp["held_reason"].as_str().unwrap().contains("rebind"),
            "{tp}"
        );
    }
    world.sync_expect(4);
    for t in &world.targets {
        assert_eq!(t.user("p001")["externalId"], old, "{}", t.name());
        let out = world.run(&["approve", "--target", t.name()]);
        out.expect_code(0);
    }
    world.sync_ok();
    for (t, sid) in world.targets.iter().zip(&scim_ids) {
        let u = t.user("p001");
        assert_eq!(u["id"], *sid, "{}: the same account", t.name());
        assert_eq!(u["externalId"], new, "{}: now the new entry's", t.name());
        assert_eq!(u["title"], "Newcomer", "{}", t.name());
        assert!(
            t.memberships()["team"].contains("p001"),
            "{}: its membership stays",
            t.name()
        );
    }
    let audit = audit_lines(&world);
    for t in &world.targets {
        assert!(
            audit.iter().any(|l| l["target"] == t.name()
                && l["action"] == "rebind"
                && l["external_id"] == new
                && l["from_external_id"] == old
                && l["outcome"] == "ok"),
            "{}: the audit log names both: {audit:?}",
            t.name()
        );
    }
    world.assert_converged();

    // Later: p002 leaves (deactivated), then a new entry takes its uid: a rebind too, not a
    // silent reactivation.
    set_targets(&mut world, "");
    world.slapd.delete(&person_dn("p002"));
    world.sync_ok();
    for t in &world.targets {
        assert!(!t.user_states()["p002"], "{}", t.name());
    }
    let old2 = world.targets[0].user("p002")["externalId"]
        .as_str()
        .unwrap()
        .to_string();
    let new2 = add_newcomer(&world, "p002");
    let (_, plan) = world.plan_json();
    for t in &world.targets {
        let tp = target_plan(&plan, t.name());
        assert_eq!(
            rebinds(&tp["changes"]),
            vec![("p002".to_string(), new2.clone(), old2.clone())],
            "{}: {tp}",
            t.name()
        );
    }
    world.sync_ok();
    for t in &world.targets {
        let u = t.user("p002");
        assert_eq!(u["externalId"], new2, "{}", t.name());
        assert_eq!(u["active"], true, "{}", t.name());
    }
    world.assert_converged();

    // Two rebinds in one cycle whose accounts share a group: both memberships move.
    for uid in ["p000", "p003"] {
        replace_entry(&world, uid);
    }
    let pair = world
        .slapd
        .search(&group_dn("pair"), "(objectClass=*)", &["member"]);
    for uid in ["p000", "p003"] {
        if !pair.contains(&person_dn(uid)) {
            world.slapd.modify(&format!(
                "dn: {}\nchangetype: modify\nadd: member\nmember: {}\n",
                group_dn("pair"),
                person_dn(uid)
            ));
        }
    }
    let (_, plan) = world.plan_json();
    for t in &world.targets {
        let tp = target_plan(&plan, t.name());
        assert_eq!(rebinds(&tp["changes"]).len(), 2, "{tp}");
    }
    world.sync_ok();
    for t in &world.targets {
        assert_eq!(
            t.memberships()["pair"].iter().cloned().collect::<Vec<_>>(),
            vec!["p000".to_string(), "p003".to_string()],
            "{}",
            t.name()
        );
    }
    world.assert_converged();
}

#[test]
fn protect_keeps_directory_entries_from_being_created() {
    let seed = staff(2)
        + &person(
            "admin-evil",
            "Evil",
            "Evil",
            "E",
            "admin-evil@example.org",
            "Root",
        )
        + &group("admin-team", &[&person_dn("p000")])
        + &group("staff", &[&person_dn("p000"), &person_dn("admin-evil")]);
    let world = World::start(&seed, "protect = [\"admin*\"]");
    let (_, plan) = world.plan_json();
    for t in &world.targets {
        let tp = target_plan(&plan, t.name());
        let changes = changes_of(&plan, t.name());
        assert!(
            changes
                .iter()
                .all(|c| c.2 != "admin-evil" && c.2 != "admin-team"),
            "{}: {changes:?}",
            t.name()
        );
        let problems = tp["problems"].to_string();
        assert!(
            problems.contains("admin-evil matches a protect pattern; not created")
                && problems.contains("admin-team matches a protect pattern; not created"),
            "{}: {problems}",
            t.name()
        );
    }
    // Policy, not a failure.
    let out = world.sync_ok();
    assert!(out.stdout.contains("not created"), "{out}");
    for t in &world.targets {
        assert!(
            !t.user_states().contains_key("admin-evil"),
            "{}: not created",
            t.name()
        );
        let groups = t.memberships();
        assert!(!groups.contains_key("admin-team"), "{}", t.name());
        assert_eq!(
            groups["staff"].iter().cloned().collect::<Vec<_>>(),
            vec!["p000".to_string()],
            "{}",
            t.name()
        );
    }
    world.assert_converged();
}

fn user_writes(t: &Target) -> Vec<RecordedRequest> {
    t.proxy
        .requests()
        .into_iter()
        .filter(|r| matches!(r.method.as_str(), "PATCH" | "PUT") && r.path.starts_with("/Users"))
        .collect()
}

#[test]
fn an_adoption_after_a_lost_snapshot_sends_only_what_differs() {
    let world = World::start(&(staff(5) + &group("all", &[&person_dn("p000")])), "");
    world.sync_ok();

    std::fs::remove_dir_all(world.config.state_dir()).unwrap();
    for t in &world.targets {
        t.proxy.clear();
    }
    world.sync_ok();
    for t in &world.targets {
        assert_eq!(
            user_writes(t),
            vec![],
            "{}: unchanged users are adopted without a write",
            t.name()
        );
    }
    world.assert_converged();

    // One attribute changed while the snapshot was away: one PATCH, of that attribute only.
    std::fs::remove_dir_all(world.config.state_dir()).unwrap();
    world.slapd.modify(&format!(
        "dn: {}\nchangetype: modify\nreplace: title\ntitle: Boss\n",
        person_dn("p003")
    ));
    let (_, plan) = world.plan_json();
    for t in &world.targets {
        let tp = target_plan(&plan, t.name());
        let adoptions: Vec<&Value> = tp["changes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["resource"] == "User")
            .collect();
        assert_eq!(adoptions.len(), 5, "{tp}");
        for c in adoptions {
            let attrs = c["attributes"].as_object().unwrap();
            if c["name"] == "p003" {
                assert_eq!(
                    attrs.keys().collect::<Vec<_>>(),
                    vec!["title"],
                    "{}: {c}",
                    t.name()
                );
            } else {
                assert!(attrs.is_empty(), "{}: {c}", t.name());
            }
        }
        t.proxy.clear();
    }
    world.sync_ok();
    for t in &world.targets {
        let id = t.user("p003")["id"].as_str().unwrap().to_string();
        let writes = user_writes(t);
        assert_eq!(writes.len(), 1, "{}: {writes:?}", t.name());
        assert_eq!(writes[0].method, "PATCH");
        assert_eq!(writes[0].path, format!("/Users/{id}"));
        assert_eq!(t.user("p003")["title"], "Boss");
    }
    world.assert_converged();
}

/// slapd, and a configuration with one target `fake` at `url` (users only).
fn fake_world(seed: &str, url: &str, extra: &str) -> (Slapd, TestConfig) {
    let slapd = Slapd::start(seed);
    let mut config = TestConfig::new(&slapd);
    config.set("ldap", "max_shrink", "\"100%\"");
    config.target(
        "fake",
        url,
        "fake-token",
        &format!("groups = \"none\"\n{extra}"),
    );
    (slapd, config)
}

#[test]
fn a_listed_account_without_id_is_a_problem_never_a_second_account() {
    let fake = FakeScim::start(FakeScimOptions::default());
    let (_slapd, config) = fake_world(&staff(3), &fake.url(), "");
    ldap2scim(&config.path(), &["sync"]).expect_code(0);
    assert_eq!(fake.count("POST"), 3);

    // The target now lists its users without `id` (but with our externalId), and the
    // snapshot is lost.
    fake.set_options(FakeScimOptions {
        omit_ids: true,
        ..FakeScimOptions::default()
    });
    std::fs::remove_dir_all(config.state_dir()).unwrap();
    fake.clear();
    let plan = ldap2scim(&config.path(), &["plan", "--format", "json"]);
    let tp = target_plan(&plan.json(), "fake").clone();
    assert_eq!(tp["changes"], json!([]), "{tp}");
    assert_eq!(tp["problems"].as_array().unwrap().len(), 3, "{tp}");
    assert!(tp["problems"].to_string().contains("no usable id"), "{tp}");
    for _ in 0..3 {
        let out = ldap2scim(&config.path(), &["sync"]);
        assert_eq!(out.code, 3, "a failing problem per entry:\n{out}");
        assert!(out.stdout.contains("no usable id"), "{out}");
    }
    assert_eq!(fake.count("POST"), 0, "{:?}", fake.requests());
    assert_eq!(fake.users().len(), 3, "no duplicate");
}

#[test]
fn after_a_409_a_found_account_without_id_is_an_error_not_a_create() {
    let fake = FakeScim::start(FakeScimOptions {
        unique_user_names: true,
        ..FakeScimOptions::default()
    });
    let (slapd, config) = fake_world(&staff(1), &fake.url(), "");
    ldap2scim(&config.path(), &["sync"]).expect_code(0);
    let created = fake.users().remove(0);
    // Deleted on the target by hand, and made again under the same name and externalId, on
    // a target that now shows no ids.
    fake.remove_user(created["id"].as_str().unwrap());
    fake.seed_user(
        json!({"userName": "p000", "externalId": created["externalId"], "active": true}),
    );
    fake.set_options(FakeScimOptions {
        unique_user_names: true,
        omit_ids: true,
        ..FakeScimOptions::default()
    });
    slapd.modify(&format!(
        "dn: {}\nchangetype: modify\nreplace: title\ntitle: Boss\n",
        person_dn("p000")
    ));
    for _ in 0..2 {
        fake.clear();
        let out = ldap2scim(&config.path(), &["sync"]);
        assert_eq!(out.code, 3, "{out}");
        assert!(out.stdout.contains("no usable id"), "{out}");
        // The update met a 404, the create a 409; nothing else was written.
        let writes: Vec<String> = fake
            .requests()
            .iter()
            .filter(|r| r.method != "GET")
            .map(|r| r.method.clone())
            .collect();
        assert_eq!(writes, vec!["PATCH", "POST"], "{:?}", fake.requests());
    }
    assert_eq!(fake.users().len(), 1, "no duplicate");
}

#[test]
fn an_adoption_without_differences_writes_nothing_a_target_would_refuse() {
    let fake = FakeScim::start(FakeScimOptions {
        refuse_patch_of: vec!["userName".into(), "emails".into()],
        ..FakeScimOptions::default()
    });
    let (_slapd, config) = fake_world(&staff(3), &fake.url(), "");
    ldap2scim(&config.path(), &["sync"]).expect_code(0);
    for _ in 0..2 {
        std::fs::remove_dir_all(config.state_dir()).unwrap();
        fake.clear();
        let out = ldap2scim(&config.path(), &["sync"]);
        out.expect_code(0);
        assert_eq!(
            fake.requests().iter().filter(|r| r.method != "GET").count(),
            0,
            "{:?}",
            fake.requests()
        );
    }
}

#[test]
fn a_target_that_keeps_values_in_its_own_shape_is_not_rewritten_on_every_adoption() {
    let fake = FakeScim::start(FakeScimOptions {
        drop: vec!["title".into()],
        strip_item_type: true,
        ..FakeScimOptions::default()
    });
    let (slapd, config) = fake_world(&staff(2), &fake.url(), "");
    ldap2scim(&config.path(), &["sync"]).expect_code(0);
    assert!(fake.users().iter().all(|u| u.get("title").is_none()));
    // The create answers showed it: the target does not keep title.
    let plan = ldap2scim(&config.path(), &["plan", "--format", "json"]);
    assert_eq!(plan.code, 0, "{plan}");
    assert_eq!(
        target_plan(&plan.json(), "fake")["not_kept"],
        json!(["title"])
    );

    // A newcomer whose account was made by hand, in the target's shape: its email untyped,
    // no title. Adopted by userName: only the externalId is written.
    slapd.add(&person(
        "carol",
        "Carol",
        "Carol",
        "C",
        "carol@example.org",
        "Chief",
    ));
    fake.seed_user(json!({
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
        "userName": "carol",
        "name": {"givenName": "C", "familyName": "Carol"},
        "displayName": "Carol",
        "emails": [{"value": "carol@example.org", "primary": true}],
        "active": true,
    }));
    let plan = ldap2scim(&config.path(), &["plan", "--format", "json"]);
    let tp = target_plan(&plan.json(), "fake").clone();
    let changes = tp["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 1, "{tp}");
    assert_eq!(changes[0]["action"], "adopt");
    assert_eq!(
        changes[0]["attributes"]
            .as_object()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        vec!["externalId"],
        "{tp}"
    );
    fake.clear();
    ldap2scim(&config.path(), &["sync"]).expect_code(0);
    let patches: Vec<FakeRequest> = fake
        .requests()
        .into_iter()
        .filter(|r| r.method != "GET")
        .collect();
    assert_eq!(patches.len(), 1, "{patches:?}");
    assert_eq!(patches[0].method, "PATCH");
    let paths: Vec<&str> = patches[0].body["Operations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|op| op["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, vec!["externalId"], "{:?}", patches[0].body);

    // And nothing after that, cycle after cycle.
    for _ in 0..2 {
        fake.clear();
        let out = ldap2scim(&config.path(), &["sync"]);
        out.expect_code(0);
        assert_eq!(
            fake.requests().iter().filter(|r| r.method != "GET").count(),
            0,
            "{out}"
        );
    }
}

fn group_writes(t: &Target) -> Vec<RecordedRequest> {
    t.proxy
        .requests()
        .into_iter()
        .filter(|r| matches!(r.method.as_str(), "PATCH" | "PUT") && r.path.starts_with("/Groups"))
        .collect()
}

/// After a lost snapshot, an account found by userName whose directory-style externalId names
/// an entry gone from the directory changes owner only through a visible, counted rebind.
#[test]
fn after_a_lost_snapshot_an_account_of_another_directory_id_moves_only_by_rebind() {
    let fake = FakeScim::start(FakeScimOptions::default());
    let (slapd, mut config) = fake_world(&staff(2), &fake.url(), "");
    ldap2scim(&config.path(), &["sync"]).expect_code(0);
    let old = entry_uuid(&slapd, "p000");
    slapd.delete(&person_dn("p000"));
    slapd.add(&person(
        "p000",
        "Someone Else",
        "Else",
        "Someone",
        "p000@example.org",
        "Newcomer",
    ));
    let new = entry_uuid(&slapd, "p000");
    std::fs::remove_dir_all(config.state_dir()).unwrap();
    config.target(
        "fake",
        &fake.url(),
        "fake-token",
        "groups = \"none\"\nrebind = \"hold\"\nmax_deprovisions = \"5\"",
    );

    let plan = ldap2scim(&config.path(), &["plan", "--format", "json"]);
    let tp = target_plan(&plan.json(), "fake").clone();
    assert_eq!(tp["status"], "held", "{tp}");
    assert_eq!(
        rebinds(&tp["held"]),
        vec![("p000".to_string(), new.clone(), old.clone())],
        "{tp}"
    );
    let held_rebind = tp["held"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["action"] == "rebind")
        .unwrap();
    assert_eq!(held_rebind["from_name"], "p000", "{tp}");
    for list in ["changes", "held"] {
        assert!(
            tp[list]
                .as_array()
                .unwrap()
                .iter()
                .all(|c| c["name"] != "p000" || c["action"] == "rebind"),
            "neither a silent adoption nor an orphan: {tp}"
        );
    }
    let text = ldap2scim(&config.path(), &["plan"]);
    assert!(
        text.stdout.contains(&old) && text.stdout.contains(&new),
        "{text}"
    );

    ldap2scim(&config.path(), &["sync"]).expect_code(4);
    let account = |fake: &FakeScim| {
        fake.users()
            .into_iter()
            .find(|u| u["userName"] == "p000")
            .unwrap()
    };
    assert_eq!(
        account(&fake)["externalId"],
        old,
        "held: still the old one's"
    );

    ldap2scim(&config.path(), &["approve", "--target", "fake"]).expect_code(0);
    ldap2scim(&config.path(), &["sync"]).expect_code(0);
    assert_eq!(account(&fake)["externalId"], new);
    assert_eq!(fake.users().len(), 2, "no second account");
    let audit = std::fs::read_to_string(config.state_dir().join("audit.jsonl")).unwrap();
    assert!(
        audit.lines().any(|l| {
            let l: Value = serde_json::from_str(l).unwrap();
            l["action"] == "rebind"
                && l["external_id"] == new
                && l["from_external_id"] == old
                && l["outcome"] == "ok"
        }),
        "{audit}"
    );
}

/// A create answered 409 never takes an account whose directory-style externalId names
/// another directory entry: the next plan shows it as a rebind.
#[test]
fn after_a_409_an_account_of_another_directory_id_is_not_taken() {
    let fake = FakeScim::start(FakeScimOptions {
        unique_user_names: true,
        ..FakeScimOptions::default()
    });
    let (slapd, config) = fake_world(&staff(1), &fake.url(), "");
    ldap2scim(&config.path(), &["sync"]).expect_code(0);
    let created = fake.users().remove(0);
    // Deleted by hand, and the name taken by an account of another directory entry.
    fake.remove_user(created["id"].as_str().unwrap());
    let other = "0c0ffee0-1111-4222-8333-444455556666";
    fake.seed_user(json!({"userName": "p000", "externalId": other, "active": true}));
    slapd.modify(&format!(
        "dn: {}\nchangetype: modify\nreplace: title\ntitle: Boss\n",
        person_dn("p000")
    ));
    fake.clear();
    let out = ldap2scim(&config.path(), &["sync"]);
    assert_eq!(out.code, 3, "{out}");
    assert!(
        out.stdout
            .contains(&format!("held by directory id {other}")),
        "{out}"
    );
    let users = fake.users();
    assert_eq!(users.len(), 1, "no duplicate");
    assert_eq!(users[0]["externalId"], other, "not taken over");
    let writes: Vec<String> = fake
        .requests()
        .iter()
        .filter(|r| r.method != "GET")
        .map(|r| r.method.clone())
        .collect();
    assert_eq!(writes, vec!["PATCH", "POST"], "{:?}", fake.requests());
}

/// Values read from a target (attribute values, names of orphans) never carry its
/// credentials into a plan.
#[test]
fn a_plan_never_shows_the_targets_secret_read_back_from_it() {
    let fake = FakeScim::start(FakeScimOptions::default());
    let (slapd, config) = fake_world(&staff(1), &fake.url(), "");
    ldap2scim(&config.path(), &["sync"]).expect_code(0);
    slapd.add(&person(
        "carol",
        "Carol",
        "Carol",
        "C",
        "carol@example.org",
        "Chief",
    ));
    fake.seed_user(json!({
        "userName": "carol",
        "displayName": "fake-token",
        "title": "the token is fake-token",
        "active": true,
    }));
    fake.seed_user(json!({
        "userName": "leaver-fake-token",
        "externalId": "0c0ffee0-1111-4222-8333-444455556666",
        "active": true,
    }));
    std::fs::remove_dir_all(config.state_dir()).unwrap();
    let json = ldap2scim(&config.path(), &["plan", "--format", "json"]);
    let tp = target_plan(&json.json(), "fake").clone();
    assert!(
        tp["changes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "carol" && c["attributes"]["title"]["from"].is_string()),
        "the value is reported, redacted: {tp}"
    );
    assert!(
        tp["held"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["action"] == "orphan"),
        "{tp}"
    );
    for format in ["json", "text", "markdown"] {
        let out = ldap2scim(&config.path(), &["plan", "--format", format]);
        assert!(!out.stdout.contains("fake-token"), "{format}:\n{out}");
        assert!(!out.stderr.contains("fake-token"), "{format}:\n{out}");
    }
}

/// A lost snapshot costs no group writes where nothing differs (an adoption sends only what
/// its plan shows), on both real servers.
#[test]
fn a_group_adoption_after_a_lost_snapshot_writes_nothing_unchanged() {
    let seed = staff(3)
        + &group("team", &[&person_dn("p000"), &person_dn("p001")])
        + &group("solo", &[&person_dn("p002")]);
    let world = World::start(&seed, "");
    world.sync_ok();
    std::fs::remove_dir_all(world.config.state_dir()).unwrap();
    let (_, plan) = world.plan_json();
    for t in &world.targets {
        let tp = target_plan(&plan, t.name());
        let adopted: Vec<&Value> = tp["changes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["resource"] == "Group")
            .collect();
        assert_eq!(adopted.len(), 2, "{}: {tp}", t.name());
        for c in adopted {
            assert_eq!(c["action"], "adopt", "{}: {c}", t.name());
            assert!(
                c["attributes"].as_object().is_none_or(|a| a.is_empty()),
                "{}: nothing differs: {c}",
                t.name()
            );
        }
        t.proxy.clear();
    }
    world.sync_ok();
    for t in &world.targets {
        assert_eq!(group_writes(t), vec![], "{}", t.name());
    }
    world.assert_converged();
}

/// A group replaced in the directory by another with the same name never takes the old
/// one's account (which the old one's delete would then remove): the new group is a
/// problem until the old one's account is gone, then it is created.
#[test]
fn a_group_never_adopts_another_groups_account() {
    let seed = staff(2) + &group("team", &[&person_dn("p000"), &person_dn("p001")]);
    let world = World::start(
        &seed,
        "match_existing = [\"externalId\", \"userName\", \"displayName\"]",
    );
    world.sync_ok();
    let old_ids: Vec<String> = world
        .targets
        .iter()
        .map(|t| t.groups()[0]["id"].as_str().unwrap().to_string())
        .collect();
    world.slapd.delete(&group_dn("team"));
    world
        .slapd
        .add(&group("team", &[&person_dn("p000"), &person_dn("p001")]));
    let (out, plan) = world.plan_json();
    assert_eq!(out.code, 2, "{out}");
    for (t, old) in world.targets.iter().zip(&old_ids) {
        let tp = target_plan(&plan, t.name());
        let groups: Vec<(String, String)> = tp["changes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["resource"] == "Group")
            .map(|c| {
                (
                    c["action"].as_str().unwrap().to_string(),
                    c["name"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        assert_eq!(
            groups,
            vec![("delete".to_string(), "team".to_string())],
            "{}: the old group goes, the new one does not take its account: {tp}",
            t.name()
        );
        assert!(
            tp["problems"]
                .to_string()
                .contains("belongs to directory group"),
            "{}: {tp}",
            t.name()
        );
        let _ = old;
    }
    world.sync_expect(3);
    world.sync_ok();
    for (t, old) in world.targets.iter().zip(&old_ids) {
        let groups = t.groups();
        assert_eq!(groups.len(), 1, "{}: {groups:?}", t.name());
        assert_ne!(groups[0]["id"], *old, "{}: a new account", t.name());
        assert_eq!(
            t.memberships()["team"].iter().cloned().collect::<Vec<_>>(),
            vec!["p000".to_string(), "p001".to_string()],
            "{}",
            t.name()
        );
    }
    world.assert_converged();

    // Without rows (a lost snapshot), a group whose directory-style externalId names another
    // group is not adopted either.
    std::fs::remove_dir_all(world.config.state_dir()).unwrap();
    world.slapd.delete(&group_dn("team"));
    world
        .slapd
        .add(&group("team", &[&person_dn("p000"), &person_dn("p001")]));
    let (_, plan) = world.plan_json();
    for t in &world.targets {
        let tp = target_plan(&plan, t.name());
        assert!(
            tp["changes"]
                .as_array()
                .unwrap()
                .iter()
                .all(|c| c["resource"] != "Group"),
            "{}: {tp}",
            t.name()
        );
        assert!(
            tp["problems"]
                .to_string()
                .contains("belongs to directory group"),
            "{}: {tp}",
            t.name()
        );
    }
}
