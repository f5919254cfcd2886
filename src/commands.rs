//! The commands behind the command line, each returning its exit code as SPEC.md defines it.
//! Messages go to stderr; reports go to stdout (or `--out`).

use std::io::Write;

use serde_json::json;

use crate::cli::{Cli, Command, ReportFormat};
use crate::clock::Clock;
use crate::config::{self, Config};
use crate::ha::{Ha, Writer};
use crate::lock::{LockError, StateLock};
use crate::model::{DirectoryId, Entry};
use crate::outcome::{Outcome, TargetStatus};
use crate::progress::ProgressBars;
use crate::reconcile::{self, Pass};
use crate::report::{self, Format};
use crate::snapshot::Snapshot;

pub const EXIT_OK: u8 = 0;
pub const EXIT_ERROR: u8 = 1;
pub const EXIT_CHANGES_PENDING: u8 = 2;
pub const EXIT_PARTIAL: u8 = 3;
pub const EXIT_HELD: u8 = 4;
/// `sync --plan`: some saved changes were stale (the rest applied).
pub const EXIT_STALE: u8 = 5;

fn fail(msg: impl std::fmt::Display) -> u8 {
    eprintln!("ldap2scim: error: {msg}");
    EXIT_ERROR
}

fn load_config(cli: &Cli) -> Result<Config, u8> {
    config::load(&cli.config).map_err(|errs| {
        eprintln!(
            "ldap2scim: the configuration is invalid ({} problem(s)):",
            errs.0.len()
        );
        for e in &errs.0 {
            eprintln!("  {e}");
        }
        EXIT_ERROR
    })
}

pub async fn execute(cli: Cli) -> u8 {
    // While the daemon holds the state directory, it answers these itself.
    if matches!(
        cli.command,
        Command::Plan { .. }
            | Command::Explain { .. }
            | Command::Status
            | Command::Approve { .. }
            | Command::Sync { .. }
    ) {
        let args: Vec<String> = std::env::args_os()
            .skip(1)
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let config_path = cli.config.clone();
        let forwarded =
            tokio::task::spawn_blocking(move || crate::control::forward(&config_path, &args))
                .await
                .ok()
                .flatten();
        if let Some(code) = forwarded {
            return code;
        }
    }
    let config = match load_config(&cli) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let clock = Clock::from_env();
    // Commands that write the snapshot hold the state directory for as long as they run.
    let _lock = match &cli.command {
        // The daemon's own child works under the daemon's lock.
        Command::Sync { .. } | Command::Approve { .. }
            if crate::control::inside_daemon(&config.daemon.state_dir) =>
        {
            None
        }
        Command::Run { .. } | Command::Sync { .. } | Command::Approve { .. } => {
            match StateLock::acquire_at(
                &config.daemon.state_dir,
                command_name(&cli.command),
                &clock,
            ) {
                Ok(lock) => Some(lock),
                Err(e) => return fail(e),
            }
        }
        _ => None,
    };
    match &cli.command {
        Command::Run { now } => crate::daemon::run(&cli, config, *now, clock).await,
        Command::Sync {
            saved_plan: Some(file),
            max_age,
            targets,
            ..
        } => sync_saved(&config, targets, file, max_age, &clock).await,
        Command::Sync {
            targets,
            full,
            only,
            ..
        } => sync(&config, targets, *full, only, &clock).await,
        Command::Plan {
            targets,
            full,
            only,
            format,
            out,
        } => {
            let format = format.unwrap_or(if out.is_some() {
                ReportFormat::Json
            } else {
                ReportFormat::Text
            });
            plan(
                &config,
                targets,
                *full,
                only,
                report_format(format),
                out.as_deref(),
                &clock,
            )
            .await
        }
        Command::Check { connect } => check(&config, *connect).await,
        Command::Status => status(&config, &clock).await,
        Command::Explain { name_or_dn } => explain(&config, name_or_dn, &clock).await,
        Command::Approve { target } => approve(&config, target).await,
    }
}

fn command_name(command: &Command) -> &'static str {
    match command {
        Command::Run { .. } => "run",
        Command::Sync { .. } => "sync",
        Command::Plan { .. } => "plan",
        Command::Check { .. } => "check",
        Command::Status => "status",
        Command::Explain { .. } => "explain",
        Command::Approve { .. } => "approve",
    }
}

