//! The daemon: reconciles on `daemon.schedule` (5-field crontab, Sunday = 0 or 7, in
//! `daemon.timezone`), reloads the configuration on SIGHUP, stops cleanly on SIGTERM/SIGINT,
//! talks to systemd (`sd_notify`: READY, STATUS, WATCHDOG, STOPPING) and serves `/metrics`,
//! `/healthz` and `/readyz` on `daemon.listen`.
//!
//! Never runs two cycles at once: a tick that comes while a cycle runs is skipped and counted.
//! A reload never touches the cycle in flight; it applies from the next one. A stop lets the
//! cycle finish the request in flight (the `Pass` stop flag), which flushes the snapshot, and
//! exits within [`STOP_BOUND`].

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

use crate::cli::Cli;
use crate::clock::Clock;
use crate::config::{self, Config, Schedule};
use crate::ha::{Ha, Role, Writer};
use crate::metrics::Metrics;
use crate::mirror::Cookies;
use crate::outcome::{Outcome, TargetStatus};
use crate::reconcile::{self, Pass};

/// How long a stop may wait for the cycle in flight before the process exits anyway.
pub const STOP_BOUND: Duration = Duration::from_secs(30);

/// Testing only: replaces the schedule by a fixed interval (a duration like "2s"), so tests
/// of overlapping ticks need not wait for minute boundaries. The crontab path has unit tests.
pub const TICK_INTERVAL_ENV: &str = "LDAP2SCIM_TICK_INTERVAL";

/// When the next cycle is due: the crontab, or the test-only fixed interval.
enum Ticks {
    Cron(Box<Schedule>),
    Every(Duration),
}

impl Ticks {
    fn new(config: &Config) -> Result<Ticks, String> {
        match std::env::var(TICK_INTERVAL_ENV) {
            Ok(v) if !v.is_empty() => config::parse_duration(&v)
                .map(Ticks::Every)
                .map_err(|e| format!("{TICK_INTERVAL_ENV}: {e}")),
            _ => Ok(Ticks::Cron(Box::new(config.daemon.schedule.clone()))),
        }
    }

    /// When a cycle started at `now` should stop starting changes: a tenth of the interval
    /// (at most a minute) before the next scheduled time. None for the test-only interval,
    /// whose tests want cycles that overlap ticks.
    fn cycle_deadline(&self, now: DateTime<Utc>) -> Option<Instant> {
        let Ticks::Cron(s) = self else { return None };
        let next = s.next_after(now)?;
        let interval = (next - now).to_std().ok()?;
        let margin = (interval / 10).min(Duration::from_secs(60));
        Some(Instant::now() + interval.saturating_sub(margin))
    }

    fn next_after(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Ticks::Cron(s) => s.next_after(now),
            Ticks::Every(d) => chrono::Duration::from_std(*d).ok().map(|d| now + d),
        }
    }
}

/// The systemd notification socket (`NOTIFY_SOCKET`), if the service manager gave one.
/// A datagram per message, as `sd_notify(3)` describes; errors are ignored, as there.
pub struct Notifier {
    socket: Option<(
        std::os::unix::net::UnixDatagram,
        std::os::unix::net::SocketAddr,
    )>,
    /// Half of `WATCHDOG_USEC`, when the watchdog is on for this process.
    pub watchdog_every: Option<Duration>,
}

impl Notifier {
    pub fn from_env() -> Notifier {
        Notifier::new(
            std::env::var("NOTIFY_SOCKET").ok().as_deref(),
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
        )
    }

