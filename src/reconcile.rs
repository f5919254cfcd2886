//! One reconcile pass: read → map → plan → guard → apply (or report, in a dry run), for every
//! selected target. Targets run concurrently and independently: one failing target is that
//! target's result, not the cycle's.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, OnceLock};

use chrono::{DateTime, Utc};
use serde_json::Value;
use tracing::{debug, info, warn};

use crate::apply::{Applier, ApplyReport};
use crate::config::{Config, Dialect, MatchRule, TargetConfig};
use crate::map::{self, Desired, FlatAttrs};
use crate::model::{Directory, DirectoryId};
use crate::plan::{self, guard, Existing, Plan, PlanInput};
use crate::scim::resource::{flatten_user, members_of, scim_id_of};
use crate::scim::{Capabilities, ScimClient, TargetError};
use crate::snapshot::{
    HeldChange, Orphan, Orphans, ReadStats, Rebuild, RowCounts, Snapshot, SnapshotError,
    TargetSnapshot, TargetState,
};
use crate::source::{self, SourceError};

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("unknown target {name} (--target): the configured targets are {known}")]
    UnknownTarget { name: String, known: String },
}

use crate::outcome::{Outcome, TargetOutcome, TargetStatus};

/// Options of one pass.
pub struct Pass<'a> {
    pub config: &'a Config,
    /// Empty = all targets.
    pub only: &'a [String],
    pub dry_run: bool,
    pub now: DateTime<Utc>,
    /// A short id for this pass, in logs and the audit trail.
    pub run_id: String,
    /// Set by a signal handler: finish the request in flight, start nothing new.
    pub stop: Option<&'a std::sync::atomic::AtomicBool>,
    /// After this instant a target starts no new change (the daemon sets it just before the
    /// next scheduled cycle, so one slow target cannot make the others miss theirs).
    pub deadline: Option<std::time::Instant>,
    pub progress: Option<crate::apply::Progress<'a>>,
}

impl<'a> Pass<'a> {
    pub fn new(config: &'a Config, only: &'a [String], dry_run: bool) -> Self {
        Pass {
            config,
            only,
            dry_run,
            now: crate::clock::now(),
            run_id: new_run_id(),
            stop: None,
            deadline: None,
            progress: None,
        }
    }
}

/// A short random id (time-based, unique enough to tell runs apart in logs).
pub fn new_run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{:08x}",
        (nanos as u64 ^ (std::process::id() as u64) << 32) & 0xffff_ffff
    )
}

pub fn select_targets<'a>(
    config: &'a Config,
    only: &[String],
) -> Result<Vec<&'a TargetConfig>, ReconcileError> {
    if only.is_empty() {
        return Ok(config.targets.iter().collect());
    }
    only.iter()
        .map(|n| {
            config
                .targets
                .iter()
                .find(|t| &t.name.0 == n)
                .ok_or_else(|| ReconcileError::UnknownTarget {
                    name: n.clone(),
                    known: config
                        .targets
                        .iter()
                        .map(|t| t.name.0.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                })
        })
        .collect()
}

