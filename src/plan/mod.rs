//! The planner: a pure diff of what a target should have (from [`crate::map`]) against what
//! the snapshot says it has, producing the list of changes to send. No I/O.
//!
//! Order matters and is part of the plan: users are created and updated first, then groups,
//! then member removals before additions, and deprovisions last.

pub mod adopt;
pub mod guard;
pub mod only;
pub mod orphans;
pub mod saved;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

use crate::config::{Deprovision, MatchRule, TargetConfig};
use crate::map::{Desired, FlatAttrs, SharedAttrs};
pub use crate::model::action::{Action, HeldKey, ResourceKind};
pub use crate::model::AttrChange;
use crate::model::{DirectoryId, ScimId};
use crate::snapshot::{RowCounts, TargetState, UserState};
pub use only::Selection;
pub use saved::{SavedChange, SavedPlan};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    /// The entry is gone from the directory (or from the target's scope).
    Left,
    /// The entry is disabled in the directory.
    Disabled,
    /// Deactivated for longer than `delete_after`.
    GracePeriodOver,
}

/// A resource found on the target that a new directory entry will take over.
#[derive(Debug, Clone, PartialEq)]
pub struct Existing {
    pub scim_id: ScimId,
    /// The target's current flat attributes (as far as they were read).
    pub attrs: FlatAttrs,
    /// How it matched.
    pub matched_by: MatchRule,
    /// For a group: its current members, as directory ids.
    pub members: BTreeSet<DirectoryId>,
    /// For a user matched by userName: the other directory id its directory-style
    /// `externalId` names (no snapshot row holds the account, e.g. after a lost snapshot).
    /// Taking it is a [`Change::Rebind`] from that id, never a silent adoption.
    pub claimed_by: Option<DirectoryId>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    CreateUser {
        id: DirectoryId,
        user_name: String,
        attrs: SharedAttrs,
    },
    /// Take over a resource that already exists on the target, then bring it in line.
    AdoptUser {
        id: DirectoryId,
        scim_id: ScimId,
        user_name: String,
        matched_by: MatchRule,
        changes: Vec<AttrChange>,
        attrs: SharedAttrs,
    },
    /// An account we manage for one directory entry (`from`) is claimed by another (`id`),
    /// matched by userName: the old entry's account becomes the new one's. For the old
    /// identity it is a deprovision (counted, and held like one).
    Rebind {
        id: DirectoryId,
        /// The directory entry whose snapshot row holds the account now.
        from: DirectoryId,
        from_name: String,
        scim_id: ScimId,
        user_name: String,
        matched_by: MatchRule,
        changes: Vec<AttrChange>,
        attrs: SharedAttrs,
    },
    UpdateUser {
        id: DirectoryId,
        scim_id: ScimId,
        user_name: String,
        changes: Vec<AttrChange>,
        attrs: SharedAttrs,
    },
    DeactivateUser {
        id: DirectoryId,
        scim_id: ScimId,
        user_name: String,
        reason: Reason,
        changes: Vec<AttrChange>,
        attrs: SharedAttrs,
    },
    DeleteUser {
        id: DirectoryId,
        scim_id: ScimId,
        user_name: String,
        reason: Reason,
    },
    CreateGroup {
        id: DirectoryId,
        display_name: String,
    },
    AdoptGroup {
        id: DirectoryId,
        scim_id: ScimId,
        display_name: String,
        matched_by: MatchRule,
        from_name: String,
        /// Its members on the target when it was found.
        members: BTreeSet<DirectoryId>,
        /// What differs on the found group (`displayName`, `externalId`): all that is sent.
        changes: Vec<AttrChange>,
    },
    UpdateGroup {
        id: DirectoryId,
        scim_id: ScimId,
        display_name: String,
        from_name: String,
    },
    DeleteGroup {
        id: DirectoryId,
        scim_id: ScimId,
        display_name: String,
    },
    RemoveMembers {
        group: DirectoryId,
        group_name: String,
        members: Vec<DirectoryId>,
    },
    AddMembers {
        group: DirectoryId,
        group_name: String,
        members: Vec<DirectoryId>,
    },
    /// An account with a directory-style `externalId` (`id`) that matches no directory entry,
    /// found when the target's snapshot rows were rebuilt: probably someone who left while the
    /// snapshot was lost. Unverifiable, so it is deprovisioned (deactivated, or deleted when
    /// `delete` says the target's policy is `deprovision = "delete"`) only through `approve`.
    Orphan {
        id: DirectoryId,
        scim_id: ScimId,
        user_name: String,
        delete: bool,
    },
}

