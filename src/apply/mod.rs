//! Act on one target: runs a plan's changes against it, phase by phase, and advances its
//! snapshot rows for exactly what the target acknowledged. [`act`] sends one change and
//! returns the target's acknowledgement; [`advance::advance`] (pure) turns it into row
//! updates, which are written to sled at once and then applied to the in-memory rows. A
//! failed change is recorded and the rest go on, except what depends on it.

mod act;
pub mod advance;
pub mod outcome;

use std::sync::atomic::{AtomicBool, Ordering};

use chrono::{DateTime, Utc};
use futures::stream::{self, StreamExt};
use tracing::warn;

use self::act::Acted;
use self::advance::Update;
pub use self::outcome::{Applied, ApplyError, ApplyReport, Failure, FailureClass};
use crate::config::TargetConfig;
use crate::plan::Change;
use crate::scim::{Capabilities, ScimClient, TargetError};
use crate::snapshot::{ScimIndex, SnapshotError, TargetSnapshot, TargetState};

/// Something that wants to know how far an apply got (a progress bar).
pub type Progress<'a> = &'a (dyn Fn(&str, usize, usize) + Sync);

/// One change as it finished: the row updates it made durable, and how it went.
struct Finished<'c> {
    change: &'c Change,
    updates: Vec<Update>,
    acted: Acted,
}

/// Trips after a run of changes that could not reach the target at all, so a dead target
/// costs a few timeouts, not one per change.
#[derive(Default)]
struct Breaker {
    consecutive: std::sync::atomic::AtomicUsize,
}

impl Breaker {
    const LIMIT: usize = 3;

    fn record(&self, err: Option<&ApplyError>) {
        match err {
            Some(ApplyError::Target(TargetError::Unavailable { .. })) => {
                self.consecutive.fetch_add(1, Ordering::Relaxed);
            }
            _ => self.consecutive.store(0, Ordering::Relaxed),
        }
    }

    fn tripped(&self) -> Option<usize> {
        let n = self.consecutive.load(Ordering::Relaxed);
        (n >= Self::LIMIT).then_some(n)
    }
}

pub struct Applier<'a> {
    pub client: &'a ScimClient,
    pub target: &'a TargetConfig,
    pub snapshot: &'a TargetSnapshot,
    pub now: DateTime<Utc>,
    /// Set when the process must stop: changes not yet started are left for the next cycle
    /// (the request in flight finishes).
    pub stop: Option<&'a AtomicBool>,
    /// Like `stop`, at a given time.
    pub deadline: Option<std::time::Instant>,
    /// Called with (target, changes done, changes total) as changes finish.
    pub progress: Option<Progress<'a>>,
    /// What the target said it supports (`/ServiceProviderConfig`).
    pub caps: Capabilities,
    /// Users by DN, to send a manager as its SCIM id here.
    pub managers: Option<&'a crate::map::Managers>,
    /// `[ha]`: the lease (changes stop when it is not ours) and the ledger every
    /// acknowledged row update is recorded in.
    pub ha: Option<&'a crate::ha::Writer>,
}

