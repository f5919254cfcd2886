//! Safety limits: decides which destructive changes of a plan may go ahead. Pure.
//!
//! A destructive change (deactivate, delete) that a limit holds is moved from
//! `Plan::changes` to `Plan::held`, never dropped silently: reports show it and `approve`
//! releases exactly the held set.

use std::collections::BTreeSet;

use super::{Action, Change, HeldKey, Plan, ResourceKind};
use crate::config::{Limit, Rebind};
use crate::model::DirectoryId;
use crate::snapshot::ReadStats;

/// Why every destructive change of this cycle is held, whatever the per-target limit says
/// (e.g. the directory shrank suspiciously).
#[derive(Debug, Clone)]
pub struct SourceHold(pub String);

/// The directory-wide integrity check: a read much smaller than the last good one holds all
/// deprovisions.
pub fn source_hold(
    users: usize,
    groups: usize,
    last: Option<&ReadStats>,
    max_shrink: f64,
) -> Option<SourceHold> {
    let last = last?;
    shrank("users", last.users, users, max_shrink)
        .or_else(|| shrank("groups", last.groups, groups, max_shrink))
}

fn shrank(kind: &str, before: usize, now: usize, max_shrink: f64) -> Option<SourceHold> {
    if before == 0 {
        return None;
    }
    if now == 0 {
        return Some(SourceHold(format!(
            "the directory read returned no {kind}, but the last good read had {before}"
        )));
    }
    let shrink = 1.0 - now as f64 / before as f64;
    (shrink > max_shrink).then(|| {
        SourceHold(format!(
            "the directory shrank from {before} to {now} {kind} ({:.0}%), more than ldap.max_shrink ({:.0}%)",
            shrink * 100.0,
            max_shrink * 100.0
        ))
    })
}

/// Applies the limits to `plan` in place.
/// `managed_users` is the number of users the snapshot holds for the target;
/// `approved` is the set of destructive changes an operator released with `approve`;
/// `rebind` is the target's policy for re-bound accounts (`Hold`: every one waits for
/// `approve`, whatever the limits say).
#[allow(clippy::too_many_arguments)]
pub fn apply_limits(
    plan: &mut Plan,
    max_deprovisions: Limit,
    managed_users: usize,
    managed_groups: usize,
    source_hold: Option<&SourceHold>,
    approved: Option<&BTreeSet<HeldKey>>,
    rebind: Rebind,
) {
    // Approved changes go ahead; only they: anything destructive planned since the approval
    // is judged on its own.
    let is_approved = |c: &Change| approved.is_some_and(|a| a.contains(&approval_key(c)));
    let pending: Vec<&Change> = plan
        .changes
        .iter()
        .filter(|c| c.is_destructive() && !is_approved(c))
        .collect();
    if pending.is_empty() {
        return;
    }
    let user_deprovisions = pending
        .iter()
        .filter(|c| c.resource() == ResourceKind::User)
        .count();
    let group_deletes = pending.len() - user_deprovisions;
    let (allowed_users, allowed_groups) = (
        max_deprovisions.allowed(managed_users),
        max_deprovisions.allowed(managed_groups),
    );
    let rebinds = pending
        .iter()
        .filter(|c| matches!(c, Change::Rebind { .. }))
        .count();
    // Over a limit everything destructive waits; with `rebind = "hold"` the rebinds do anyway.
    let (reason, hold_all) = if let Some(SourceHold(why)) = source_hold {
        (why.clone(), true)
    } else if user_deprovisions > allowed_users {
        (format!(
            "{user_deprovisions} deprovisions exceed max_deprovisions ({}) of {managed_users} managed users; review them with `ldap2scim plan`, then run `ldap2scim approve --target NAME` to release them",
            describe_limit(max_deprovisions, allowed_users)
        ), true)
    } else if group_deletes > allowed_groups {
        (format!(
            "{group_deletes} group deletions exceed max_deprovisions ({}) of {managed_groups} managed groups; review them with `ldap2scim plan`, then run `ldap2scim approve --target NAME` to release them",
            describe_limit(max_deprovisions, allowed_groups)
        ), true)
    } else if rebind == Rebind::Hold && rebinds > 0 {
        (format!(
            "{rebinds} rebind(s) of an account to another directory entry wait for approval (rebind = \"hold\"); review them with `ldap2scim plan`, then run `ldap2scim approve --target NAME` to release them"
        ), false)
    } else {
        return;
    };
    let (mut held, kept): (Vec<Change>, Vec<Change>) = std::mem::take(&mut plan.changes)
        .into_iter()
        .partition(|c| {
            c.is_destructive()
                && !is_approved(c)
                && (hold_all || matches!(c, Change::Rebind { .. }))
        });
    // A held leaver keeps its group memberships too: removing them would take the access the
    // hold is there to keep. A held rebind keeps both entries' memberships as they are.
    let held_users: BTreeSet<DirectoryId> = held
        .iter()
        .filter(|c| c.resource() == ResourceKind::User)
        .flat_map(|c| std::iter::once(c.id().clone()).chain(c.from_id().cloned()))
        .collect();
    let mut changes = Vec::with_capacity(kept.len());
    for c in kept {
        match c {
            Change::RemoveMembers {
                group,
                group_name,
                members,
            } if !is_approved_removal(approved, &group) => {
                let (keep_back, go): (Vec<_>, Vec<_>) =
                    members.into_iter().partition(|m| held_users.contains(m));
                if !go.is_empty() {
                    changes.push(Change::RemoveMembers {
                        group: group.clone(),
                        group_name: group_name.clone(),
                        members: go,
                    });
                }
                if !keep_back.is_empty() {
                    held.push(Change::RemoveMembers {
                        group,
                        group_name,
                        members: keep_back,
                    });
                }
            }
            // The new entry of a held rebind has no account of its own yet.
            Change::AddMembers {
                group,
                group_name,
                members,
            } if members.iter().any(|m| held_users.contains(m)) => {
                let (keep_back, go): (Vec<_>, Vec<_>) =
                    members.into_iter().partition(|m| held_users.contains(m));
                if !go.is_empty() {
                    changes.push(Change::AddMembers {
                        group: group.clone(),
                        group_name: group_name.clone(),
                        members: go,
                    });
                }
                held.push(Change::AddMembers {
                    group,
                    group_name,
                    members: keep_back,
                });
            }
            other => changes.push(other),
        }
    }
    plan.changes = changes;
    plan.held = held;
    plan.held_reason = Some(reason);
}

