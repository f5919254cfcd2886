use std::collections::BTreeMap;

use chrono::Utc;
use serde_json::json;

use super::*;
use crate::config::{Auth, GroupScope, Limit, Profile, Secret, TargetName};
use crate::map::{DesiredGroup, DesiredUser};
use crate::snapshot::{GroupRow, Ownership, UserRow};

pub(crate) fn target() -> TargetConfig {
    TargetConfig {
        name: TargetName("app".into()),
        file: "app.toml".into(),
        url: "http://127.0.0.1:1".into(),
        auth: Auth::Bearer(Secret::new("x".into())),
        profile: Profile::Generic,
        scope_groups: vec![],
        groups: GroupScope::All,
        deprovision: Deprovision::Deactivate,
        provision_disabled: false,
        delete_after: Duration::from_secs(30 * 86400),
        max_deprovisions: Limit::Percent(1.0),
        match_existing: vec![],
        protect: vec![],
        rate_limit: None,
        concurrency: 4,
        members_per_request: 100,
        timeout: Duration::from_secs(30),
        mapping: vec![],
        allow_plaintext: false,
        ca_file: None,
        max_response_size: 32 << 20,
        max_value_length: 64 << 10,
        rebind: crate::config::Rebind::Allow,
    }
}

fn want(id: &str, title: &str, active: bool) -> DesiredUser {
    let mut attrs = FlatAttrs::new();
    attrs.insert("userName".into(), json!(id));
    attrs.insert("title".into(), json!(title));
    attrs.insert("externalId".into(), json!(id));
    attrs.insert("active".into(), json!(active));
    DesiredUser {
        id: DirectoryId::new(id),
        dn: format!("uid={id}"),
        user_name: id.into(),
        active,
        hash: crate::map::user_hash(&attrs),
        attrs: attrs.into(),
    }
}

fn row(u: &DesiredUser) -> UserRow {
    UserRow {
        scim_id: ScimId(format!("s-{}", u.id)),
        user_name: u.user_name.clone(),
        hash: u.hash.clone(),
        attrs: u.attrs.clone(),
        etag: None,
        state: if u.active {
            UserState::Active
        } else {
            UserState::Deactivated { since: Utc::now() }
        },
        owned: Ownership::Created,
    }
}

fn run(t: &TargetConfig, desired: &Desired, state: &TargetState) -> Plan {
    let none = BTreeMap::new();
    let blocked = BTreeSet::new();
    plan(&PlanInput {
        target: t,
        desired,
        state,
        existing_users: &none,
        existing_groups: &none,
        blocked: &blocked,
        now: Utc::now(),
    })
}

#[test]
fn converged_state_plans_nothing() {
    let mut d = Desired::default();
    let mut s = TargetState::default();
    for id in ["a", "b"] {
        let u = want(id, "Engineer", true);
        s.users.insert(u.id.clone(), row(&u));
        d.users.insert(u.id.clone(), u);
    }
    let members: BTreeSet<_> = d.users.keys().cloned().collect();
    d.groups.insert(
        DirectoryId::new("g"),
        DesiredGroup {
            id: DirectoryId::new("g"),
            dn: "cn=g".into(),
            display_name: "g".into(),
            members: members.clone(),
        },
    );
    s.groups.insert(
        DirectoryId::new("g"),
        GroupRow {
            scim_id: ScimId("sg".into()),
            display_name: "g".into(),
            members,
            etag: None,
            owned: Ownership::Created,
        },
    );
    assert!(run(&target(), &d, &s).is_empty());
}