impl Applier<'_> {
    pub async fn apply(&self, state: &mut TargetState, changes: &[Change]) -> ApplyReport {
        let mut report = ApplyReport::default();
        let counters = self.client.counters();
        let (writes0, retries0, throttled0) = (
            counters.writes.load(Ordering::Relaxed),
            counters.retries.load(Ordering::Relaxed),
            counters.throttled.load(Ordering::Relaxed),
        );
        let stopping = || self.should_stop();
        let total = changes.len();
        let done = std::sync::atomic::AtomicUsize::new(0);
        let breaker = &Breaker::default();
        let mut paths = SharedPaths::default();
        let changes = self.managers_first(changes);
        // Consecutive changes of the same kind form a phase; phases run in plan order, the
        // changes inside one run concurrently.
        let mut i = 0;
        while i < changes.len() {
            if stopping() {
                report.not_started += changes.len() - i;
                warn!(target = %self.target.name, left = report.not_started, "stop requested or the next cycle is due; the remaining changes wait for the next cycle");
                break;
            }
            let kind = std::mem::discriminant(changes[i]);
            let mut j = i;
            while j < changes.len() && std::mem::discriminant(changes[j]) == kind {
                j += 1;
            }
            let phase = &changes[i..j];
            // Creates run in waves, managers before the people who report to them, so that a
            // manager made in this apply is linked at once.
            for wave in self.waves(phase) {
                let results: Vec<Option<Finished<'_>>> = {
                    let st: &TargetState = state;
                    let done = &done;
                    // The rows by SCIM id, built at most once per wave (when a 409 needs them).
                    let ix = &std::sync::OnceLock::new();
                    stream::iter(wave.into_iter().map(|c| async move {
                        if stopping() {
                            return None;
                        }
                        // The ledger first gets what it is still owed (the database was away).
                        if let Some(ha) = self.ha {
                            if let Err(e) = ha.ha.settle().await {
                                warn!(target = %self.target.name, error = %e, "ha: the ledger is behind; this change waits for the next cycle");
                                return None;
                            }
                        }
                        let finished = self.run(Rows { state: st, ix }, c, breaker).await;
                        let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                        if let Some(p) = self.progress {
                            p(&self.target.name.0, n, total);
                        }
                        Some(finished)
                    }))
                    .buffer_unordered(self.target.concurrency.max(1))
                    .collect()
                    .await
                };
                report.not_started += results.iter().filter(|r| r.is_none()).count();
                let mut moved = Vec::new();
                for finished in results.into_iter().flatten() {
                    moved.extend(self.record(state, &mut report, &mut paths, finished));
                }
                // A rebind's groups, as written to the snapshot, go to the ledger too.
                if let (Some(w), false) = (self.ha, moved.is_empty()) {
                    if let Err(e) = w.ha.record(w.epoch, &self.target.name.0, &moved).await {
                        warn!(target = %self.target.name, error = %e, "ha: re-bound memberships are not in the ledger yet; they are sent before the next write");
                    }
                }
            }
            i = j;
        }
        report.writes = counters.writes.load(Ordering::Relaxed) - writes0;
        report.retries = counters.retries.load(Ordering::Relaxed) - retries0;
        report.throttled = counters.throttled.load(Ordering::Relaxed) - throttled0;
        report
    }

    /// The plan's changes in apply order: as planned, except that a user change other than
    /// a create whose manager this apply creates waits until after the last create (so it
    /// can name the manager's new id).
    fn managers_first<'c>(&self, changes: &'c [Change]) -> Vec<&'c Change> {
        let Some(managers) = self.managers else {
            return changes.iter().collect();
        };
        let created: std::collections::HashSet<&crate::model::DirectoryId> = changes
            .iter()
            .filter(|c| matches!(c, Change::CreateUser { .. }))
            .map(Change::id)
            .collect();
        let Some(last_create) = changes
            .iter()
            .rposition(|c| matches!(c, Change::CreateUser { .. }))
        else {
            return changes.iter().collect();
        };
        let waits = |c: &Change| {
            !matches!(c, Change::CreateUser { .. })
                && change_attrs(c)
                    .and_then(crate::map::manager_dn)
                    .and_then(|dn| managers.id_of(&dn))
                    .is_some_and(|m| created.contains(m))
        };
        let mut order = Vec::with_capacity(changes.len());
        let mut waiting = Vec::new();
        for (i, c) in changes.iter().enumerate() {
            if i < last_create && waits(c) {
                waiting.push(c);
            } else {
                order.push(c);
            }
            if i == last_create {
                order.append(&mut waiting);
            }
        }
        order
    }

    /// A phase as waves: one wave, except for user creates when managers are mapped, where
    /// a create whose manager is created in the same phase goes in a later wave than the
    /// manager's (a chain of managers gives a wave per level; a loop is cut at 64).
    fn waves<'c>(&self, phase: &[&'c Change]) -> Vec<Vec<&'c Change>> {
        let Some(managers) = self.managers else {
            return vec![phase.to_vec()];
        };
        if !matches!(phase.first(), Some(Change::CreateUser { .. })) {
            return vec![phase.to_vec()];
        }
        let creating: std::collections::HashMap<&crate::model::DirectoryId, usize> =
            phase.iter().enumerate().map(|(i, c)| (c.id(), i)).collect();
        let manager_of: Vec<Option<usize>> = phase
            .iter()
            .map(|c| match c {
                Change::CreateUser { attrs, .. } => crate::map::manager_dn(attrs)
                    .and_then(|dn| managers.id_of(&dn))
                    .and_then(|m| creating.get(m).copied()),
                _ => None,
            })
            .collect();
        let depth = |mut i: usize| {
            let mut d = 0usize;
            while let Some(m) = manager_of[i] {
                d += 1;
                if d >= 64 || m == i {
                    break;
                }
                i = m;
            }
            d
        };
        let mut waves: Vec<Vec<&Change>> = Vec::new();
        for (i, c) in phase.iter().copied().enumerate() {
            let d = depth(i);
            if waves.len() <= d {
                waves.resize_with(d + 1, Vec::new);
            }
            waves[d].push(c);
        }
        waves.retain(|w| !w.is_empty());
        waves
    }

    /// Sends one change (unless the breaker tripped) and makes the row updates its
    /// acknowledgement implies durable.
    async fn run<'c>(&self, rows: Rows<'_>, change: &'c Change, breaker: &Breaker) -> Finished<'c> {
        if let Some(failures) = breaker.tripped() {
            let error = ApplyError::Skipped(format!(
                "target {} skipped for the rest of this cycle after {failures} consecutive changes failed to reach it",
                self.target.name
            ));
            return Finished {
                change,
                updates: Vec::new(),
                acted: Acted {
                    error: Some(error),
                    ..Acted::default()
                },
            };
        }
        // A manager made earlier in this apply is sent as its new id, and the row records
        // that (as the next plan resolves it, so nothing is planned again); one still without
        // an account here is left out, and the row keeps the plan's form.
        let linked = change_attrs(change).and_then(|attrs| {
            let flat = attrs.unpack();
            let sid = self.managers.and(self.manager_link(&flat, rows.state))??;
            Some((flat, sid))
        });
        let mut acted = self.act(rows, change).await;
        breaker.record(acted.error.as_ref());
        let mut updates = match &acted.ack {
            Some(ack) => advance::advance(rows.state, change, ack, self.now),
            None => Vec::new(),
        };
        if let Some((mut flat, sid)) = linked {
            flat.insert(
                crate::config::MANAGER_PATH.to_owned(),
                serde_json::json!({ "value": sid.0 }),
            );
            let sent = crate::map::SharedAttrs::pack(&flat);
            for u in &mut updates {
                if let Update::PutUser(id, row) = u {
                    if id == change.id() {
                        row.hash = crate::map::packed_hash(&sent);
                        row.attrs = sent.clone();
                    }
                }
            }
        }
        // Durable before it counts: an update sled could not write is not made in memory
        // either (the next cycle sees the row as it was, and plans the change again), nor
        // learnt from. A group's members are the exception: the target has them as the
        // confirmed batches left them, and later changes of this apply (a PUT of the whole
        // list, on a target without PATCH) must start from that, not from the old row.
        let updates = match write(self.snapshot, &updates) {
            Ok(()) => {
                if let Some(ha) = self.ha {
                    if let Err(e) = ha.ha.record(ha.epoch, &self.target.name.0, &updates).await {
                        warn!(target = %self.target.name, error = %e, "ha: an acknowledged change is not in the ledger yet; it is sent before the next write");
                    }
                }
                updates
            }
            Err(e) => {
                acted.error.get_or_insert(e.into());
                acted.answered = None;
                match change {
                    Change::AddMembers { .. } | Change::RemoveMembers { .. } => updates,
                    _ => Vec::new(),
                }
            }
        };
        Finished {
            change,
            updates,
            acted,
        }
    }

    /// Applies a finished change to the in-memory rows and the report.
    fn record(
        &self,
        state: &mut TargetState,
        report: &mut ApplyReport,
        paths: &mut SharedPaths,
        finished: Finished<'_>,
    ) -> Vec<Update> {
        let mut moved = Vec::new();
        let Finished {
            change,
            updates,
            acted,
        } = finished;
        let scim_id = updates.iter().find_map(|u| match u {
            Update::PutUser(_, r) => Some(r.scim_id.0.clone()),
            Update::PutGroup(id, r) if id == change.id() => Some(r.scim_id.0.clone()),
            _ => None,
        });
        for u in updates {
            let Update::MoveMemberships { from, to } = &u else {
                advance::apply_to(state, u);
                continue;
            };
            // Resolved one at a time against the rows as they are now; each group on its own.
            for m in advance::moved_memberships(state, from, to) {
                if let Err(e) = write(self.snapshot, std::slice::from_ref(&m)) {
                    warn!(target = %self.target.name, error = %e, "cannot record a re-bound membership; the next cycle repairs it");
                } else {
                    moved.push(m.clone());
                }
                advance::apply_to(state, m);
            }
        }
        if matches!(
            acted.ack,
            Some(advance::Ack::User {
                recreated: true,
                ..
            })
        ) {
            report.recreated += 1;
        }
        if let Some(answered) = acted.answered {
            report.dropped.extend(answered.dropped);
            report.kept.extend(answered.kept);
        }
        let err = acted.error;
        report.records.push(Applied {
            action: change.action(),
            resource: change.resource(),
            external_id: change.id().0.clone(),
            name: change.name().to_string(),
            from_external_id: change.from_id().map(|f| f.0.clone()),
            scim_id: scim_id.or_else(|| change_scim_id(change)),
            attributes: paths.shared(changed_paths(change)),
            outcome: err.as_ref().map_or(std::borrow::Cow::Borrowed("ok"), |e| {
                std::borrow::Cow::Owned(e.to_string())
            }),
        });
        match err {
            None => report.applied += 1,
            Some(e) => {
                if let (ApplyError::Stale(_), Change::Orphan { id, .. }) = (&e, change) {
                    report.stale_orphans.push(id.clone());
                }
                warn!(target = %self.target.name, action = %change.action(), resource = %change.resource(), name = change.name(), error = %e, "change failed");
                report.failures.push(Failure {
                    class: e.class(),
                    action: change.action(),
                    resource: change.resource(),
                    external_id: change.id().0.clone(),
                    name: change.name().to_string(),
                    error: e.to_string(),
                });
            }
        }
        moved
    }

    /// A stop was requested, or the deadline passed: start nothing new.
    fn should_stop(&self) -> bool {
        self.stop.is_some_and(|s| s.load(Ordering::Relaxed))
            || self.ha.is_some_and(|w| !w.current())
            || self
                .deadline
                .is_some_and(|d| std::time::Instant::now() >= d)
    }
}

