use std::collections::BTreeMap;

use chrono::Utc;
use serde_json::json;

use super::*;
use crate::config::{Auth, GroupScope, Limit, Profile, Rebind, Secret, TargetName};
use crate::map::{DesiredGroup, DesiredUser};
use crate::snapshot::{GroupRow, Ownership, UserRow};

/// Asserts that the plan's first change matches the pattern.
macro_rules! assert_first {
    ($plan:expr, $pattern:pat) => {
        assert!(matches!(&$plan.changes[0], $pattern), "{:?}", $plan.changes)
    };
}

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
        proxy: None,
        max_response_size: 32 << 20,
        max_value_length: 64 << 10,
        rebind: crate::config::Rebind::Allow,
        groups_filter: None,
        group_display_name: None,
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

/// Adds group `id` (dn `cn=<id>`, named `id`) with `members` to the desired state.
fn add_group(d: &mut Desired, id: &str, members: BTreeSet<DirectoryId>) {
    let group = DesiredGroup {
        id: DirectoryId::new(id),
        dn: format!("cn={id}"),
        display_name: id.into(),
        members,
    };
    d.groups.insert(group.id.clone(), group);
}

/// Adds a created row for group `id` (named `id`, SCIM id `scim_id`) to the snapshot.
fn add_group_row(s: &mut TargetState, id: &str, scim_id: &str, members: BTreeSet<DirectoryId>) {
    let row = GroupRow {
        scim_id: ScimId(scim_id.into()),
        display_name: id.into(),
        members,
        etag: None,
        owned: Ownership::Created,
    };
    s.groups.insert(DirectoryId::new(id), row);
}

/// The desired state of `wanted`, and a snapshot with a created row for each of `had`.
fn states(
    had: &[DesiredUser],
    wanted: impl IntoIterator<Item = DesiredUser>,
) -> (Desired, TargetState) {
    let mut d = Desired::default();
    let mut s = TargetState::default();
    for u in had {
        s.users.insert(u.id.clone(), row(u));
    }
    for u in wanted {
        d.users.insert(u.id.clone(), u);
    }
    (d, s)
}

/// The plan for the default target after the limits (`max_deprovisions` = `limit`, rebinds
/// allowed), counting what `s` manages.
fn limited(
    d: &Desired,
    s: &TargetState,
    limit: Limit,
    approved: Option<&BTreeSet<HeldKey>>,
) -> Plan {
    let mut p = run(&target(), d, s);
    let (users, groups) = (s.users.len(), s.groups.len());
    guard::apply_limits(&mut p, limit, users, groups, None, approved, Rebind::Allow);
    p
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
        not_kept: &BTreeSet::new(),
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
    add_group(&mut d, "g", members.clone());
    add_group_row(&mut s, "g", "sg", members);
    assert!(run(&target(), &d, &s).is_empty());
}

