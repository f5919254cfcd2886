//! What an apply reports: per change, how it went (for the audit trail), and per failure its
//! class (for metrics) and reason. Plain data; nothing here talks to a target.

use std::collections::BTreeSet;

use crate::model::DirectoryId;
use crate::plan::{Action, ResourceKind};
use crate::scim::TargetError;
use crate::snapshot::SnapshotError;

/// A coarse class of failure, for metrics labels and reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum FailureClass {
    #[serde(rename = "http_4xx")]
    Http4xx,
    #[serde(rename = "http_5xx")]
    Http5xx,
    #[serde(rename = "transport")]
    Transport,
    #[serde(rename = "malformed")]
    Malformed,
    #[serde(rename = "client")]
    Client,
    #[serde(rename = "snapshot")]
    Snapshot,
    #[serde(rename = "skipped")]
    Skipped,
    /// The credential was refused (a 401, or the token endpoint's client error).
    #[serde(rename = "auth")]
    Auth,
}

impl FailureClass {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureClass::Http4xx => "http_4xx",
            FailureClass::Http5xx => "http_5xx",
            FailureClass::Transport => "transport",
            FailureClass::Malformed => "malformed",
            FailureClass::Client => "client",
            FailureClass::Snapshot => "snapshot",
            FailureClass::Skipped => "skipped",
            FailureClass::Auth => "auth",
        }
    }
}

impl std::fmt::Display for FailureClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for FailureClass {
    fn eq(&self, word: &&str) -> bool {
        self.as_str() == *word
    }
}

/// A change that did not go through, with the reason.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Failure {
    pub class: FailureClass,
    pub action: Action,
    pub resource: ResourceKind,
    pub external_id: String,
    pub name: String,
    pub error: String,
}

/// One change as it went, for the audit log.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Applied {
    pub action: Action,
    pub resource: ResourceKind,
    pub external_id: String,
    pub name: String,
    /// For a rebind: the directory id that held the account before.
    pub from_external_id: Option<String>,
    /// The SCIM id the change touched (after it was known).
    pub scim_id: Option<String>,
    /// Attribute paths changed, or member ids added/removed (shared between records with the
    /// same paths: 100,000 creates have one list).
    pub attributes: std::sync::Arc<[String]>,
    /// `"ok"` or the error.
    pub outcome: std::borrow::Cow<'static, str>,
}

impl Applied {
    /// The target acknowledged the whole change.
    pub fn ok(&self) -> bool {
        self.outcome == "ok"
    }
}

#[derive(Debug, Default)]
pub struct ApplyReport {
    pub applied: usize,
    pub failures: Vec<Failure>,
    /// Every change attempted, in the order they finished.
    pub records: Vec<Applied>,
    /// Write requests sent, retries included.
    pub writes: usize,
    pub retries: usize,
    pub throttled: usize,
    /// Changes not started because a stop was requested.
    pub not_started: usize,
    /// Attribute paths the target's answers left out although we sent them (it does not
    /// keep them), and paths they had.
    pub dropped: BTreeSet<String>,
    pub kept: BTreeSet<String>,
    /// Approved orphans found to be orphans no more when they were read again before the
    /// deprovision (never deprovisioned; each one is also a `skipped` failure).
    pub stale_orphans: Vec<DirectoryId>,
    /// Updates that found the account deleted on the target by hand and made it again (its
    /// memberships are for the next plan to restore).
    pub recreated: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("{0}")]
    Skipped(String),
    /// An approved orphan that is no longer one when looked at again (its externalId changed,
    /// it became protected, it is inactive already): not deprovisioned, dropped from the
    /// orphans.
    #[error("{0}")]
    Stale(String),
}

impl ApplyError {
    pub fn class(&self) -> FailureClass {
        match self {
            ApplyError::Target(e) if e.refuses_credential() => FailureClass::Auth,
            ApplyError::Target(TargetError::Rejected { status, .. }) if *status < 500 => {
                FailureClass::Http4xx
            }
            ApplyError::Target(TargetError::Rejected { .. }) => FailureClass::Http5xx,
            ApplyError::Target(TargetError::Unavailable { .. }) => FailureClass::Transport,
            ApplyError::Target(TargetError::Malformed { .. }) => FailureClass::Malformed,
            ApplyError::Target(TargetError::Client { .. }) => FailureClass::Client,
            ApplyError::Snapshot(_) => FailureClass::Snapshot,
            ApplyError::Skipped(_) | ApplyError::Stale(_) => FailureClass::Skipped,
        }
    }
}