fn is_approved_removal(approved: Option<&BTreeSet<HeldKey>>, group: &DirectoryId) -> bool {
    approved.is_some_and(|a| a.contains(&HeldKey::new(Action::RemoveMembers, None, group.clone())))
}

fn describe_limit(limit: Limit, allowed: usize) -> String {
    match limit {
        Limit::Count(n) => format!("{n}"),
        Limit::Percent(p) => format!("{}% = {allowed}", (p * 100.0).round()),
    }
}

/// The identity of a held change, as stored for `approve`.
pub fn approval_key(c: &Change) -> HeldKey {
    HeldKey::new(c.action(), c.from_id(), c.id().clone())
}

/// The identity of a held set, as stored for `approve`.
pub fn held_keys(plan: &Plan) -> BTreeSet<HeldKey> {
    plan.held.iter().map(approval_key).collect()
}

/// Adds a target's orphans (`Change::Orphan`) to a plan that [`apply_limits`] already judged:
/// each one is held until an operator approved it, and every one is held while the
/// directory read itself is in doubt (an orphan is an account the directory does not know,
/// so a suspicious read makes every orphan suspicious). Approved ones go ahead, after the
/// other changes; they do not count against `max_deprovisions` (the approval is explicit).
pub fn add_orphans(
    plan: &mut Plan,
    orphans: Vec<Change>,
    source_hold: Option<&SourceHold>,
    approved: Option<&BTreeSet<HeldKey>>,
) {
    let approved_orphan = |c: &Change| {
        source_hold.is_none() && approved.is_some_and(|a| a.contains(&approval_key(c)))
    };
    let (go, held): (Vec<Change>, Vec<Change>) = orphans.into_iter().partition(approved_orphan);
    plan.changes.extend(go);
    if held.is_empty() {
        return;
    }
    let why = match source_hold {
        Some(SourceHold(doubt)) => format!(
            "{} orphan account(s) are held with every deprovision: {doubt}",
            held.len()
        ),
        None => format!(
            "{} orphan account(s) carry a directory-style externalId that matches no directory entry this target provisions (found when the snapshot was rebuilt); they are unverifiable, so they are deprovisioned only after review: `ldap2scim plan`, then `ldap2scim approve --target NAME`",
            held.len()
        ),
    };
    plan.held_reason = Some(match plan.held_reason.take() {
        Some(other) if source_hold.is_none() => format!("{other}; {why}"),
        Some(other) => other,
        None => why,
    });
    plan.held.extend(held);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ScimId;

    #[test]
    fn shrink_guard_trips_past_the_limit() {
        let last = ReadStats {
            users: 10,
            groups: 0,
            at: None,
        };
        assert!(source_hold(0, 0, Some(&last), 0.2).is_some());
        assert!(source_hold(0, 0, None, 0.2).is_none());
    }

    fn orphan(id: &str) -> Change {
        Change::Orphan {
            id: DirectoryId::new(id),
            scim_id: ScimId(format!("s-{id}")),
            user_name: format!("{id}@example.org"),
            delete: false,
        }
    }

    #[test]
    fn orphans_wait_for_approve_and_a_doubtful_read_holds_even_approved_ones() {
        let mut plan = Plan::default();
        add_orphans(&mut plan, vec![orphan("a"), orphan("b")], None, None);
        assert!(plan.changes.is_empty());
        assert_eq!(plan.held.len(), 2);
        assert!(plan.held_reason.as_deref().unwrap().contains("approve"));

        let approved = BTreeSet::from([HeldKey::new(Action::Orphan, None, DirectoryId::new("a"))]);
        let mut plan = Plan::default();
        add_orphans(
            &mut plan,
            vec![orphan("a"), orphan("b")],
            None,
            Some(&approved),
        );
        assert_eq!(plan.changes, vec![orphan("a")]);
        assert_eq!(plan.held, vec![orphan("b")]);

        let doubt = SourceHold("the directory shrank".into());
        let mut plan = Plan::default();
        add_orphans(&mut plan, vec![orphan("a")], Some(&doubt), Some(&approved));
        assert!(plan.changes.is_empty());
        assert!(plan
            .held_reason
            .as_deref()
            .unwrap()
            .contains("the directory shrank"));
    }
}
