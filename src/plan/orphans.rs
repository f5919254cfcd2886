//! Orphans, decided: accounts on a target with a directory-style `externalId` that no
//! directory entry of this target provisions, no row holds and no entry adopts now. They are
//! found when a target's snapshot rows were lost (or never written) and its accounts are
//! listed; they are kept until they are deprovisioned through `approve`, come back into the
//! directory, or vanish from the target. Pure: the listing and the stored orphans come in.

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, Utc};

use super::{is_protected, Change, Existing};
use crate::config::{Deprovision, Dialect, TargetConfig};
use crate::map::Desired;
use crate::model::{is_directory_style, DirectoryId, ScimId};
use crate::scim::observe::RemoteUser;
use crate::snapshot::{Orphan, Orphans, TargetState};

/// What an orphan scan looks at besides the orphans themselves.
pub struct Scan<'a> {
    pub target: &'a TargetConfig,
    pub dialect: Dialect,
    pub desired: &'a Desired,
    pub state: &'a TargetState,
    /// Accounts entries adopt in this plan.
    pub adopting: &'a BTreeMap<DirectoryId, Existing>,
}

impl Scan<'_> {
    /// Whether a directory entry of this target provisions `id` (an entry that is there
    /// but disabled is no orphan where disabled entries are provisioned).
    fn provisioned(&self, id: &DirectoryId) -> bool {
        self.desired
            .users
            .get(id)
            .is_some_and(|u| u.active || self.target.provision_disabled)
    }

    /// Adds the orphans among `listed` to `orphans` (found `now`), and says how many listed
    /// accounts carry a directory-style `externalId` at all (ours, orphan or not).
    pub fn collect(
        &self,
        listed: &[RemoteUser],
        now: DateTime<Utc>,
        orphans: &mut Orphans,
    ) -> usize {
        let delete = self.target.deprovision == Deprovision::Delete;
        let adopted: HashSet<&ScimId> = self.adopting.values().map(|e| &e.scim_id).collect();
        // Indexed once: a partly lost snapshot of 100,000 rows must not be scanned per account.
        let held: HashSet<&ScimId> = self.state.users.values().map(|r| &r.scim_id).collect();
        let unmapped: HashSet<&DirectoryId> =
            self.desired.problems.iter().map(|(id, _, _)| id).collect();
        let mut ours = 0usize;
        for r in listed {
            let Some(ext) = r.external_id.as_deref() else {
                continue;
            };
            if !is_directory_style(self.dialect, ext) {
                continue;
            }
            ours += 1;
            // An inactive account is already offboarded: an orphan only where the policy
            // wants leavers deleted.
            if !r.active && !delete {
                continue;
            }
            let id = DirectoryId::new(ext);
            let (Some(scim_id), Some(user_name)) = (r.scim_id.clone(), r.user_name.as_deref())
            else {
                continue;
            };
            if self.provisioned(&id)
                || unmapped.contains(&id)
                || self.state.users.contains_key(&id)
                || held.contains(&scim_id)
                || adopted.contains(&scim_id)
                || is_protected(self.target, user_name)
            {
                continue;
            }
            orphans.entry(id).or_insert(Orphan {
                scim_id,
                // Read from the target: it reaches reports and the audit log.
                user_name: r.name.clone(),
                found: now,
            });
        }
        ours
    }

    /// Drops what is an orphan no more: a returner (adopted by its externalId), an account a
    /// row or an adoption holds, one a `protect` pattern covers now. Returns the orphans
    /// dropped for a protect pattern (to be said).
    pub fn prune(&self, orphans: &mut Orphans) -> Vec<(DirectoryId, String)> {
        let adopted: HashSet<&ScimId> = self.adopting.values().map(|e| &e.scim_id).collect();
        let held: HashSet<&ScimId> = if orphans.is_empty() {
            HashSet::new()
        } else {
            self.state.users.values().map(|r| &r.scim_id).collect()
        };
        let mut protected = Vec::new();
        orphans.retain(|id, o| {
            // A `protect` pattern added since the orphan was found covers it from then on.
            if is_protected(self.target, &o.user_name) {
                protected.push((id.clone(), o.user_name.clone()));
                return false;
            }
            !self.provisioned(id)
                && !self.state.users.contains_key(id)
                && !held.contains(&o.scim_id)
                && !adopted.contains(&o.scim_id)
        });
        protected
    }

    /// The orphans as changes for the guard to hold. A disabled entry's account is
    /// deactivated, never deleted.
    pub fn changes(&self, orphans: Orphans) -> Vec<Change> {
        let delete = self.target.deprovision == Deprovision::Delete;
        orphans
            .into_iter()
            .map(|(id, o)| Change::Orphan {
                delete: delete && !self.desired.users.contains_key(&id),
                id,
                scim_id: o.scim_id,
                user_name: o.user_name,
            })
            .collect()
    }
}

