//! One reconcile pass, for every selected target: observe → decide → act (or report, in a
//! dry run). The directory is read once for all targets while the snapshot opens
//! ([`prepare`]); then each target, concurrently and independently, is observed (what it
//! holds for new entries, its accounts when its rows were lost: `scim::observe`), decided
//! (the plan, adoptions, orphans and safety limits: `plan`) and acted on (`apply`). One
//! failing target is that target's result, not the cycle's.

mod existing;
pub mod feed;
mod prepare;
mod record;

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use tracing::{info, warn};

use self::existing::{find_existing, find_orphans};
use self::prepare::{drop_in_background, Opening, Prepared, StreamingMap};
use self::record::{record_cycle, record_row_counts};
use crate::apply::Applier;
use crate::clock::Clock;
use crate::config::{Config, TargetConfig};
use crate::map;
use crate::model::{Directory, DirectoryId, DirectoryUser};
use crate::outcome::{Outcome, ReadWay, TargetFailure, TargetOutcome, TargetStatus};
use crate::plan::{self, guard, Plan, PlanInput};
use crate::scim::{Capabilities, ScimClient, TargetError};
use crate::snapshot::{
    FeedProgress, LastRun, ReadStats, RowCounts, Snapshot, SnapshotError, TargetState,
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

/// Options of one pass.
pub struct Pass<'a> {
    pub config: &'a Config,
    /// Empty = all targets.
    pub only: &'a [String],
    pub dry_run: bool,
    /// The pass's one instant (grace periods, deactivation dates, records).
    pub now: DateTime<Utc>,
    /// A short id for this pass, in logs and the audit trail.
    pub run_id: String,
    /// Set by a signal handler: finish the request in flight, start nothing new.
    pub stop: Option<&'a std::sync::atomic::AtomicBool>,
    /// After this instant a target starts no new change (the daemon sets it just before the
    /// next scheduled cycle, so one slow target cannot make the others miss theirs).
    pub deadline: Option<std::time::Instant>,
    pub progress: Option<crate::apply::Progress<'a>>,
    /// Read the whole directory although a change feed could say what changed; says why
    /// (`--full`, the full schedule).
    pub full: Option<&'static str>,
    /// `--only`: just these users or groups (DN or name); empty = every entry. Such a pass
    /// reads the whole directory without the change feed and records no feed progress, no
    /// held set and no read size: it is not a cycle, only a few entries brought up to date.
    pub entries: &'a [String],
    /// `sync --plan`: apply exactly the changes of this saved plan that still match.
    pub saved: Option<&'a plan::SavedPlan>,
    /// `plan --out`: give every change its fingerprint.
    pub fingerprints: bool,
    /// `[ha]`: writes only while this instance holds the lease; every acknowledged row goes
    /// to the ledger too.
    pub ha: Option<&'a crate::ha::Writer>,
    /// `[ha]`, a standby: bring the directory's mirror up to date from the change feed, and
    /// plan no target (it writes to none).
    pub mirror_only: bool,
}

impl<'a> Pass<'a> {
    pub fn new(config: &'a Config, only: &'a [String], dry_run: bool, clock: &Clock) -> Self {
        Pass {
            config,
            only,
            dry_run,
            now: clock.now(),
            run_id: new_run_id(),
            stop: None,
            deadline: None,
            progress: None,
            full: None,
            entries: &[],
            saved: None,
            fingerprints: false,
            ha: None,
            mirror_only: false,
        }
    }

