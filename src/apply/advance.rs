//! The one rule by which the snapshot moves forward: a change, the rows as they were, and the
//! target's acknowledgement of that change become the row updates. Pure, so "a row advances
//! only for what the target confirmed" is this function and its tests, not a pattern repeated
//! in every arm of the apply. Both the sled write and the in-memory rows consume its output.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::config::MatchRule;
use crate::map::{self, FlatAttrs, SharedAttrs};
use crate::model::{DirectoryId, ScimId};
use crate::plan::Change;
use crate::snapshot::{GroupRow, Ownership, TargetState, UserRow, UserState};

/// What the target confirmed of one change (what its answers said, nothing assumed).
#[derive(Debug, Clone, PartialEq)]
pub enum Ack {
    /// The target holds the user as the change wanted it: created, adopted, re-bound,
    /// updated or deactivated. `owned` is set where the apply learnt it (a create that met
    /// a 409 and found the account); `recreated` when an update found the account deleted
    /// by hand and created it again (its memberships went with it).
    User {
        scim_id: ScimId,
        etag: Option<String>,
        owned: Option<Ownership>,
        recreated: bool,
    },
    /// The user is gone from the target (deleted, or already gone when deactivated).
    UserGone,
    /// An approved orphan was deactivated: from then on it is managed like any leaver.
    OrphanDeactivated { etag: Option<String> },
    /// Nothing to record (an orphan deleted, or found gone already).
    Nothing,
    /// The target holds the group: created, or adopted. `members` are the ones it has
    /// when they were read (a create that met a 409); `None`: as the change says.
    Group {
        scim_id: ScimId,
        etag: Option<String>,
        members: Option<BTreeSet<DirectoryId>>,
    },
    /// The group's displayName was changed.
    GroupRenamed { etag: Option<String> },
    /// The group is gone from the target.
    GroupGone,
    /// Member changes the target confirmed (maybe only some batches): `confirmed` were
    /// added or removed; `absent` were removals of users without a row (nothing to send);
    /// `etag` is the last write's, `None` when no write was confirmed.
    Members {
        confirmed: Vec<DirectoryId>,
        absent: Vec<DirectoryId>,
        etag: Option<Option<String>>,
    },
}

/// One update of a target's rows.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    PutUser(DirectoryId, UserRow),
    RemoveUser(DirectoryId),
    PutGroup(DirectoryId, GroupRow),
    RemoveGroup(DirectoryId),
    /// A rebind: the old entry's memberships are the account's, now the new entry's.
    /// Resolved against the rows as they are when it is applied ([`moved_memberships`]),
    /// one at a time: two rebinds may share a group.
    MoveMemberships {
        from: DirectoryId,
        to: DirectoryId,
    },
}

