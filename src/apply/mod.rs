//! Runs a plan against one target. Every acknowledged change advances the snapshot row at once
//! (compare-and-swap style: a row moves only for what the target confirmed); a failed change
//! is recorded and the rest go on, except what depends on it.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};

use chrono::{DateTime, Utc};
use futures::stream::{self, StreamExt};
use serde_json::{json, Value};
use tracing::{info, warn};

use crate::config::{MatchRule, TargetConfig};
use crate::map::{self, FlatAttrs, SharedAttrs};
use crate::model::{DirectoryId, ScimId};
use crate::plan::{AttrChange, Change};
use crate::scim::resource::{self, group_put_body, members_of, patch_ops, scim_id_of};
use crate::scim::{profile, Capabilities, PatchOp, ScimClient, TargetError};
use crate::snapshot::{
    GroupRow, Ownership, ScimIndex, SnapshotError, TargetSnapshot, TargetState, UserRow, UserState,
};

/// A change that did not go through, with the reason.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Failure {
    /// `http_4xx`, `http_5xx`, `transport`, `malformed`, `skipped` or `snapshot`.
    pub class: &'static str,
    pub action: &'static str,
    pub resource: &'static str,
    pub external_id: String,
    pub name: String,
    pub error: String,
}

/// One change as it went, for the audit log.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Applied {
    pub action: &'static str,
    pub resource: &'static str,
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
}

/// Something that wants to know how far an apply got (a progress bar).
pub type Progress<'a> = &'a (dyn Fn(&str, usize, usize) + Sync);

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
    /// A coarse class for metrics.
    pub fn class(&self) -> &'static str {
        match self {
            ApplyError::Target(TargetError::Rejected { status, .. }) if *status < 500 => "http_4xx",
            ApplyError::Target(TargetError::Rejected { .. }) => "http_5xx",
            ApplyError::Target(TargetError::Unavailable { .. }) => "transport",
            ApplyError::Target(TargetError::Malformed { .. }) => "malformed",
            ApplyError::Target(TargetError::Client { .. }) => "client",
            ApplyError::Snapshot(_) => "snapshot",
            ApplyError::Skipped(_) | ApplyError::Stale(_) => "skipped",
        }
    }
}

/// The state updates of one change, and its error if it (partly) failed.
type ChangeResult<'c> = (Vec<Effect>, Option<(&'c Change, ApplyError)>, &'c Change);