impl Change {
    /// Destructive changes are the ones a safety limit may hold.
    pub fn is_destructive(&self) -> bool {
        matches!(
            self,
            Change::DeactivateUser { .. }
                | Change::DeleteUser { .. }
                | Change::DeleteGroup { .. }
                | Change::Rebind { .. }
                | Change::Orphan { .. }
        )
    }

    pub fn action(&self) -> Action {
        match self {
            Change::CreateUser { .. } | Change::CreateGroup { .. } => Action::Create,
            Change::AdoptUser { .. } | Change::AdoptGroup { .. } => Action::Adopt,
            Change::UpdateUser { .. } | Change::UpdateGroup { .. } => Action::Update,
            Change::DeactivateUser { .. } => Action::Deactivate,
            Change::Rebind { .. } => Action::Rebind,
            Change::DeleteUser { .. } | Change::DeleteGroup { .. } => Action::Delete,
            Change::RemoveMembers { .. } => Action::RemoveMembers,
            Change::AddMembers { .. } => Action::AddMembers,
            Change::Orphan { .. } => Action::Orphan,
        }
    }

    pub fn resource(&self) -> ResourceKind {
        match self {
            Change::CreateUser { .. }
            | Change::AdoptUser { .. }
            | Change::UpdateUser { .. }
            | Change::DeactivateUser { .. }
            | Change::DeleteUser { .. }
            | Change::Rebind { .. }
            | Change::Orphan { .. } => ResourceKind::User,
            _ => ResourceKind::Group,
        }
    }

    /// The directory id the change is about.
    pub fn id(&self) -> &DirectoryId {
        match self {
            Change::CreateUser { id, .. }
            | Change::AdoptUser { id, .. }
            | Change::UpdateUser { id, .. }
            | Change::DeactivateUser { id, .. }
            | Change::DeleteUser { id, .. }
            | Change::Rebind { id, .. }
            | Change::CreateGroup { id, .. }
            | Change::AdoptGroup { id, .. }
            | Change::UpdateGroup { id, .. }
            | Change::DeleteGroup { id, .. }
            | Change::Orphan { id, .. } => id,
            Change::RemoveMembers { group, .. } | Change::AddMembers { group, .. } => group,
        }
    }

    /// For a rebind: the directory id that held the account before.
    pub fn from_id(&self) -> Option<&DirectoryId> {
        match self {
            Change::Rebind { from, .. } => Some(from),
            _ => None,
        }
    }

    /// The userName or displayName the change is about.
    pub fn name(&self) -> &str {
        match self {
            Change::CreateUser { user_name, .. }
            | Change::AdoptUser { user_name, .. }
            | Change::UpdateUser { user_name, .. }
            | Change::DeactivateUser { user_name, .. }
            | Change::DeleteUser { user_name, .. }
            | Change::Rebind { user_name, .. }
            | Change::Orphan { user_name, .. } => user_name,
            Change::CreateGroup { display_name, .. }
            | Change::AdoptGroup { display_name, .. }
            | Change::UpdateGroup { display_name, .. }
            | Change::DeleteGroup { display_name, .. } => display_name,
            Change::RemoveMembers { group_name, .. } | Change::AddMembers { group_name, .. } => {
                group_name
            }
        }
    }
}

/// A user or group that could not be planned, with the reason (reported, never guessed).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Problem {
    pub external_id: String,
    pub name: String,
    pub reason: String,
    /// `false` for what policy wants (a `protect` pattern): reported, but not a failure.
    #[serde(skip)]
    pub fails: bool,
}