fn report_format(format: ReportFormat) -> Format {
    match format {
        ReportFormat::Text => Format::Text,
        ReportFormat::Json => Format::Json,
        ReportFormat::Markdown => Format::Markdown,
    }
}

/// One reconcile now. The caller holds the state directory lock.
pub async fn sync(
    config: &Config,
    targets: &[String],
    full: bool,
    entries: &[String],
    clock: &Clock,
) -> u8 {
    let bars = ProgressBars::for_terminal();
    let hook = |target: &str, done: usize, total: usize| {
        if let Some(b) = &bars {
            b.update(target, done, total);
        }
    };
    let lease = match HandLease::take(config).await {
        Ok(l) => l,
        Err(code) => return code,
    };
    let mut pass = Pass::new(config, targets, false, clock);
    pass.full = full.then_some(FULL_BY_HAND);
    pass.entries = entries;
    pass.ha = lease.writer();
    if bars.is_some() {
        pass.progress = Some(&hook);
    }
    let result = reconcile::run(&pass).await;
    lease.end().await;
    if let Some(b) = &bars {
        b.finish();
    }
    match result {
        Ok(outcome) => {
            crate::audit::record(config, &outcome, clock.now());
            print!("{}", report::sync_lines(&outcome));
            let _ = std::io::stdout().flush();
            if any_target_is(&outcome, TargetStatus::Error) {
                EXIT_PARTIAL
            } else if any_target_is(&outcome, TargetStatus::Held) {
                EXIT_HELD
            } else {
                EXIT_OK
            }
        }
        Err(e) => fail(e),
    }
}

/// `sync --plan FILE`: exactly the saved plan's changes that still match. The caller holds
/// the state directory lock.
pub async fn sync_saved(
    config: &Config,
    targets: &[String],
    file: &std::path::Path,
    max_age: &str,
    clock: &Clock,
) -> u8 {
    let max_age = match crate::config::parse_duration(max_age) {
        Ok(d) => d,
        Err(e) => return fail(format!("--max-age {max_age:?}: {e}")),
    };
    let saved = match crate::plan::SavedPlan::read(file, config, clock.now(), max_age) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    // The saved plan's targets (or those of them --target names).
    let names: Vec<String> = saved
        .targets
        .keys()
        .filter(|n| targets.is_empty() || targets.contains(n))
        .cloned()
        .collect();
    if names.is_empty() {
        return fail(format!(
            "the plan file {} names no target to apply (--target)",
            file.display()
        ));
    }
    let lease = match HandLease::take(config).await {
        Ok(l) => l,
        Err(code) => return code,
    };
    let mut pass = Pass::new(config, &names, false, clock);
    pass.saved = Some(&saved);
    pass.ha = lease.writer();
    let result = reconcile::run(&pass).await;
    lease.end().await;
    let outcome = match result {
        Ok(o) => o,
        Err(e) => return fail(e),
    };
    crate::audit::record(config, &outcome, clock.now());
    print!("{}", report::sync_lines(&outcome));
    let _ = std::io::stdout().flush();
    if any_target_is(&outcome, TargetStatus::Error) {
        EXIT_ERROR
    } else if outcome.targets.iter().any(|t| !t.plan.stale.is_empty()) {
        EXIT_STALE
    } else if any_target_is(&outcome, TargetStatus::Held) {
        EXIT_HELD
    } else {
        EXIT_OK
    }
}

/// `[ha]` for a `sync` run by hand: the lease, renewed while the pass runs. The daemon's own
/// child works under the daemon's lease and epoch; any other `sync` takes the lease (with a
/// new epoch) only if it ended, or if a process of this instance held it (we hold the state
/// directory's lock, so that process is gone). Rows the other instance acknowledged are
/// applied to the snapshot first.
struct HandLease {
    held: Option<(
        std::sync::Arc<Ha>,
        Writer,
        tokio::task::JoinHandle<()>,
        bool,
    )>,
}