/// Writes row updates to the target's sled tree (a rebind's membership move is resolved by
/// the caller, against the rows of the moment).
fn write(snapshot: &TargetSnapshot, updates: &[Update]) -> Result<(), SnapshotError> {
    for u in updates {
        match u {
            Update::PutUser(id, row) => snapshot.put_user(id, row)?,
            Update::RemoveUser(id) => snapshot.remove_user(id)?,
            Update::PutGroup(id, row) => snapshot.put_group(id, row)?,
            Update::RemoveGroup(id) => snapshot.remove_group(id)?,
            Update::MoveMemberships { .. } => {}
        }
    }
    Ok(())
}

/// The rows a phase of changes sees, and their index by SCIM id (built on first use).
#[derive(Clone, Copy)]
struct Rows<'a> {
    state: &'a TargetState,
    ix: &'a std::sync::OnceLock<ScimIndex<'a>>,
}

impl<'a> Rows<'a> {
    fn index(&self) -> &'a ScimIndex<'a> {
        self.ix.get_or_init(|| self.state.user_index())
    }
}

fn change_scim_id(c: &Change) -> Option<String> {
    match c {
        Change::AdoptUser { scim_id, .. }
        | Change::Rebind { scim_id, .. }
        | Change::UpdateUser { scim_id, .. }
        | Change::DeactivateUser { scim_id, .. }
        | Change::DeleteUser { scim_id, .. }
        | Change::AdoptGroup { scim_id, .. }
        | Change::UpdateGroup { scim_id, .. }
        | Change::DeleteGroup { scim_id, .. }
        | Change::Orphan { scim_id, .. } => Some(scim_id.0.clone()),
        _ => None,
    }
}