#[test]
fn changed_title_is_one_attribute_update() {
    let mut d = Desired::default();
    let mut s = TargetState::default();
    let old = want("a", "Engineer", true);
    s.users.insert(old.id.clone(), row(&old));
    let new = want("a", "Staff Engineer", true);
    d.users.insert(new.id.clone(), new);
    let p = run(&target(), &d, &s);
    assert_eq!(p.changes.len(), 1);
    match &p.changes[0] {
        Change::UpdateUser { changes, .. } => {
            assert_eq!(
                changes,
                &vec![AttrChange {
                    path: "title".into(),
                    from: Some(json!("Engineer")),
                    to: Some(json!("Staff Engineer"))
                }]
            );
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn new_user_and_group_are_created_then_members_added() {
    let mut d = Desired::default();
    let u = want("a", "x", true);
    d.users.insert(u.id.clone(), u.clone());
    d.groups.insert(
        DirectoryId::new("g"),
        DesiredGroup {
            id: DirectoryId::new("g"),
            dn: "cn=g".into(),
            display_name: "g".into(),
            members: [u.id.clone()].into(),
        },
    );
    let p = run(&target(), &d, &TargetState::default());
    let actions: Vec<_> = p
        .changes
        .iter()
        .map(|c| (c.action(), c.resource()))
        .collect();
    assert_eq!(
        actions,
        vec![
            ("create", "User"),
            ("create", "Group"),
            ("add-members", "Group")
        ]
    );
}

#[test]
fn leaver_is_deactivated_and_disabled_unprovisioned_user_is_not_created() {
    let mut d = Desired::default();
    let mut s = TargetState::default();
    let gone = want("gone", "x", true);
    s.users.insert(gone.id.clone(), row(&gone));
    let disabled = want("off", "x", false);
    d.users.insert(disabled.id.clone(), disabled);
    let p = run(&target(), &d, &s);
    assert_eq!(p.changes.len(), 1);
    assert!(matches!(
        &p.changes[0],
        Change::DeactivateUser {
            reason: Reason::Left,
            ..
        }
    ));
}

#[test]
fn deactivated_user_is_deleted_only_after_the_grace_period() {
    let mut t = target();
    t.deprovision = Deprovision::DeactivateThenDelete;
    let gone = want("gone", "x", false);
    let mut s = TargetState::default();
    let mut r = row(&gone);
    r.state = UserState::Deactivated {
        since: Utc::now() - chrono::Duration::days(29),
    };
    s.users.insert(gone.id.clone(), r.clone());
    assert!(run(&t, &Desired::default(), &s).is_empty());
    r.state = UserState::Deactivated {
        since: Utc::now() - chrono::Duration::days(31),
    };
    s.users.insert(gone.id.clone(), r);
    let p = run(&t, &Desired::default(), &s);
    assert!(matches!(
        &p.changes[0],
        Change::DeleteUser {
            reason: Reason::GracePeriodOver,
            ..
        }
    ));
}

#[test]
fn guard_holds_destructive_changes_over_the_limit() {
    let mut s = TargetState::default();
    for i in 0..10 {
        let u = want(&format!("u{i}"), "x", true);
        s.users.insert(u.id.clone(), row(&u));
    }
    let mut d = Desired::default();
    for i in 0..5 {
        let u = want(&format!("u{i}"), "changed", true);
        d.users.insert(u.id.clone(), u);
    }
    let mut p = run(&target(), &d, &s);
    guard::apply_limits(&mut p, Limit::Percent(0.1), s.users.len(), 0, None, None);
    assert_eq!(p.changes.len(), 5, "the safe updates still go ahead");
    assert_eq!(p.held.len(), 5);
    assert!(p
        .held_reason
        .as_deref()
        .unwrap()
        .contains("max_deprovisions"));
    let approved = guard::held_keys(&p);
    let mut again = run(&target(), &d, &s);
    guard::apply_limits(
        &mut again,
        Limit::Percent(0.1),
        s.users.len(),
        0,
        None,
        Some(&approved),
    );
    assert!(again.held.is_empty());
    assert_eq!(again.changes.len(), 10);

    // Something destructive planned after the approval is not covered by it.
    d.users.remove(&DirectoryId::new("u0"));
    d.users.remove(&DirectoryId::new("u1"));
    let mut later = run(&target(), &d, &s);
    guard::apply_limits(
        &mut later,
        Limit::Count(1),
        s.users.len(),
        0,
        None,
        Some(&approved),
    );
    assert_eq!(
        later.held.len(),
        2,
        "u0 and u1 are new deprovisions over the limit: {:?}",
        later.held
    );
    let released = later.changes.iter().filter(|c| c.is_destructive()).count();
    assert_eq!(released, 5, "the approved five go ahead");
}

#[test]
fn a_user_whose_mapping_fails_is_never_deprovisioned_nor_removed_from_groups() {
    let mut s = TargetState::default();
    let u = want("a", "x", true);
    s.users.insert(u.id.clone(), row(&u));
    let members: BTreeSet<_> = [u.id.clone()].into();
    s.groups.insert(
        DirectoryId::new("g"),
        GroupRow {
            scim_id: ScimId("sg".into()),
            display_name: "g".into(),
            members: members.clone(),
            etag: None,
            owned: Ownership::Created,
        },
    );
    let mut d = Desired::default();
    d.problems.push((
        u.id.clone(),
        "uid=a".into(),
        "its userName template renders empty".into(),
    ));
    d.groups.insert(
        DirectoryId::new("g"),
        DesiredGroup {
            id: DirectoryId::new("g"),
            dn: "cn=g".into(),
            display_name: "g".into(),
            members,
        },
    );
    let p = run(&target(), &d, &s);
    assert!(p.changes.is_empty(), "{:?}", p.changes);
    assert_eq!(p.problems.len(), 1);
}

#[test]
fn group_deletions_have_a_limit_and_held_leavers_keep_their_memberships() {
    let mut s = TargetState::default();
    let mut d = Desired::default();
    for i in 0..10 {
        let u = want(&format!("u{i}"), "x", true);
        s.users.insert(u.id.clone(), row(&u));
        if i >= 5 {
            d.users.insert(u.id.clone(), u);
        }
    }
    for g in 0..4 {
        let gid = DirectoryId::new(&format!("g{g}"));
        let members: BTreeSet<_> = s.users.keys().cloned().collect();
        s.groups.insert(
            gid.clone(),
            GroupRow {
                scim_id: ScimId(format!("s{g}")),
                display_name: format!("g{g}"),
                members: members.clone(),
                etag: None,
                owned: Ownership::Created,
            },
        );
        if g == 0 {
            d.groups.insert(
                gid.clone(),
                DesiredGroup {
                    id: gid,
                    dn: "cn=g0".into(),
                    display_name: "g0".into(),
                    members,
                },
            );
        }
    }
    // Three groups gone and five users gone: both over a limit of one.
    let mut p = run(&target(), &d, &s);
    guard::apply_limits(
        &mut p,
        Limit::Count(1),
        s.users.len(),
        s.groups.len(),
        None,
        None,
    );
    assert!(
        p.changes.iter().all(|c| !c.is_destructive()),
        "{:?}",
        p.changes
    );
    assert!(
        p.changes
            .iter()
            .all(|c| !matches!(c, Change::RemoveMembers { .. })),
        "held leavers stay members: {:?}",
        p.changes
    );
    assert_eq!(
        p.held
            .iter()
            .filter(|c| matches!(c, Change::DeleteGroup { .. }))
            .count(),
        3
    );
    assert_eq!(
        p.held
            .iter()
            .filter(|c| matches!(c, Change::RemoveMembers { .. }))
            .count(),
        1
    );

    // Only groups over the limit, no user leaving: the group deletions are held on their own.
    let mut d2 = d.clone();
    for i in 0..5 {
        let u = want(&format!("u{i}"), "x", true);
        d2.users.insert(u.id.clone(), u);
    }
    d2.groups.get_mut(&DirectoryId::new("g0")).unwrap().members = s.users.keys().cloned().collect();
    let mut p = run(&target(), &d2, &s);
    guard::apply_limits(
        &mut p,
        Limit::Count(1),
        s.users.len(),
        s.groups.len(),
        None,
        None,
    );
    assert_eq!(p.held.len(), 3, "{:?}", p.held);
    assert!(p.held_reason.unwrap().contains("group deletions"));
}

#[test]
fn protected_rows_are_never_touched() {
    let mut t = target();
    t.protect = vec!["ADMIN*".into()];
    let mut s = TargetState::default();
    for id in ["admin-root", "bob"] {
        let u = want(id, "x", true);
        s.users.insert(u.id.clone(), row(&u));
    }
    let mut d = Desired::default();
    let bob = want("bob", "changed", true);
    d.users.insert(bob.id.clone(), bob);
    let mut admin = want("admin-root", "changed", true);
    admin.user_name = "admin-root".into();
    d.users.insert(admin.id.clone(), admin);
    let p = run(&t, &d, &s);
    assert_eq!(p.changes.len(), 1, "{:?}", p.changes);
    assert_eq!(p.changes[0].name(), "bob");
    // Gone from the directory: still never deactivated.
    d.users.remove(&DirectoryId::new("admin-root"));
    assert_eq!(run(&t, &d, &s).changes.len(), 1);
}