impl HandLease {
    async fn take(config: &Config) -> Result<HandLease, u8> {
        let Some(cfg) = &config.ha else {
            return Ok(HandLease { held: None });
        };
        let joined = crate::control::inside_daemon(&config.daemon.state_dir);
        let ha = match Ha::open(cfg.clone(), joined, &config.daemon.state_dir) {
            Ok(ha) => ha,
            Err(e) => return Err(fail(format!("ha: {e}; nothing was written"))),
        };
        ha.step(!joined).await;
        let Some(writer) = Writer::now(&ha) else {
            let why = ha
                .fence(std::time::Duration::ZERO)
                .err()
                .unwrap_or_default();
            return Err(fail(format!("ha: {why}; nothing was written (run sync on the instance that holds the lease, or wait for it to end)")));
        };
        let keeper = tokio::spawn(ha.clone().keep(false));
        let caught_up = crate::daemon::catch_up(config, &ha, !joined).await;
        if let Err(e) = caught_up {
            keeper.abort();
            if !joined {
                ha.release().await;
            }
            return Err(fail(format!("ha: the ledger could not be applied to this instance's snapshot ({e}); nothing was written")));
        }
        Ok(HandLease {
            held: Some((ha, writer, keeper, joined)),
        })
    }

    fn writer(&self) -> Option<&Writer> {
        self.held.as_ref().map(|(_, w, _, _)| w)
    }

    /// Stops renewing; a lease this command took is released.
    async fn end(&self) {
        if let Some((ha, _, keeper, joined)) = &self.held {
            keeper.abort();
            if !joined {
                ha.release().await;
            }
        }
    }
}

fn any_target_is(outcome: &Outcome, status: TargetStatus) -> bool {
    outcome.targets.iter().any(|t| t.status == status)
}

/// Why a full read, when `--full` asks for one.
pub const FULL_BY_HAND: &str = "a full read was asked for (--full)";

async fn plan(
    config: &Config,
    targets: &[String],
    full: bool,
    entries: &[String],
    format: Format,
    out: Option<&std::path::Path>,
    clock: &Clock,
) -> u8 {
    let mut pass = Pass::new(config, targets, true, clock);
    pass.full = full.then_some(FULL_BY_HAND);
    pass.entries = entries;
    // A json report written to a file is a saved plan.
    let saving = out.is_some() && format == Format::Json;
    pass.fingerprints = saving;
    let outcome = match reconcile::run(&pass).await {
        Ok(o) => o,
        Err(e) => return fail(e),
    };
    let rendered = if saving {
        let mut json = report::to_json(&outcome);
        match crate::plan::saved::header(config, pass.now) {
            Ok(header) => json["saved"] = header,
            Err(e) => return fail(e),
        }
        let mut text = serde_json::to_string_pretty(&json).expect("a report serializes");
        text.push('\n');
        text
    } else {
        report::render(&outcome, format)
    };
    match out {
        Some(path) => {
            if let Err(e) = std::fs::write(path, rendered) {
                return fail(format!(
                    "cannot write the report to {} (--out): {e}",
                    path.display()
                ));
            }
        }
        None => {
            print!("{rendered}");
            let _ = std::io::stdout().flush();
        }
    }
    for t in &outcome.targets {
        if let Some(e) = &t.error {
            eprintln!("ldap2scim: target {}: {e}", t.name);
        }
    }
    if any_target_is(&outcome, TargetStatus::Error) {
        EXIT_ERROR
    } else if outcome
        .targets
        .iter()
        .any(|t| !t.plan.is_empty() || t.plan.problems.iter().any(|p| p.fails))
    {
        // An entry that cannot be provisioned is pending work too: `sync` would report it
        // (exit 3), so the plan must not say "nothing to do".
        EXIT_CHANGES_PENDING
    } else {
        EXIT_OK
    }
}