#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub changes: Vec<Change>,
    /// Destructive changes a safety limit held back (not applied).
    pub held: Vec<Change>,
    /// Why changes were held.
    pub held_reason: Option<String>,
    pub problems: Vec<Problem>,
    /// Attribute paths this target does not keep (absent from its answers after we sent
    /// them): not planned again while the target does not have them.
    pub not_kept: Vec<String>,
    /// `plan --out`: each change's fingerprint, in the order of `changes`.
    pub fingerprints: Vec<String>,
    /// `sync --plan`: the saved plan's changes that no longer match what would be done now.
    pub stale: Vec<SavedChange>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.held.is_empty()
    }

    /// The fewest rows a target can have once the plan is applied (what it removes taken
    /// off), to be recorded before the apply starts.
    pub fn row_floor(&self, state: &TargetState) -> RowCounts {
        let removing_users = self
            .changes
            .iter()
            .filter(|c| {
                matches!(
                    c,
                    Change::DeleteUser { .. }
                        | Change::DeactivateUser { .. }
                        | Change::Rebind { .. }
                )
            })
            .count();
        let removing_groups = self
            .changes
            .iter()
            .filter(|c| matches!(c, Change::DeleteGroup { .. }))
            .count();
        RowCounts {
            users: state.users.len().saturating_sub(removing_users),
            groups: state.groups.len().saturating_sub(removing_groups),
        }
    }

    /// The userNames of the users that member changes name, for reports.
    pub fn member_names(
        &self,
        desired: &Desired,
        state: &TargetState,
    ) -> BTreeMap<DirectoryId, String> {
        let mut names = BTreeMap::new();
        for c in self.changes.iter().chain(&self.held) {
            if let Change::AddMembers { members, .. } | Change::RemoveMembers { members, .. } = c {
                for m in members {
                    let name = desired
                        .users
                        .get(m)
                        .map(|u| u.user_name.clone())
                        .or_else(|| state.users.get(m).map(|r| r.user_name.clone()))
                        .unwrap_or_else(|| m.0.clone());
                    names.insert(m.clone(), name);
                }
            }
        }
        names
    }
}

/// What the planner needs besides the desired state and the snapshot.
pub struct PlanInput<'a> {
    pub target: &'a TargetConfig,
    pub desired: &'a Desired,
    pub state: &'a TargetState,
    /// Resources on the target matched to directory entries that have no snapshot row yet.
    pub existing_users: &'a BTreeMap<DirectoryId, Existing>,
    pub existing_groups: &'a BTreeMap<DirectoryId, Existing>,
    /// Entries not to create: a resource on the target matches them ambiguously or is
    /// protected (reported as problems, never guessed).
    pub blocked: &'a BTreeSet<DirectoryId>,
    /// Attribute paths the target does not keep ([`adopt::not_kept_paths`]).
    pub not_kept: &'a BTreeSet<String>,
    pub now: DateTime<Utc>,
}

