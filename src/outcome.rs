//! What one pass did: per target, its status, plan, apply report and timings. Produced by
//! `reconcile`, consumed by the report, the audit trail, the metrics and `status`.

use std::collections::BTreeMap;

use crate::apply::ApplyReport;
use crate::map::MapError;
use crate::model::DirectoryId;
use crate::plan::Plan;
use crate::scim::TargetError;
use crate::snapshot::SnapshotError;

/// Why a target could not be planned at all, with its cause.
#[derive(Debug, thiserror::Error)]
pub enum TargetFailure {
    /// Boxed: a SCIM error is large, and this travels in every target's result.
    #[error(transparent)]
    Scim(Box<TargetError>),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Map(#[from] MapError),
    #[error("{0}")]
    Other(String),
}

impl From<TargetError> for TargetFailure {
    fn from(e: TargetError) -> Self {
        TargetFailure::Scim(Box::new(e))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TargetStatus {
    Ok,
    Held,
    Error,
}

impl TargetStatus {
    /// The word for this status in reports, logs, metrics labels and the snapshot's record.
    pub fn as_str(self) -> &'static str {
        match self {
            TargetStatus::Ok => "ok",
            TargetStatus::Held => "held",
            TargetStatus::Error => "error",
        }
    }
}

/// What happened to one target in one pass.
#[derive(Debug)]
pub struct TargetOutcome {
    pub name: String,
    pub status: TargetStatus,
    /// The target could not be planned at all (unreachable, scope group missing, …).
    pub error: Option<TargetFailure>,
    pub plan: Plan,
    /// `None` in a dry run.
    pub applied: Option<ApplyReport>,
    /// userNames of the users that member changes name, for reports.
    pub names: BTreeMap<DirectoryId, String>,
    /// How long this target took (plan and apply).
    pub elapsed: std::time::Duration,
    /// The target's snapshot rows were found lost (or missing while the target holds
    /// accounts with directory-style externalIds) and are being rebuilt: the warning.
    pub rebuild: Option<String>,
}

#[derive(Debug)]
pub struct Outcome {
    pub run_id: String,
    /// How long the directory read took.
    pub read_duration: std::time::Duration,
    pub source_users: usize,
    pub source_groups: usize,
    pub targets: Vec<TargetOutcome>,
    /// How the directory was read: in full, or from the change feed.
    pub read: ReadWay,
    /// `[ha]`: the lease's epoch every write of this pass was made under.
    pub epoch: Option<i64>,
}

/// How a pass read the directory.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReadWay {
    /// `full` (the whole directory, without a feed or to rebuild its mirror), `delta` (the
    /// changes the feed named, applied to the mirror) or `quiet` (the feed named no change and
    /// every target had applied everything: nothing was planned).
    pub mode: &'static str,
    /// With a feed: `syncrepl`.
    pub feed: Option<&'static str>,
    /// Why a full read, where the feed could have been used.
    pub why_full: Option<String>,
    /// A delta was tried and the feed could not go on: why, as a metrics label
    /// (`refresh-required`, `disagreement`).
    pub fallback: Option<&'static str>,
    /// Entries the delta changed in the mirror.
    pub changes: usize,
    /// The feed's cookies after this read (the daemon's live watch starts from them).
    pub cookies: Option<crate::mirror::Cookies>,
}

/// Test fixture: a pass over 2 users and no groups whose one target `app` is held with
/// one orphan waiting and its snapshot being rebuilt (`rebuild` the warning).
#[cfg(test)]
pub(crate) fn held_orphan_outcome(rebuild: &str) -> Outcome {
    use crate::model::ScimId;
    use crate::plan::Change;
    let plan = Plan {
        held: vec![Change::Orphan {
            id: DirectoryId::new("107f0144-823a-1041-89a3-21734381405b"),
            scim_id: ScimId("s1".into()),
            user_name: "left".into(),
            delete: false,
        }],
        ..Plan::default()
    };
    Outcome {
        epoch: None,
        run_id: "r1".into(),
        read_duration: std::time::Duration::ZERO,
        source_users: 2,
        source_groups: 0,
        targets: vec![TargetOutcome {
            name: "app".into(),
            status: TargetStatus::Held,
            error: None,
            plan,
            applied: None,
            names: Default::default(),
            elapsed: std::time::Duration::ZERO,
            rebuild: Some(rebuild.into()),
        }],
        read: Default::default(),
    }
}