async fn check(config: &Config, connect: bool) -> u8 {
    println!(
        "configuration {} is valid: {} target(s)",
        config.path.display(),
        config.targets.len()
    );
    if !connect {
        return EXIT_OK;
    }
    let mut failed = false;
    match crate::source::check_connection(&config.ldap).await {
        Ok(url) => {
            println!("ldap: bound to {url}");
            println!("ldap: {}", feed_mode(&config.ldap).await);
        }
        Err(e) => {
            failed = true;
            eprintln!("ldap2scim: ldap: {e}");
        }
    }
    // Each target is read as a cycle reads it: /ServiceProviderConfig (which many serve to
    // anyone) and one user listed with its credentials, so a wrong or revoked one fails here.
    for t in &config.targets {
        let result = match crate::scim::ScimClient::new(t) {
            Ok(c) => c.check_connection().await,
            Err(e) => Err(e),
        };
        match result {
            Ok((_, spc)) => println!(
                "target {}: {}; its credentials were accepted (one user listed)",
                t.name,
                if spc {
                    "/ServiceProviderConfig answered"
                } else {
                    "no usable /ServiceProviderConfig (defaults apply)"
                }
            ),
            Err(e) if crate::scim::is_auth_failure(&e) => {
                failed = true;
                eprintln!(
                    "ldap2scim: {e}\nldap2scim: target {}: its credentials were refused: check `auth` in its target file",
                    t.name
                );
            }
            Err(e) => {
                failed = true;
                eprintln!("ldap2scim: {e}");
            }
        }
    }
    if let Some(cfg) = &config.ha {
        match Ha::new(cfg.clone(), true).pair_status().await {
            Ok(p) => println!(
                "ha: the lease database answered (tables ready); the lease is {} (epoch {}); this instance is {}",
                if p.remaining > 0.0 && !p.holder.is_empty() {
                    format!("held by {}", p.holder)
                } else {
                    "free".to_string()
                },
                p.epoch,
                cfg.instance
            ),
            Err(e) => {
                failed = true;
                eprintln!("ldap2scim: ha: the lease database (ha.lease.postgres) cannot be used: {e}");
            }
        }
    }
    if failed {
        EXIT_ERROR
    } else {
        EXIT_OK
    }
}

async fn status(config: &Config, clock: &Clock) -> u8 {
    let state_dir = &config.daemon.state_dir;
    let holder = crate::lock::holder(state_dir);
    if let Some(h) = &holder {
        println!(
            "state directory {} is held by ldap2scim ({h})",
            state_dir.display()
        );
    }
    let snapshot = match Snapshot::open_existing(state_dir) {
        Ok(Some(s)) => Some(s),
        Ok(None) => {
            println!(
                "no sync has run yet (state directory {})",
                state_dir.display()
            );
            None
        }
        // The snapshot is open in the process holding the lock (a cycle is running).
        Err(_) if holder.is_some() => {
            println!("a cycle is running right now; run `status` again when it has finished");
            None
        }
        // `status` always answers (exit 0): it says what it cannot read.
        Err(e) => {
            println!("cannot read the snapshot: {e}");
            None
        }
    };
    if let Some(ha) = &config.ha {
        print_pair_status(ha, snapshot.as_ref()).await;
    }
    if let Some(snapshot) = &snapshot {
        if let Some(why) = snapshot.lost() {
            println!(
                "WARNING: the snapshot in {} (daemon.state_dir) is not the one written there: {why}. The next sync rebuilds it from the targets and lists orphans for `ldap2scim approve`",
                state_dir.display()
            );
        }
        print_feed_status(config, snapshot, clock.now());
        print_feed_waiting(config, snapshot, clock.now()).await;
        for t in &config.targets {
            print_target_status(snapshot, &t.name.0);
        }
    }
    match config.daemon.schedule.next_after(clock.now()) {
        Some(next) => println!(
            "next scheduled run: {next} (daemon.schedule \"{}\", {})",
            config.daemon.schedule, config.daemon.timezone
        ),
        None => println!(
            "next scheduled run: none (daemon.schedule \"{}\")",
            config.daemon.schedule
        ),
    }
    EXIT_OK
}