    /// Whether this pass touches only some entries (`--only`, `sync --plan`), or plans for a
    /// saved plan (`plan --out`): then it reads the whole directory, never the change feed,
    /// and records no feed progress, held set or read size.
    pub fn partial(&self) -> bool {
        !self.entries.is_empty() || self.saved.is_some() || self.fingerprints
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

/// A target's client, and what its `/ServiceProviderConfig` said; or why there is none.
type Connected = Result<(ScimClient, Capabilities), TargetError>;

/// Runs one pass. Errors are for the whole pass (directory, snapshot); a target's own failure
/// is in its [`TargetOutcome`].
pub async fn run(pass: &Pass<'_>) -> Result<Outcome, ReconcileError> {
    run_with(pass, None).await
}

/// Runs one pass on a directory the caller read already (`explain`, which looks up the entry
/// it explains in the same read).
pub async fn run_on(pass: &Pass<'_>, directory: Directory) -> Result<Outcome, ReconcileError> {
    run_with(pass, Some(directory)).await
}

async fn run_with(pass: &Pass<'_>, read: Option<Directory>) -> Result<Outcome, ReconcileError> {
    let targets = if pass.mirror_only {
        Vec::new()
    } else {
        select_targets(pass.config, pass.only)?
    };
    // The read covers every target's mappings: one read serves any subset of targets.
    let mut wanted = map::needed_attributes(&pass.config.targets);
    if !pass.entries.is_empty() {
        // `--only` finds entries by name as `explain` does.
        wanted.extend(
            crate::model::LOOKUP_ATTRIBUTES
                .iter()
                .map(|a| a.to_string()),
        );
    }
    let read_started = std::time::Instant::now();
    // Each target's client is built meanwhile (loading TLS roots takes tens of milliseconds).
    let clients: Vec<tokio::task::JoinHandle<Result<ScimClient, TargetError>>> = targets
        .iter()
        .map(|t| {
            let t = (*t).clone();
            let fence = pass.ha.cloned();
            tokio::task::spawn_blocking(move || ScimClient::new(&t).map(|c| c.with_fence(fence)))
        })
        .collect();
    // With a change feed the snapshot opens first: the directory's mirror and its cookies are
    // in it. Nothing is written to a target before the read is complete.
    let (opening, way) = if read.is_none() && feed::configured(&pass.config.ldap) && !pass.partial()
    {
        let snapshot = prepare::open_snapshot(&pass.config.daemon.state_dir, pass.dry_run).await?;
        let ask = feed_ask(pass, &wanted, &targets);
        let way = feed::decide(&ask, snapshot.as_ref()).await?;
        if let feed::Way::Quiet {
            users,
            groups,
            seq,
            cookies,
        } = way
        {
            let mut outcome = quiet(
                pass,
                &targets,
                snapshot,
                clients,
                (users, groups),
                seq,
                read_started,
            )
            .await?;
            outcome.read.feed = Some(feed::kind_of(&cookies));
            outcome.read.cookies = Some(cookies);
            return Ok(outcome);
        }
        let narrow = match &way {
            feed::Way::Delta {
                narrow: Some(n), ..
            } => Some(n.users.clone()),
            _ => None,
        };
        (
            Opening::with_snapshot(snapshot, pass.dry_run, &targets, narrow),
            way,
        )
    } else {
        (
            Opening::start(&pass.config.daemon.state_dir, pass.dry_run, &targets),
            feed::Way::Classic,
        )
    };
    // Each target's `/ServiceProviderConfig` is read meanwhile too (a GET, nothing more); a
    // refused credential fails the target.
    let discoveries: Vec<tokio::task::JoinHandle<Connected>> = targets
        .iter()
        .zip(clients)
        .map(|(t, client)| {
            let t = (*t).clone();
            let fence = pass.ha.cloned();
            tokio::spawn(async move {
                let client = match client.await {
                    Ok(built) => built?,
                    Err(_) => ScimClient::new(&t)?.with_fence(fence),
                };
                let caps = client.discover().await?;
                Ok((client, caps))
            })
        })
        .collect();
    let mut mapping = StreamingMap::new(&targets, &opening);
    mapping.keep_attributes = !pass.entries.is_empty();
    let mut read_way = ReadWay {
        mode: "full",
        ..ReadWay::default()
    };
    let mut seq = None;
    // A fast delta's directory holds only the users it touches: the counts are the mirror's.
    let mut counts = None;
    let read = match (read, way) {
        (Some(directory), _) => Ok(mapped(directory, &mut mapping)),
        (
            None,
            feed::Way::Delta {
                directory,
                changed,
                seq: s,
                cookies,
                narrow,
            },
        ) => {
            read_way = ReadWay {
                mode: "delta",
                feed: Some(feed::kind_of(&cookies)),
                changes: changed,
                cookies: Some(cookies),
                ..ReadWay::default()
            };
            seq = Some(s);
            if let Some(narrow) = narrow {
                counts = Some(narrow.counts);
                mapping.narrow = Some(narrow.users);
            }
            Ok(mapped(directory, &mut mapping))
        }
        (
            None,
            feed::Way::Full {
                why,
                fallback,
                capture: Some((mut rebuild, cookies)),
            },
        ) => {
            read_way.feed = Some(feed::kind_of(&cookies));
            read_way.why_full = Some(why);
            read_way.fallback = fallback;
            let mut expires: Option<chrono::DateTime<chrono::Utc>> = None;
            let read = {
                let (mapping, rebuild) = (&mut mapping, &mut rebuild);
                let rebuild = std::sync::Mutex::new(rebuild);
                let (ldap, now, expires) = (&pass.config.ldap, pass.now, &mut expires);
                let on_user = &mut |u: &mut DirectoryUser| {
                    if let Ok(mut r) = rebuild.lock() {
                        r.user(u);
                    }
                    let next = source::next_expiry(ldap, std::iter::once(&u.attrs), now);
                    *expires = (*expires).into_iter().chain(next).min();
                    mapping.on_user(u)
                };
                let on_group =
                    &mut |id: &DirectoryId, dn: &str, attrs: &crate::model::Attributes| {
                        if let Ok(mut r) = rebuild.lock() {
                            r.group(id, dn, attrs);
                        }
                    };
                source::read_capturing(
                    &pass.config.ldap,
                    Some(&wanted),
                    on_user,
                    on_group,
                    pass.now,
                )
                .await
            };
            match read {
                Ok(directory) => {
                    let ask = feed_ask(pass, &wanted, &targets);
                    read_way.cookies = Some(cookies.clone());
                    seq = Some(feed::finish_full(&ask, rebuild, cookies, expires)?);
                    Ok(directory)
                }
                Err(e) => {
                    rebuild.abandon();
                    Err(e)
                }
            }
        }
        (None, way) => {
            if let feed::Way::Full { why, fallback, .. } = way {
                read_way.feed = Some(feed::kind_for(&pass.config.ldap));
                read_way.why_full = Some(why);
                read_way.fallback = fallback;
            }
            let on_user = &mut |u: &mut DirectoryUser| mapping.on_user(u);
            source::read_streaming(&pass.config.ldap, Some(&wanted), on_user, pass.now).await
        }
    };
    let directory = match read {
        Ok(directory) => directory,
        Err(e) => {
            // The opening is let finish, so what it records (a loss noticed, the rebuild it
            // leaves pending) does not depend on how fast the read failed.
            let _ = opening.finish().await;
            return Err(e.into());
        }
    };
    let read_duration = read_started.elapsed();
    let (source_users, source_groups) =
        counts.unwrap_or((directory.users.len(), directory.groups.len()));
    let selection =
        (!pass.entries.is_empty()).then(|| plan::Selection::resolve(&directory, pass.entries));
    let managers = mapping.managers.take();
    let (snapshot, mut prepared) = mapping.finish(&targets, directory, opening).await?;
    // Managers outside a target's scope are left out of its users (and said in its plan).
    let mut manager_notes: Vec<Vec<map::ManagerNote>> = Vec::with_capacity(targets.len());
    for (t, p) in targets.iter().zip(prepared.iter_mut()) {
        manager_notes.push(match (&managers, p) {
            (Some(managers), Ok((desired, _, state))) if t.maps_manager() => {
                map::resolve_managers(desired, managers, state)
            }
            _ => Vec::new(),
        });
    }
    let last = match &snapshot {
        Some(s) => s.last_read()?,
        None => None,
    };
    let hold = guard::source_hold(
        source_users,
        source_groups,
        last.as_ref(),
        pass.config.ldap.max_shrink,
    );
    if let Some(h) = &hold {
        warn!(reason = %h.0, "holding every deprovision this cycle");
    }

    // Each target waits only for its own discovery: a dead target's retries delay no other.
    let (snapshot_ref, hold_ref, selection) = (snapshot.as_ref(), hold.as_ref(), &selection);
    let managers_ref = managers.as_ref();
    let outcomes = futures::future::join_all(
        targets
            .iter()
            .zip(prepared)
            .zip(manager_notes)
            .zip(discoveries)
            .map(|(((t, prepared), notes), discovery)| async move {
                let connected = match discovery.await {
                    Ok(c) => c,
                    // Only a panic ends the task early: connect again here.
                    Err(_) => ScimClient::new(t).map(|client| {
                        (client.with_fence(pass.ha.cloned()), Capabilities::default())
                    }),
                };
                let started = std::time::Instant::now();
                let read = ReadFacts {
                    hold: hold_ref,
                    seq,
                    selection: selection.as_ref(),
                    managers: managers_ref,
                    manager_notes: notes,
                };
                let result =
                    reconcile_target(pass, t, snapshot_ref, read, prepared, connected).await;
                let mut outcome =
                    result.unwrap_or_else(|error| failed_target(pass, t, snapshot_ref, error));
                outcome.elapsed = started.elapsed();
                outcome
            }),
    )
    .await;

    if let (Some(s), false) = (&snapshot, pass.dry_run) {
        // The shrink guard compares with the last read that was allowed to count: one that
        // held nothing, or whose held changes an operator approved on every target (a pass
        // over some targets only cannot lift the hold for the others).
        let all_clear = pass.only.is_empty()
            && !pass.partial()
            && outcomes
                .iter()
                .all(|t| t.plan.held.is_empty() && t.error.is_none());
        if (hold.is_none() || all_clear) && !pass.partial() {
            s.set_last_read(&ReadStats {
                users: source_users,
                groups: source_groups,
                at: Some(pass.now),
            })?;
        }
        s.flush().await?;
    }
    Ok(Outcome {
        run_id: pass.run_id.clone(),
        read_duration,
        source_users,
        source_groups,
        targets: outcomes,
        read: read_way,
        epoch: pass.ha.map(|w| w.epoch),
    })
}

/// Maps a directory read already (or assembled from the mirror) for every target.
fn mapped(mut directory: Directory, mapping: &mut StreamingMap) -> Directory {
    directory.users.iter_mut().for_each(|u| mapping.on_user(u));
    directory
}

fn feed_ask<'a>(
    pass: &'a Pass<'_>,
    wanted: &'a [String],
    targets: &'a [&'a TargetConfig],
) -> feed::Ask<'a> {
    feed::Ask {
        cfg: &pass.config.ldap,
        wanted,
        full: pass.full,
        dry_run: pass.dry_run,
        now: pass.now,
        targets,
    }
}