/// Runs one pass. Errors are for the whole pass (directory, snapshot); a target's own failure
/// is in its [`TargetOutcome`].
pub async fn run(pass: &Pass<'_>) -> Result<Outcome, ReconcileError> {
    let targets = select_targets(pass.config, pass.only)?;
    // The snapshot opens and each target's rows load on the blocking pool while the directory
    // is read (nothing is written before the read is complete).
    let rows: Vec<Arc<OnceLock<Loaded>>> = targets.iter().map(|_| Arc::default()).collect();
    let opening = {
        let state_dir = pass.config.daemon.state_dir.clone();
        let dry_run = pass.dry_run;
        let names: Vec<String> = targets.iter().map(|t| t.name.0.clone()).collect();
        let cells = rows.clone();
        tokio::task::spawn_blocking(move || open_and_load(&state_dir, dry_run, &names, &cells))
    };
    // Each target's `/ServiceProviderConfig` is read meanwhile too (a GET, nothing more).
    let discoveries: Vec<tokio::task::JoinHandle<Connected>> = targets
        .iter()
        .map(|t| {
            let client = ScimClient::new(t).map_err(|e| e.to_string());
            tokio::spawn(async move {
                let client = client?;
                // A refused credential fails the target; other discovery failures use defaults.
                let caps = client.discover().await.map_err(|e| e.to_string())?;
                Ok((client, caps))
            })
        })
        .collect();
    let read_started = std::time::Instant::now();
    // The read covers every target's mappings: one read serves any subset of targets.
    let wanted = map::needed_attributes(&pass.config.targets);
    // Users are mapped for every target as they arrive (targets with scope_groups wait for
    // the groups), and then keep no attributes in the directory: a user whose snapshot row
    // (if already loaded) has the same hash keeps none in its desired form either.
    let mappers: Vec<Option<map::UserMapper>> = targets
        .iter()
        .map(|t| t.scope_groups.is_empty().then(|| map::UserMapper::new(t)))
        .collect();
    let mut premapped: Vec<Vec<Mapped>> = targets.iter().map(|_| Vec::new()).collect();
    let mut on_user = |user: &mut crate::model::DirectoryUser| {
        for ((mapper, out), cell) in mappers.iter().zip(&mut premapped).zip(&rows) {
            let Some(mapper) = mapper else { continue };
            let mut mapped = mapper.map(user);
            // With the rows loaded, an unchanged user drops its attributes now; otherwise they
            // wait (packed, a few hundred bytes) until `map::desired_premapped` can tell.
            if let (Ok(u), Some(Ok((_, state)))) = (&mut mapped, cell.get()) {
                if state.users.get(&u.id).is_some_and(|row| row.hash == u.hash) {
                    u.attrs = map::no_attrs();
                }
            }
            out.push(mapped);
        }
        if mappers.iter().all(Option::is_some) {
            user.attrs = Default::default();
        }
    };
    let directory = match source::read_streaming(
        &pass.config.ldap,
        Some(&wanted),
        &mut on_user,
        pass.now,
    )
    .await
    {
        Ok(directory) => directory,
        Err(e) => {
            // The snapshot opening runs meanwhile; it is let finish, so what it records (a loss
            // noticed, the rebuild it leaves pending) does not depend on how fast the read failed.
            let _ = opening.await;
            return Err(e.into());
        }
    };
    let read_duration = read_started.elapsed();
    let snapshot = match opening.await {
        Ok(opened) => opened?,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => {
            return Err(ReconcileError::Snapshot(SnapshotError::Open {
                path: pass.config.daemon.state_dir.clone(),
                reason: format!("opening was interrupted ({e})"),
            }))
        }
    };
    let loaded: Vec<Loaded> = rows
        .into_iter()
        .map(|cell| {
            Arc::try_unwrap(cell)
                .ok()
                .and_then(OnceLock::into_inner)
                .unwrap_or_else(|| Err("loading the snapshot failed".into()))
        })
        .collect();
    let last = match &snapshot {
        Some(s) => s.last_read()?,
        None => None,
    };
    let hold = source_hold(&directory, last.as_ref(), pass.config.ldap.max_shrink);
    if let Some(h) = &hold {
        warn!(reason = %h.0, "holding every deprovision this cycle");
    }

    // Map every target now, then let go of the directory's attributes: from here on only the
    // desired resources count, so the apply phase does not hold the read as well.
    let mapping_started = std::time::Instant::now();
    // The last target takes the groups' member sets instead of copying them, when nothing
    // reads the directory after it: it must be the last one of all, and mapped on the fly (a
    // target with scope_groups reads the member sets to find its scope).
    let taker = targets.len().checked_sub(1).filter(|&last| {
        mappers[last].is_some() && targets[last].groups != crate::config::GroupScope::None
    });
    let mut directory = directory;
    let mut prepared: Vec<Prepared> = Vec::with_capacity(targets.len());
    for (i, ((t, rows), (mapped, mapper))) in targets
        .iter()
        .zip(loaded)
        .zip(premapped.into_iter().zip(&mappers))
        .enumerate()
    {
        let members = (taker == Some(i)).then(|| {
            directory
                .groups
                .iter_mut()
                .map(|g| std::mem::take(&mut g.members))
                .collect()
        });
        prepared.push(prepare(
            t,
            &directory,
            rows,
            mapper.is_some().then_some(mapped),
            members,
        ));
    }
    let (source_users, source_groups) = (directory.users.len(), directory.groups.len());
    drop_in_background(directory);
    debug!(
        elapsed_ms = mapping_started.elapsed().as_millis() as u64,
        rss_mib = crate::memory::rss_mib(),
        "mapped and snapshot loaded"
    );

    // Each target waits only for its own discovery: a dead target's retries delay no other.
    let snapshot_ref = snapshot.as_ref();
    let hold_ref = hold.as_ref();
    let outcomes = futures::future::join_all(targets.iter().zip(prepared).zip(discoveries).map(
        |((t, prepared), discovery)| async move {
            let connected = match discovery.await {
                Ok(c) => c,
                // Only a panic ends the task early: connect again here.
                Err(_) => ScimClient::new(t)
                    .map_err(|e| e.to_string())
                    .map(|client| (client, Capabilities::default())),
            };
            run_target(pass, t, snapshot_ref, hold_ref, prepared, connected).await
        },
    ))
    .await;

    if let Some(s) = &snapshot {
        if !pass.dry_run {
            // The shrink guard compares with the last read that was allowed to count: one
            // that held nothing, or whose held changes an operator approved on every target
            // (a pass over some targets only cannot lift the hold for the others).
            let all_clear = pass.only.is_empty()
                && outcomes
                    .iter()
                    .all(|t| t.plan.held.is_empty() && t.error.is_none());
            if hold.is_none() || all_clear {
                s.set_last_read(&ReadStats {
                    users: source_users,
                    groups: source_groups,
                    at: Some(pass.now),
                })?;
            }
            s.flush().await?;
        }
    }
    Ok(Outcome {
        run_id: pass.run_id.clone(),
        read_duration,
        source_users,
        source_groups,
        targets: outcomes,
    })
}

/// The directory-wide integrity check: a read much smaller than the last good one holds all
/// deprovisions.
fn source_hold(
    dir: &Directory,
    last: Option<&ReadStats>,
    max_shrink: f64,
) -> Option<guard::SourceHold> {
    let last = last?;
    shrank("users", last.users, dir.users.len(), max_shrink)
        .or_else(|| shrank("groups", last.groups, dir.groups.len(), max_shrink))
}

fn shrank(kind: &str, before: usize, now: usize, max_shrink: f64) -> Option<guard::SourceHold> {
    if before == 0 {
        return None;
    }
    if now == 0 {
        return Some(guard::SourceHold(format!(
            "the directory read returned no {kind}, but the last good read had {before}"
        )));
    }
    let shrink = 1.0 - now as f64 / before as f64;
    (shrink > max_shrink).then(|| {
        guard::SourceHold(format!(
            "the directory shrank from {before} to {now} {kind} ({:.0}%), more than ldap.max_shrink ({:.0}%)",
            shrink * 100.0,
            max_shrink * 100.0
        ))
    })
}

