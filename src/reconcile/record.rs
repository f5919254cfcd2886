//! What a cycle leaves in the snapshot beside the rows. A failure to record is logged, never
//! the cycle's: the changes already happened and the rows say so.

use std::collections::BTreeSet;

use tracing::{info, warn};

use super::Pass;
use crate::apply::ApplyReport;
use crate::model::DirectoryId;
use crate::outcome::TargetStatus;
use crate::plan::{guard, Action, Plan};
use crate::snapshot::{HeldChange, LastRun, RowCounts, Snapshot, SnapshotError};

pub(super) fn record_row_counts(snapshot: &Snapshot, target: &str, counts: RowCounts) {
    if let Err(e) = snapshot.set_row_counts(target, counts) {
        warn!(target = %target, error = %e, "cannot record the snapshot's row counts");
    }
}

/// What a cycle leaves in the snapshot beside the rows: orphans deprovisioned, the held set
/// (and what it is, for `approve`), attributes the target does not keep, the approval used
/// up, and the run's record for `status`. A failure to record is logged, never the cycle's.
#[allow(clippy::too_many_arguments)]
pub(super) fn record_cycle(
    s: &Snapshot,
    pass: &Pass<'_>,
    name: &str,
    plan: &Plan,
    report: &ApplyReport,
    not_kept: &BTreeSet<String>,
    approved: bool,
    status: TargetStatus,
) {
    let warn_on = |what: &str, r: Result<(), SnapshotError>| {
        if let Err(e) = r {
            warn!(target = %name, error = %e, "cannot record {what}");
        }
    };
    // Orphans the target acknowledged deprovisioning, or found orphans no more.
    let done: Vec<DirectoryId> = report
        .records
        .iter()
        .filter(|r| r.action == Action::Orphan && r.ok())
        .map(|r| DirectoryId(r.external_id.clone()))
        .chain(report.stale_orphans.iter().cloned())
        .collect();
    warn_on("the deprovisioned orphans", s.forget_orphans(name, &done));
    // A partial pass (`--only`) saw some entries only: the held set stays the last cycle's.
    if !pass.partial() {
        warn_on("held changes", s.set_held(name, &guard::held_keys(plan)));
    }
    let shown: Vec<HeldChange> = plan
        .held
        .iter()
        .map(|c| HeldChange {
            action: c.action().to_string(),
            resource: c.resource().to_string(),
            name: c.name().to_string(),
            external_id: c.id().0.clone(),
            from_external_id: c.from_id().map(|f| f.0.clone()),
        })
        .collect();
    if !pass.partial() {
        warn_on(
            "what the held changes are",
            s.set_held_changes(name, &shown),
        );
    }
    if !report.dropped.is_empty() || !report.kept.is_empty() {
        let mut next = not_kept.clone();
        next.extend(report.dropped.iter().cloned());
        next.retain(|p| !report.kept.contains(p));
        if next != *not_kept {
            info!(target = %name, not_kept = ?next, "the target does not keep some attributes we send; they are not planned again while it lacks them");
            warn_on(
                "the attributes the target does not keep",
                s.set_not_kept(name, &next),
            );
        }
    }
    // An approval releases one held set, in the sync right after it: never later
    // deprovisions that happen to have the same action and id.
    if approved && !pass.partial() {
        let _ = s.clear_approved(name);
    }
    let run = LastRun {
        at: pass.now,
        status: status.as_str().into(),
        error: None,
        applied: report.applied,
        failed: report.failures.len(),
        held: plan.held.len(),
        writes: report.writes,
    };
    warn_on("the run status", s.set_last_run(name, &run));
}
