//! Observe and decide what a target already holds: the accounts new directory entries take
//! over (looked up through `scim::observe`, judged by `plan::adopt`), and the orphans of a
//! target whose rows were lost (listed, judged by `plan::orphans`, kept in the snapshot).

use std::collections::BTreeMap;

use tracing::{info, warn};

use super::Pass;
use crate::config::{MatchRule, TargetConfig};
use crate::map::Desired;
use crate::model::DirectoryId;
use crate::outcome::TargetFailure;
use crate::plan::orphans::{self, Scan};
use crate::plan::{self, adopt, Existing};
use crate::scim::observe::{self, Candidate};
use crate::scim::{profile, Capabilities, ScimClient, TargetError};
use crate::snapshot::{Rebuild, Snapshot, TargetState};

pub(super) type Found = (
    BTreeMap<DirectoryId, Existing>,
    BTreeMap<DirectoryId, Existing>,
    Vec<plan::Problem>,
);

/// Looks on the target (read-only) for the resources that directory entries without a
/// snapshot row should take over, and decides what was found (`plan::adopt`). Adopted
/// groups' members are read where the profile lists them.
pub(super) async fn find_existing(
    client: &ScimClient,
    caps: Capabilities,
    target: &TargetConfig,
    pass: &Pass<'_>,
    desired: &Desired,
    state: &TargetState,
) -> Result<Found, TargetError> {
    let dialect = pass.config.ldap.dialect;
    let users = adopt::user_candidates(target, desired, state);
    let keys: Vec<Candidate<'_>> = users
        .iter()
        .map(|u| (&u.id, u.user_name.as_str()))
        .collect();
    let by_name = target.match_existing.contains(&MatchRule::UserName);
    let found = observe::find_users(client, caps, &keys, by_name).await?;
    let (adopted_users, mut problems) =
        adopt::match_users(target, dialect, desired, state, &users, found);

    let groups = adopt::group_candidates(target, desired, state);
    let keys: Vec<Candidate<'_>> = groups
        .iter()
        .map(|g| (&g.id, g.display_name.as_str()))
        .collect();
    let by_name = target.match_existing.contains(&MatchRule::DisplayName);
    let found = observe::find_groups(client, caps, &keys, by_name).await?;
    let (mut adopted_groups, more) = adopt::match_groups(target, dialect, state, &groups, found);
    problems.extend(more);
    if profile::reads_members(target.profile) && !adopted_groups.is_empty() {
        // Users found above may be group members too: members resolve against rows and
        // adoptions alike (indexed once, not per group).
        let mut known = state.user_index();
        known.extend(
            adopted_users
                .iter()
                .map(|(id, e)| (e.scim_id.0.as_str(), id)),
        );
        for e in adopted_groups.values_mut() {
            e.members = observe::group_members(client, &e.scim_id, &known).await?;
        }
    }
    Ok((adopted_users, adopted_groups, problems))
}

/// The rebuild warning for a target (if its rows are lost, or missing while it holds
/// accounts with directory-style externalIds) and its orphans as changes for the guard.
///
/// A target without rows, or whose rows were lost, is listed once, and its orphans are kept
/// in the snapshot (a sync only) so later cycles, which have rows again, still show them.
pub(super) async fn find_orphans(
    pass: &Pass<'_>,
    target: &TargetConfig,
    client: &ScimClient,
    snapshot: Option<&Snapshot>,
    desired: &Desired,
    state: &TargetState,
    adopting: &BTreeMap<DirectoryId, Existing>,
) -> Result<(Option<String>, Vec<plan::Change>), TargetFailure> {
    let name = &target.name.0;
    // Rows narrowed for a fast delta are counted as they are in all.
    let (users, groups) = state
        .narrowed_from
        .map_or((state.users.len(), state.groups.len()), |n| {
            (n.users, n.groups)
        });
    let lost = snapshot.and_then(|s| s.lost_rows(name, users, groups));
    let mut orphans = match snapshot {
        Some(s) => s.orphans(name)?,
        None => Default::default(),
    };
    let stored = orphans.clone();
    let scan = Scan {
        target,
        dialect: pass.config.ldap.dialect,
        desired,
        state,
        adopting,
    };
    // A target without rows is listed until a cycle has recorded its row counts (a new or
    // lost snapshot); one whose rows are known to be none (everyone deprovisioned, nobody in
    // scope) is not listed again every cycle.
    let never_counted = snapshot.is_none_or(|s| matches!(s.row_counts(name), Ok(None)));
    let listing = lost.is_some() || (state.users.is_empty() && never_counted);
    let mut rebuild = None;
    if listing {
        let listed = observe::list_users(client).await?;
        let ours = scan.collect(&listed, pass.now, &mut orphans);
        let state_dir = &pass.config.daemon.state_dir;
        rebuild = orphans::rebuild_warning(state_dir, name, lost.as_deref(), ours);
    }
    for (id, user) in scan.prune(&mut orphans) {
        info!(target = %name, user = %user, external_id = %id, "an orphan's userName matches a protect pattern now; it is dropped from the orphans and never deprovisioned");
    }
    if let Some(msg) = &rebuild {
        warn!(target = %name, "{msg}");
    }
    if let (Some(s), false) = (snapshot, pass.dry_run) {
        if orphans != stored {
            s.set_orphans(name, &orphans)?;
        }
        // Listed and its orphans stored: a loss noticed earlier is this target's no more.
        if listing {
            let all = pass.config.targets.iter().map(|t| t.name.0.as_str());
            if let Err(e) = s.set_rebuilt(name, all) {
                warn!(target = %name, error = %e, "cannot record the snapshot rebuild");
            }
        }
        if let Some(msg) = &rebuild {
            let record = Rebuild {
                at: pass.now,
                reason: msg.clone(),
            };
            if let Err(e) = s.set_last_rebuild(name, &record) {
                warn!(target = %name, error = %e, "cannot record the snapshot rebuild");
            }
        }
    }
    Ok((rebuild, scan.changes(orphans)))
}