/// The warning for a target whose rows are being rebuilt from its listing: they were lost
/// (`lost` says how), or there are none while the target holds `ours` accounts with
/// directory-style externalIds.
pub fn rebuild_warning(
    state_dir: &std::path::Path,
    target: &str,
    lost: Option<&str>,
    ours: usize,
) -> Option<String> {
    let state_dir = state_dir.display();
    match (lost, ours) {
        (Some(why), _) => Some(format!(
            "the snapshot in {state_dir} (daemon.state_dir) lost rows of target {target}: {why}; rebuilding from the target"
        )),
        (None, 0) => None,
        (None, n) => Some(format!(
            "the snapshot in {state_dir} (daemon.state_dir) has no rows for target {target}, but the target holds {n} account(s) with directory-style externalIds: the snapshot was lost (or never written for this target); rebuilding from the target"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::map::DesiredUser;

    const GONE: &str = "107f0144-823a-1041-89a3-21734381405b";
    const HERE: &str = "207f0144-823a-1041-89a3-21734381405b";

    fn remote(ext: &str, name: &str, active: bool) -> RemoteUser {
        RemoteUser {
            scim_id: Some(ScimId(format!("s-{name}"))),
            user_name: Some(name.into()),
            name: name.into(),
            external_id: Some(ext.into()),
            active,
            attrs: Default::default(),
        }
    }

    /// A scan of an OpenLDAP directory's entries for `target`.
    fn scan<'a>(
        target: &'a TargetConfig,
        desired: &'a Desired,
        state: &'a TargetState,
        adopting: &'a BTreeMap<DirectoryId, Existing>,
    ) -> Scan<'a> {
        Scan {
            target,
            dialect: Dialect::OpenLdap,
            desired,
            state,
            adopting,
        }
    }

    fn desired_with(id: &str) -> Desired {
        let mut d = Desired::default();
        let u = DesiredUser {
            id: DirectoryId::new(id),
            dn: String::new(),
            user_name: "here".into(),
            active: true,
            hash: String::new(),
            attrs: crate::map::no_attrs(),
        };
        d.users.insert(u.id.clone(), u);
        d
    }

    #[test]
    fn only_unprovisioned_directory_style_accounts_are_orphans() {
        let mut target = crate::plan::tests::target();
        target.protect = vec!["admin*".into()];
        let desired = desired_with(HERE);
        let state = TargetState::default();
        let adopting = BTreeMap::new();
        let scan = scan(&target, &desired, &state, &adopting);
        let listed = vec![
            remote(GONE, "gone", true),
            remote(HERE, "here", true),
            remote("HR-4711", "by-hand", true),
            remote(&GONE.replace('1', "2"), "admin-x", true),
            remote(&GONE.replace('1', "3"), "inactive", false),
            // Without a userName it cannot be shown, matched or protected: not listed.
            RemoteUser {
                user_name: None,
                ..remote(&GONE.replace('1', "4"), "", true)
            },
        ];
        let mut orphans = Orphans::new();
        let ours = scan.collect(&listed, Utc::now(), &mut orphans);
        assert_eq!(ours, 5, "every directory-style externalId counts as ours");
        let names: Vec<&str> = orphans.values().map(|o| o.user_name.as_str()).collect();
        assert_eq!(names, ["gone"], "{orphans:?}");
        let changes = scan.changes(orphans);
        assert!(matches!(
            &changes[..],
            [Change::Orphan { delete: false, .. }]
        ));
    }

    #[test]
    fn a_protect_pattern_added_later_drops_an_orphan() {
        let mut target = crate::plan::tests::target();
        let desired = Desired::default();
        let state = TargetState::default();
        let adopting = BTreeMap::new();
        let mut orphans = Orphans::new();
        orphans.insert(
            DirectoryId::new(GONE),
            Orphan {
                scim_id: ScimId("s1".into()),
                user_name: "admin-old".into(),
                found: Utc::now(),
            },
        );
        target.protect = vec!["admin*".into()];
        let scan = scan(&target, &desired, &state, &adopting);
        let dropped = scan.prune(&mut orphans);
        assert!(orphans.is_empty());
        assert_eq!(dropped.len(), 1);
    }
}