/// The row updates that `ack` of `change` implies, given the rows before it (`state`).
/// A pair that does not belong together implies nothing.
pub fn advance(state: &TargetState, change: &Change, ack: &Ack, now: DateTime<Utc>) -> Vec<Update> {
    match (change, ack) {
        (
            Change::CreateUser {
                id,
                user_name,
                attrs,
            }
            | Change::AdoptUser {
                id,
                user_name,
                attrs,
                ..
            }
            | Change::UpdateUser {
                id,
                user_name,
                attrs,
                ..
            }
            | Change::DeactivateUser {
                id,
                user_name,
                attrs,
                ..
            },
            Ack::User {
                scim_id,
                etag,
                owned,
                recreated,
            },
        ) => {
            // A new row: an adoption's ownership follows how it matched; a create's is what
            // the target's answer showed (a 409 that found the account: adopted).
            let new_row = match change {
                Change::AdoptUser { matched_by, .. } => Some(ownership(*matched_by)),
                Change::CreateUser { .. } => Some(owned.unwrap_or(Ownership::Created)),
                _ => None,
            };
            if let Some(owned) = new_row {
                let row = user_row(scim_id, user_name, attrs, etag, owned, None, now);
                return vec![Update::PutUser(id.clone(), row)];
            }
            if *recreated {
                // A new account: its memberships went with the old one; forgotten, so the
                // next plan adds them again.
                let row = user_row(
                    scim_id,
                    user_name,
                    attrs,
                    etag,
                    owned.unwrap_or(Ownership::Created),
                    None,
                    now,
                );
                let mut updates = vec![Update::PutUser(id.clone(), row)];
                for (gid, group) in &state.groups {
                    if group.members.contains(id) {
                        let mut group = group.clone();
                        group.members.remove(id);
                        updates.push(Update::PutGroup(gid.clone(), group));
                    }
                }
                return updates;
            }
            let prev = state.users.get(id);
            let owned = prev.map_or(Ownership::Created, |r| r.owned);
            vec![Update::PutUser(
                id.clone(),
                user_row(scim_id, user_name, attrs, etag, owned, prev, now),
            )]
        }
        (
            Change::Rebind {
                id,
                from,
                user_name,
                attrs,
                ..
            },
            Ack::User { scim_id, etag, .. },
        ) => {
            // The account keeps the ownership it had under the old entry.
            let owned = state
                .users
                .get(from)
                .map_or(Ownership::Adopted, |prev| prev.owned);
            vec![
                Update::PutUser(
                    id.clone(),
                    user_row(scim_id, user_name, attrs, etag, owned, None, now),
                ),
                Update::RemoveUser(from.clone()),
                Update::MoveMemberships {
                    from: from.clone(),
                    to: id.clone(),
                },
            ]
        }
        (Change::DeactivateUser { id, .. } | Change::DeleteUser { id, .. }, Ack::UserGone) => {
            vec![Update::RemoveUser(id.clone())]
        }
        (
            Change::Orphan {
                id,
                scim_id,
                user_name,
                ..
            },
            Ack::OrphanDeactivated { etag },
        ) => {
            // All that is known of it: it is inactive (its row lets `deactivate-then-delete`
            // run its course and a returner be reactivated).
            let mut inactive = FlatAttrs::new();
            inactive.insert("active".into(), Value::Bool(false));
            let attrs = SharedAttrs::pack(&inactive);
            vec![Update::PutUser(
                id.clone(),
                user_row(
                    scim_id,
                    user_name,
                    &attrs,
                    etag,
                    Ownership::Adopted,
                    None,
                    now,
                ),
            )]
        }
        (
            Change::CreateGroup { id, display_name }
            | Change::AdoptGroup {
                id, display_name, ..
            },
            Ack::Group {
                scim_id,
                etag,
                members,
            },
        ) => {
            // An adopted group starts from the members it was found with, unless the target
            // answered with its list.
            let (found, owned) = match change {
                Change::AdoptGroup {
                    members,
                    matched_by,
                    ..
                } => (members.clone(), ownership(*matched_by)),
                _ => (BTreeSet::new(), Ownership::Created),
            };
            vec![Update::PutGroup(
                id.clone(),
                GroupRow {
                    scim_id: scim_id.clone(),
                    display_name: display_name.clone(),
                    members: members.clone().unwrap_or(found),
                    etag: etag.clone(),
                    owned,
                },
            )]
        }
        (
            Change::UpdateGroup {
                id, display_name, ..
            },
            Ack::GroupRenamed { etag },
        ) => {
            let Some(row) = state.groups.get(id) else {
                return Vec::new();
            };
            let mut row = row.clone();
            row.display_name = display_name.clone();
            row.etag = etag.clone();
            vec![Update::PutGroup(id.clone(), row)]
        }
        (Change::DeleteGroup { id, .. }, Ack::GroupGone) => vec![Update::RemoveGroup(id.clone())],
        (
            Change::AddMembers { group, .. } | Change::RemoveMembers { group, .. },
            Ack::Members {
                confirmed,
                absent,
                etag,
            },
        ) => {
            let Some(row) = state.groups.get(group) else {
                return Vec::new();
            };
            let mut row = row.clone();
            let add = matches!(change, Change::AddMembers { .. });
            for m in absent {
                row.members.remove(m);
            }
            for m in confirmed {
                if add {
                    row.members.insert(m.clone());
                } else {
                    row.members.remove(m);
                }
            }
            if let Some(etag) = etag {
                row.etag = etag.clone();
            }
            vec![Update::PutGroup(group.clone(), row)]
        }
        _ => Vec::new(),
    }
}