/// Diffs desired against the snapshot. Pure: same input, same plan.
pub fn plan(input: &PlanInput<'_>) -> Plan {
    let PlanInput {
        target,
        desired,
        state,
        existing_users,
        existing_groups,
        blocked,
        not_kept,
        now,
    } = *input;
    let mut policy_problems = Vec::new();
    // Accounts re-bound to another entry: their old id's memberships are the new one's.
    let mut rebound: BTreeMap<DirectoryId, DirectoryId> = BTreeMap::new();
    let mut p = Plan::default();
    let mut user_changes = Vec::new();
    let mut deprovisions = Vec::new();
    // Which row holds a SCIM id: indexed once, looked up per adoption.
    let by_scim = if existing_users.is_empty() {
        Default::default()
    } else {
        state.user_index()
    };
    let holder = |sid: &ScimId| by_scim.get(sid.0.as_str()).copied();
    let superseded: BTreeSet<DirectoryId> = existing_users
        .values()
        .filter_map(|e| holder(&e.scim_id).cloned())
        .collect();
    // Users that will be on the target (as group member candidates) after this plan.
    let mut provisioned: HashSet<&DirectoryId> =
        HashSet::with_capacity(desired.users.len() + desired.problems.len());
    // Entries present in the directory that could not be mapped: never "left". Their current
    // rows stay as they are (and count as provisioned, so memberships stay too).
    let unmapped: BTreeSet<DirectoryId> = desired
        .problems
        .iter()
        .map(|(id, _, _)| id.clone())
        .collect();
    provisioned.extend(
        desired
            .problems
            .iter()
            .map(|(id, _, _)| id)
            .filter(|id| state.users.contains_key(*id)),
    );

    // Both maps are in id order: one merge instead of 100,000 lookups.
    let mut rows = state.users.iter().peekable();
    for (id, want) in &desired.users {
        while rows.next_if(|(k, _)| *k < id).is_some() {}
        let row = rows.next_if(|(k, _)| *k == id).map(|(_, r)| r);
        match row {
            Some(row) => {
                provisioned.insert(id);
                // `protect` covers what we already manage too (a pattern added later, a rename).
                if row.hash == want.hash || is_protected(target, &row.user_name) {
                    continue;
                }
                let want_attrs = want.attrs.unpack();
                let changes = diff_attrs(&row.attrs.unpack(), &want_attrs);
                if changes.is_empty() {
                    continue;
                }
                let was_active = matches!(row.state, UserState::Active);
                if was_active && !want.active {
                    deprovisions.push(Change::DeactivateUser {
                        id: id.clone(),
                        scim_id: row.scim_id.clone(),
                        user_name: want.user_name.clone(),
                        reason: Reason::Disabled,
                        changes,
                        attrs: want.attrs.clone(),
                    });
                } else {
                    user_changes.push(Change::UpdateUser {
                        id: id.clone(),
                        scim_id: row.scim_id.clone(),
                        user_name: want.user_name.clone(),
                        changes,
                        attrs: want.attrs.clone(),
                    });
                }
            }
            None if !want.active && !target.provision_disabled => {}
            None if blocked.contains(id) => {}
            // `protect` covers creates too: a protected name is never made by us (and would
            // never be deprovisioned either).
            None if is_protected(target, &want.user_name) => {
                policy_problems.push(Problem {
                    external_id: id.0.clone(),
                    name: want.user_name.clone(),
                    reason: format!("{} matches a protect pattern; not created", want.user_name),
                    fails: false,
                });
            }
            None => {
                provisioned.insert(id);
                match existing_users.get(id) {
                    Some(found) => {
                        let want_attrs = want.attrs.unpack();
                        let changes = adopt::adoption_diff(&found.attrs, &want_attrs, not_kept);
                        // Held by a row, or (no row) named by the account's directory-style
                        // externalId: either way the account moves from another directory id.
                        let from = match holder(&found.scim_id) {
                            Some(old) => state
                                .users
                                .get(old)
                                .map(|r| (old.clone(), r.user_name.clone())),
                            None => found.claimed_by.clone().map(|old| {
                                let name = found.attrs.get("userName").and_then(Value::as_str);
                                (old, name.unwrap_or_default().to_string())
                            }),
                        };
                        match from {
                            Some((old, from_name)) => {
                                rebound.insert(old.clone(), id.clone());
                                user_changes.push(Change::Rebind {
                                    id: id.clone(),
                                    from: old,
                                    from_name,
                                    scim_id: found.scim_id.clone(),
                                    user_name: want.user_name.clone(),
                                    matched_by: found.matched_by,
                                    changes,
                                    attrs: want.attrs.clone(),
                                })
                            }
                            None => user_changes.push(Change::AdoptUser {
                                id: id.clone(),
                                scim_id: found.scim_id.clone(),
                                user_name: want.user_name.clone(),
                                matched_by: found.matched_by,
                                changes,
                                attrs: want.attrs.clone(),
                            }),
                        }
                    }
                    None => user_changes.push(Change::CreateUser {
                        id: id.clone(),
                        user_name: want.user_name.clone(),
                        attrs: want.attrs.clone(),
                    }),
                }
            }
        }
    }

    // A SCIM resource that a desired entry holds is never deprovisioned through another,
    // stale row (left behind by a crash between an adoption's two snapshot writes).
    // Rows without a desired entry, by merging the two id-ordered maps.
    let mut wanted = desired.users.keys().peekable();
    let leavers: Vec<(&DirectoryId, &crate::snapshot::UserRow)> = state
        .users
        .iter()
        .filter(|(id, _)| {
            while wanted.next_if(|k| k < id).is_some() {}
            wanted.next_if(|k| k == id).is_none()
        })
        .collect();
    let held_by_desired: BTreeSet<&ScimId> = if leavers.is_empty() {
        BTreeSet::new()
    } else {
        state
            .users
            .iter()
            .filter(|(id, _)| desired.users.contains_key(*id))
            .map(|(_, r)| &r.scim_id)
            .collect()
    };
    for (id, row) in leavers {
        if unmapped.contains(id)
            || is_protected(target, &row.user_name)
            || superseded.contains(id)
            || held_by_desired.contains(&row.scim_id)
        {
            continue;
        }
        let deactivate = |reason| Change::DeactivateUser {
            id: id.clone(),
            scim_id: row.scim_id.clone(),
            user_name: row.user_name.clone(),
            reason,
            changes: vec![AttrChange {
                path: "active".into(),
                from: Some(Value::Bool(true)),
                to: Some(Value::Bool(false)),
            }],
            attrs: SharedAttrs::pack(&with_active(&row.attrs.unpack(), false)),
        };
        let delete = |reason| Change::DeleteUser {
            id: id.clone(),
            scim_id: row.scim_id.clone(),
            user_name: row.user_name.clone(),
            reason,
        };
        match (row.state, target.deprovision) {
            (UserState::Active, Deprovision::Delete) => deprovisions.push(delete(Reason::Left)),
            (UserState::Active, _) => deprovisions.push(deactivate(Reason::Left)),
            (UserState::Deactivated { .. }, Deprovision::Delete) => {
                deprovisions.push(delete(Reason::Left))
            }
            (UserState::Deactivated { since }, Deprovision::DeactivateThenDelete) => {
                if grace_over(since, target.delete_after, now) {
                    deprovisions.push(delete(Reason::GracePeriodOver));
                }
            }
            (UserState::Deactivated { .. }, Deprovision::Deactivate) => {}
        }
    }

    // Groups.
    let mut group_changes = Vec::new();
    let mut removals = Vec::new();
    let mut additions = Vec::new();
    let mut group_deletes = Vec::new();
    let no_members = BTreeSet::new();
    for (id, want) in &desired.groups {
        let current: std::borrow::Cow<'_, BTreeSet<DirectoryId>> = match state.groups.get(id) {
            Some(row) if is_protected(target, &row.display_name) => continue,
            Some(row) => {
                if row.display_name != want.display_name {
                    group_changes.push(Change::UpdateGroup {
                        id: id.clone(),
                        scim_id: row.scim_id.clone(),
                        display_name: want.display_name.clone(),
                        from_name: row.display_name.clone(),
                    });
                }
                if rebound.is_empty() || !row.members.iter().any(|m| rebound.contains_key(m)) {
                    std::borrow::Cow::Borrowed(&row.members)
                } else {
                    std::borrow::Cow::Owned(
                        row.members
                            .iter()
                            .map(|m| rebound.get(m).unwrap_or(m).clone())
                            .collect(),
                    )
                }
            }
            None if blocked.contains(id) => continue,
            None if is_protected(target, &want.display_name) => {
                policy_problems.push(Problem {
                    external_id: id.0.clone(),
                    name: want.display_name.clone(),
                    reason: format!(
                        "{} matches a protect pattern; not created",
                        want.display_name
                    ),
                    fails: false,
                });
                continue;
            }
            None => match existing_groups.get(id) {
                Some(found) => {
                    // Only what differs is sent (nothing: no write at all).
                    let have: FlatAttrs = ["displayName", "externalId"]
                        .into_iter()
                        .filter_map(|k| {
                            let v = found.attrs.get(k).filter(|v| !v.is_null())?;
                            Some((k.to_string(), v.clone()))
                        })
                        .collect();
                    let want_attrs = FlatAttrs::from([
                        (
                            "displayName".to_string(),
                            Value::from(want.display_name.clone()),
                        ),
                        ("externalId".to_string(), Value::from(id.0.clone())),
                    ]);
                    group_changes.push(Change::AdoptGroup {
                        changes: diff_attrs(&have, &want_attrs),
                        id: id.clone(),
                        scim_id: found.scim_id.clone(),
                        display_name: want.display_name.clone(),
                        matched_by: found.matched_by,
                        from_name: found
                            .attrs
                            .get("displayName")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string(),
                        members: found.members.clone(),
                    });
                    std::borrow::Cow::Borrowed(&found.members)
                }
                None => {
                    group_changes.push(Change::CreateGroup {
                        id: id.clone(),
                        display_name: want.display_name.clone(),
                    });
                    std::borrow::Cow::Borrowed(&no_members)
                }
            },
        };
        let wanted = want.members.iter().filter(|m| provisioned.contains(*m));
        let (remove, add) = sorted_difference(current.iter(), wanted);
        if !remove.is_empty() {
            removals.push(Change::RemoveMembers {
                group: id.clone(),
                group_name: want.display_name.clone(),
                members: remove,
            });
        }
        if !add.is_empty() {
            additions.push(Change::AddMembers {
                group: id.clone(),
                group_name: want.display_name.clone(),
                members: add,
            });
        }
    }
    for (id, row) in &state.groups {
        // A group whose name template fails for it is still in the directory: kept.
        if !desired.groups.contains_key(id)
            && !unmapped.contains(id)
            && !is_protected(target, &row.display_name)
        {
            group_deletes.push(Change::DeleteGroup {
                id: id.clone(),
                scim_id: row.scim_id.clone(),
                display_name: row.display_name.clone(),
            });
        }
    }

    p.changes.extend(user_changes);
    p.changes.extend(group_changes);
    p.changes.extend(removals);
    p.changes.extend(additions);
    p.changes.extend(group_deletes);
    p.changes.extend(deprovisions);
    p.problems = desired
        .problems
        .iter()
        .map(|(id, dn, reason)| Problem {
            external_id: id.0.clone(),
            name: dn.clone(),
            reason: reason.clone(),
            fails: true,
        })
        .collect();
    p.problems.append(&mut policy_problems);
    p.not_kept = not_kept.iter().cloned().collect();
    p
}