    fn new(
        socket: Option<&str>,
        watchdog_usec: Option<&str>,
        watchdog_pid: Option<&str>,
    ) -> Notifier {
        let socket = socket.filter(|s| !s.is_empty()).and_then(|s| {
            let addr = if let Some(name) = s.strip_prefix('@') {
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            } else {
                std::os::unix::net::SocketAddr::from_pathname(s)
            };
            // Non-blocking: a manager that does not read must never stall the daemon.
            let sock = std::os::unix::net::UnixDatagram::unbound()
                .and_then(|s| s.set_nonblocking(true).map(|()| s));
            match (sock, addr) {
                (Ok(sock), Ok(addr)) => Some((sock, addr)),
                (Err(e), _) | (_, Err(e)) => {
                    warn!(error = %e, "NOTIFY_SOCKET is unusable; not notifying systemd");
                    None
                }
            }
        });
        let for_us = watchdog_pid
            .map(|p| p.trim().parse::<u32>().ok() == Some(std::process::id()))
            .unwrap_or(true);
        let watchdog_every = watchdog_usec
            .and_then(|u| u.trim().parse::<u64>().ok())
            .filter(|u| *u > 0 && for_us)
            .map(|u| Duration::from_micros(u / 2));
        Notifier {
            socket,
            watchdog_every,
        }
    }

    pub fn notify(&self, state: &str) {
        if let Some((sock, addr)) = &self.socket {
            let _ = sock.send_to_addr(state.as_bytes(), addr);
        }
    }

    /// `STATUS=…`, one line (systemd shows it in `systemctl status`).
    pub fn status(&self, text: &str) {
        self.notify(&format!("STATUS={}", text.replace('\n', " ")));
    }
}

/// Why a full read, when the full schedule asks for one.
pub const FULL_BY_SCHEDULE: &str = "the full schedule (daemon.full_schedule) is due";
/// Why the first cycle after this instance took the lease (`[ha]`) reads in full.
pub const FULL_BY_PROMOTION: &str =
    "this instance just took the lease ([ha]) and there is no change feed whose mirror it kept";

/// One cycle: a reconcile pass, its audit records, its metrics and one log line per target.
/// Returns the one-line summary for `STATUS=`.
#[allow(clippy::too_many_arguments)]
async fn cycle(
    config: Arc<Config>,
    stop: Arc<AtomicBool>,
    metrics: Metrics,
    deadline: Option<Instant>,
    clock: Clock,
    full: bool,
    writer: Option<Writer>,
    promoted: bool,
) -> (String, Option<Cookies>) {
    let started = Instant::now();
    metrics.cycle_started();
    let mut pass = Pass::new(&config, &[], false, &clock);
    pass.stop = Some(&stop);
    pass.deadline = deadline;
    // With a change feed the standby kept its own mirror up to date: a new holder's targets
    // are planned against it in full (their progress is the last writer's, not ours).
    pass.full = if promoted && !reconcile::feed::configured(&config.ldap) {
        Some(FULL_BY_PROMOTION)
    } else {
        full.then_some(FULL_BY_SCHEDULE)
    };
    let run_id = pass.run_id.clone();
    // `[ha]`: first the rows the other instance acknowledged, then the cycle, under the epoch.
    if let Some(w) = &writer {
        if let Err(e) = catch_up(&config, &w.ha, promoted).await {
            metrics.cycle_failed("ha", started.elapsed());
            error!(run_id = %run_id, epoch = w.epoch, error = %e, "cycle not started: the ledger could not be applied to this instance's snapshot; nothing was changed on any target");
            return (format!("last cycle {run_id} failed: ha: {e}"), None);
        }
        pass.ha = Some(w);
    }
    match &writer {
        Some(w) => info!(run_id = %run_id, epoch = w.epoch, "cycle started"),
        None => info!(run_id = %run_id, "cycle started"),
    }
    let result = reconcile::run(&pass).await;
    let elapsed = started.elapsed();
    match result {
        Ok(outcome) => {
            crate::audit::record(&config, &outcome, clock.now());
            metrics.cycle_finished(&outcome, elapsed, unix_now());
            log_summary(&outcome, elapsed);
            (
                summary_status(&outcome, clock.now()),
                outcome.read.cookies.clone(),
            )
        }
        Err(e) => {
            let class = match e {
                reconcile::ReconcileError::Source(_) => "source",
                reconcile::ReconcileError::Snapshot(_) => "snapshot",
                reconcile::ReconcileError::UnknownTarget { .. } => "config",
            };
            metrics.cycle_failed(class, elapsed);
            let what = match e {
                // A failed read plans nothing; a failed flush comes after changes were applied.
                reconcile::ReconcileError::Snapshot(_) => "cycle failed",
                _ => "cycle failed; nothing was changed on any target",
            };
            error!(run_id = %run_id, error = %e, "{what}");
            (format!("last cycle {run_id} failed: {e}"), None)
        }
    }
}