/// The feed named no change and every target had applied the mirror: nothing to plan. Each
/// target is still asked who we are (its `/ServiceProviderConfig` and one user listed, reads
/// only), so a revoked credential fails the target in a cycle with nothing to do.
async fn quiet(
    pass: &Pass<'_>,
    targets: &[&TargetConfig],
    snapshot: Option<Snapshot>,
    clients: Vec<tokio::task::JoinHandle<Result<ScimClient, TargetError>>>,
    (users, groups): (usize, usize),
    seq: u64,
    read_started: std::time::Instant,
) -> Result<Outcome, ReconcileError> {
    let snapshot_ref = snapshot.as_ref();
    let outcomes =
        futures::future::join_all(targets.iter().zip(clients).map(|(t, client)| async move {
            let started = std::time::Instant::now();
            let client = match client.await {
                Ok(built) => built,
                Err(_) => ScimClient::new(t),
            };
            let checked = match client {
                Ok(client) => client.check_connection().await.map(|_| ()),
                Err(e) => Err(e),
            };
            if let Err(e) = checked {
                let mut failed = failed_target(pass, t, snapshot_ref, e.into());
                failed.elapsed = started.elapsed();
                return failed;
            }
            if let (Some(s), false) = (snapshot_ref, pass.dry_run) {
                let run = LastRun {
                    at: pass.now,
                    status: TargetStatus::Ok.as_str().into(),
                    error: None,
                    applied: 0,
                    failed: 0,
                    held: 0,
                    writes: 0,
                };
                if let Err(e) = s.set_last_run(&t.name.0, &run) {
                    warn!(target = %t.name, error = %e, "cannot record the run status");
                }
            }
            let not_kept = snapshot_ref
                .and_then(|s| s.not_kept(&t.name.0).ok())
                .unwrap_or_default();
            TargetOutcome {
                name: t.name.0.clone(),
                status: TargetStatus::Ok,
                error: None,
                plan: Plan {
                    not_kept: not_kept.into_iter().collect(),
                    ..Plan::default()
                },
                applied: None,
                names: BTreeMap::new(),
                elapsed: started.elapsed(),
                rebuild: None,
            }
        }))
        .await;
    if let (Some(s), false) = (&snapshot, pass.dry_run) {
        s.flush().await?;
    }
    info!(run_id = %pass.run_id, seq, "the change feed named no change; every target is up to date");
    Ok(Outcome {
        run_id: pass.run_id.clone(),
        read_duration: read_started.elapsed(),
        source_users: users,
        source_groups: groups,
        targets: outcomes,
        epoch: pass.ha.map(|w| w.epoch),
        read: ReadWay {
            mode: "quiet",
            feed: Some(feed::kind_for(&pass.config.ldap)),
            ..ReadWay::default()
        },
    })
}

