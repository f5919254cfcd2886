//! Group membership: resolves `member` DNs to users, and (when nested) to the users of member
//! groups, transitively. Cycles are harmless: each group's closure is a visited-set walk.

use std::collections::HashMap;

use tracing::debug;

use crate::model::dn;
use crate::model::{Attributes, DirectoryGroup, DirectoryId, DirectoryUser};

/// The groups and how they nest, worked out from the groups alone (while the users are still
/// being read): member DNs normalized once, member groups found, and for each group the
/// groups whose users count as its members.
pub(super) struct GroupGraph {
    raw: Vec<(DirectoryId, String, Attributes)>,
    /// Per group: member DNs that are not groups (users, or nothing known).
    other_members: Vec<Vec<String>>,
    /// Per group: itself and, when nested, every group reachable through `member` (cycles
    /// included once).
    closure: Vec<Vec<usize>>,
}

impl GroupGraph {
    pub(super) fn new(raw: Vec<(DirectoryId, String, Attributes)>, nested: bool) -> Self {
        let group_by_dn: HashMap<String, usize> = raw
            .iter()
            .enumerate()
            .map(|(i, (_, d, _))| (dn::normalize_lossy(d), i))
            .collect();
        let mut other_members = Vec::with_capacity(raw.len());
        let mut child_groups: Vec<Vec<usize>> = Vec::with_capacity(raw.len());
        for (_, _, attrs) in &raw {
            let mut others = Vec::new();
            let mut gs = Vec::new();
            for member in attrs.get("member").into_iter().flatten() {
                let norm = dn::normalize_lossy(member);
                match group_by_dn.get(&norm) {
                    Some(&gi) => gs.push(gi),
                    None => others.push(norm),
                }
            }
            other_members.push(others);
            child_groups.push(gs);
        }
        // visited[g] == i marks group g as seen in the walk from group i: one allocation for
        // all walks instead of one per group.
        let mut visited = vec![usize::MAX; raw.len()];
        let mut closure = Vec::with_capacity(raw.len());
        for i in 0..raw.len() {
            let mut reach = vec![i];
            if nested {
                visited[i] = i;
                let mut stack: Vec<usize> = child_groups[i].clone();
                while let Some(g) = stack.pop() {
                    if std::mem::replace(&mut visited[g], i) == i {
                        continue;
                    }
                    reach.push(g);
                    stack.extend(child_groups[g].iter().copied());
                }
            }
            closure.push(reach);
        }
        GroupGraph {
            raw,
            other_members,
            closure,
        }
    }

    /// Every group read, as (id, DN), in read order.
    pub(super) fn entries(&self) -> impl Iterator<Item = (&DirectoryId, &str)> {
        self.raw.iter().map(|(id, dn, _)| (id, dn.as_str()))
    }

    /// The groups with their members resolved to users. `user_dns[i]` is the normalized DN
    /// of `users[i]`.
    pub(super) fn resolve(
        self,
        users: &[DirectoryUser],
        user_dns: &[String],
    ) -> Vec<DirectoryGroup> {
        let user_by_dn: HashMap<&str, &DirectoryId> = user_dns
            .iter()
            .map(String::as_str)
            .zip(users.iter().map(|u| &u.id))
            .collect();
        let direct: Vec<Vec<&DirectoryId>> = self
            .raw
            .iter()
            .zip(&self.other_members)
            .map(|((_, gdn, _), others)| {
                others
                    .iter()
                    .filter_map(|m| {
                        let found = user_by_dn.get(m.as_str()).copied();
                        if found.is_none() {
                            debug!(group = %gdn, member = %m, "member is neither a user nor a group in scope; ignored");
                        }
                        found
                    })
                    .collect()
            })
            .collect();
        self.raw
            .into_iter()
            .zip(&self.closure)
            .map(|((id, gdn, attrs), reach)| {
                let mut ids: Vec<&DirectoryId> = reach
                    .iter()
                    .flat_map(|&g| direct[g].iter().copied())
                    .collect();
                ids.sort_unstable();
                ids.dedup();
                DirectoryGroup {
                    id,
                    dn: gdn,
                    attrs,
                    // Sorted and unique: built in one pass.
                    members: ids.into_iter().cloned().collect(),
                }
            })
            .collect()
    }
}

/// `user_dns[i]` is the normalized DN of `users[i]` (normalized once, by the caller).
#[cfg(test)]
fn resolve_members(
    users: &[DirectoryUser],
    user_dns: &[String],
    raw_groups: Vec<(DirectoryId, String, Attributes)>,
    nested: bool,
) -> Vec<DirectoryGroup> {
    GroupGraph::new(raw_groups, nested).resolve(users, user_dns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn user(id: &str) -> DirectoryUser {
        DirectoryUser {
            id: DirectoryId::new(id),
            dn: format!("uid={id},ou=people,dc=x"),
            attrs: Attributes::new(),
            disabled: false,
            invalid_utf8: Vec::new(),
        }
    }

    fn group(id: &str, members: &[&str]) -> (DirectoryId, String, Attributes) {
        let mut attrs = Attributes::new();
        attrs.insert(
            "member".into(),
            members.iter().map(|m| m.to_string()).collect(),
        );
        (
            DirectoryId::new(id),
            format!("cn={id},ou=groups,dc=x"),
            attrs,
        )
    }

    #[test]
    fn nested_groups_with_a_cycle_resolve_to_all_users() {
        let users = vec![user("a"), user("b"), user("c")];
        let groups = vec![
            group("g1", &["UID=a, ou=People,dc=x", "cn=g2,ou=groups,dc=x"]),
            group("g2", &["uid=b,ou=people,dc=x", "cn=g3,ou=groups,dc=x"]),
            group(
                "g3",
                &[
                    "uid=c,ou=people,dc=x",
                    "cn=g1,ou=groups,dc=x",
                    "uid=gone,ou=people,dc=x",
                ],
            ),
        ];
        let dns: Vec<String> = users.iter().map(|u| dn::normalize_lossy(&u.dn)).collect();
        let out = resolve_members(&users, &dns, groups.clone(), true);
        for g in &out {
            assert_eq!(g.members.len(), 3, "{}", g.id);
        }
        let flat = resolve_members(&users, &dns, groups, false);
        assert_eq!(flat[0].members, BTreeSet::from([DirectoryId::new("a")]));
    }
}