/// The ledger's rows since the last catch-up, applied to this instance's snapshot; a new
/// holder (`seed`) then gives the ledger the rows it lacks.
pub(crate) async fn catch_up(config: &Config, ha: &Ha, seed: bool) -> Result<usize, String> {
    let snapshot =
        crate::snapshot::Snapshot::open(&config.daemon.state_dir).map_err(|e| e.to_string())?;
    let applied = ha.catch_up(&snapshot).await?;
    if seed {
        let targets: Vec<&str> = config.targets.iter().map(|t| t.name.0.as_str()).collect();
        ha.seed(&snapshot, &targets).await?;
    }
    Ok(applied)
}

/// A standby's turn: its snapshot brought up to the ledger; nothing is written anywhere else.
async fn standby_cycle(
    config: Arc<Config>,
    ha: Arc<Ha>,
    metrics: Metrics,
    clock: Clock,
) -> (String, Option<Cookies>) {
    let mut result = catch_up(&config, &ha, false).await;
    // With a change feed, the standby's mirror follows the directory too (no target is planned).
    if result.is_ok() && reconcile::feed::configured(&config.ldap) {
        let mut pass = Pass::new(&config, &[], false, &clock);
        pass.mirror_only = true;
        if let Err(e) = reconcile::run(&pass).await {
            result = Err(format!(
                "the directory's mirror could not be brought up to date: {e}"
            ));
        }
    }
    metrics.standby_caught_up(result.is_ok());
    let who = match ha.role() {
        Role::Standby { holder, epoch, .. } => format!("{holder} holds the lease (epoch {epoch})"),
        Role::Unreachable { reason } => format!("the lease database cannot be reached ({reason})"),
        _ => "the lease is not known yet".into(),
    };
    match result {
        Ok(_) => (
            format!(
                "standby ({}): {who}; snapshot up to the ledger",
                ha.instance()
            ),
            None,
        ),
        Err(e) => {
            warn!(error = %e, "ha: standby: this instance's snapshot could not be brought up to date; trying again");
            (
                format!(
                    "standby ({}): {who}; snapshot not up to date: {e}",
                    ha.instance()
                ),
                None,
            )
        }
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// One summary line per target, with the run id.
fn log_summary(outcome: &Outcome, elapsed: Duration) {
    for t in &outcome.targets {
        let a = t.applied.as_ref();
        let result = t.status.as_str();
        let (applied, failed, writes, not_started) = (
            a.map_or(0, |a| a.applied),
            a.map_or(0, |a| a.failures.len()),
            a.map_or(0, |a| a.writes),
            a.map_or(0, |a| a.not_started),
        );
        let error = t
            .error
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default();
        let error = error.as_str();
        if t.status == TargetStatus::Error {
            warn!(run_id = %outcome.run_id, target = %t.name, result, planned = t.plan.changes.len(), applied, failed, held = t.plan.held.len(), writes, not_started, error, seconds = elapsed.as_secs_f64(), "cycle summary");
        } else {
            info!(run_id = %outcome.run_id, target = %t.name, result, planned = t.plan.changes.len(), applied, failed, held = t.plan.held.len(), writes, not_started, seconds = elapsed.as_secs_f64(), "cycle summary");
        }
    }
}

fn summary_status(outcome: &Outcome, now: DateTime<Utc>) -> String {
    let targets: Vec<String> = outcome
        .targets
        .iter()
        .map(|t| {
            let applied = t.applied.as_ref().map_or(0, |a| a.applied);
            let orphans = t
                .plan
                .held
                .iter()
                .filter(|c| matches!(c, crate::plan::Change::Orphan { .. }))
                .count();
            let mut notes = String::new();
            if t.rebuild.is_some() {
                notes.push_str(", snapshot lost: rebuilding");
            }
            if orphans > 0 {
                notes.push_str(&format!(", {orphans} orphan(s) waiting for approve"));
            }
            format!(
                "{} {} ({applied} applied, {} held{notes})",
                t.name,
                t.status.as_str(),
                t.plan.held.len()
            )
        })
        .collect();
    format!(
        "last cycle {} at {}: {}",
        outcome.run_id,
        now.format("%Y-%m-%d %H:%M:%SZ"),
        targets.join(", ")
    )
}

/// Loads and checks a new configuration for a reload; every problem, if any.
fn reload(cli: &Cli, current: &Config) -> Result<(Config, Ticks), Vec<String>> {
    let new = config::load(&cli.config)
        .map_err(|errs| errs.0.iter().map(|e| e.to_string()).collect::<Vec<_>>())?;
    let mut problems = Vec::new();
    if new.daemon.state_dir != current.daemon.state_dir {
        problems.push(format!(
            "daemon.state_dir changed from {} to {}: that needs a restart",
            current.daemon.state_dir.display(),
            new.daemon.state_dir.display()
        ));
    }
    let ticks = Ticks::new(&new).map_err(|e| problems.push(e)).ok();
    match ticks {
        Some(t) if problems.is_empty() => {
            if new.daemon.listen != current.daemon.listen {
                warn!("daemon.listen changed; the metrics endpoint moves only on a restart");
            }
            Ok((new, t))
        }
        _ => Err(problems),
    }
}

type CycleFuture = Pin<Box<dyn Future<Output = (String, Option<Cookies>)>>>;

/// Runs the daemon until SIGTERM/SIGINT; returns the exit code. `clock` decides when cycles
/// are due.
pub async fn run(cli: &Cli, config: Config, run_now: bool, clock: Clock) -> u8 {
    let (mut term, mut int, mut hup) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) {
        (Ok(t), Ok(i), Ok(h)) => (t, i, h),
        _ => {
            eprintln!("ldap2scim: error: cannot install signal handlers");
            return 1;
        }
    };
    let mut ticks = match Ticks::new(&config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ldap2scim: error: {e}");
            return 1;
        }
    };
    let metrics = Metrics::default();
    // `[ha]`: the lease, kept in the background; cycles write only while it is ours.
    let ha = match config
        .ha
        .clone()
        .map(|c| Ha::open(c, false, &config.daemon.state_dir))
    {
        Some(Ok(ha)) => Some(ha),
        Some(Err(e)) => {
            eprintln!("ldap2scim: error: ha: {e}");
            return 1;
        }
        None => None,
    };
    // Subscribed before the keeper starts, so its first role is seen.
    let (_no_ha, no_ha_rx) = tokio::sync::watch::channel("none");
    let mut ha_rx = ha.as_ref().map_or(no_ha_rx, |h| h.watch());
    let mut keeper = ha
        .as_ref()
        .map(|ha| AbortOnDrop(tokio::spawn(ha.clone().keep(true))));
    let _endpoint = match config.daemon.listen {
        Some(addr) => match crate::metrics::bind(addr).await {
            Ok(listener) => {
                info!(listen = %addr, "serving /metrics, /healthz and /readyz");
                Some(AbortOnDrop(tokio::spawn(crate::metrics::serve(
                    listener,
                    metrics.clone(),
                ))))
            }
            Err(e) => {
                eprintln!("ldap2scim: error: cannot listen on {addr} (daemon.listen): {e}");
                return 1;
            }
        },
        None => None,
    };
    // The control socket: commands run by hand are answered here, between cycles.
    let (jobs_tx, mut jobs_rx) = tokio::sync::mpsc::channel::<crate::control::Job>(16);
    let control = match crate::control::bind(&config.daemon.state_dir) {
        Ok((listener, path)) => {
            info!(socket = %path.display(), "serving the control socket (plan, explain, status, approve and sync run by hand are answered here)");
            Some(ControlSocket {
                _server: AbortOnDrop(tokio::spawn(crate::control::serve(listener, jobs_tx))),
                state_dir: config.daemon.state_dir.clone(),
                path,
            })
        }
        Err(e) => {
            warn!(error = %e, "cannot serve the control socket; commands run by hand wait until the daemon stops");
            None
        }
    };
    let socket_path = control.as_ref().map(|c| c.path.clone());
    // A command being answered, and whether a cycle waits for it to end.
    let mut answering: Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>> = None;
    let mut cycle_waits = false;
    let notifier = Notifier::from_env();
    let mut config = Arc::new(config);
    let stop = Arc::new(AtomicBool::new(false));
    info!(schedule = %config.daemon.schedule, timezone = %config.daemon.timezone, "daemon started");
    notifier.notify("READY=1");
    notifier.status("started; waiting for the first cycle");

    let mut running: Option<CycleFuture> = None;
    // A cycle starts nothing new shortly before the next one is due, so a slow target costs
    // the others no scheduled cycle (its remaining changes go in the next one).
    // A cycle is a full read when the full schedule had a time since the previous cycle
    // started (with a change feed the others are deltas).
    let last_started = std::cell::Cell::new(clock.now());
    // `[ha]`: the epoch the last cycle wrote under (the first under a new one reads in full).
    let last_epoch = std::cell::Cell::new(None::<i64>);
    let start_cycle = |config: &Arc<Config>, ticks: &Ticks| -> CycleFuture {
        let writer = match &ha {
            Some(ha) => match Writer::now(ha) {
                Some(w) => Some(w),
                None => {
                    return Box::pin(standby_cycle(
                        config.clone(),
                        ha.clone(),
                        metrics.clone(),
                        clock,
                    ));
                }
            },
            None => None,
        };
        let epoch = writer.as_ref().map(|w| w.epoch);
        let promoted = epoch.is_some() && last_epoch.replace(epoch) != epoch;
        let now = clock.now();
        let deadline = ticks.cycle_deadline(now);
        let full = config
            .daemon
            .full_schedule
            .next_after(last_started.get())
            .is_some_and(|due| due <= now);
        last_started.set(now);
        Box::pin(cycle(
            config.clone(),
            stop.clone(),
            metrics.clone(),
            deadline,
            clock,
            full,
            writer,
            promoted,
        ))
    };
    if run_now {
        running = Some(start_cycle(&config, &ticks));
    }
    let mut watchdog =
        tokio::time::interval(notifier.watchdog_every.unwrap_or(Duration::from_secs(3600)));
    watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next = ticks.next_after(clock.now());
    // `[ha]`: how often a standby applies the ledger.
    let mut standby_tick =
        tokio::time::interval(config.ha.as_ref().map_or(Duration::from_secs(3600), |h| {
            (h.lease_ttl / 3).max(Duration::from_millis(500))
        }));
    standby_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stop_deadline: Option<tokio::time::Instant> = None;
    // `[ha]`: the role changed while the daemon was busy; a cycle starts once it is not.
    let mut role_changed = false;
    // Live mode: a persistent search that says when the directory changed, started after a
    // cycle that used the change feed (from its cookies), restarted after a reload.
    let (live_tx, mut live_rx) = tokio::sync::mpsc::channel::<Live>(1);
    let mut watch: Option<AbortOnDrop> = None;
    // When the change that started the running cycle was received, and written where the
    // entry said (for the latency metric).
    let mut live_since: Option<(Instant, Option<DateTime<Utc>>)> = None;
    let mut last_status = String::from("no cycle yet");
    // The next cycle time last logged and sent as STATUS (said once, not at every wake-up).
    let mut announced: Option<DateTime<Utc>> = None;
    loop {
        let Some(due) = next else {
            error!("the schedule has no future run; stopping");
            return 1;
        };
        if running.is_none() && answering.is_none() && stop_deadline.is_some() {
            if let Some(ha) = &ha {
                // The keeper first, so it cannot take the lease again after the release.
                keeper.take();
                ha.release().await;
            }
            info!("stopped cleanly");
            return 0;
        }
        if running.is_none() && announced != Some(due) {
            announced = Some(due);
            info!(next = %due, "next cycle scheduled");
            notifier.status(&format!(
                "{last_status}; next cycle {}",
                due.format("%Y-%m-%d %H:%M:%SZ")
            ));
        }
        let wait = (due - clock.now()).to_std().unwrap_or_default();
        let deadline = stop_deadline
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(86400 * 365));
        tokio::select! {
            (summary, cookies) = async { running.as_mut().expect("guarded").await }, if running.is_some() => {
                running = None;
                announced = None;
                last_status = summary;
                if let Some((received, written)) = live_since.take() {
                    // From the write where the entry carries its time (a clock behind the
                    // directory's counts from receipt), else from receipt.
                    let from_write = written
                        .and_then(|w| (Utc::now() - w).to_std().ok())
                        .filter(|d| *d >= received.elapsed());
                    metrics.live_latency(from_write.unwrap_or_else(|| received.elapsed()));
                }
                if std::mem::take(&mut role_changed) && answering.is_none() && stop_deadline.is_none() {
                    running = Some(start_cycle(&config, &ticks));
                }
                if let (Some(cookies), true, None) = (cookies, config.daemon.live, &watch) {
                    info!(delay = ?config.daemon.live_delay, "live: watching the directory for changes between cycles");
                    watch = Some(AbortOnDrop(tokio::spawn(live_watch(config.clone(), cookies, live_tx.clone()))));
                }
            }
            Some((request, reply)) = jobs_rx.recv(), if running.is_none() && answering.is_none() && stop_deadline.is_none() => {
                let (config_path, socket) = (cli.config.clone(), socket_path.clone().unwrap_or_default());
                answering = Some(Box::pin(async move {
                    let answer = crate::control::run_child(&config_path, &socket, request).await;
                    let _ = reply.send(answer);
                }));
            }
            () = async { answering.as_mut().expect("guarded").await }, if answering.is_some() => {
                answering = None;
                if std::mem::take(&mut role_changed) && stop_deadline.is_none() {
                    cycle_waits = true;
                }
                if cycle_waits && stop_deadline.is_none() {
                    cycle_waits = false;
                    running = Some(start_cycle(&config, &ticks));
                }
            }
            Some(first) = live_rx.recv(), if running.is_none() && answering.is_none() && stop_deadline.is_none() => {
                if first.poll {
                    // Active Directory: the delta cycle is the poll; latency is not known.
                    tracing::debug!("live: polling the directory for changes");
                } else {
                    // Changes are gathered for daemon.live_delay, then applied in one delta cycle.
                    tokio::time::sleep(config.daemon.live_delay).await;
                    let mut written = first.written;
                    while let Ok(more) = live_rx.try_recv() {
                        written = written.into_iter().chain(more.written).min();
                    }
                    info!(waited_ms = first.at.elapsed().as_millis() as u64, "live: the directory changed; applying");
                    live_since = Some((first.at, written));
                }
                running = Some(start_cycle(&config, &ticks));
            }
            _ = tokio::time::sleep(wait), if stop_deadline.is_none() => {
                if running.is_none() && answering.is_some() {
                    info!(due = %due, "a command run by hand is being answered; the cycle starts when it is done");
                    cycle_waits = true;
                } else if running.is_some() {
                    metrics.tick_skipped();
                    warn!(due = %due, skipped = metrics.ticks_skipped(), "a cycle is still running; this scheduled cycle is skipped");
                } else {
                    running = Some(start_cycle(&config, &ticks));
                }
                next = ticks.next_after(clock.now().max(due));
            }
            _ = watchdog.tick(), if notifier.watchdog_every.is_some() => notifier.notify("WATCHDOG=1"),
            Ok(()) = ha_rx.changed(), if ha.is_some() => {
                let role = *ha_rx.borrow_and_update();
                let h = ha.as_ref().expect("guarded");
                let epoch = match h.role() {
                    Role::Active { epoch, .. } | Role::Standby { epoch, .. } => epoch,
                    _ => 0,
                };
                metrics.ha(role, epoch);
                notifier.status(&format!("ha: {} is {role} (epoch {epoch}); {last_status}", h.instance()));
                // Promoted: the work the other instance left is finished at once; a standby
                // brings its snapshot up to the ledger as the other instance writes.
                if running.is_none() && answering.is_none() && stop_deadline.is_none() {
                    running = Some(start_cycle(&config, &ticks));
                } else {
                    role_changed = true;
                }
            }
            _ = standby_tick.tick(), if ha.as_ref().is_some_and(|h| h.epoch().is_none()) && running.is_none() && answering.is_none() && stop_deadline.is_none() => {
                running = Some(start_cycle(&config, &ticks));
            }
            _ = tokio::time::sleep_until(deadline), if stop_deadline.is_some() => {
                warn!(bound = ?STOP_BOUND, "the cycle in flight did not finish in time; exiting anyway (acknowledged changes are already in the snapshot)");
                return 0;
            }
            sig = async { tokio::select! { _ = term.recv() => "SIGTERM", _ = int.recv() => "SIGINT" } } => {
                if stop_deadline.is_some() {
                    continue;
                }
                stop.store(true, Ordering::SeqCst);
                stop_deadline = Some(tokio::time::Instant::now() + STOP_BOUND);
                notifier.notify("STOPPING=1");
                if running.is_some() {
                    info!(signal = sig, "stopping: the cycle finishes the request in flight and starts nothing new");
                    notifier.status("stopping: finishing the request in flight");
                } else {
                    info!(signal = sig, "stopping");
                }
            }
            _ = hup.recv() => {
                match reload(cli, &config) {
                    Ok((new, new_ticks)) => {
                        metrics.reload(true);
                        info!(targets = new.targets.len(), schedule = %new.daemon.schedule, "SIGHUP: configuration reloaded; it applies from the next cycle");
                        ticks = new_ticks;
                        config = Arc::new(new);
                        // The watch starts again from the next cycle, with the new settings.
                        watch = None;
                        next = ticks.next_after(clock.now());
                    }
                    Err(problems) => {
                        metrics.reload(false);
                        error!(problems = problems.len(), "SIGHUP: the new configuration is invalid and was rejected; the running one stays in force");
                        for p in &problems {
                            error!("SIGHUP: rejected: {p}");
                        }
                    }
                }
            }
        }
    }
}