/// A target that failed before applying anything (a refused credential, an unusable
/// listing) is recorded too, so `status` does not keep showing its last good run.
fn failed_target(
    pass: &Pass<'_>,
    target: &TargetConfig,
    snapshot: Option<&Snapshot>,
    error: TargetFailure,
) -> TargetOutcome {
    let failed = LastRun {
        at: pass.now,
        status: TargetStatus::Error.as_str().into(),
        error: Some(error.to_string()),
        applied: 0,
        failed: 0,
        held: 0,
        writes: 0,
    };
    if let (Some(s), false) = (snapshot, pass.dry_run) {
        if let Err(e) = s.set_last_run(&target.name.0, &failed) {
            warn!(target = %target.name, error = %e, "cannot record the run status");
        }
        let _ = s.set_feed_progress(&target.name.0, None);
    }
    TargetOutcome {
        name: target.name.0.clone(),
        status: TargetStatus::Error,
        error: Some(error),
        plan: Plan::default(),
        applied: None,
        names: BTreeMap::new(),
        elapsed: Default::default(),
        rebuild: None,
    }
}

/// Observe, decide, act for one target.
/// What the pass's read means for a target.
struct ReadFacts<'r> {
    /// Every deprovision is held (the read shrank too much).
    hold: Option<&'r guard::SourceHold>,
    /// The mirror's position the read reached (with a change feed).
    seq: Option<u64>,
    /// `--only`: the entries the pass touches.
    selection: Option<&'r plan::Selection>,
    /// Users by DN, when some target maps the manager.
    managers: Option<&'r map::Managers>,
    /// This target's users whose manager it does not have.
    manager_notes: Vec<map::ManagerNote>,
}