#[test]
fn changed_title_is_one_attribute_update() {
    let (d, s) = states(
        &[want("a", "Engineer", true)],
        [want("a", "Staff Engineer", true)],
    );
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
    add_group(&mut d, "g", [u.id.clone()].into());
    let p = run(&target(), &d, &TargetState::default());
    let actions: Vec<_> = p
        .changes
        .iter()
        .map(|c| (c.action().as_str(), c.resource().as_str()))
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
    let (d, s) = states(&[want("gone", "x", true)], [want("off", "x", false)]);
    let p = run(&target(), &d, &s);
    assert_eq!(p.changes.len(), 1);
    assert_first!(
        p,
        Change::DeactivateUser {
            reason: Reason::Left,
            ..
        }
    );
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
    assert_first!(
        p,
        Change::DeleteUser {
            reason: Reason::GracePeriodOver,
            ..
        }
    );
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
    let p = limited(&d, &s, Limit::Percent(0.1), None);
    assert_eq!(p.changes.len(), 5, "the safe updates still go ahead");
    assert_eq!(p.held.len(), 5);
    assert!(p
        .held_reason
        .as_deref()
        .unwrap()
        .contains("max_deprovisions"));
    let approved = guard::held_keys(&p);
    let again = limited(&d, &s, Limit::Percent(0.1), Some(&approved));
    assert!(again.held.is_empty());
    assert_eq!(again.changes.len(), 10);

    // Something destructive planned after the approval is not covered by it.
    d.users.remove(&DirectoryId::new("u0"));
    d.users.remove(&DirectoryId::new("u1"));
    let later = limited(&d, &s, Limit::Count(1), Some(&approved));
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
    add_group_row(&mut s, "g", "sg", members.clone());
    let mut d = Desired::default();
    d.problems.push((
        u.id.clone(),
        "uid=a".into(),
        "its userName template renders empty".into(),
    ));
    add_group(&mut d, "g", members);
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
    let p = limited(&d, &s, Limit::Count(1), None);
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
    let p = limited(&d2, &s, Limit::Count(1), None);
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

fn rebind_world() -> (Desired, TargetState, BTreeMap<DirectoryId, Existing>) {
    // "old" left the directory; "new" has the same userName and matched its account.
    let mut d = Desired::default();
    let mut s = TargetState::default();
    let old = want("old", "Engineer", true);
    let mut old_row = row(&old);
    old_row.user_name = "alice".into();
    s.users.insert(old.id.clone(), old_row);
    let keep = want("keep", "Engineer", true);
    s.users.insert(keep.id.clone(), row(&keep));
    d.users.insert(keep.id.clone(), keep);
    let mut new = want("new", "Engineer", true);
    new.user_name = "alice".into();
    d.users.insert(new.id.clone(), new);
    let members = BTreeSet::from([DirectoryId::new("old"), DirectoryId::new("keep")]);
    add_group_row(&mut s, "g", "sg", members);
    add_group(
        &mut d,
        "g",
        BTreeSet::from([DirectoryId::new("new"), DirectoryId::new("keep")]),
    );
    let mut found_attrs = FlatAttrs::new();
    found_attrs.insert("externalId".into(), json!("old"));
    let existing = BTreeMap::from([(
        DirectoryId::new("new"),
        Existing {
            scim_id: ScimId("s-old".into()),
            attrs: found_attrs,
            matched_by: crate::config::MatchRule::UserName,
            members: BTreeSet::new(),
            claimed_by: None,
        },
    )]);
    (d, s, existing)
}

/// [`run_with`] for the default target, then the limits, counting the two users and one
/// group of [`rebind_world`].
fn rebind_limited(
    d: &Desired,
    s: &TargetState,
    existing: &BTreeMap<DirectoryId, Existing>,
    limit: Limit,
    approved: Option<&BTreeSet<HeldKey>>,
    rebind: Rebind,
) -> Plan {
    let mut p = run_with(&target(), d, s, existing);
    guard::apply_limits(&mut p, limit, 2, 1, None, approved, rebind);
    p
}

/// Asserts that `c` re-binds alice's account `s-old` from entry `old` to `new`; its changes.
fn alice_moves_from_old_to_new(c: &Change) -> &[AttrChange] {
    match c {
        Change::Rebind {
            id,
            from,
            from_name,
            scim_id,
            changes,
            ..
        } => {
            assert_eq!((id.0.as_str(), from.0.as_str()), ("new", "old"));
            assert_eq!(from_name, "alice");
            assert_eq!(scim_id.0, "s-old");
            changes
        }
        other => panic!("not a rebind (a silent adoption?): {other:?}"),
    }
}

/// [`rebind_limited`] with `max_deprovisions = 5` and `rebind = "hold"`.
fn held_within_five(
    d: &Desired,
    s: &TargetState,
    existing: &BTreeMap<DirectoryId, Existing>,
    approved: Option<&BTreeSet<HeldKey>>,
) -> Plan {
    rebind_limited(d, s, existing, Limit::Count(5), approved, Rebind::Hold)
}

fn run_with(
    t: &TargetConfig,
    d: &Desired,
    s: &TargetState,
    existing: &BTreeMap<DirectoryId, Existing>,
) -> Plan {
    let none = BTreeMap::new();
    plan(&PlanInput {
        target: t,
        desired: d,
        state: s,
        existing_users: existing,
        existing_groups: &none,
        blocked: &BTreeSet::new(),
        not_kept: &BTreeSet::new(),
        now: Utc::now(),
    })
}

#[test]
fn an_owned_account_claimed_by_another_entry_is_a_rebind_not_an_adoption() {
    let (d, s, existing) = rebind_world();
    let p = run_with(&target(), &d, &s, &existing);
    assert_eq!(p.changes.len(), 1, "{:?}", p.changes);
    let changes = alice_moves_from_old_to_new(&p.changes[0]);
    assert!(changes.iter().any(|c| c.path == "externalId"));
    assert_eq!(p.changes[0].action(), "rebind");
    assert!(p.changes[0].is_destructive());
    // The old identity is not deactivated besides, and the group keeps the account: it was
    // the old entry's membership and is the new one's.
    assert!(p.changes.iter().all(|c| !matches!(
        c,
        Change::DeactivateUser { .. } | Change::RemoveMembers { .. }
    )));
}

#[test]
fn a_rebind_counts_against_max_deprovisions_and_can_always_be_held() {
    let (d, s, existing) = rebind_world();
    let p = rebind_limited(&d, &s, &existing, Limit::Count(0), None, Rebind::Allow);
    assert_eq!(p.held.len(), 1);
    assert!(p.changes.is_empty());
    assert!(p.held_reason.unwrap().contains("max_deprovisions"));

    let p = rebind_limited(&d, &s, &existing, Limit::Count(5), None, Rebind::Allow);
    assert_eq!(p.changes.len(), 1, "within the limit, allow applies it");

    let p = rebind_limited(&d, &s, &existing, Limit::Count(5), None, Rebind::Hold);
    assert_eq!(guard::held_keys(&p).len(), 1);
    assert!(p.held_reason.as_deref().unwrap().contains("rebind"));
    let approved = guard::held_keys(&p);
    let p = held_within_five(&d, &s, &existing, Some(&approved));
    assert!(p.held.is_empty());
    assert_eq!(p.changes[0].action(), "rebind");
}

#[test]
fn a_held_rebind_holds_the_new_entrys_member_additions() {
    let (mut d, s, existing) = rebind_world();
    // The new entry is in a second group the old one was not in.
    add_group(
        &mut d,
        "h",
        BTreeSet::from([DirectoryId::new("new"), DirectoryId::new("keep")]),
    );
    let p = rebind_limited(&d, &s, &existing, Limit::Count(5), None, Rebind::Hold);
    let adds: Vec<&Change> = p
        .changes
        .iter()
        .filter(|c| matches!(c, Change::AddMembers { .. }))
        .collect();
    for c in adds {
        if let Change::AddMembers { members, .. } = c {
            assert!(!members.contains(&DirectoryId::new("new")), "{members:?}");
        }
    }
    assert!(p.held.iter().any(|c| matches!(c, Change::AddMembers { members, .. } if members == &vec![DirectoryId::new("new")])));
}

#[test]
fn protect_keeps_a_directory_entry_from_being_created() {
    let mut d = Desired::default();
    let mut evil = want("admin-evil", "Boss", true);
    evil.user_name = "admin-evil".into();
    d.users.insert(evil.id.clone(), evil);
    d.users
        .insert(DirectoryId::new("ok"), want("ok", "Engineer", true));
    d.groups.insert(
        DirectoryId::new("g"),
        DesiredGroup {
            id: DirectoryId::new("g"),
            dn: "cn=admins".into(),
            display_name: "admins".into(),
            members: BTreeSet::from([DirectoryId::new("admin-evil"), DirectoryId::new("ok")]),
        },
    );
    let mut t = target();
    t.protect = vec!["admin*".into()];
    let p = run(&t, &d, &TargetState::default());
    let names: Vec<(&str, &str)> = p
        .changes
        .iter()
        .map(|c| (c.action().as_str(), c.name()))
        .collect();
    assert_eq!(names, vec![("create", "ok")], "{names:?}");
    assert_eq!(p.problems.len(), 2, "{:?}", p.problems);
    assert!(p
        .problems
        .iter()
        .all(|pr| !pr.fails && pr.reason.contains("matches a protect pattern; not created")));
}

/// The rebind world after a lost snapshot: no row holds the account, but its directory-style
/// externalId names the old entry.
fn claimed_world() -> (Desired, TargetState, BTreeMap<DirectoryId, Existing>) {
    let (d, mut s, mut existing) = rebind_world();
    s.users.remove(&DirectoryId::new("old"));
    s.groups.clear();
    let found = existing.get_mut(&DirectoryId::new("new")).unwrap();
    found.attrs.insert("userName".into(), json!("alice"));
    found.claimed_by = Some(DirectoryId::new("old"));
    (d, s, existing)
}

#[test]
fn an_account_claimed_by_another_directory_id_without_a_row_is_a_rebind() {
    let (d, s, existing) = claimed_world();
    let p = run_with(&target(), &d, &s, &existing);
    let rebinds: Vec<&Change> = p
        .changes
        .iter()
        .filter(|c| c.resource() == "User")
        .collect();
    assert_eq!(rebinds.len(), 1, "{:?}", p.changes);
    alice_moves_from_old_to_new(rebinds[0]);
    // Counted against max_deprovisions, and held by rebind = "hold".
    let mut p = run_with(&target(), &d, &s, &existing);
    guard::apply_limits(&mut p, Limit::Count(0), 1, 0, None, None, Rebind::Allow);
    assert!(p.held.iter().any(|c| c.action() == "rebind"), "{p:?}");
    let mut p = run_with(&target(), &d, &s, &existing);
    guard::apply_limits(&mut p, Limit::Count(5), 1, 0, None, None, Rebind::Hold);
    assert!(p.held.iter().any(|c| c.action() == "rebind"), "{p:?}");
}

#[test]
fn approving_a_rebind_does_not_approve_one_from_another_account() {
    let (d, s, existing) = rebind_world();
    let p = rebind_limited(&d, &s, &existing, Limit::Count(5), None, Rebind::Hold);
    let keys = guard::held_keys(&p);
    assert!(
        keys.contains(&("rebind:old".to_string(), DirectoryId::new("new"))),
        "{keys:?}"
    );
    for stale in ["rebind", "rebind:other"] {
        let approved = BTreeSet::from([HeldKey::parse(stale, DirectoryId::new("new")).unwrap()]);
        let p = held_within_five(&d, &s, &existing, Some(&approved));
        assert!(
            p.held.iter().any(|c| c.action() == "rebind"),
            "{stale}: {p:?}"
        );
    }
}

#[test]
fn a_group_adoption_sends_only_what_differs() {
    let mut d = Desired::default();
    d.groups.insert(
        DirectoryId::new("g"),
        DesiredGroup {
            id: DirectoryId::new("g"),
            dn: "cn=g".into(),
            display_name: "team".into(),
            members: BTreeSet::new(),
        },
    );
    let found = |name: &str, ext: Option<&str>| {
        let mut attrs = FlatAttrs::from([("displayName".to_string(), json!(name))]);
        attrs.insert("externalId".into(), ext.map_or(Value::Null, |e| json!(e)));
        BTreeMap::from([(
            DirectoryId::new("g"),
            Existing {
                scim_id: ScimId("sg".into()),
                attrs,
                matched_by: crate::config::MatchRule::ExternalId,
                members: BTreeSet::new(),
                claimed_by: None,
            },
        )])
    };
    let paths = |groups: &BTreeMap<DirectoryId, Existing>| {
        let p = plan(&PlanInput {
            target: &target(),
            desired: &d,
            state: &TargetState::default(),
            existing_users: &BTreeMap::new(),
            existing_groups: groups,
            blocked: &BTreeSet::new(),
            not_kept: &BTreeSet::new(),
            now: Utc::now(),
        });
        match &p.changes[..] {
            [Change::AdoptGroup { changes, .. }] => {
                changes.iter().map(|c| c.path.clone()).collect::<Vec<_>>()
            }
            other => panic!("{other:?}"),
        }
    };
    assert!(paths(&found("team", Some("g"))).is_empty());
    assert_eq!(paths(&found("Team", Some("g"))), vec!["displayName"]);
    assert_eq!(paths(&found("team", None)), vec!["externalId"]);
}

#[test]
fn globs_match_case_insensitively() {
    assert!(glob_match("admin*", "admin-root"));
    assert!(glob_match("break-glass-?", "break-glass-1"));
    assert!(!glob_match("admin*", "sysadmin"));
    assert!(glob_match("*", ""));
}