/// A target's snapshot rows (and its tree, absent in a dry run without one), or why not.
type Loaded = Result<(Option<TargetSnapshot>, TargetState), String>;

/// Opens the snapshot (`None`: a dry run before any sync) and loads each target's rows into
/// its cell, in the background of the directory read.
fn open_and_load(
    state_dir: &std::path::Path,
    dry_run: bool,
    names: &[String],
    cells: &[Arc<OnceLock<Loaded>>],
) -> Result<Option<Snapshot>, SnapshotError> {
    let opened = std::time::Instant::now();
    let snapshot = if dry_run {
        Snapshot::open_existing(state_dir)?
    } else {
        Some(Snapshot::open(state_dir)?)
    };
    debug!(
        elapsed_ms = opened.elapsed().as_millis() as u64,
        "snapshot opened"
    );
    for (name, cell) in names.iter().zip(cells) {
        // A dry run never creates a target's tree: no tree means no rows.
        let snap = snapshot.as_ref().filter(|s| !dry_run || s.has_target(name));
        let loaded = match snap.map(|s| s.target(name)) {
            Some(Ok(ts)) => ts
                .load()
                .map(|st| (Some(ts), st))
                .map_err(|e| e.to_string()),
            Some(Err(e)) => Err(e.to_string()),
            None => Ok((None, TargetState::default())),
        };
        let _ = cell.set(loaded);
    }
    Ok(snapshot)
}

/// Frees a large structure (100,000 entries take tens of milliseconds to free) on the
/// blocking pool, while the cycle goes on.
fn drop_in_background<T: Send + 'static>(value: T) {
    tokio::task::spawn_blocking(move || drop(value));
}

/// A listing of a target's resources by the string value of `attr` (ASCII-lowercased when
/// `fold_case`), in listing order.
fn index_by<'a>(all: &'a [Value], attr: &str, fold_case: bool) -> HashMap<String, Vec<&'a Value>> {
    let mut ix: HashMap<String, Vec<&Value>> = HashMap::new();
    for r in all {
        if let Some(v) = r[attr].as_str() {
            let key = if fold_case {
                v.to_ascii_lowercase()
            } else {
                v.to_string()
            };
            ix.entry(key).or_default().push(r);
        }
    }
    ix
}

fn lookup(ix: &HashMap<String, Vec<&Value>>, key: &str) -> Vec<Value> {
    ix.get(key).map_or_else(Vec::new, |found| {
        found.iter().map(|r| (*r).clone()).collect()
    })
}

/// A user mapped while the directory was read, or why it cannot be mapped.
type Mapped = Result<map::DesiredUser, String>;

/// A target's client, and what its `/ServiceProviderConfig` said; or why there is none.
type Connected = Result<(ScimClient, Capabilities), String>;

/// A target's desired resources, snapshot tree and rows, ready to plan; or why not.
type Prepared = Result<(Desired, Option<TargetSnapshot>, TargetState), String>;

/// Maps the directory for `target` and completes its snapshot rows: attribute-level diffs are
/// needed only where the hashes differ (and for leavers), so only those rows' attributes are
/// loaded, and a desired user whose hash matches its row keeps no attributes either.
fn prepare(
    target: &TargetConfig,
    directory: &Directory,
    rows: Loaded,
    premapped: Option<Vec<Mapped>>,
    members: Option<Vec<BTreeSet<DirectoryId>>>,
) -> Prepared {
    let (tsnap, mut state) = rows?;
    let unchanged =
        |id: &DirectoryId, hash: &str| state.users.get(id).is_some_and(|row| row.hash == hash);
    let desired = match premapped {
        Some(mapped) => map::desired_premapped(directory, target, mapped, unchanged, members),
        None => map::desired_with(directory, target, unchanged).map_err(|e| e.to_string())?,
    };
    // Both maps are in id order: one merge.
    let mut wanted = desired.users.iter().peekable();
    let stale: Vec<DirectoryId> = state
        .users
        .iter()
        .filter(|(id, row)| {
            while wanted.next_if(|(k, _)| k < id).is_some() {}
            wanted
                .next_if(|(k, _)| k == id)
                .is_none_or(|(_, want)| want.hash != row.hash)
        })
        .map(|(id, _)| id.clone())
        .collect();
    if let Some(ts) = &tsnap {
        ts.load_attrs(&mut state, &stale)
            .map_err(|e| e.to_string())?;
    }
    Ok((desired, tsnap, state))
}

async fn run_target(
    pass: &Pass<'_>,
    target: &TargetConfig,
    snapshot: Option<&Snapshot>,
    hold: Option<&guard::SourceHold>,
    prepared: Prepared,
    connected: Connected,
) -> TargetOutcome {
    let started = std::time::Instant::now();
    let mut outcome = run_target_untimed(pass, target, snapshot, hold, prepared, connected).await;
    outcome.elapsed = started.elapsed();
    // A target that failed before applying anything (a refused credential, an unusable
    // listing) is recorded too, so `status` does not keep showing its last good run.
    if let (Some(s), false, Some(error)) = (snapshot, pass.dry_run, &outcome.error) {
        let record = serde_json::json!({
            "at": pass.now.to_rfc3339(),
            "status": TargetStatus::Error,
            "error": error,
            "applied": 0, "failed": 0, "held": 0, "writes": 0,
        });
        if let Err(e) = s.put_meta(&status_key(&outcome.name), &record) {
            warn!(target = %outcome.name, error = %e, "cannot record the run status");
        }
    }
    outcome
}

