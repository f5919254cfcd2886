//! The change feed against a real slapd with syncprov: delta cycles read only what changed
//! (RFC 4533 refreshOnly from a stored cookie), plan exactly what a full read plans, and any
//! doubt about the feed falls back to a full read with every guard.

mod support;

use serde_json::Value;
use support::*;

/// A nested directory: `outer` holds `inner` (p002, p003) and p000; `everyone` holds p000, p001.
fn nested_seed() -> String {
    staff(8)
        + &group("everyone", &[&person_dn("p000"), &person_dn("p001")])
        + &group("inner", &[&person_dn("p002"), &person_dn("p003")])
        + &group("outer", &[&group_dn("inner"), &person_dn("p000")])
}

/// `plan --format json` without `--full` (a delta where the feed can) and with it; the read
/// durations aside, they must be the same.
fn delta_and_full_plans(w: &World) -> (Value, Value) {
    let delta = w.run(&["plan", "--format", "json"]);
    assert!(delta.code == 0 || delta.code == 2, "plan: {delta}");
    let full = w.run(&["plan", "--full", "--format", "json"]);
    assert!(full.code == 0 || full.code == 2, "plan --full: {full}");
    assert_eq!(delta.code, full.code, "delta:\n{delta}\nfull:\n{full}");
    (delta.json(), full.json())
}

fn assert_delta_plans_like_full(w: &World) {
    let (delta, full) = delta_and_full_plans(w);
    assert_eq!(
        delta, full,
        "the delta plan differs from the full plan:\ndelta: {delta:#}\nfull: {full:#}"
    );
}

fn stderr(out: &Output) -> String {
    out.stderr.clone()
}

#[test]
fn delta_cycles_read_only_what_changed_and_plan_what_a_full_read_plans() {
    let w = World::start(&nested_seed(), "");
    let first = w.sync_ok();
    assert!(
        stderr(&first).contains("there is no mirror of the directory yet"),
        "the first cycle reads everything and builds the mirror: {first}"
    );
    // Nothing changed: a quiet delta, no write, no plan.
    for t in &w.targets {
        t.proxy.clear();
    }
    let quiet = w.sync_ok();
    assert!(
        stderr(&quiet).contains("the change feed named no change"),
        "{quiet}"
    );
    for t in &w.targets {
        assert_eq!(
            t.proxy.writes(),
            0,
            "{}: {:?}",
            t.name(),
            t.proxy.requests()
        );
    }

    // A title, a new hire, a leaver, a disabled user, a member added to the inner group (a
    // member of the outer one too), a rename.
    w.slapd.modify(&format!(
        "dn: {}\nchangetype: modify\nreplace: title\ntitle: Staff Engineer\n",
        person_dn("p001")
    ));
    w.slapd.add(&person(
        "p100",
        "New Hire",
        "Hire",
        "New",
        "p100@example.org",
        "Staff",
    ));
    w.slapd.delete(&person_dn("p007"));
    w.slapd.modify(&format!(
        "dn: {}\nchangetype: modify\nadd: employeeType\nemployeeType: disabled\n",
        person_dn("p006")
    ));
    w.slapd.modify(&format!(
        "dn: {}\nchangetype: modify\nadd: member\nmember: {}\n",
        group_dn("inner"),
        person_dn("p004")
    ));
    w.slapd.modify(&format!(
        "dn: {}\nchangetype: modrdn\nnewrdn: uid=p005b\ndeleteoldrdn: 1\n",
        person_dn("p005")
    ));
    assert_delta_plans_like_full(&w);
    let (delta, _) = delta_and_full_plans(&w);
    let changes = changes_of(&delta, w.targets[0].name());
    for expected in [
        change("update", "User", "p001"),
        change("create", "User", "p100"),
        change("deactivate", "User", "p007"),
        change("deactivate", "User", "p006"),
        change("add-members", "Group", "outer"),
        change("add-members", "Group", "inner"),
    ] {
        assert!(
            changes.contains(&expected),
            "{expected:?} not in {changes:?}"
        );
    }
    let synced = w.sync_ok();
    assert!(
        stderr(&synced).contains("directory read from the change feed"),
        "{synced}"
    );
    w.assert_converged();
    let outer = &w.targets[0].memberships()["outer"];
    assert!(outer.contains("p004"), "{outer:?}");
}

#[test]
fn a_member_removed_from_a_nested_group_and_a_group_deleted_are_deltas_too() {
    let w = World::start(&nested_seed(), "");
    w.sync_ok();
    w.slapd.modify(&format!(
        "dn: {}\nchangetype: modify\ndelete: member\nmember: {}\n",
        group_dn("inner"),
        person_dn("p003")
    ));
    w.slapd.delete(&group_dn("everyone"));
    assert_delta_plans_like_full(&w);
    w.sync_ok();
    w.assert_converged();
    let m = w.targets[0].memberships();
    assert!(!m["outer"].contains("p003"), "{m:?}");
    assert!(!m.contains_key("everyone"), "{m:?}");
}

#[test]
fn the_change_feed_setting_none_reads_everything_every_time() {
    let mut w = World::start(&nested_seed(), "");
    w.config.set("ldap", "change_feed", "\"none\"");
    w.sync_ok();
    let again = w.sync_ok();
    assert!(
        !stderr(&again).contains("change feed"),
        "no feed without one: {again}"
    );
    w.slapd.add(&person(
        "p100",
        "New Hire",
        "Hire",
        "New",
        "p100@example.org",
        "Staff",
    ));
    w.sync_ok();
    w.assert_converged();
}

#[test]
fn sync_full_reads_everything_and_a_changed_mapping_rebuilds_the_mirror() {
    let w = World::start(&nested_seed(), "");
    w.sync_ok();
    let full = w.run(&["sync", "--full"]);
    full.expect_code(0);
    assert!(stderr(&full).contains("--full"), "{full}");
    // A target file changed: that target is planned against the whole mirror again.
    let name = w.targets[0].name();
    let path = w.config.target_path(name);
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("{text}\n# touched\n")).unwrap();
    let after = w.sync_ok();
    assert!(
        !stderr(&after).contains("the change feed named no change"),
        "a target whose settings changed is planned: {after}"
    );
    // A mapping that reads another attribute: the mirror's view changed, a full read.
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        format!("{text}\n[mapping]\nnickName = \"{{uid}}{{employeeNumber}}\"\n"),
    )
    .unwrap();
    let rebuilt = w.sync_ok();
    assert!(
        stderr(&rebuilt).contains("mapped attributes changed"),
        "{rebuilt}"
    );
    w.assert_converged();
}