/// `[ha]`: who holds the lease, its epoch and expiry, and both instances as the lease
/// database last heard of them.
async fn print_pair_status(cfg: &crate::config::HaConfig, snapshot: Option<&Snapshot>) {
    let ha = Ha::new(cfg.clone(), true);
    let me = &cfg.instance;
    match ha.pair_status().await {
        Err(e) => println!(
            "ha: the lease database cannot be reached ({e}): no instance writes until it answers (this instance is {me})"
        ),
        Ok(p) => {
            let holder = if p.holder.is_empty() {
                "nobody".to_string()
            } else if &p.holder == me {
                format!("{} (this instance)", p.holder)
            } else {
                p.holder.clone()
            };
            if p.remaining > 0.0 {
                println!(
                    "ha: lease held by {holder}, epoch {}, expires {} (in {:.0}s; lease_ttl {})",
                    p.epoch,
                    p.expires_at.format("%Y-%m-%d %H:%M:%SZ"),
                    p.remaining,
                    humantime(cfg.lease_ttl)
                );
            } else {
                println!(
                    "ha: the lease is free (last held by {holder}, epoch {}, ended {}): the next instance to ask takes it",
                    p.epoch,
                    p.expires_at.format("%Y-%m-%d %H:%M:%SZ")
                );
            }
            for (name, role, epoch, seen, ago) in &p.instances {
                let this = if name == me { " (this instance)" } else { "" };
                let role = if name == &p.holder && p.remaining > 0.0 {
                    "active".to_string()
                } else if *ago > 2.0 * cfg.lease_ttl.as_secs_f64() {
                    format!("not heard from lately (it last said {role}; stopped?)")
                } else if role == "active" {
                    "standby".to_string()
                } else {
                    role.clone()
                };
                println!(
                    "ha: instance {name}{this}: {role}, epoch {epoch}, last seen {} ({ago:.0}s ago)",
                    seen.format("%Y-%m-%d %H:%M:%SZ")
                );
            }
            let applied = snapshot.and_then(|s| s.ledger_seq().ok()).unwrap_or(0);
            println!(
                "ha: ledger: {} rows, up to seq {}; this instance's snapshot has applied up to {applied} (its own writes are in it already)",
                p.ledger_rows, p.ledger_seq
            );
        }
    }
}

fn humantime(d: std::time::Duration) -> String {
    let s = d.as_secs();
    if s.is_multiple_of(60) && s > 0 {
        format!("{}m", s / 60)
    } else {
        format!("{:.0}s", d.as_secs_f64())
    }
}

/// Which change feed a cycle would use, as `check --connect` says it.
async fn feed_mode(ldap: &crate::config::LdapConfig) -> String {
    use crate::config::{ChangeFeed, Dialect};
    use crate::source::Advertised;
    let setting = ldap.change_feed.as_str();
    if ldap.change_feed == ChangeFeed::None {
        return format!("change feed: none (ldap.change_feed \"{setting}\"): every cycle reads the whole directory");
    }
    let advertised = crate::source::advertised_feed(ldap).await;
    match (ldap.dialect, ldap.change_feed, advertised) {
        (Dialect::OpenLdap, _, Ok(Advertised::Syncrepl)) => format!(
            "change feed: syncrepl (RFC 4533 content synchronisation; ldap.change_feed \"{setting}\"): cycles between full reads read only what changed. The bind account needs read access to entryUUID, entryCSN and the suffix's contextCSN, and no size limit on the sync searches"
        ),
        (Dialect::OpenLdap, ChangeFeed::Syncrepl, _) => format!(
            "change feed: the server does not advertise content synchronisation (RFC 4533) but ldap.change_feed is \"{setting}\": cycles will fail. Enable syncprov (OpenLDAP) or the Content Synchronization plugin (389-DS), or set ldap.change_feed = \"auto\" or \"none\""
        ),
        (Dialect::OpenLdap, _, Ok(_)) => format!(
            "change feed: none: the server does not advertise content synchronisation (RFC 4533) in its root DSE (ldap.change_feed \"{setting}\"); every cycle reads the whole directory"
        ),
        (Dialect::ActiveDirectory, ChangeFeed::Auto, Ok(found)) if found != Advertised::DirSync => format!(
            "change feed: none: the server does not advertise DirSync in its root DSE (ldap.change_feed \"{setting}\"; set \"usn\" to follow uSNChanged); every cycle reads the whole directory"
        ),
        (Dialect::ActiveDirectory, _, Ok(_)) => match crate::source::ad_feed_mode(ldap).await {
            Ok((mode, refused)) => format!(
                "change feed: {} (ldap.change_feed \"{setting}\"){}: cycles between full reads read only what changed. DirSync needs the bind account to hold \"Replicating Directory Changes\" on the domain, or runs in object-security mode on what it may read; usn needs read access to uSNChanged and to CN=Deleted Objects",
                mode.describe(),
                refused.map(|why| format!("; DirSync cannot be used: {why}")).unwrap_or_default()
            ),
            Err(e) => format!("change feed: cannot be decided ({e}); every cycle reads the whole directory"),
        },
        (_, _, Err(e)) => format!("change feed: the root DSE cannot be read ({e}); every cycle reads the whole directory"),
    }
}