/// Says, for each user this plan creates or changes, that its manager is not on the target
/// (the field is left empty until it is). Reported, not a failure.
pub fn note_absent_managers(plan: &mut Plan, notes: &[crate::map::ManagerNote], desired: &Desired) {
    if notes.is_empty() {
        return;
    }
    let changed: HashSet<&DirectoryId> = plan
        .changes
        .iter()
        .filter(|c| c.resource() == ResourceKind::User)
        .map(Change::id)
        .collect();
    for note in notes.iter().filter(|n| changed.contains(&n.user)) {
        let name = desired
            .users
            .get(&note.user)
            .map_or_else(|| note.user.0.clone(), |u| u.user_name.clone());
        let why = if note.unknown {
            "is not in the directory read"
        } else {
            "is outside this target's scope"
        };
        plan.problems.push(Problem {
            external_id: note.user.0.clone(),
            name,
            reason: format!(
                "its manager {} {why}: the manager field is left empty until the manager is provisioned here",
                note.manager_dn
            ),
            fails: false,
        });
    }
}

fn grace_over(since: DateTime<Utc>, grace: Duration, now: DateTime<Utc>) -> bool {
    chrono::Duration::from_std(grace)
        .map(|g| since + g <= now)
        .unwrap_or(false)
}

/// What is in `have` and not in `want` (to remove), and the reverse (to add), for two
/// ascending sequences: one linear merge, even for a group of 100,000 members.
fn sorted_difference<'a>(
    have: impl Iterator<Item = &'a DirectoryId>,
    want: impl Iterator<Item = &'a DirectoryId>,
) -> (Vec<DirectoryId>, Vec<DirectoryId>) {
    let (mut remove, mut add) = (Vec::new(), Vec::new());
    let (mut have, mut want) = (have.peekable(), want.peekable());
    loop {
        match (have.peek(), want.peek()) {
            (Some(h), Some(w)) => match h.cmp(w) {
                std::cmp::Ordering::Less => remove.extend(have.next().cloned()),
                std::cmp::Ordering::Greater => add.extend(want.next().cloned()),
                std::cmp::Ordering::Equal => {
                    have.next();
                    want.next();
                }
            },
            (Some(_), None) => remove.extend(have.next().cloned()),
            (None, Some(_)) => add.extend(want.next().cloned()),
            (None, None) => return (remove, add),
        }
    }
}

fn with_active(attrs: &FlatAttrs, active: bool) -> FlatAttrs {
    let mut a = attrs.clone();
    a.insert("active".into(), Value::Bool(active));
    a
}

/// Attribute-level differences between what the target has and what it should have.
pub fn diff_attrs(have: &FlatAttrs, want: &FlatAttrs) -> Vec<AttrChange> {
    let paths: BTreeSet<&String> = have.keys().chain(want.keys()).collect();
    paths
        .into_iter()
        .filter_map(|path| {
            let (from, to) = (have.get(path), want.get(path));
            (from != to).then(|| AttrChange {
                path: path.clone(),
                from: from.cloned(),
                to: to.cloned(),
            })
        })
        .collect()
}

/// Whether `name` matches one of the target's `protect` patterns (`*` and `?` globs,
/// case-insensitive).
pub fn is_protected(target: &TargetConfig, name: &str) -> bool {
    target
        .protect
        .iter()
        .any(|p| glob_match(&p.to_lowercase(), &name.to_lowercase()))
}

pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
pub(crate) mod tests;