async fn run_target_untimed(
    pass: &Pass<'_>,
    target: &TargetConfig,
    snapshot: Option<&Snapshot>,
    hold: Option<&guard::SourceHold>,
    prepared: Prepared,
    connected: Connected,
) -> TargetOutcome {
    let name = target.name.0.clone();
    let fail = |error: String| TargetOutcome {
        name: name.clone(),
        status: TargetStatus::Error,
        error: Some(error),
        plan: Plan::default(),
        applied: None,
        names: BTreeMap::new(),
        elapsed: Default::default(),
        rebuild: None,
    };
    let (desired, tsnap, mut state) = match prepared {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    let (client, caps) = match connected {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let step = std::time::Instant::now();
    let (existing_users, existing_groups, mut problems) = match resolve_existing(
        &client,
        caps,
        target,
        pass.config.ldap.dialect,
        &desired,
        &state,
    )
    .await
    {
        Ok(x) => x,
        Err(e) => return fail(e.to_string()),
    };
    let (rebuild, orphans) = match orphans_of(
        pass,
        target,
        &client,
        snapshot,
        &desired,
        &state,
        &existing_users,
    )
    .await
    {
        Ok(x) => x,
        Err(e) => return fail(e),
    };
    let blocked: BTreeSet<DirectoryId> = problems
        .iter()
        .map(|p| DirectoryId(p.external_id.clone()))
        .collect();
    debug!(target = %name, elapsed_ms = step.elapsed().as_millis() as u64, rss_mib = crate::memory::rss_mib(), "target looked up");
    let step = std::time::Instant::now();
    let not_kept: BTreeSet<String> = snapshot
        .and_then(|s| s.get_meta(&not_kept_key(&name)).ok().flatten())
        .unwrap_or_default();
    let mut plan = plan::plan(&PlanInput {
        target,
        desired: &desired,
        state: &state,
        existing_users: &existing_users,
        existing_groups: &existing_groups,
        blocked: &blocked,
        not_kept: &not_kept,
        now: pass.now,
    });
    plan.problems.append(&mut problems);
    let names = member_names(&plan, &desired, &state);
    drop_in_background(desired);
    let approved = snapshot.and_then(|s| {
        s.get_meta::<BTreeSet<(String, DirectoryId)>>(&approval_key(&name))
            .ok()
            .flatten()
    });
    guard::apply_limits(
        &mut plan,
        target.max_deprovisions,
        state.users.len(),
        state.groups.len(),
        hold,
        approved.as_ref(),
        target.rebind,
    );
    guard::add_orphans(&mut plan, orphans, hold, approved.as_ref());

    if pass.dry_run {
        let status = if plan.held.is_empty() {
            TargetStatus::Ok
        } else {
            TargetStatus::Held
        };
        drop_in_background(state);
        return TargetOutcome {
            name,
            status,
            error: None,
            plan,
            applied: None,
            names,
            elapsed: Default::default(),
            rebuild,
        };
    }
    let Some(tsnap) = tsnap else {
        unreachable!("a sync always opens the snapshot")
    };
    let applier = Applier {
        client: &client,
        target,
        snapshot: &tsnap,
        now: pass.now,
        stop: pass.stop,
        deadline: pass.deadline,
        progress: pass.progress,
        caps,
    };
    debug!(target = %name, elapsed_ms = step.elapsed().as_millis() as u64, rss_mib = crate::memory::rss_mib(), "planned");
    if let Some(s) = snapshot {
        record_row_counts(s, &name, row_floor(&state, &plan));
    }
    let report = applier.apply(&mut state, &plan.changes).await;
    if let Some(s) = snapshot {
        record_row_counts(
            s,
            &name,
            RowCounts {
                users: state.users.len(),
                groups: state.groups.len(),
            },
        );
        forget_deprovisioned_orphans(s, &name, &report);
    }
    drop_in_background(state);
    if let Some(s) = snapshot {
        let held = guard::held_keys(&plan);
        let stored = if held.is_empty() {
            s.remove_meta(&held_key(&name))
        } else {
            s.put_meta(&held_key(&name), &held)
        };
        if let Err(e) = stored {
            warn!(target = %name, error = %e, "cannot record held changes");
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
        if let Err(e) = s.set_held_changes(&name, &shown) {
            warn!(target = %name, error = %e, "cannot record what the held changes are");
        }
        if !report.dropped.is_empty() || !report.kept.is_empty() {
            let mut next = not_kept.clone();
            next.extend(report.dropped.iter().cloned());
            next.retain(|p| !report.kept.contains(p));
            if next != not_kept {
                info!(target = %name, not_kept = ?next, "the target does not keep some attributes we send; they are not planned again while it lacks them");
                if let Err(e) = s.put_meta(&not_kept_key(&name), &next) {
                    warn!(target = %name, error = %e, "cannot record the attributes the target does not keep");
                }
            }
        }
        // An approval releases one held set, in the sync right after it: never later
        // deprovisions that happen to have the same action and id.
        if approved.is_some() {
            let _ = s.remove_meta(&approval_key(&name));
        }
    }
    let status = if !report.failures.is_empty()
        || report.not_started > 0
        || plan.problems.iter().any(|p| p.fails)
    {
        // Something was not applied, or an entry could not be provisioned: partly failed.
        TargetStatus::Error
    } else if !plan.held.is_empty() {
        TargetStatus::Held
    } else {
        TargetStatus::Ok
    };
    if let Some(s) = snapshot {
        let record = serde_json::json!({
            "at": pass.now.to_rfc3339(),
            "status": status,
            "applied": report.applied,
            "failed": report.failures.len(),
            "held": plan.held.len(),
            "writes": report.writes,
        });
        if let Err(e) = s.put_meta(&status_key(&name), &record) {
            warn!(target = %name, error = %e, "cannot record the run status");
        }
    }
    info!(
        run_id = %pass.run_id,
        target = %name,
        applied = report.applied,
        failed = report.failures.len(),
        held = plan.held.len(),
        writes = report.writes,
        "target reconciled"
    );
    TargetOutcome {
        name,
        status,
        error: None,
        plan,
        applied: Some(report),
        names,
        elapsed: Default::default(),
        rebuild,
    }
}

/// A target's rows were lost if the snapshot holds fewer than it recorded (the counts are a
/// lower bound while a cycle runs, so a crash mid-cycle never looks like a loss).
fn lost_rows(snapshot: Option<&Snapshot>, target: &str, state: &TargetState) -> Option<String> {
    let snapshot = snapshot?;
    if let Some(why) = snapshot.lost() {
        return Some(why.to_string());
    }
    // A loss noticed by an earlier command whose cycle did not get to rebuild this target.
    match snapshot.rebuild_pending(target) {
        Ok(Some(why)) => return Some(why),
        Ok(None) => {}
        Err(e) => {
            return Some(format!(
                "its record of a pending rebuild is unreadable ({e})"
            ))
        }
    }
    let recorded = match snapshot.row_counts(target) {
        Ok(r) => r?,
        Err(e) => return Some(format!("its row counts are unreadable ({e})")),
    };
    (state.users.len() < recorded.users || state.groups.len() < recorded.groups).then(|| {
        format!(
            "it recorded {} user and {} group rows for this target, {} and {} are left",
            recorded.users,
            recorded.groups,
            state.users.len(),
            state.groups.len()
        )
    })
}

/// The fewest rows a target can have once `plan` is applied (what it removes taken off), to
/// be recorded before the apply starts.
fn row_floor(state: &TargetState, plan: &Plan) -> RowCounts {
    let removing_users = plan
        .changes
        .iter()
        .filter(|c| {
            matches!(
                c,
                plan::Change::DeleteUser { .. }
                    | plan::Change::DeactivateUser { .. }
                    | plan::Change::Rebind { .. }
            )
        })
        .count();
    let removing_groups = plan
        .changes
        .iter()
        .filter(|c| matches!(c, plan::Change::DeleteGroup { .. }))
        .count();
    RowCounts {
        users: state.users.len().saturating_sub(removing_users),
        groups: state.groups.len().saturating_sub(removing_groups),
    }
}

fn record_row_counts(snapshot: &Snapshot, target: &str, counts: RowCounts) {
    if let Err(e) = snapshot.set_row_counts(target, counts) {
        warn!(target = %target, error = %e, "cannot record the snapshot's row counts");
    }
}

/// Orphans the target acknowledged deprovisioning are orphans no more.
fn forget_deprovisioned_orphans(snapshot: &Snapshot, target: &str, report: &ApplyReport) {
    let done: Vec<DirectoryId> = report
        .records
        .iter()
        .filter(|r| r.action == "orphan" && r.outcome == "ok")
        .map(|r| DirectoryId(r.external_id.clone()))
        // Read again before the deprovision and found to be orphans no more.
        .chain(report.stale_orphans.iter().cloned())
        .collect();
    if done.is_empty() {
        return;
    }
    let stored = snapshot.orphans(target).and_then(|mut o| {
        for id in &done {
            o.remove(id);
        }
        snapshot.set_orphans(target, &o)
    });
    if let Err(e) = stored {
        warn!(target = %target, error = %e, "cannot record the deprovisioned orphans");
    }
}

/// The rebuild warning for a target (if its rows are lost, or missing while it holds accounts
/// with directory-style externalIds) and its orphans as changes for the guard to hold.
///
/// A target without rows, or whose rows were lost, is listed once: every account with a
/// directory-style `externalId` that no directory entry of this target provisions, that no
/// row holds and that no entry adopts now, is an orphan (an inactive one only under
/// `deprovision = "delete"`: otherwise it is offboarded already). Orphans are kept in the snapshot's
/// meta (a sync only) so later cycles, which have rows again, still show them until they are
/// deprovisioned through `approve`, come back into the directory, or vanish from the target.
async fn orphans_of(
    pass: &Pass<'_>,
    target: &TargetConfig,
    client: &ScimClient,
    snapshot: Option<&Snapshot>,
    desired: &Desired,
    state: &TargetState,
    adopting: &BTreeMap<DirectoryId, Existing>,
) -> Result<(Option<String>, Vec<plan::Change>), String> {
    let name = &target.name.0;
    let state_dir = pass.config.daemon.state_dir.display();
    let lost = lost_rows(snapshot, name, state);
    let mut orphans: Orphans = match snapshot {
        Some(s) => s.orphans(name).map_err(|e| e.to_string())?,
        None => Orphans::new(),
    };
    let stored = orphans.clone();
    let delete = target.deprovision == crate::config::Deprovision::Delete;
    let mut rebuild = None;
    // A target without rows is listed until a cycle has recorded its row counts (a new or
    // lost snapshot); one whose rows are known to be none (everyone deprovisioned, nobody in
    // scope) is not listed again every cycle.
    let never_counted = snapshot.is_none_or(|s| matches!(s.row_counts(name), Ok(None)));
    let listing = lost.is_some() || (state.users.is_empty() && never_counted);
    if listing {
        let listed = client.list_all("Users").await.map_err(|e| e.to_string())?;
        let adopted: BTreeSet<&crate::model::ScimId> =
            adopting.values().map(|e| &e.scim_id).collect();
        // Indexed once: a partly lost snapshot of 100,000 rows must not be scanned per account.
        let held: std::collections::HashSet<&crate::model::ScimId> =
            state.users.values().map(|r| &r.scim_id).collect();
        let unmapped: std::collections::HashSet<&DirectoryId> =
            desired.problems.iter().map(|(id, _, _)| id).collect();
        let mut ours = 0usize;
        for r in &listed {
            let Some(ext) = r["externalId"].as_str() else {
                continue;
            };
            if !crate::model::is_directory_style(pass.config.ldap.dialect, ext) {
                continue;
            }
            ours += 1;
            // An inactive account is already offboarded: an orphan only where the policy
            // wants leavers deleted.
            if !r["active"].as_bool().unwrap_or(true) && !delete {
                continue;
            }
            let id = DirectoryId::new(ext);
            let (Some(scim_id), Some(user_name)) = (scim_id_of(r), r["userName"].as_str()) else {
                continue;
            };
            let provisioned = desired
                .users
                .get(&id)
                .is_some_and(|u| u.active || target.provision_disabled);
            if provisioned
                || unmapped.contains(&id)
                || state.users.contains_key(&id)
                || held.contains(&scim_id)
                || adopted.contains(&scim_id)
                || plan::is_protected(target, user_name)
            {
                continue;
            }
            orphans.entry(id).or_insert(Orphan {
                scim_id,
                // Read from the target: it reaches reports and the audit log.
                user_name: client.redact(user_name),
                found: pass.now,
            });
        }
        rebuild = match (&lost, ours) {
            (Some(why), _) => Some(format!(
                "the snapshot in {state_dir} (daemon.state_dir) lost rows of target {name}: {why}; rebuilding from the target"
            )),
            (None, 0) => None,
            (None, n) => Some(format!(
                "the snapshot in {state_dir} (daemon.state_dir) has no rows for target {name}, but the target holds {n} account(s) with directory-style externalIds: the snapshot was lost (or never written for this target); rebuilding from the target"
            )),
        };
    }
    // A returner is adopted by its externalId; an account a row or an adoption holds is
    // managed again.
    let adopted: BTreeSet<&crate::model::ScimId> = adopting.values().map(|e| &e.scim_id).collect();
    let held: std::collections::HashSet<&crate::model::ScimId> = if orphans.is_empty() {
        Default::default()
    } else {
        state.users.values().map(|r| &r.scim_id).collect()
    };
    orphans.retain(|id, o| {
        let provisioned = desired
            .users
            .get(id)
            .is_some_and(|u| u.active || target.provision_disabled);
        // A `protect` pattern added since the orphan was found covers it from then on.
        if plan::is_protected(target, &o.user_name) {
            info!(target = %name, user = %o.user_name, external_id = %id, "an orphan's userName matches a protect pattern now; it is dropped from the orphans and never deprovisioned");
            return false;
        }
        !provisioned
            && !state.users.contains_key(id)
            && !held.contains(&o.scim_id)
            && !adopted.contains(&o.scim_id)
    });
    if let Some(msg) = &rebuild {
        warn!(target = %name, "{msg}");
    }
    if let (Some(s), false) = (snapshot, pass.dry_run) {
        if orphans != stored {
            s.set_orphans(name, &orphans).map_err(|e| e.to_string())?;
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
    let changes = orphans
        .into_iter()
        .map(|(id, o)| plan::Change::Orphan {
            // A disabled entry's account is deactivated, never deleted.
            delete: delete && !desired.users.contains_key(&id),
            id,
            scim_id: o.scim_id,
            user_name: o.user_name,
        })
        .collect();
    Ok((rebuild, changes))
}

fn member_names(
    plan: &Plan,
    desired: &Desired,
    state: &TargetState,
) -> BTreeMap<DirectoryId, String> {
    let mut names = BTreeMap::new();
    for c in plan.changes.iter().chain(&plan.held) {
        if let plan::Change::AddMembers { members, .. }
        | plan::Change::RemoveMembers { members, .. } = c
        {
            for m in members {
                let name = desired
                    .users
                    .get(m)
                    .map(|u| u.user_name.clone())
                    .or_else(|| state.users.get(m).map(|r| r.user_name.clone()))
                    .unwrap_or_else(|| m.0.clone());
                names.insert(m.clone(), name);
            }
        }
    }
    names
}

pub fn status_key(target: &str) -> String {
    format!("status/{target}")
}

pub fn held_key(target: &str) -> String {
    format!("held/{target}")
}

/// The attribute paths a target does not keep (a JSON list).
pub fn not_kept_key(target: &str) -> String {
    format!("not_kept/{target}")
}

pub fn approval_key(target: &str) -> String {
    format!("approved/{target}")
}

type Found = (
    BTreeMap<DirectoryId, Existing>,
    BTreeMap<DirectoryId, Existing>,
    Vec<plan::Problem>,
);

/// Looks on the target (read-only) for resources that directory entries without a snapshot
/// row should take over: by `externalId` always (it can only be ours), then by `userName` /
/// `displayName` where `match_existing` allows. Many candidates (a first run, a lost
/// snapshot) list the target once; a few are looked up one by one.
///
/// A found account is never taken from another directory entry silently: one a row of an
/// entry still in the directory holds, or whose directory-style `externalId` names such an
/// entry, is a problem; one whose directory-style `externalId` names an entry that is gone
/// (no row: a lost snapshot) is marked [`Existing::claimed_by`], and planned as a rebind.
/// Likewise a group another group's row holds, or that carries another directory-style
/// `externalId`, is a problem, never adopted (groups have no rebind).
/// Values read from the target are redacted before they reach a plan or a report.
async fn resolve_existing(
    client: &ScimClient,
    caps: Capabilities,
    target: &TargetConfig,
    dialect: Dialect,
    desired: &Desired,
    state: &TargetState,
) -> Result<Found, TargetError> {
    let mut users = BTreeMap::new();
    let mut groups = BTreeMap::new();
    let mut problems = Vec::new();
    // Both maps are in id order: one merge.
    let mut rows = state.users.keys().peekable();
    let user_candidates: Vec<&map::DesiredUser> = desired
        .users
        .values()
        .filter(|u| {
            while rows.next_if(|k| *k < &u.id).is_some() {}
            rows.next_if(|k| *k == &u.id).is_none()
                && (u.active || target.provision_disabled)
                // Never created nor adopted: the planner reports it.
                && !plan::is_protected(target, &u.user_name)
        })
        .collect();
    let group_candidates: Vec<&map::DesiredGroup> = desired
        .groups
        .values()
        .filter(|g| {
            !state.groups.contains_key(&g.id) && !plan::is_protected(target, &g.display_name)
        })
        .collect();
    if user_candidates.is_empty() && group_candidates.is_empty() {
        return Ok((users, groups, problems));
    }
    // Indexed once: rows by SCIM id, and the entries present but unmapped.
    let rows_by_scim = state.user_index();
    let unmapped: std::collections::HashSet<&DirectoryId> =
        desired.problems.iter().map(|(id, _, _)| id).collect();
    let in_directory = |id: &DirectoryId| desired.users.contains_key(id) || unmapped.contains(id);
    // The other directory id a resource's directory-style externalId names, if any.
    let other_directory_id = |r: &Value, own: &DirectoryId| {
        r["externalId"]
            .as_str()
            .filter(|e| crate::model::is_directory_style(dialect, e))
            .map(DirectoryId::new)
            .filter(|e| e != own)
    };
    let by_user_name = target.match_existing.contains(&MatchRule::UserName);
    let by_display_name = target.match_existing.contains(&MatchRule::DisplayName);
    const LIST_THRESHOLD: usize = 50;

    if !user_candidates.is_empty() {
        let listed = if user_candidates.len() > LIST_THRESHOLD || !caps.filter {
            Some(client.list_all("Users").await?)
        } else {
            None
        };
        // Indexed once: 100,000 candidates against a listing of 100,000 must not be a scan each.
        let listed_ids = listed
            .as_deref()
            .map(|all| index_by(all, "externalId", false));
        let listed_names = listed.as_deref().map(|all| index_by(all, "userName", true));
        for u in user_candidates {
            let mut found = match &listed_ids {
                Some(ix) => lookup(ix, &u.id.0),
                None => client.find_eq("Users", "externalId", &u.id.0).await?,
            };
            let mut how = "externalId";
            if found.is_empty() && by_user_name {
                how = "userName";
                found = match &listed_names {
                    Some(ix) => lookup(ix, &u.user_name.to_ascii_lowercase()),
                    None => client.find_eq("Users", "userName", &u.user_name).await?,
                };
            }
            match found.len() {
                0 => {}
                1 => {
                    let r = &found[0];
                    let raw_name = r["userName"].as_str().unwrap_or_default();
                    let name = &client.redact(raw_name);
                    if plan::is_protected(target, raw_name) {
                        problems.push(protected(&u.id, &u.user_name, format!("an existing account {name} on the target matches a protect pattern; it is neither adopted nor duplicated")));
                        continue;
                    }
                    // A match we cannot address is not a reason to make a second account.
                    let Some(scim_id) = scim_id_of(r) else {
                        problems.push(problem(
                            &u.id,
                            &u.user_name,
                            format!("the account {name} on the target matches by {how} but has no usable id; not adopting it, and not creating a second one"),
                        ));
                        continue;
                    };
                    let row_holder = rows_by_scim.get(scim_id.0.as_str()).copied();
                    // Without a row, the account's own directory-style externalId names
                    // its holder (a lost snapshot).
                    let claimed_by = match row_holder {
                        Some(_) => None,
                        None => other_directory_id(r, &u.id),
                    };
                    // Still in the directory (mapped or not): never re-bound away from it.
                    if let Some(holder) = row_holder
                        .filter(|h| in_directory(h))
                        .or(claimed_by.as_ref().filter(|h| in_directory(h)))
                    {
                        problems.push(problem(
                            &u.id,
                            &u.user_name,
                            format!("the account {name} on the target already belongs to directory entry {holder}; not adopting it for a second one"),
                        ));
                        continue;
                    }
                    users.insert(
                        u.id.clone(),
                        Existing {
                            scim_id,
                            attrs: redacted(client, flatten_user(r)),
                            matched_by: how,
                            members: BTreeSet::new(),
                            claimed_by,
                        },
                    );
                }
                n => problems.push(problem(
                    &u.id,
                    &u.user_name,
                    format!(
                        "{n} accounts on the target match by {how}; not adopting any (ambiguous)"
                    ),
                )),
            }
        }
    }
    // One account found for two entries (names that differ only in case): neither takes it.
    for (id, name, n) in plan::adopt::claimed_twice(&users, &desired.users) {
        users.remove(&id);
        problems.push(problem(
            &id,
            &name,
            format!("the account matched on the target is matched by {n} directory entries; not adopting it for any (ambiguous)"),
        ));
    }
    if !group_candidates.is_empty() {
        // Users found above may be group members too: resolve group members against rows
        // and adoptions alike (indexed once, not per group).
        let mut known = rows_by_scim.clone();
        known.extend(users.iter().map(|(id, e)| (e.scim_id.0.as_str(), id)));
        let groups_by_scim = state.group_index();
        let listed = if group_candidates.len() > LIST_THRESHOLD || !caps.filter {
            Some(client.list_all("Groups").await?)
        } else {
            None
        };
        let listed_ids = listed
            .as_deref()
            .map(|all| index_by(all, "externalId", false));
        let listed_names = listed
            .as_deref()
            .map(|all| index_by(all, "displayName", false));
        for g in group_candidates {
            let mut found: Vec<Value> = match &listed_ids {
                Some(ix) => lookup(ix, &g.id.0),
                None => client.find_eq("Groups", "externalId", &g.id.0).await?,
            };
            let mut how = "externalId";
            if found.is_empty() && by_display_name {
                how = "displayName";
                found = match &listed_names {
                    Some(ix) => lookup(ix, &g.display_name),
                    None => {
                        client
                            .find_eq("Groups", "displayName", &g.display_name)
                            .await?
                    }
                };
            }
            match found.len() {
                0 => {}
                1 => {
                    let summary = &found[0];
                    let raw_name = summary["displayName"].as_str().unwrap_or_default();
                    let name = &client.redact(raw_name);
                    if plan::is_protected(target, raw_name) {
                        problems.push(protected(&g.id, &g.display_name, format!("an existing group {name} on the target matches a protect pattern; it is neither adopted nor duplicated")));
                        continue;
                    }
                    let Some(scim_id) = scim_id_of(summary) else {
                        problems.push(problem(
                            &g.id,
                            &g.display_name,
                            format!("the group {name} on the target matches by {how} but has no usable id; not adopting it, and not creating a second one"),
                        ));
                        continue;
                    };
                    // Another group's account: a group replaced in the directory by another
                    // with the same name would take the old one's account, and the old one's
                    // delete would then remove it. Never adopted: the old group's row goes
                    // its own way (deleted, under the limits, once it left), and this group
                    // is created afresh after that.
                    let holder = groups_by_scim
                        .get(scim_id.0.as_str())
                        .copied()
                        .filter(|h| *h != &g.id)
                        .cloned()
                        .or_else(|| other_directory_id(summary, &g.id));
                    if let Some(holder) = holder {
                        problems.push(problem(
                            &g.id,
                            &g.display_name,
                            format!("the group {name} on the target matches by {how} but belongs to directory group {holder}; not adopting it for a second one (once that group's account is gone, this one is created)"),
                        ));
                        continue;
                    }
                    let mut attrs = FlatAttrs::new();
                    for k in ["displayName", "externalId"] {
                        attrs.insert(k.into(), summary[k].clone());
                    }
                    let attrs = redacted(client, attrs);
                    // Lists may leave members out; the resource itself has them. AWS Identity
                    // Center never returns members: its groups start from "unknown" (additions
                    // are idempotent, and nothing unseen is removed).
                    let members = if crate::scim::profile::reads_members(target.profile) {
                        members_of(&client.get("Groups", &scim_id).await?, &known)
                    } else {
                        BTreeSet::new()
                    };
                    groups.insert(
                        g.id.clone(),
                        Existing {
                            scim_id,
                            attrs,
                            matched_by: how,
                            members,
                            claimed_by: None,
                        },
                    );
                }
                n => problems.push(problem(
                    &g.id,
                    &g.display_name,
                    format!(
                        "{n} groups on the target match by {how}; not adopting any (ambiguous)"
                    ),
                )),
            }
        }
    }
    Ok((users, groups, problems))
}

fn problem(id: &DirectoryId, name: &str, reason: String) -> plan::Problem {
    plan::Problem {
        external_id: id.0.clone(),
        name: name.to_string(),
        reason,
        fails: true,
    }
}

fn protected(id: &DirectoryId, name: &str, reason: String) -> plan::Problem {
    plan::Problem {
        fails: false,
        ..problem(id, name, reason)
    }
}

/// `attrs` with the target's secrets cut out of every string value: what a target lists
/// reaches plans, reports and the audit log.
fn redacted(client: &ScimClient, mut attrs: FlatAttrs) -> FlatAttrs {
    for v in attrs.values_mut() {
        if let Value::String(s) = v {
            *s = client.redact(s);
        }
    }
    attrs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_case_insensitively() {
        assert!(plan::glob_match("admin*", "admin-root"));
        assert!(plan::glob_match("break-glass-?", "break-glass-1"));
        assert!(!plan::glob_match("admin*", "sysadmin"));
        assert!(plan::glob_match("*", ""));
    }

    #[test]
    fn shrink_guard_trips_past_the_limit() {
        let dir = Directory {
            users: vec![],
            groups: vec![],
        };
        let last = ReadStats {
            users: 10,
            groups: 0,
            at: None,
        };
        assert!(source_hold(&dir, Some(&last), 0.2).is_some());
        assert!(source_hold(&dir, None, 0.2).is_none());
    }
}