/// How many changes wait in the feed since the mirror's cookie: the directory is asked now,
/// and nothing is stored.
async fn print_feed_waiting(
    config: &Config,
    snapshot: &Snapshot,
    now: chrono::DateTime<chrono::Utc>,
) {
    let wanted = crate::map::needed_attributes(&config.targets);
    match crate::reconcile::feed::waiting(&config.ldap, &wanted, snapshot, now).await {
        Ok(None) => {}
        Ok(Some(w)) => println!("change feed: {w}"),
        Err(e) => {
            println!("change feed: changes waiting unknown: the directory cannot be asked ({e})")
        }
    }
}

/// The change feed: its kind, how old its cookie is, the last full read, the last fallback.
fn print_feed_status(config: &Config, snapshot: &Snapshot, now: chrono::DateTime<chrono::Utc>) {
    let age = |t: Option<chrono::DateTime<chrono::Utc>>| match t {
        Some(t) => format!("{t} ({}s ago)", (now - t).num_seconds().max(0)),
        None => "never".into(),
    };
    match crate::reconcile::feed::status(snapshot) {
        Some(f) => {
            println!(
                "change feed: {} (ldap.change_feed \"{}\"); mirror of {} users and {} groups; cookie from {}; last full read {}",
                f.kind,
                config.ldap.change_feed.as_str(),
                f.users,
                f.groups,
                age(f.cookie_at),
                age(f.last_full),
            );
            println!(
                "next full read: {}",
                config
                    .daemon
                    .full_schedule
                    .next_after(now)
                    .map_or("none".to_string(), |t| format!(
                        "{t} (daemon.full_schedule \"{}\")",
                        config.daemon.full_schedule
                    ))
            );
        }
        None => println!(
            "change feed: none in use (ldap.change_feed \"{}\"); every cycle reads the whole directory",
            config.ldap.change_feed.as_str()
        ),
    }
    if let Some(fb) = snapshot.feed_fallback().ok().flatten() {
        println!(
            "change feed fallback: {} at {}: read the whole directory",
            fb.reason, fb.at
        );
    }
}

fn print_target_status(snapshot: &Snapshot, target: &str) {
    let last = snapshot.last_run(target).ok().flatten();
    let held = snapshot.held(target).ok();
    let rows = snapshot.target(target).and_then(|ts| ts.load());
    let (users, groups) = rows
        .map(|s| (s.users.len(), s.groups.len()))
        .unwrap_or((0, 0));
    let held_count = held.as_ref().map_or(0, |h| h.len());
    match last {
        Some(l) => println!(
            "target {target}: last run {} result {}; applied {}, failed {}, held {held_count}, {} write requests; managing {users} users, {groups} groups",
            l.at.to_rfc3339(),
            l.status,
            l.applied,
            l.failed,
            l.writes,
        ),
        None => println!("target {target}: never synced"),
    }
    for key in held.iter().flatten() {
        let (action, id) = (key.word(), key.id());
        println!("  held: {action} {id} (release with `ldap2scim approve --target {target}`)");
    }
    print_snapshot_health(snapshot, target, users, groups);
}