/// A state update that an acknowledged change implies (already written to the snapshot).
enum Effect {
    PutUser(DirectoryId, UserRow),
    RemoveUser(DirectoryId),
    PutGroup(DirectoryId, GroupRow),
    RemoveGroup(DirectoryId),
    /// A rebind: the old entry's memberships are the account's, now the new entry's (done
    /// after the phase, one at a time: two rebinds may share a group).
    MoveMemberships {
        from: DirectoryId,
        to: DirectoryId,
    },
    /// What an answer showed the target keeps of what we sent (no snapshot row).
    Answered {
        dropped: BTreeSet<String>,
        kept: BTreeSet<String>,
    },
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
        // Consecutive changes of the same kind form a phase; phases run in plan order, the
        // changes inside one run concurrently.
        let mut i = 0;
        while i < changes.len() {
            if stopping() {
                report.not_started = changes.len() - i;
                warn!(target = %self.target.name, left = report.not_started, "stop requested or the next cycle is due; the remaining changes wait for the next cycle");
                break;
            }
            let kind = std::mem::discriminant(&changes[i]);
            let mut j = i;
            while j < changes.len() && std::mem::discriminant(&changes[j]) == kind {
                j += 1;
            }
            let phase = &changes[i..j];
            let results: Vec<Option<ChangeResult<'_>>> = {
                let st: &TargetState = state;
                let done = &done;
                // The rows by SCIM id, built at most once per phase (when a 409 needs them).
                let ix = &std::sync::OnceLock::new();
                stream::iter(phase.iter().map(|c| async move {
                    if stopping() {
                        return None;
                    }
                    let (effects, err) = self.run(Rows { state: st, ix }, c, breaker).await;
                    let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                    if let Some(p) = self.progress {
                        p(&self.target.name.0, n, total);
                    }
                    Some((effects, err.map(|e| (c, e)), c))
                }))
                .buffer_unordered(self.target.concurrency.max(1))
                .collect()
                .await
            };
            report.not_started += results.iter().filter(|r| r.is_none()).count();
            for (effects, err, change) in results.into_iter().flatten() {
                let scim_id = effects.iter().find_map(|e| match e {
                    Effect::PutUser(_, r) => Some(r.scim_id.0.clone()),
                    Effect::PutGroup(_, r) => Some(r.scim_id.0.clone()),
                    _ => None,
                });
                for e in effects {
                    match e {
                        Effect::PutUser(id, mut row) => {
                            // The snapshot has the attributes; in memory the rest of this
                            // apply only needs ids (as a cycle does after a hash match).
                            row.attrs = map::no_attrs();
                            state.users.insert(id, row);
                        }
                        Effect::RemoveUser(id) => {
                            state.users.remove(&id);
                        }
                        Effect::PutGroup(id, row) => {
                            state.groups.insert(id, row);
                        }
                        Effect::RemoveGroup(id) => {
                            state.groups.remove(&id);
                        }
                        Effect::MoveMemberships { from, to } => {
                            for (gid, group) in state.groups.iter_mut() {
                                if group.members.remove(&from) {
                                    group.members.insert(to.clone());
                                    if let Err(e) = self.snapshot.put_group(gid, group) {
                                        warn!(target = %self.target.name, group = %group.display_name, error = %e, "cannot record a re-bound membership; the next cycle repairs it");
                                    }
                                }
                            }
                        }
                        Effect::Answered { dropped, kept } => {
                            report.dropped.extend(dropped);
                            report.kept.extend(kept);
                        }
                    }
                }
                report.records.push(Applied {
                    action: change.action(),
                    resource: change.resource(),
                    external_id: change.id().0.clone(),
                    name: change.name().to_string(),
                    from_external_id: change.from_id().map(|f| f.0.clone()),
                    scim_id: scim_id.or_else(|| change_scim_id(change)),
                    attributes: paths.shared(changed_paths(change)),
                    outcome: err
                        .as_ref()
                        .map_or(std::borrow::Cow::Borrowed("ok"), |(_, e)| {
                            std::borrow::Cow::Owned(e.to_string())
                        }),
                });
                match err {
                    None => report.applied += 1,
                    Some((c, e)) => {
                        if let (ApplyError::Stale(_), Change::Orphan { id, .. }) = (&e, c) {
                            report.stale_orphans.push(id.clone());
                        }
                        warn!(target = %self.target.name, action = c.action(), resource = c.resource(), name = c.name(), error = %e, "change failed");
                        report.failures.push(Failure {
                            class: e.class(),
                            action: c.action(),
                            resource: c.resource(),
                            external_id: c.id().0.clone(),
                            name: c.name().to_string(),
                            error: e.to_string(),
                        });
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

    async fn run(
        &self,
        rows: Rows<'_>,
        change: &Change,
        breaker: &Breaker,
    ) -> (Vec<Effect>, Option<ApplyError>) {
        if let Some(failures) = breaker.tripped() {
            return (
                Vec::new(),
                Some(ApplyError::Skipped(format!(
                    "target {} skipped for the rest of this cycle after {failures} consecutive changes failed to reach it",
                    self.target.name
                ))),
            );
        }
        let (effects, err) = match change {
            Change::RemoveMembers { group, members, .. } => {
                self.members(rows.state, group, members, false).await
            }
            Change::AddMembers { group, members, .. } => {
                self.members(rows.state, group, members, true).await
            }
            other => match self.run_single(rows, other).await {
                Ok(effects) => (effects, None),
                Err(e) => (Vec::new(), Some(e)),
            },
        };
        breaker.record(err.as_ref());
        (effects, err)
    }

    async fn run_single(&self, rows: Rows<'_>, change: &Change) -> Result<Vec<Effect>, ApplyError> {
        let c = self.client;
        let state = rows.state;
        match change {
            Change::CreateUser {
                id,
                user_name,
                attrs,
            } => {
                let flat = attrs.unpack();
                let (scim_id, etag, owned, answered) =
                    self.create_user(rows, id, user_name, &flat).await?;
                let row = self.user_row(scim_id, user_name, attrs, &flat, etag, owned, None);
                self.snapshot.put_user(id, &row)?;
                Ok(vec![Effect::PutUser(id.clone(), row), answered])
            }
            Change::AdoptUser {
                id,
                scim_id,
                user_name,
                attrs,
                matched_by,
                changes,
            } => {
                let owned = if *matched_by == "externalId" {
                    Ownership::Created
                } else {
                    Ownership::Adopted
                };
                self.adopt_user(id, scim_id, user_name, attrs, changes, owned)
                    .await
            }
            Change::Rebind {
                id,
                from,
                scim_id,
                user_name,
                attrs,
                changes,
                ..
            } => {
                let owned = state
                    .users
                    .get(from)
                    .map_or(Ownership::Adopted, |prev| prev.owned);
                let mut effects = self
                    .adopt_user(id, scim_id, user_name, attrs, changes, owned)
                    .await?;
                // The old entry's row goes; its memberships are the account's, now the new
                // entry's (the plan's member changes were computed that way).
                self.snapshot.remove_user(from)?;
                effects.push(Effect::RemoveUser(from.clone()));
                effects.push(Effect::MoveMemberships {
                    from: from.clone(),
                    to: id.clone(),
                });
                Ok(effects)
            }
            Change::UpdateUser {
                id,
                scim_id,
                user_name,
                changes,
                attrs,
            }
            | Change::DeactivateUser {
                id,
                scim_id,
                user_name,
                changes,
                attrs,
                ..
            } => {
                let prev = state.users.get(id);
                let flat = attrs.unpack();
                match self
                    .write_user(
                        scim_id,
                        patch_ops(changes, &flat),
                        &flat,
                        prev.and_then(|r| r.etag.as_deref()),
                    )
                    .await
                {
                    Ok((etag, _)) => {
                        let owned = prev.map(|r| r.owned).unwrap_or(Ownership::Created);
                        let row = self.user_row(
                            scim_id.clone(),
                            user_name,
                            attrs,
                            &flat,
                            etag,
                            owned,
                            prev,
                        );
                        self.snapshot.put_user(id, &row)?;
                        Ok(vec![Effect::PutUser(id.clone(), row)])
                    }
                    Err(e)
                        if e.status() == Some(404)
                            && matches!(change, Change::DeactivateUser { .. }) =>
                    {
                        warn!(target = %self.target.name, user = %user_name, "user to deactivate is already gone from the target");
                        self.snapshot.remove_user(id)?;
                        Ok(vec![Effect::RemoveUser(id.clone())])
                    }
                    Err(e) if e.status() == Some(404) => {
                        warn!(target = %self.target.name, user = %user_name, "user was deleted on the target by hand; creating it again");
                        let (sid, etag, owned, answered) =
                            self.create_user(rows, id, user_name, &flat).await?;
                        let row = self.user_row(sid, user_name, attrs, &flat, etag, owned, None);
                        self.snapshot.put_user(id, &row)?;
                        let mut effects = vec![Effect::PutUser(id.clone(), row), answered];
                        // Its memberships went with it: forget them, so the next plan adds
                        // them again.
                        for (gid, group) in &state.groups {
                            if group.members.contains(id) {
                                let mut group = group.clone();
                                group.members.remove(id);
                                self.snapshot.put_group(gid, &group)?;
                                effects.push(Effect::PutGroup(gid.clone(), group));
                            }
                        }
                        Ok(effects)
                    }
                    Err(e) => Err(e.into()),
                }
            }
            Change::DeleteUser { id, scim_id, .. } => {
                c.delete("Users", scim_id).await?;
                self.snapshot.remove_user(id)?;
                Ok(vec![Effect::RemoveUser(id.clone())])
            }
            Change::CreateGroup { id, display_name } => {
                let (scim_id, etag, owned, members) = match c
                    .create("Groups", &resource::group_resource(id, display_name))
                    .await
                {
                    Ok((sid, etag)) => (sid, etag, Ownership::Created, BTreeSet::new()),
                    Err(e) if e.status() == Some(409) => {
                        let found = c.find_eq("Groups", "externalId", &id.0).await?;
                        let Some(g) = found.into_iter().next() else {
                            return Err(e.into());
                        };
                        let sid = scim_id_of(&g).ok_or_else(|| {
                            no_usable_id(self.target, "Groups", "the group", display_name)
                        })?;
                        (sid, None, Ownership::Created, members_of(&g, rows.index()))
                    }
                    Err(e) => return Err(e.into()),
                };
                let row = GroupRow {
                    scim_id,
                    display_name: display_name.clone(),
                    members,
                    etag,
                    owned,
                };
                self.snapshot.put_group(id, &row)?;
                Ok(vec![Effect::PutGroup(id.clone(), row)])
            }
            Change::AdoptGroup {
                id,
                scim_id,
                display_name,
                matched_by,
                members,
                changes,
                ..
            } => {
                // Exactly what the plan shows differs; nothing differs: no write.
                let ops: Vec<PatchOp> = changes
                    .iter()
                    .filter_map(|c| {
                        let v = c.to.as_ref()?;
                        Some(PatchOp::replace(c.path.as_str(), v.clone()))
                    })
                    .collect();
                let etag = if ops.is_empty() {
                    None
                } else {
                    self.write_group(scim_id, ops, || {
                        group_put_body(id, display_name, members, &state.users)
                    })
                    .await?
                };
                let owned = if *matched_by == "externalId" {
                    Ownership::Created
                } else {
                    Ownership::Adopted
                };
                let row = GroupRow {
                    scim_id: scim_id.clone(),
                    display_name: display_name.clone(),
                    members: members.clone(),
                    etag,
                    owned,
                };
                self.snapshot.put_group(id, &row)?;
                Ok(vec![Effect::PutGroup(id.clone(), row)])
            }
            Change::UpdateGroup {
                id,
                scim_id,
                display_name,
                ..
            } => {
                let mut row = state
                    .groups
                    .get(id)
                    .cloned()
                    .ok_or_else(|| missing_row(id))?;
                let ops = vec![PatchOp::replace("displayName", json!(display_name))];
                let etag = self
                    .write_group(scim_id, ops, || {
                        group_put_body(id, display_name, &row.members, &state.users)
                    })
                    .await?;
                row.display_name = display_name.clone();
                row.etag = etag;
                self.snapshot.put_group(id, &row)?;
                Ok(vec![Effect::PutGroup(id.clone(), row)])
            }
            Change::DeleteGroup { id, scim_id, .. } => {
                c.delete("Groups", scim_id).await?;
                self.snapshot.remove_group(id)?;
                Ok(vec![Effect::RemoveGroup(id.clone())])
            }
            Change::RemoveMembers { .. } | Change::AddMembers { .. } => {
                unreachable!("handled by members()")
            }
            Change::Orphan {
                id,
                scim_id,
                user_name,
                delete,
            } => {
                self.deprovision_orphan(id, scim_id, user_name, *delete)
                    .await
            }
        }
    }

    /// An approved orphan: deleted, or deactivated and from then on managed like any leaver
    /// (its row, in the deactivated state, lets `deactivate-then-delete` run its course and a
    /// returner with the same directory id be reactivated).
    ///
    /// The SCIM id was found when the snapshot was rebuilt, maybe days ago: the account is
    /// read again first, and deprovisioned only if it is still that orphan ([`recheck_orphan`]).
    /// One that is not is never touched ([`ApplyError::Stale`]: dropped from the orphans).
    async fn deprovision_orphan(
        &self,
        id: &DirectoryId,
        scim_id: &ScimId,
        user_name: &str,
        delete: bool,
    ) -> Result<Vec<Effect>, ApplyError> {
        let mut current = match self.client.get("Users", scim_id).await {
            Ok(current) => current,
            Err(e) if e.status() == Some(404) => {
                warn!(target = %self.target.name, user = %user_name, "orphan to deprovision is already gone from the target");
                return Ok(Vec::new());
            }
            Err(e) => return Err(e.into()),
        };
        if let Some(e) = recheck_orphan(
            self.target,
            self.client,
            id,
            scim_id,
            user_name,
            delete,
            &current,
        ) {
            return Err(e);
        }
        if delete {
            self.client.delete("Users", scim_id).await?;
            return Ok(Vec::new());
        }
        let mut inactive = FlatAttrs::new();
        inactive.insert("active".into(), Value::Bool(false));
        let written = if self.caps.patch {
            let change = AttrChange {
                path: "active".into(),
                from: Some(Value::Bool(true)),
                to: Some(Value::Bool(false)),
            };
            self.client
                .patch("Users", scim_id, patch_ops(&[change], &inactive))
                .await
        } else {
            // Without PATCH the whole resource goes back as the target has it, inactive: we
            // know nothing else of it. (`recheck_orphan` made sure it is an object.)
            let Some(obj) = current.as_object_mut() else {
                return Err(not_a_resource(self.target, scim_id));
            };
            obj.insert("active".into(), Value::Bool(false));
            obj.remove("meta");
            self.client.put("Users", scim_id, &current).await
        };
        let etag = match written {
            Ok(etag) => etag,
            Err(e) if e.status() == Some(404) => {
                warn!(target = %self.target.name, user = %user_name, "orphan to deactivate is already gone from the target");
                return Ok(Vec::new());
            }
            Err(e) => return Err(e.into()),
        };
        let attrs = SharedAttrs::pack(&inactive);
        let row = self.user_row(
            scim_id.clone(),
            user_name,
            &attrs,
            &inactive,
            etag,
            Ownership::Adopted,
            None,
        );
        self.snapshot.put_user(id, &row)?;
        Ok(vec![Effect::PutUser(id.clone(), row)])
    }

    /// Member deltas, in batches the target accepts; the row advances after each batch.
    async fn members(
        &self,
        state: &TargetState,
        group: &DirectoryId,
        members: &[DirectoryId],
        add: bool,
    ) -> (Vec<Effect>, Option<ApplyError>) {
        let Some(mut row) = state.groups.get(group).cloned() else {
            return (
                Vec::new(),
                Some(ApplyError::Skipped(
                    "the group does not exist on the target (its creation failed)".into(),
                )),
            );
        };
        let mut resolved: Vec<(&DirectoryId, &ScimId)> = Vec::new();
        let mut unresolved = 0usize;
        for m in members {
            match state.users.get(m) {
                Some(u) => resolved.push((m, &u.scim_id)),
                // A removal of someone already gone needs nothing; an addition of someone whose
                // creation failed is reported.
                None if !add => {
                    row.members.remove(m);
                }
                None => unresolved += 1,
            }
        }
        let mut error = None;
        if !self.caps.patch {
            // No PATCH on this target: the whole member list in one PUT is the only way.
            let mut next = row.members.clone();
            for (m, _) in &resolved {
                if add {
                    next.insert((*m).clone());
                } else {
                    next.remove(*m);
                }
            }
            let body = group_put_body(group, &row.display_name, &next, &state.users);
            match self.client.put("Groups", &row.scim_id, &body).await {
                Ok(etag) => {
                    row.members = next;
                    row.etag = etag;
                }
                Err(e) => error = Some(e.into()),
            }
            resolved.clear();
        }
        let batch = self.batch_size();
        for chunk in resolved.chunks(batch) {
            if self.should_stop() {
                error = Some(ApplyError::Skipped(
                    "stop requested; the remaining member changes wait for the next cycle".into(),
                ));
                break;
            }
            let ids: Vec<&ScimId> = chunk.iter().map(|(_, s)| *s).collect();
            let ops = profile::member_ops(self.target.profile, add, &ids);
            match self.client.patch("Groups", &row.scim_id, ops).await {
                Ok(etag) => {
                    for (m, _) in chunk {
                        if add {
                            row.members.insert((*m).clone());
                        } else {
                            row.members.remove(*m);
                        }
                    }
                    // The row is written once, after the last batch: rewriting a large
                    // group's row per batch made a big push quadratic. A crash in between
                    // only means some acknowledged batches are sent again (they are idempotent).
                    row.etag = etag;
                }
                Err(e) => {
                    error = Some(e.into());
                    break;
                }
            }
        }
        if error.is_none() && unresolved > 0 {
            error = Some(ApplyError::Skipped(format!(
                "{unresolved} member(s) were not added because they do not exist on the target (their creation failed)"
            )));
        }
        if let Err(e) = self.snapshot.put_group(group, &row) {
            error.get_or_insert(e.into());
        }
        (vec![Effect::PutGroup(group.clone(), row)], error)
    }

    /// A stop was requested, or the deadline passed: start nothing new.
    fn should_stop(&self) -> bool {
        self.stop.is_some_and(|s| s.load(Ordering::Relaxed))
            || self
                .deadline
                .is_some_and(|d| std::time::Instant::now() >= d)
    }

    /// Changes a user: PATCH where the target supports it, else PUT of the full resource.
    async fn write_user(
        &self,
        scim_id: &ScimId,
        ops: Vec<PatchOp>,
        attrs: &FlatAttrs,
        etag: Option<&str>,
    ) -> Result<(Option<String>, Value), TargetError> {
        if self.caps.patch {
            let etag = etag.filter(|_| self.caps.etag);
            return self
                .client
                .patch_returning("Users", scim_id, ops, etag)
                .await;
        }
        let mut body = resource::user_resource(attrs);
        if let Some(obj) = body.as_object_mut() {
            obj.insert("id".into(), json!(scim_id.0));
        }
        Ok((self.client.put("Users", scim_id, &body).await?, Value::Null))
    }

    /// Takes over a resource found on the target: sends exactly the plan's attribute changes
    /// (none: no write at all) and writes the row.
    async fn adopt_user(
        &self,
        id: &DirectoryId,
        scim_id: &ScimId,
        user_name: &str,
        attrs: &SharedAttrs,
        changes: &[AttrChange],
        owned: Ownership,
    ) -> Result<Vec<Effect>, ApplyError> {
        let flat = attrs.unpack();
        let (etag, answered) = self.send_changes(scim_id, changes, &flat).await?;
        let row = self.user_row(scim_id.clone(), user_name, attrs, &flat, etag, owned, None);
        self.snapshot.put_user(id, &row)?;
        Ok(vec![Effect::PutUser(id.clone(), row), answered])
    }

    /// Sends `changes` to a user (nothing when there are none) and reads what the answer
    /// shows the target kept of them.
    async fn send_changes(
        &self,
        scim_id: &ScimId,
        changes: &[AttrChange],
        flat: &FlatAttrs,
    ) -> Result<(Option<String>, Effect), TargetError> {
        if changes.is_empty() {
            return Ok((None, answered(&FlatAttrs::new(), &Value::Null)));
        }
        let ops = patch_ops(changes, flat);
        let (etag, body) = self.write_user(scim_id, ops, flat, None).await?;
        let sent: FlatAttrs = changes
            .iter()
            .filter_map(|c| c.to.clone().map(|v| (c.path.clone(), v)))
            .collect();
        Ok((etag, answered(&sent, &body)))
    }

    /// Changes a group's own attributes: PATCH, else PUT of the full group (members included).
    async fn write_group(
        &self,
        scim_id: &ScimId,
        ops: Vec<PatchOp>,
        full: impl FnOnce() -> Value,
    ) -> Result<Option<String>, TargetError> {
        if self.caps.patch {
            self.client.patch("Groups", scim_id, ops).await
        } else {
            self.client.put("Groups", scim_id, &full()).await
        }
    }

    fn batch_size(&self) -> usize {
        // The loaded configuration is capped to the profile's limit already.
        self.target.members_per_request.max(1)
    }

    /// Creates a user. On 409 (already there: a create whose answer was lost, or an account
    /// someone made by hand under the same name) it takes the resource that holds the place,
    /// if the match rules allow, and brings it in line; otherwise the 409 is the error.
    async fn create_user(
        &self,
        rows: Rows<'_>,
        id: &DirectoryId,
        user_name: &str,
        flat: &FlatAttrs,
    ) -> Result<(ScimId, Option<String>, Ownership, Effect), ApplyError> {
        match self
            .client
            .create_returning("Users", &resource::user_resource(flat))
            .await
        {
            Ok((sid, etag, body)) => Ok((sid, etag, Ownership::Created, answered(flat, &body))),
            Err(e) if e.status() == Some(409) => {
                let Some((sid, owned)) = self.find_after_conflict(id, user_name).await? else {
                    return Err(e.into());
                };
                // An account another entry's row holds moves only through a planned rebind.
                if let Some(holder) = rows.index().get(sid.0.as_str()).filter(|h| **h != id) {
                    return Err(ApplyError::Skipped(format!(
                        "the create answered 409 and the account {user_name} on the target belongs to directory entry {holder}; not taking it over here (the next plan shows it as a rebind)"
                    )));
                }
                // Brought in line like an adoption: only what differs is sent.
                let found = self.client.get("Users", &sid).await?;
                let changes = crate::plan::adopt::adoption_diff(
                    &resource::flatten_user(&found),
                    flat,
                    &BTreeSet::new(),
                );
                let (etag, answered) = self.send_changes(&sid, &changes, flat).await?;
                info!(target = %self.target.name, user = %user_name, changed = changes.len(), "create answered 409; found and adopted the existing resource");
                Ok((sid, etag, owned, answered))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// After a 409 on create: the resource with our externalId (ours, its create answer was
    /// lost), else one with the same userName if the target's match rules allow adoption.
    /// A found resource without a usable id is an error: never a reason to create another.
    async fn find_after_conflict(
        &self,
        id: &DirectoryId,
        user_name: &str,
    ) -> Result<Option<(ScimId, Ownership)>, ApplyError> {
        if let Some(r) = self
            .client
            .find_eq("Users", "externalId", &id.0)
            .await?
            .first()
        {
            let sid = scim_id_of(r)
                .ok_or_else(|| no_usable_id(self.target, "Users", "the account", user_name))?;
            return Ok(Some((sid, Ownership::Created)));
        }
        if self.target.match_existing.contains(&MatchRule::UserName)
            && !crate::plan::is_protected(self.target, user_name)
        {
            let found = self.client.find_eq("Users", "userName", user_name).await?;
            if found.len() == 1 {
                // Another directory entry's account (by its externalId, whether or not a row
                // says so): it moves only through a planned, counted rebind. Any dialect's id
                // form counts here (the OpenLDAP form includes AD's).
                if let Some(other) = found[0]["externalId"]
                    .as_str()
                    .filter(|e| {
                        crate::model::is_directory_style(crate::config::Dialect::OpenLdap, e)
                    })
                    .map(DirectoryId::new)
                    .filter(|e| e != id)
                {
                    return Err(ApplyError::Skipped(format!(
                        "the create answered 409 and the account {} on the target is held by directory id {other}; not taking it over here (the next plan shows it as a rebind)",
                        self.client.redact(user_name)
                    )));
                }
                let sid = scim_id_of(&found[0])
                    .ok_or_else(|| no_usable_id(self.target, "Users", "the account", user_name))?;
                return Ok(Some((sid, Ownership::Adopted)));
            }
        }
        Ok(None)
    }

    /// The row of a user the target acknowledged: `attrs` packed, `flat` the same unpacked.
    #[allow(clippy::too_many_arguments)]
    fn user_row(
        &self,
        scim_id: ScimId,
        user_name: &str,
        attrs: &SharedAttrs,
        flat: &FlatAttrs,
        etag: Option<String>,
        owned: Ownership,
        prev: Option<&UserRow>,
    ) -> UserRow {
        let active = flat.get("active").and_then(Value::as_bool).unwrap_or(true);
        let state = match (active, prev.map(|p| p.state)) {
            (true, _) => UserState::Active,
            (false, Some(UserState::Deactivated { since })) => UserState::Deactivated { since },
            (false, _) => UserState::Deactivated { since: self.now },
        };
        UserRow {
            scim_id,
            user_name: user_name.to_string(),
            hash: map::packed_hash(attrs),
            attrs: SharedAttrs::clone(attrs),
            etag,
            state,
            owned,
        }
    }
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

/// What an answer to a write shows the target kept of `sent` (nothing learnt when the
/// answer is not a resource).
fn answered(sent: &FlatAttrs, body: &Value) -> Effect {
    let (dropped, kept) = if crate::plan::adopt::is_resource(body) {
        crate::plan::adopt::not_kept_paths(sent, &resource::flatten_user(body))
    } else {
        Default::default()
    };
    Effect::Answered { dropped, kept }
}

/// A resource found after a 409 that cannot be addressed: the entry fails, nothing is created.
fn no_usable_id(target: &TargetConfig, resource_type: &str, what: &str, name: &str) -> ApplyError {
    ApplyError::Target(TargetError::Malformed {
        target: target.name.0.clone(),
        method: "GET".into(),
        path: format!("/{resource_type}"),
        reason: format!(
            "{what} {name} that holds the place on the target has no usable id; not creating another one"
        ),
    })
}

/// Whether the account an approved orphan names, as the target has it now (`current`), is
/// still that orphan: its `externalId` is still the orphan's directory id, its `userName` is
/// not protected, and (to be deactivated) it is still active. `None` if it is; `Stale` if it
/// is not (it is dropped from the orphans), `Malformed` if the answer is not a resource.
#[allow(clippy::too_many_arguments)]
fn recheck_orphan(
    target: &TargetConfig,
    client: &ScimClient,
    id: &DirectoryId,
    scim_id: &ScimId,
    user_name: &str,
    delete: bool,
    current: &Value,
) -> Option<ApplyError> {
    let Some(obj) = current.as_object() else {
        return Some(not_a_resource(target, scim_id));
    };
    let stale = |why: String| {
        let why = client.redact(&format!(
            "orphan {user_name} ({id}) not deprovisioned: {why}; it is no longer an orphan of this directory and is dropped from the orphans"
        ));
        warn!(target = %target.name, user = %user_name, "{why}");
        Some(ApplyError::Stale(why))
    };
    match obj.get("externalId") {
        Some(Value::String(ext)) if DirectoryId::new(ext) == *id => {}
        Some(Value::String(ext)) => {
            return stale(format!("its externalId on the target is now {ext:?}"));
        }
        _ => return stale("its externalId on the target was cleared".into()),
    }
    let now_named = obj.get("userName").and_then(Value::as_str);
    if let Some(name) = [Some(user_name), now_named]
        .into_iter()
        .flatten()
        .find(|n| crate::plan::is_protected(target, n))
    {
        return stale(format!("its userName {name} matches a protect pattern"));
    }
    if !delete && obj.get("active").and_then(Value::as_bool) == Some(false) {
        return stale("it is inactive on the target already".into());
    }
    None
}

/// A target answered a GET of one account with something other than a resource.
fn not_a_resource(target: &TargetConfig, scim_id: &ScimId) -> ApplyError {
    ApplyError::Target(TargetError::Malformed {
        target: target.name.0.clone(),
        method: "GET".into(),
        path: format!("/Users/{scim_id}", scim_id = scim_id.0),
        reason: "the answer is not a SCIM resource (a JSON object); nothing was changed".into(),
    })
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

fn missing_row(id: &DirectoryId) -> ApplyError {
    ApplyError::Skipped(format!("no snapshot row for {id}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An approved orphan is deprovisioned only while the account is still that orphan; a
    /// hostile answer (not an object) is an error, never a panic.
    #[tokio::test]
    async fn an_approved_orphan_is_rechecked_against_the_account_as_it_is_now() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut target = crate::plan::tests::target();
        target.protect = vec!["admin*".into()];
        let client = ScimClient::new(&target).unwrap();
        let id = DirectoryId::new("8f1c2f6e-0000-4000-8000-000000000001");
        let sid = ScimId("s1".into());
        let check = |current: Value, delete: bool| {
            recheck_orphan(
                &target,
                &client,
                &id,
                &sid,
                "left@example.org",
                delete,
                &current,
            )
        };
        let ok = json!({"id": "s1", "userName": "left@example.org", "active": true,
                        "externalId": "8F1C2F6E-0000-4000-8000-000000000001"});
        assert!(check(ok.clone(), false).is_none(), "still the orphan");
        let mut no_active = ok.clone();
        no_active.as_object_mut().unwrap().remove("active");
        assert!(check(no_active, false).is_none(), "active by default");
        let stale = |current: Value, delete: bool| match check(current, delete) {
            Some(ApplyError::Stale(why)) => why,
            other => panic!("{other:?}"),
        };
        let mut moved = ok.clone();
        moved["externalId"] = json!("HR-4711");
        assert!(stale(moved, true).contains("HR-4711"));
        let mut cleared = ok.clone();
        cleared["externalId"] = Value::Null;
        assert!(stale(cleared, false).contains("cleared"));
        let mut protected = ok.clone();
        protected["userName"] = json!("admin-left@example.org");
        assert!(stale(protected, true).contains("protect"));
        let mut inactive = ok.clone();
        inactive["active"] = json!(false);
        assert!(stale(inactive.clone(), false).contains("inactive"));
        assert!(check(inactive, true).is_none(), "deleted under delete");
        for hostile in [json!([ok.clone()]), json!("s1"), json!(7), Value::Null] {
            match check(hostile.clone(), false) {
                Some(e @ ApplyError::Target(TargetError::Malformed { .. })) => {
                    assert_eq!(e.class(), "malformed", "{hostile}")
                }
                other => panic!("{hostile}: {other:?}"),
            }
        }
    }
}
