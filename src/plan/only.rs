//! `--only`: a plan narrowed to some users and groups, for a new hire who starts in an hour
//! or a leaver who must go now. The whole plan is computed as usual (ownership, adoption,
//! rebind rules), then only the chosen entries' changes are kept, before the safety limits
//! count them: nothing else on the target is touched.

use std::collections::BTreeSet;

use super::{Change, Plan, Problem};
use crate::model::{Directory, DirectoryId, Entry};
use crate::snapshot::TargetState;

/// The entries a partial pass touches, found in the directory read; a name found nowhere
/// there is looked up among each target's accounts (a leaver is no longer in the directory).
#[derive(Debug, Clone, Default)]
pub struct Selection {
    ids: BTreeSet<DirectoryId>,
    /// Users chosen, whose memberships follow them into every group.
    users: BTreeSet<DirectoryId>,
    /// What the directory did not know, lowercased.
    unresolved: Vec<String>,
}

impl Selection {
    pub fn resolve(directory: &Directory, needles: &[String]) -> Selection {
        let mut selection = Selection::default();
        for needle in needles {
            match directory.find(needle) {
                Some(Entry::User(u)) => {
                    selection.ids.insert(u.id.clone());
                    selection.users.insert(u.id.clone());
                }
                Some(Entry::Group(g)) => {
                    selection.ids.insert(g.id.clone());
                }
                None => selection.unresolved.push(needle.to_lowercase()),
            }
        }
        selection
    }

    /// The ids chosen on one target: the directory's, and the rows of accounts whose
    /// userName, group name or directory id is a name the directory did not know. A name
    /// found in neither is a problem of this target's plan.
    fn on_target(
        &self,
        state: &TargetState,
    ) -> (BTreeSet<DirectoryId>, BTreeSet<DirectoryId>, Vec<&str>) {
        let mut ids = self.ids.clone();
        let mut users = self.users.clone();
        let mut unmatched = Vec::new();
        for needle in &self.unresolved {
            let mut found = false;
            for (id, row) in &state.users {
                if row.user_name.to_lowercase() == *needle || id.0 == *needle {
                    ids.insert(id.clone());
                    users.insert(id.clone());
                    found = true;
                }
            }
            for (id, row) in &state.groups {
                if row.display_name.to_lowercase() == *needle || id.0 == *needle {
                    ids.insert(id.clone());
                    found = true;
                }
            }
            if !found {
                unmatched.push(needle.as_str());
            }
        }
        (ids, users, unmatched)
    }

    /// Keeps the chosen entries' changes: their own, and their memberships (a chosen group's
    /// all, a chosen user's in every group). Problems of other entries are left out.
    pub fn narrow(&self, plan: &mut Plan, state: &TargetState) {
        let (ids, users, unmatched) = self.on_target(state);
        plan.changes = std::mem::take(&mut plan.changes)
            .into_iter()
            .filter_map(|c| keep(c, &ids, &users))
            .collect();
        plan.problems
            .retain(|p| ids.contains(&DirectoryId(p.external_id.clone())));
        for needle in unmatched {
            plan.problems.push(Problem {
                external_id: String::new(),
                name: needle.to_string(),
                reason: "--only names no entry of the directory read (DN, uid, mail, cn, userPrincipalName, sAMAccountName or id) and no account ldap2scim manages on this target; nothing is done for it".into(),
                fails: true,
            });
        }
    }

    /// After the limits: held changes, and the orphans an approval released into the
    /// changes, of the chosen entries only.
    pub fn narrow_held(&self, plan: &mut Plan, state: &TargetState) {
        let (ids, users, _) = self.on_target(state);
        plan.changes = std::mem::take(&mut plan.changes)
            .into_iter()
            .filter_map(|c| keep(c, &ids, &users))
            .collect();
        plan.held = std::mem::take(&mut plan.held)
            .into_iter()
            .filter_map(|c| keep(c, &ids, &users))
            .collect();
        if plan.held.is_empty() {
            plan.held_reason = None;
        }
    }
}

fn keep(
    change: Change,
    ids: &BTreeSet<DirectoryId>,
    users: &BTreeSet<DirectoryId>,
) -> Option<Change> {
    match change {
        Change::AddMembers {
            group,
            group_name,
            members,
        } => {
            let members = chosen_members(&group, ids, users, members)?;
            Some(Change::AddMembers {
                group,
                group_name,
                members,
            })
        }
        Change::RemoveMembers {
            group,
            group_name,
            members,
        } => {
            let members = chosen_members(&group, ids, users, members)?;
            Some(Change::RemoveMembers {
                group,
                group_name,
                members,
            })
        }
        other => {
            let chosen =
                ids.contains(other.id()) || other.from_id().is_some_and(|f| ids.contains(f));
            chosen.then_some(other)
        }
    }
}

fn chosen_members(
    group: &DirectoryId,
    ids: &BTreeSet<DirectoryId>,
    users: &BTreeSet<DirectoryId>,
    members: Vec<DirectoryId>,
) -> Option<Vec<DirectoryId>> {
    let members: Vec<DirectoryId> = if ids.contains(group) {
        members
    } else {
        members.into_iter().filter(|m| users.contains(m)).collect()
    };
    (!members.is_empty()).then_some(members)
}