/// The control socket while the daemon runs; its pointer and socket go when it stops.
struct ControlSocket {
    _server: AbortOnDrop,
    state_dir: std::path::PathBuf,
    path: std::path::PathBuf,
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        crate::control::unbind(&self.state_dir, &self.path);
    }
}

/// Live mode's watch: persistent searches that signal `tx` on every change, reconnected with
/// backoff (1 s doubling to 60 s, back to 1 s after a watch that lasted a minute). The cookies
/// only bound what the server replays on a reconnect: the cycles read from their own.
/// One signal of live mode: a change received at `at` (written at `written`, where the entry
/// said), or an Active Directory poll.
struct Live {
    at: Instant,
    written: Option<DateTime<Utc>>,
    poll: bool,
}

async fn live_watch(config: Arc<Config>, cookies: Cookies, tx: tokio::sync::mpsc::Sender<Live>) {
    if config.ldap.dialect == crate::config::Dialect::ActiveDirectory {
        // DirSync and uSNChanged have no persistent search: a delta cycle every
        // daemon.live_interval is the poll (one that finds nothing writes nothing).
        let mut every = tokio::time::interval(config.daemon.live_interval);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every.tick().await;
        loop {
            every.tick().await;
            let _ = tx.try_send(Live {
                at: Instant::now(),
                written: None,
                poll: true,
            });
        }
    }
    let mut backoff = Duration::from_secs(1);
    loop {
        let started = Instant::now();
        let signal = |written: Option<DateTime<Utc>>| {
            // A full channel already wakes the daemon; the earliest write is in it or lost
            // to the latency metric only.
            let _ = tx.try_send(Live {
                at: Instant::now(),
                written,
                poll: false,
            });
        };
        let ended = crate::source::watch(&config.ldap, &cookies, &signal).await;
        if started.elapsed() > Duration::from_secs(60) {
            backoff = Duration::from_secs(1);
        }
        match ended {
            Err(e) => {
                warn!(error = %e, retry_in = ?backoff, "live: the change feed connection ended; reconnecting")
            }
            Ok(()) => warn!(retry_in = ?backoff, "live: the change feed ended; reconnecting"),
        }
        // A change may have been missed while the watch was down: one delta cycle finds it.
        let _ = tx.try_send(Live {
            at: Instant::now(),
            written: None,
            poll: false,
        });
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(60));
    }
}