/// The group rows a [`Update::MoveMemberships`] rewrites, against the rows as they are now.
pub fn moved_memberships(state: &TargetState, from: &DirectoryId, to: &DirectoryId) -> Vec<Update> {
    state
        .groups
        .iter()
        .filter(|(_, g)| g.members.contains(from))
        .map(|(gid, g)| {
            let mut g = g.clone();
            g.members.remove(from);
            g.members.insert(to.clone());
            Update::PutGroup(gid.clone(), g)
        })
        .collect()
}

/// Applies `update` to the in-memory rows. A user row keeps no attributes in memory: the
/// snapshot has them, and the rest of an apply needs only ids (as a cycle does after a
/// hash match).
pub fn apply_to(state: &mut TargetState, update: Update) {
    match update {
        Update::PutUser(id, mut row) => {
            row.attrs = map::no_attrs();
            state.users.insert(id, row);
        }
        Update::RemoveUser(id) => {
            state.users.remove(&id);
        }
        Update::PutGroup(id, row) => {
            state.groups.insert(id, row);
        }
        Update::RemoveGroup(id) => {
            state.groups.remove(&id);
        }
        Update::MoveMemberships { from, to } => {
            for u in moved_memberships(state, &from, &to) {
                apply_to(state, u);
            }
        }
    }
}

/// An adoption by `externalId` takes back what ldap2scim made; any other rule adopts.
fn ownership(matched_by: MatchRule) -> Ownership {
    if matched_by == MatchRule::ExternalId {
        Ownership::Created
    } else {
        Ownership::Adopted
    }
}