/// What `status` says of a target's snapshot itself: rows lost since they were recorded, the
/// last rebuild, and the orphans waiting for `approve`.
fn print_snapshot_health(snapshot: &Snapshot, target: &str, users: usize, groups: usize) {
    match snapshot.row_counts(target) {
        Ok(Some(c)) if users < c.users || groups < c.groups => println!(
            "  WARNING: the snapshot lost rows of this target: it recorded {} users and {} groups, {users} and {groups} are left; the next sync rebuilds them from the target and lists orphans",
            c.users, c.groups
        ),
        Ok(_) => {}
        Err(e) => println!("  WARNING: {e}"),
    }
    match snapshot.rebuild_pending(target) {
        Ok(Some(why)) => println!(
            "  WARNING: the snapshot was lost and this target is not rebuilt yet: {why}; the next sync rebuilds it from the target and lists orphans"
        ),
        Ok(None) => {}
        Err(e) => println!("  WARNING: {e}"),
    }
    if let Ok(Some(r)) = snapshot.last_rebuild(target) {
        println!("  snapshot rebuilt at {}: {}", r.at.to_rfc3339(), r.reason);
    }
    match snapshot.orphans(target) {
        Ok(orphans) => {
            for (id, o) in &orphans {
                println!(
                    "  orphan: {} (externalId {id}, SCIM id {}, found {}): matches no directory entry this target provisions; deprovisioned only after `ldap2scim approve --target {target}` and a sync",
                    o.user_name,
                    o.scim_id.0,
                    o.found.to_rfc3339()
                );
            }
        }
        Err(e) => println!("  WARNING: the orphans of this target are unreadable: {e}"),
    }
}

async fn explain(config: &Config, needle: &str, clock: &Clock) -> u8 {
    // explain reads the snapshot, which one process at a time may open: while a `run` or a
    // `sync` holds the state directory, its rows cannot be shown (and opening them would get
    // in that process's way). Holding the lock for the read keeps a cycle from starting
    // meanwhile.
    // The daemon's own child works under the daemon's lock, between its cycles.
    let inside = crate::control::inside_daemon(&config.daemon.state_dir);
    let _lock = match StateLock::acquire_at(&config.daemon.state_dir, "explain", clock) {
        Ok(lock) => Some(lock),
        Err(LockError::Busy { .. }) if inside => None,
        Err(LockError::Busy { dir, holder }) => {
            return fail(format!(
                "state directory {} (daemon.state_dir) is in use by ldap2scim ({holder}): explain cannot read the snapshot while it runs. Try again when it has finished, or stop it",
                dir.display()
            ))
        }
        Err(e) => return fail(e),
    };
    let pass = Pass::new(config, &[], true, clock);
    // One read serves both: what the mappings name (asked for by name, as a sync does, so
    // attributes a server returns only when named are there too) and what the lookup of
    // the entry compares.
    let mut wanted = crate::map::needed_attributes(&config.targets);
    for attr in crate::model::LOOKUP_ATTRIBUTES {
        if !wanted.iter().any(|w| w.eq_ignore_ascii_case(attr)) {
            wanted.push(attr.to_string());
        }
    }
    let directory =
        match crate::source::read_attributes(&config.ldap, Some(&wanted), pass.now).await {
            Ok(d) => d,
            Err(e) => return fail(e),
        };
    let Some(entry) = directory.find(needle) else {
        eprintln!("ldap2scim: {needle:?} matches no user or group in the directory read");
        return EXIT_ERROR;
    };
    let (id, dn, kind) = match entry {
        Entry::User(u) => (u.id.clone(), u.dn.clone(), "user"),
        Entry::Group(g) => (g.id.clone(), g.dn.clone(), "group"),
    };
    // What each target makes of the entry, before the read goes to the plan (which keeps
    // only the mapped attributes).
    let mapped: Vec<serde_json::Value> = config
        .targets
        .iter()
        .map(|t| match entry {
            Entry::User(u) => crate::map::map_user(u, t)
                .map(|m| crate::scim::resource::user_resource(&m.attrs.unpack()))
                .unwrap_or_else(|e| json!({"error": e})),
            Entry::Group(g) if !crate::map::group_selected(t, g) => {
                json!({"skipped": "not chosen by this target's groups_filter"})
            }
            Entry::Group(g) => match crate::map::mapped_group_name(t, g) {
                Ok(name) => {
                    json!({"displayName": name, "externalId": g.id.0, "members": g.members.len()})
                }
                Err(e) => json!({"error": e}),
            },
        })
        .collect();
    let outcome = match reconcile::run_on(&pass, directory).await {
        Ok(o) => o,
        Err(e) => return fail(e),
    };
    // An unreadable snapshot is an error, never an empty row.
    let snapshot = match Snapshot::open_existing(&config.daemon.state_dir) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let mut targets = Vec::new();
    for (t, mapped) in config.targets.iter().zip(mapped) {
        let row = snapshot.as_ref().and_then(|s| s.target(&t.name.0).ok()).and_then(|ts| {
            let mut st = ts.load().ok()?;
            ts.load_attrs(&mut st, [&id]).ok()?;
            Some(st)
        }).map(|st| {
            st.users
                .get(&id)
                .map(|r| {
                    let mut v = serde_json::to_value(r).unwrap_or_default();
                    v["attrs"] = serde_json::to_value(r.attrs.unpack()).unwrap_or_default();
                    v
                })
                .or_else(|| st.groups.get(&id).map(|r| json!({"scim_id": r.scim_id, "display_name": r.display_name, "members": r.members.len(), "owned": r.owned})))
        });
        let pending: Vec<serde_json::Value> = outcome
            .targets
            .iter()
            .filter(|x| x.name == t.name.0)
            .flat_map(|x| {
                x.plan.changes.iter().chain(&x.plan.held).filter(|c| c.id() == &id).map(|c| json!({"action": c.action(), "resource": c.resource(), "name": c.name()}))
            })
            .collect();
        targets.push(json!({"target": t.name.0, "mapped": mapped, "snapshot": row.flatten(), "pending": pending}));
    }
    let doc = json!({"kind": kind, "dn": dn, "external_id": id.0, "targets": targets});
    println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    EXIT_OK
}