/// The last attribute-path list recorded, reused while the next ones are equal.
#[derive(Default)]
struct SharedPaths(Option<std::sync::Arc<[String]>>);

impl SharedPaths {
    fn shared(&mut self, paths: Vec<String>) -> std::sync::Arc<[String]> {
        match &self.0 {
            Some(last) if **last == *paths => last.clone(),
            _ => {
                let fresh: std::sync::Arc<[String]> = paths.into();
                self.0 = Some(fresh.clone());
                fresh
            }
        }
    }
}

/// What a change touches, for the audit log: attribute paths, or member directory ids.
fn changed_paths(c: &Change) -> Vec<String> {
    match c {
        Change::AdoptUser { changes, .. }
        | Change::Rebind { changes, .. }
        | Change::UpdateUser { changes, .. }
        | Change::DeactivateUser { changes, .. } => {
            changes.iter().map(|a| a.path.clone()).collect()
        }
        Change::CreateUser { attrs, .. } => attrs.paths(),
        Change::UpdateGroup { .. } => vec!["displayName".into()],
        Change::AdoptGroup { changes, .. } => changes.iter().map(|a| a.path.clone()).collect(),
        Change::AddMembers { members, .. } | Change::RemoveMembers { members, .. } => {
            members.iter().map(|m| format!("member:{m}")).collect()
        }
        _ => Vec::new(),
    }
}

/// The attributes a user change sends.
fn change_attrs(change: &Change) -> Option<&crate::map::SharedAttrs> {
    match change {
        Change::CreateUser { attrs, .. }
        | Change::AdoptUser { attrs, .. }
        | Change::Rebind { attrs, .. }
        | Change::UpdateUser { attrs, .. }
        | Change::DeactivateUser { attrs, .. } => Some(attrs),
        _ => None,
    }
}