/// Aborts the metrics endpoint task when the daemon returns.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_systemd_status_says_a_lost_snapshot_and_waiting_orphans() {
        let outcome = crate::outcome::held_orphan_outcome("lost");
        let at = Clock::fixed(Utc.with_ymd_and_hms(2026, 11, 28, 12, 0, 0).unwrap());
        let line = summary_status(&outcome, at.now());
        assert!(
            line.contains("app held (0 applied, 1 held, snapshot lost: rebuilding, 1 orphan(s) waiting for approve)"),
            "{line}"
        );
        assert!(line.contains("at 2026-11-28 12:00:00Z"), "{line}");
    }
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn a_cycle_yields_shortly_before_the_next_one_is_due() {
        let ticks = Ticks::Cron(Box::new(Schedule::new("*/15 * * * *", "UTC").unwrap()));
        let now = Utc.with_ymd_and_hms(2026, 11, 28, 12, 0, 0).unwrap();
        let before = Instant::now();
        let deadline = ticks.cycle_deadline(now).unwrap();
        // 15 minutes to the next cycle, minus a tenth capped at a minute: 14 minutes.
        let budget = deadline - before;
        assert!(
            budget <= Duration::from_secs(14 * 60 + 1) && budget > Duration::from_secs(14 * 60 - 5),
            "{budget:?}"
        );
        assert!(Ticks::Every(Duration::from_secs(1))
            .cycle_deadline(now)
            .is_none());
    }

    #[test]
    fn notifies_a_path_or_an_abstract_socket_and_halves_the_watchdog_interval() {
        use std::os::linux::net::SocketAddrExt;
        use std::os::unix::net::{SocketAddr, UnixDatagram};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::new(path.to_str(), Some("2000000"), None);
        n.notify("READY=1");
        n.status("two\nlines");
        let mut buf = [0u8; 256];
        let len = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1");
        let len = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"STATUS=two lines");
        assert_eq!(n.watchdog_every, Some(Duration::from_secs(1)));

        let name = format!("ldap2scim-test-{}", std::process::id());
        let abstract_listener =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        Notifier::new(Some(&format!("@{name}")), None, None).notify("WATCHDOG=1");
        let len = abstract_listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"WATCHDOG=1");

        // The watchdog belongs to another process: no pings from this one.
        let other = Notifier::new(None, Some("2000000"), Some("1"));
        assert_eq!(other.watchdog_every, None);
        // No socket: notifying is a no-op.
        Notifier::new(None, None, None).notify("READY=1");
    }
}