async fn reconcile_target(
    pass: &Pass<'_>,
    target: &TargetConfig,
    snapshot: Option<&Snapshot>,
    read: ReadFacts<'_>,
    prepared: Prepared,
    connected: Connected,
) -> Result<TargetOutcome, TargetFailure> {
    let ReadFacts {
        hold,
        seq,
        selection,
        managers,
        manager_notes,
    } = read;
    let name = target.name.0.clone();
    let (desired, tsnap, mut state) = prepared?;
    let (client, caps) = connected?;
    // A fast delta plans the users it touches and no group: the plan sees those rows only,
    // while the apply keeps every group row (an account made again leaves its groups).
    let narrowed_view = state.narrowed_from.map(|from| TargetState {
        users: state.users.clone(),
        groups: Default::default(),
        narrowed_from: Some(from),
    });
    let seen = narrowed_view.as_ref().unwrap_or(&state);

    // Observe, and decide what the accounts found mean.
    let (existing_users, existing_groups, mut problems) =
        find_existing(&client, caps, target, pass, &desired, seen).await?;
    let (rebuild, orphans) = find_orphans(
        pass,
        target,
        &client,
        snapshot,
        &desired,
        seen,
        &existing_users,
    )
    .await?;

    // Decide the plan and what the safety limits let through.
    let blocked: BTreeSet<DirectoryId> = problems
        .iter()
        .map(|p| DirectoryId(p.external_id.clone()))
        .collect();
    let not_kept = snapshot
        .and_then(|s| s.not_kept(&name).ok())
        .unwrap_or_default();
    let mut plan = plan::plan(&PlanInput {
        target,
        desired: &desired,
        state: seen,
        existing_users: &existing_users,
        existing_groups: &existing_groups,
        blocked: &blocked,
        not_kept: &not_kept,
        now: pass.now,
    });
    plan.problems.append(&mut problems);
    plan::note_absent_managers(&mut plan, &manager_notes, &desired);
    if let Some(saved) = pass.saved {
        // Exactly what was reviewed: a change planned now that the saved plan does not have
        // with the same fingerprint is not applied; a saved one not planned now is stale.
        saved.narrow(&name, &mut plan.changes);
        plan.problems.retain(|p| saved.names(&name, &p.external_id));
    }
    if let Some(selection) = selection {
        // Only the chosen entries' changes are planned, and the limits count only those.
        selection.narrow(&mut plan, seen);
    }
    let names = plan.member_names(&desired, seen);
    drop_in_background(desired);
    let approved = snapshot.and_then(|s| s.approved(&name).ok().flatten());
    // Narrowed rows (a fast delta) leave out the rows nothing touched: the limits count all.
    let (all_users, all_groups) = state
        .narrowed_from
        .map_or((state.users.len(), state.groups.len()), |n| {
            (n.users, n.groups)
        });
    let extra_users = all_users.saturating_sub(state.users.len());
    let narrowed = narrowed_view.is_some();
    drop(narrowed_view);
    guard::apply_limits(
        &mut plan,
        target.max_deprovisions,
        all_users,
        all_groups,
        hold,
        approved.as_ref(),
        target.rebind,
    );
    guard::add_orphans(&mut plan, orphans, hold, approved.as_ref());
    if let Some(selection) = selection {
        selection.narrow_held(&mut plan, &state);
    }
    if let Some(saved) = pass.saved {
        // Exactly what was reviewed, as the limits leave it (orphans an approval released
        // are not in a saved plan unless it named them).
        plan.stale = saved.finish(&name, &mut plan.changes, &mut plan.held, &state);
    }
    if pass.fingerprints {
        plan.fingerprints = plan
            .changes
            .iter()
            .map(|c| plan::saved::fingerprint(c, &state))
            .collect();
    }
    let (Some(s), Some(tsnap), false) = (snapshot, &tsnap, pass.dry_run) else {
        let status = if plan.held.is_empty() {
            TargetStatus::Ok
        } else {
            TargetStatus::Held
        };
        drop_in_background(state);
        return Ok(TargetOutcome {
            name,
            status,
            error: None,
            plan,
            applied: None,
            names,
            elapsed: Default::default(),
            rebuild,
        });
    };

    // Act.
    let applier = Applier {
        client: &client,
        target,
        snapshot: tsnap,
        now: pass.now,
        stop: pass.stop,
        deadline: pass.deadline,
        progress: pass.progress,
        caps,
        managers,
        ha: pass.ha,
    };
    let floor = plan.row_floor(&state);
    record_row_counts(
        s,
        &name,
        RowCounts {
            users: floor.users + extra_users,
            groups: floor.groups,
        },
    );
    // With `[ha]` every log line of the writes names the epoch they were made under.
    let span = match pass.ha {
        Some(w) => tracing::info_span!("write", epoch = w.epoch),
        None => tracing::Span::none(),
    };
    let report =
        tracing::Instrument::instrument(applier.apply(&mut state, &plan.changes), span).await;
    let rows = RowCounts {
        users: state.users.len() + extra_users,
        groups: state.groups.len(),
    };
    // Accounts waiting to be deleted later have work left although nothing changes.
    // Accounts waiting to be deleted: when the first comes due (a narrowed state has only
    // some rows; the earlier progress knew the others).
    let due = (target.deprovision == crate::config::Deprovision::DeactivateThenDelete)
        .then(|| {
            state
                .users
                .values()
                .filter_map(|r| match r.state {
                    crate::snapshot::UserState::Deactivated { since } => {
                        chrono::Duration::from_std(target.delete_after)
                            .ok()
                            .and_then(|d| since.checked_add_signed(d))
                    }
                    crate::snapshot::UserState::Active => None,
                })
                .min()
        })
        .flatten();
    let due = match (
        narrowed,
        s.feed_progress(&name).ok().flatten().and_then(|p| p.due),
    ) {
        (true, Some(before)) => Some(due.map_or(before, |d| d.min(before))),
        _ => due,
    };
    record_row_counts(s, &name, rows);
    drop_in_background(state);
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
    record_cycle(
        s,
        pass,
        &name,
        &plan,
        &report,
        &not_kept,
        approved.is_some(),
        status,
    );
    if let Some(seq) = seq {
        // A cycle whose every change the target acknowledged has applied the mirror, except
        // where an account had to be made again (its memberships are for the next plan to
        // restore); anything failed, held, waiting or problematic keeps the target planned
        // on the next delta.
        let clean = status == TargetStatus::Ok
            && report.recreated == 0
            && plan.problems.is_empty()
            && plan.held.is_empty()
            && report.failures.is_empty()
            && rebuild.is_none();
        let progress = clean.then(|| FeedProgress {
            seq,
            settings: feed::target_settings(target),
            due,
        });
        if let Err(e) = s.set_feed_progress(&name, progress.as_ref()) {
            warn!(target = %name, error = %e, "cannot record how far the target applied the directory");
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
    Ok(TargetOutcome {
        name,
        status,
        error: None,
        plan,
        applied: Some(report),
        names,
        elapsed: Default::default(),
        rebuild,
    })
}
