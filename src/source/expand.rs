//! Group membership: resolves `member` DNs to users, and (when nested) to the users of member
//! groups, transitively. Cycles are harmless: each group's closure is a visited-set walk.

use std::collections::{BTreeSet, HashMap};

use tracing::debug;

use super::dn;
use crate::model::{Attributes, DirectoryGroup, DirectoryId, DirectoryUser};

/// `user_dns[i]` is the normalized DN of `users[i]` (normalized once, by the caller).
pub(super) fn resolve_members(
    users: &[DirectoryUser],
    user_dns: &[String],
    raw_groups: Vec<(DirectoryId, String, Attributes)>,
    nested: bool,
) -> Vec<DirectoryGroup> {
    let user_by_dn: HashMap<&str, &DirectoryId> = user_dns
        .iter()
        .map(String::as_str)
        .zip(users.iter().map(|u| &u.id))
        .collect();
    let group_by_dn: HashMap<String, usize> = raw_groups
        .iter()
        .enumerate()
        .map(|(i, (_, d, _))| (dn::normalize_lossy(d), i))
        .collect();

    // Direct user members and direct member groups of each group.
    let mut direct_users: Vec<BTreeSet<DirectoryId>> = Vec::with_capacity(raw_groups.len());
    let mut child_groups: Vec<Vec<usize>> = Vec::with_capacity(raw_groups.len());
    for (_, gdn, attrs) in &raw_groups {
        let mut us = BTreeSet::new();
        let mut gs = Vec::new();
        for member in attrs.get("member").into_iter().flatten() {
            let norm = dn::normalize_lossy(member);
            if let Some(id) = user_by_dn.get(norm.as_str()) {
                us.insert((*id).clone());
            } else if let Some(&gi) = group_by_dn.get(&norm) {
                gs.push(gi);
            } else {
                debug!(group = %gdn, member = %member, "member is neither a user nor a group in scope; ignored");
            }
        }
        direct_users.push(us);
        child_groups.push(gs);
    }

    let mut out = Vec::with_capacity(raw_groups.len());
    // visited[g] == i marks group g as seen in the walk from group i: one allocation for all
    // walks instead of one per group.
    let mut visited = vec![usize::MAX; child_groups.len()];
    for (i, (id, gdn, attrs)) in raw_groups.into_iter().enumerate() {
        let mut members = direct_users[i].clone();
        if nested {
            visited[i] = i;
            let mut stack: Vec<usize> = child_groups[i].clone();
            while let Some(g) = stack.pop() {
                if std::mem::replace(&mut visited[g], i) == i {
                    continue;
                }
                members.extend(direct_users[g].iter().cloned());
                stack.extend(child_groups[g].iter().copied());
            }
        }
        out.push(DirectoryGroup {
            id,
            dn: gdn,
            attrs,
            members,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(id: &str) -> DirectoryUser {
        DirectoryUser {
            id: DirectoryId::new(id),
            dn: format!("uid={id},ou=people,dc=x"),
            attrs: Attributes::new(),
            disabled: false,
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