async fn approve(config: &Config, target: &str) -> u8 {
    if !config.targets.iter().any(|t| t.name.0 == target) {
        return fail(format!("unknown target {target} (--target)"));
    }
    let snapshot = match Snapshot::open(&config.daemon.state_dir) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let held = match snapshot.held(target) {
        Ok(h) => h,
        Err(e) => return fail(e),
    };
    let Some(held) = Some(held).filter(|h| !h.is_empty()) else {
        println!("target {target}: nothing is held");
        return EXIT_OK;
    };
    // What is released is said one by one: approving also deprovisions the orphans.
    let shown = match snapshot.held_changes(target) {
        Ok(shown) => shown,
        Err(e) => return fail(e),
    };
    let orphans = match snapshot.orphans(target) {
        Ok(orphans) => orphans,
        Err(e) => return fail(e),
    };
    let lines: Vec<String> = held
        .iter()
        .map(|key| released_line(key.word(), key.id(), &shown, &orphans))
        .collect();
    if let Err(e) = snapshot.set_approved(target, &held) {
        return fail(e);
    }
    if let Err(e) = snapshot.flush().await {
        return fail(e);
    }
    println!("target {target}: releasing:");
    for line in &lines {
        println!("  {line}");
    }
    println!(
        "target {target}: approved {} held change(s); the next sync applies them",
        held.len()
    );
    EXIT_OK
}

/// One released change for `approve`: action, resource, name and directory id (the name and
/// resource as the last plan had them, or the orphan record's).
fn released_line(
    action: &str,
    id: &DirectoryId,
    shown: &[crate::snapshot::HeldChange],
    orphans: &crate::snapshot::Orphans,
) -> String {
    let known = shown
        .iter()
        .find(|h| h.action == action && h.external_id == id.0);
    let (resource, name) = match (known, orphans.get(id)) {
        (Some(h), _) => (h.resource.as_str(), h.name.as_str()),
        (None, Some(o)) if action == "orphan" => ("User", o.user_name.as_str()),
        (None, _) => ("?", "(name not recorded)"),
    };
    let mut line = format!(
        "{action} {resource} {} (externalId {})",
        report::one_line(name),
        report::one_line(&id.0)
    );
    if action == "orphan" {
        line.push_str(": an account that matches no directory entry; it is deprovisioned");
    }
    if let Some(from) = known.and_then(|h| h.from_external_id.as_deref()) {
        line.push_str(&format!(
            ", moving from externalId {}",
            report::one_line(from)
        ));
    }
    line
}