/// The row of a user the target acknowledged: deactivated since `now` when it turned
/// inactive, since the earlier date when it already was.
fn user_row(
    scim_id: &ScimId,
    user_name: &str,
    attrs: &SharedAttrs,
    etag: &Option<String>,
    owned: Ownership,
    prev: Option<&UserRow>,
    now: DateTime<Utc>,
) -> UserRow {
    let active = attrs
        .unpack()
        .get("active")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    let state = match (active, prev.map(|p| p.state)) {
        (true, _) => UserState::Active,
        (false, Some(UserState::Deactivated { since })) => UserState::Deactivated { since },
        (false, _) => UserState::Deactivated { since: now },
    };
    UserRow {
        scim_id: scim_id.clone(),
        user_name: user_name.to_string(),
        hash: map::packed_hash(attrs),
        attrs: SharedAttrs::clone(attrs),
        etag: etag.clone(),
        state,
        owned,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use serde_json::json;

    fn id(s: &str) -> DirectoryId {
        DirectoryId::new(s)
    }

    fn sid(s: &str) -> ScimId {
        ScimId(s.into())
    }

    fn attrs(active: bool) -> SharedAttrs {
        let mut a = FlatAttrs::new();
        a.insert("userName".into(), json!("ann"));
        a.insert("active".into(), json!(active));
        SharedAttrs::pack(&a)
    }

    fn ack(scim: &str) -> Ack {
        Ack::User {
            scim_id: sid(scim),
            etag: Some("W/\"1\"".into()),
            owned: None,
            recreated: false,
        }
    }

    fn row(scim: &str, state: UserState, owned: Ownership) -> UserRow {
        UserRow {
            scim_id: sid(scim),
            user_name: "ann".into(),
            hash: String::new(),
            attrs: map::no_attrs(),
            etag: None,
            state,
            owned,
        }
    }

    fn group(members: &[&str]) -> GroupRow {
        GroupRow {
            scim_id: sid("g1"),
            display_name: "staff".into(),
            members: members.iter().map(|m| id(m)).collect(),
            etag: None,
            owned: Ownership::Created,
        }
    }

    /// Creating entry u1 as ann.
    fn create_ann() -> Change {
        Change::CreateUser {
            id: id("u1"),
            user_name: "ann".into(),
            attrs: attrs(true),
        }
    }

    /// A snapshot holding entry `entry` as the active account s1.
    fn with_active(entry: &str, owned: Ownership) -> TargetState {
        let mut state = TargetState::default();
        let row = row("s1", UserState::Active, owned);
        state.users.insert(id(entry), row);
        state
    }

    /// The target's answer naming account `scim` (no ETag).
    fn found_user(scim: &str, owned: Ownership, recreated: bool) -> Ack {
        Ack::User {
            scim_id: sid(scim),
            etag: None,
            owned: Some(owned),
            recreated,
        }
    }

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 2, 8, 0, 0).unwrap()
    }

    fn put_user(updates: &[Update]) -> &UserRow {
        match updates.first() {
            Some(Update::PutUser(_, r)) => r,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_create_becomes_a_row_with_what_the_target_answered() {
        let create = create_ann();
        let state = TargetState::default();
        let u = advance(&state, &create, &ack("s1"), now());
        let r = put_user(&u);
        assert_eq!(r.scim_id, sid("s1"));
        assert_eq!(r.etag.as_deref(), Some("W/\"1\""));
        assert_eq!(r.owned, Ownership::Created);
        assert_eq!(r.state, UserState::Active);
        assert_eq!(r.hash, map::packed_hash(&attrs(true)));
        // A 409 that found someone else's account by userName: adopted.
        let found = found_user("s9", Ownership::Adopted, false);
        assert_eq!(
            put_user(&advance(&state, &create, &found, now())).owned,
            Ownership::Adopted
        );
    }

    #[test]
    fn nothing_is_recorded_for_what_was_not_acknowledged() {
        let create = create_ann();
        let state = TargetState::default();
        assert!(advance(&state, &create, &Ack::GroupGone, now()).is_empty());
        assert!(advance(&state, &create, &Ack::Nothing, now()).is_empty());
        // A rename of a group without a row has nothing to advance.
        let rename = Change::UpdateGroup {
            id: id("g"),
            scim_id: sid("g1"),
            display_name: "x".into(),
            from_name: "y".into(),
        };
        let renamed = Ack::GroupRenamed { etag: None };
        assert!(advance(&state, &rename, &renamed, now()).is_empty());
    }

    #[test]
    fn a_deactivation_dates_from_when_it_first_happened() {
        let mut state = with_active("u1", Ownership::Adopted);
        let deactivate = Change::DeactivateUser {
            id: id("u1"),
            scim_id: sid("s1"),
            user_name: "ann".into(),
            reason: crate::plan::Reason::Left,
            changes: vec![],
            attrs: attrs(false),
        };
        let u = advance(&state, &deactivate, &ack("s1"), now());
        let r = put_user(&u);
        assert_eq!(r.state, UserState::Deactivated { since: now() });
        assert_eq!(r.owned, Ownership::Adopted, "ownership stays what it was");
        let earlier = now() - chrono::Duration::days(3);
        state.users.insert(
            id("u1"),
            row(
                "s1",
                UserState::Deactivated { since: earlier },
                Ownership::Created,
            ),
        );
        let u = advance(&state, &deactivate, &ack("s1"), now());
        assert_eq!(
            put_user(&u).state,
            UserState::Deactivated { since: earlier }
        );
        // Gone from the target already: the row goes.
        let gone = advance(&state, &deactivate, &Ack::UserGone, now());
        assert_eq!(gone, vec![Update::RemoveUser(id("u1"))]);
    }

    #[test]
    fn a_recreated_account_forgets_its_memberships() {
        let mut state = with_active("u1", Ownership::Created);
        state.groups.insert(id("g"), group(&["u1", "u2"]));
        let update = Change::UpdateUser {
            id: id("u1"),
            scim_id: sid("s1"),
            user_name: "ann".into(),
            changes: vec![],
            attrs: attrs(true),
        };
        let recreated = found_user("s2", Ownership::Created, true);
        let u = advance(&state, &update, &recreated, now());
        assert_eq!(put_user(&u).scim_id, sid("s2"));
        assert_eq!(u[1], Update::PutGroup(id("g"), group(&["u2"])));
    }

    #[test]
    fn a_rebind_moves_the_row_and_its_memberships() {
        let mut state = with_active("old", Ownership::Created);
        state.groups.insert(id("g"), group(&["old", "u2"]));
        let rebind = Change::Rebind {
            id: id("new"),
            from: id("old"),
            from_name: "ann".into(),
            scim_id: sid("s1"),
            user_name: "ann".into(),
            matched_by: MatchRule::UserName,
            changes: vec![],
            attrs: attrs(true),
        };
        let u = advance(&state, &rebind, &ack("s1"), now());
        assert_eq!(
            put_user(&u).owned,
            Ownership::Created,
            "the account's ownership moves with it"
        );
        assert_eq!(u[1], Update::RemoveUser(id("old")));
        for update in u {
            apply_to(&mut state, update);
        }
        assert!(!state.users.contains_key(&id("old")));
        assert!(
            state.users[&id("new")].attrs.is_empty(),
            "no attributes kept in memory"
        );
        assert_eq!(state.groups[&id("g")], group(&["new", "u2"]));
    }

    #[test]
    fn member_rows_advance_only_by_the_confirmed_batches() {
        let mut state = TargetState::default();
        state.groups.insert(id("g"), group(&["a", "gone"]));
        let add = Change::AddMembers {
            group: id("g"),
            group_name: "staff".into(),
            members: vec![id("b"), id("c")],
        };
        let partly = Ack::Members {
            confirmed: vec![id("b")],
            absent: vec![],
            etag: None,
        };
        let u = advance(&state, &add, &partly, now());
        let mut want = group(&["a", "b", "gone"]);
        assert_eq!(u, vec![Update::PutGroup(id("g"), want.clone())]);
        let remove = Change::RemoveMembers {
            group: id("g"),
            group_name: "staff".into(),
            members: vec![id("a"), id("gone")],
        };
        let done = Ack::Members {
            confirmed: vec![id("a")],
            absent: vec![id("gone")],
            etag: Some(Some("v2".into())),
        };
        want = group(&[]);
        want.etag = Some("v2".into());
        assert_eq!(
            advance(&state, &remove, &done, now()),
            vec![Update::PutGroup(id("g"), want)]
        );
    }

    #[test]
    fn an_approved_orphan_deactivated_is_managed_from_then_on() {
        let orphan = Change::Orphan {
            id: id("o"),
            scim_id: sid("s7"),
            user_name: "left".into(),
            delete: false,
        };
        let state = TargetState::default();
        let u = advance(
            &state,
            &orphan,
            &Ack::OrphanDeactivated { etag: None },
            now(),
        );
        let r = put_user(&u);
        assert_eq!(r.owned, Ownership::Adopted);
        assert_eq!(r.state, UserState::Deactivated { since: now() });
        assert!(advance(&state, &orphan, &Ack::Nothing, now()).is_empty());
    }

    #[test]
    fn an_adoption_by_external_id_is_ours_and_by_name_adopted() {
        let adopt = |matched_by| Change::AdoptGroup {
            id: id("g"),
            scim_id: sid("g1"),
            display_name: "staff".into(),
            matched_by,
            from_name: "staff".into(),
            members: [id("a")].into(),
            changes: vec![],
        };
        let ack = Ack::Group {
            scim_id: sid("g1"),
            etag: None,
            members: None,
        };
        let state = TargetState::default();
        let owned = |m| match &advance(&state, &adopt(m), &ack, now())[..] {
            [Update::PutGroup(_, r)] => (r.owned, r.members.len()),
            other => panic!("{other:?}"),
        };
        assert_eq!(owned(MatchRule::ExternalId), (Ownership::Created, 1));
        assert_eq!(owned(MatchRule::DisplayName), (Ownership::Adopted, 1));
    }
}
