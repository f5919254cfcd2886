//! The scale benchmark (issue 5): ldap2scim against the physical limits of the same machine,
//! measured side by side in one run.
//!
//! 1. A full directory read by ldap2scim (`source::read`) against `ldapsearch` paging the same
//!    entries with the same attributes, as the same account over StartTLS.
//! 2. A no-op cycle (`sync` right after a full sync) against the same `ldapsearch`, counting the
//!    SCIM writes it sends (there must be none).
//! 3. The initial push to scim2-server, in objects per second, against the server's own capacity
//!    measured twice at the same concurrency: by `wrk` POSTing unique users (the same payload),
//!    and by a load generator pushing the same objects (users, groups, member batches, timed
//!    phase by phase). Twice: the users with their department groups (against wrk), and with
//!    `g-all` too, whose member PATCHes are server-bound (against the load generator).
//! 4. The peak RSS of `sync` and `plan` at three directory sizes, and how it grows per user.
//! 5. The change feed (issue 13), at the full size against the sink: a no-op delta cycle and a
//!    delta with 1% of the users changed against the same `ldapsearch`, the live latency of
//!    100 single-attribute changes one every 200 ms against a running daemon, and the daemon's
//!    RSS after its initial sync and after 1,000 live changes.
//!
//! Sections 1 to 4 read the whole directory every cycle (`ldap.change_feed = "none"`), as
//! before the feed existed, so their figures compare with earlier runs.
//!
//! Every server is started by the test harness on 127.0.0.1 and stopped by PID when dropped;
//! nothing else is contacted. Run it with `scripts/bench.sh` (or `scripts/bench.sh --small`);
//! `tests/bench_smoke.rs` runs it at a tiny size to prove it works.
#![forbid(unsafe_code)]

/// The allocator the ldap2scim binary uses (src/main.rs), so that the in-process read below
/// is measured as the binary would run it.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[path = "../tests/support/mod.rs"]
mod support;

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use support::{
    bulk_directory, temp_dir, toml_str, Ldap2scim, Postgres, RecordingProxy, Scim2Server,
    ScimServer, Slapd, TestConfig, BASE_DN,
};

/// Members per generated group (plus one group `g-all` nesting all the others).
const GROUP_SIZE: usize = 10;

/// How long one ldap2scim command may run before the benchmark gives up on it.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(900);

#[allow(dead_code)] // tests/bench_smoke.rs includes this file and calls `run` itself.
fn main() {
    // `cargo test --all-targets` runs bench targets too, without `--bench`: the benchmark is
    // minutes of work, so it runs only under `cargo bench` (scripts/bench.sh); its tiny-size
    // check is tests/bench_smoke.rs.
    if !std::env::args().any(|a| a == "--bench") {
        println!("scale: run it with scripts/bench.sh (cargo bench --bench scale); skipped under cargo test");
        return;
    }
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    for (flag, push) in [("--serve", false), ("--serve-push", true)] {
        if let Some(n) = args.iter().position(|a| a == flag) {
            let users = args
                .get(n + 1)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{flag} N"));
            serve_for_profiling(users, push);
            return;
        }
    }
    let options = Options::parse(args.into_iter());
    if options.require_wrk && !wrk_available() {
        eprintln!(
            "scale: wrk is not installed; scripts/bench.sh installs it (apt-get install wrk)"
        );
        std::process::exit(1);
    }
    let report = run(&options);
    print!("{}", report.render());
}

/// What to measure, and at which sizes.
#[derive(Clone, Debug)]
pub struct Options {
    /// The full directory (the largest RSS size, and where the read and no-op are compared).
    pub users: usize,
    /// The directory pushed to scim2-server (a subset: a full push would take too long).
    pub push_users: usize,
    /// `concurrency` settings tried for the push (and for wrk).
    pub concurrencies: Vec<usize>,
    /// How long each wrk capacity measurement runs.
    pub wrk_seconds: u64,
    /// Repetitions of each read / no-op timing (the median is reported).
    pub reps: usize,
    /// Fail when wrk is missing (the real benchmark), rather than skip the capacity baseline.
    pub require_wrk: bool,
    /// `members_per_request` of the push target; `None` keeps ldap2scim's default.
    pub members_per_request: Option<usize>,
}

impl Options {
    /// The full run: 100,000 users and 10,000 groups; push 10,000 users.
    pub fn full() -> Options {
        Options {
            users: 100_000,
            push_users: 10_000,
            concurrencies: vec![4, 8],
            wrk_seconds: 20,
            reps: 3,
            require_wrk: true,
            members_per_request: None,
        }
    }

    /// A tiny run (300 users) that proves every part works, in seconds.
    pub fn small() -> Options {
        Options {
            users: 300,
            push_users: 300,
            concurrencies: vec![4],
            wrk_seconds: 2,
            reps: 1,
            require_wrk: false,
            members_per_request: None,
        }
    }

    /// `--small`, `--users N`, `--push-users N`, `--concurrency 4,8`, `--wrk-seconds S`,
    /// `--reps R`, `--members-per-request N`; anything else (cargo passes `--bench`) is ignored.
    fn parse(args: impl Iterator<Item = String>) -> Options {
        let args: Vec<String> = args.collect();
        let mut options = if args.iter().any(|a| a == "--small") {
            Options::small()
        } else {
            Options::full()
        };
        let mut i = 0;
        while i < args.len() {
            let value = args.get(i + 1).map(String::as_str).unwrap_or("");
            let number = || -> usize {
                value
                    .parse()
                    .unwrap_or_else(|_| panic!("{} needs a number, not {value:?}", args[i]))
            };
            match args[i].as_str() {
                "--users" => options.users = number(),
                "--push-users" => options.push_users = number(),
                "--wrk-seconds" => options.wrk_seconds = number() as u64,
                "--reps" => options.reps = number().max(1),
                "--members-per-request" => options.members_per_request = Some(number()),
                "--concurrency" => {
                    options.concurrencies = value
                        .split(',')
                        .map(|c| c.trim().parse().expect("--concurrency 4,8"))
                        .collect()
                }
                _ => {
                    i += 1;
                    continue;
                }
            }
            i += 2;
        }
        options
    }

    /// The directory sizes whose memory is measured: a tenth, half, and all of `users`.
    pub fn rss_sizes(&self) -> Vec<usize> {
        let mut sizes = vec![self.users / 10, self.users / 2, self.users];
        sizes.retain(|n| *n > 0);
        sizes.dedup();
        sizes
    }
}

/// One ldap2scim command: exit code, wall time, peak RSS and what it said.
#[derive(Clone, Debug)]
pub struct CommandRun {
    pub code: i32,
    pub wall: Duration,
    /// VmHWM in KiB, polled every 5 ms from /proc.
    pub peak_rss_kib: u64,
    /// The `elapsed_ms` of its "directory read" log line.
    pub read_ms: Option<u64>,
    /// The N of "N write requests" in the sync summary line.
    pub writes: Option<usize>,
    pub stdout: String,
    pub stderr: String,
}

/// Memory and time of the three commands at one directory size (against the sink target).
#[derive(Clone, Debug)]
pub struct SizeResult {
    pub users: usize,
    pub groups: usize,
    pub initial_sync: CommandRun,
    pub noop_sync: CommandRun,
    pub noop_plan: CommandRun,
    /// Writes the sink received during the no-op sync.
    pub noop_sink_writes: usize,
    /// Requests of any kind the sink received during the no-op sync.
    pub noop_sink_requests: usize,
    /// Objects (users + groups) per second of the initial sync against the sink.
    pub sink_push_rate: f64,
}

/// The push to scim2-server at one concurrency, and the server's capacity at the same one.
#[derive(Clone, Debug)]
pub struct PushResult {
    pub concurrency: usize,
    pub objects: usize,
    pub sync: CommandRun,
    pub objects_per_s: f64,
    pub writes_per_s: f64,
    /// wrk POST /Users per second (None when wrk is not installed).
    pub capacity: Option<WrkResult>,
    /// The same objects pushed by the load generator at the same concurrency.
    pub replay: ReplayResult,
    /// The push of the users and the department groups only (`g-all` left out by the groups
    /// filter), to a fresh server: (objects, sync).
    pub departments: (usize, CommandRun),
}

/// The load generator's push of the same objects (see [`replay`]).
#[derive(Clone, Debug)]
pub struct ReplayResult {
    pub requests: usize,
    pub seconds: f64,
    pub objects_per_s: f64,
    /// Where the server's time went: (phase, requests, seconds), in order.
    pub phases: Vec<(&'static str, usize, f64)>,
}

/// One wrk run.
#[derive(Clone, Debug)]
pub struct WrkResult {
    pub requests: u64,
    pub non_2xx: u64,
    pub socket_errors: u64,
    pub seconds: f64,
    pub rate: f64,
}

/// Everything one run measured.
#[derive(Clone, Debug)]
pub struct Report {
    pub options: Options,
    pub started: String,
    pub machine: String,
    pub directory_load_s: f64,
    pub sizes: Vec<SizeResult>,
    /// Median ldapsearch times for the users search, the groups search, and ldap2scim's extra
    /// disabled-users search (`1.1` only), at the full size.
    pub ldapsearch_users: Duration,
    pub ldapsearch_groups: Duration,
    pub ldapsearch_disabled: Duration,
    /// Median wall time of `source::read` through the library.
    pub library_read: Duration,
    pub library_read_counts: (usize, usize),
    /// Median wall time of the no-op `sync` at the full size.
    pub noop_sync: Duration,
    pub noop_plan: Duration,
    pub pushes: Vec<PushResult>,
    /// The no-op sync against scim2-server after the push, through the recording proxy:
    /// (wall time, writes, all requests, ldapsearch baseline of the push directory).
    pub noop_real: Option<(Duration, usize, usize, Duration)>,
    /// The body ldap2scim POSTed for its first user (what wrk sends too).
    pub sample_user: Option<Value>,
    /// Section 5: the change feed at the full size.
    pub feed: Option<FeedResult>,
    /// Section 6: what `[ha]`'s ledger costs a push.
    pub ha: Option<HaResult>,
}

/// `[ha]` against none, on the initial push to the sink (section 6).
#[derive(Clone, Debug)]
pub struct HaResult {
    pub users: usize,
    pub objects: usize,
    /// The initial sync without `[ha]`, and with it (every acknowledged row also written to
    /// the ledger in PostgreSQL on loopback).
    pub plain: CommandRun,
    pub with_ha: CommandRun,
    pub ledger_rows: usize,
    /// A standby applying the whole ledger to an empty snapshot, and the rows it applied.
    pub catch_up: Duration,
    pub applied: usize,
}

/// The change feed at the full size, against the sink (section 5).
#[derive(Clone, Debug)]
pub struct FeedResult {
    pub users: usize,
    /// The first sync (a full read that builds the mirror).
    pub initial_sync: CommandRun,
    /// The second one: every target planned against the mirror once.
    pub first_delta: CommandRun,
    /// Median wall time of `sync` with nothing changed, its writes (sink count) and peak RSS.
    pub noop: Duration,
    pub noop_writes: usize,
    pub noop_rss_kib: u64,
    /// Users changed for the delta measurement.
    pub changed: usize,
    /// Median wall time of `plan` after `changed` users changed (the read and plan part), and
    /// one of its runs (its log says where the time went).
    pub delta_plan: Duration,
    pub delta_plan_run: CommandRun,
    /// The `sync` that applied the change, and the writes it sent.
    pub delta_sync: CommandRun,
    pub live: Option<LiveResult>,
}

/// The daemon in live mode (section 5).
#[derive(Clone, Debug)]
pub struct LiveResult {
    /// Single-attribute changes made one every 200 ms, and how many reached the sink.
    pub changes: usize,
    pub arrived: usize,
    /// From the modify's return to the PATCH's arrival at the sink.
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
    /// The daemon's VmRSS after its initial sync, and after `total_changes` live changes.
    pub rss_initial_kib: u64,
    pub rss_after_kib: u64,
    pub total_changes: usize,
}

impl Report {
    /// The ldapsearch baseline: the users and groups searches, the same entries ldap2scim reads.
    pub fn baseline(&self) -> Duration {
        self.ldapsearch_users + self.ldapsearch_groups
    }

    pub fn read_ratio(&self) -> f64 {
        ratio(self.library_read, self.baseline())
    }

    pub fn noop_ratio(&self) -> f64 {
        ratio(self.noop_sync, self.baseline())
    }

    pub fn full(&self) -> &SizeResult {
        self.sizes.last().expect("at least one size")
    }

    /// Peak RSS growth of the initial sync per user between the smallest and largest size.
    pub fn bytes_per_user(&self, pick: fn(&SizeResult) -> &CommandRun) -> f64 {
        let (a, b) = (&self.sizes[0], self.full());
        if b.users == a.users {
            return pick(b).peak_rss_kib as f64 * 1024.0 / b.users as f64;
        }
        (pick(b).peak_rss_kib as f64 - pick(a).peak_rss_kib as f64) * 1024.0
            / (b.users - a.users) as f64
    }

    /// The results as Markdown, for BENCHMARKS.md.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let o = &self.options;
        let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1000.0);
        let mib = |kib: u64| format!("{:.1} MiB", kib as f64 / 1024.0);
        let full = self.full();
        let _ = writeln!(out, "## Scale benchmark results\n");
        let _ = writeln!(out, "- started: {}", self.started);
        let _ = writeln!(out, "- machine: {}", self.machine);
        let _ = writeln!(
            out,
            "- directory: {} users, {} groups ({GROUP_SIZE} members each, plus `g-all` nesting them), slapadd in {:.1} s; push subset: {} users; repetitions: {} (medians)",
            full.users, full.groups, self.directory_load_s, o.push_users, o.reps
        );
        let _ = writeln!(out, "\n### 1. Full directory read ({} users)\n", full.users);
        let _ = writeln!(out, "| what | time |\n|---|---|");
        let _ = writeln!(
            out,
            "| ldapsearch users (`-ZZ -E pr=1000/noprompt '*' entryUUID`) | {} |",
            ms(self.ldapsearch_users)
        );
        let _ = writeln!(
            out,
            "| ldapsearch groups (same) | {} |",
            ms(self.ldapsearch_groups)
        );
        let _ = writeln!(
            out,
            "| **baseline** (users + groups) | **{}** |",
            ms(self.baseline())
        );
        let _ = writeln!(
            out,
            "| ldapsearch of ldap2scim's extra disabled-users search (`1.1`) | {} |",
            ms(self.ldapsearch_disabled)
        );
        let _ = writeln!(
            out,
            "| ldap2scim `source::read` ({} users, {} groups) | {} |",
            self.library_read_counts.0,
            self.library_read_counts.1,
            ms(self.library_read)
        );
        let _ = writeln!(
            out,
            "| **ratio** read / baseline (goal ≤ 1.3) | **{:.2}** {} |",
            self.read_ratio(),
            verdict(self.read_ratio() <= 1.3)
        );
        let _ = writeln!(
            out,
            "| ratio read / (baseline + disabled search) | {:.2} |",
            ratio(
                self.library_read,
                self.baseline() + self.ldapsearch_disabled
            )
        );

        let _ = writeln!(out, "\n### 2. No-op cycle ({} users)\n", full.users);
        let _ = writeln!(out, "| what | time |\n|---|---|");
        let _ = writeln!(
            out,
            "| `ldap2scim sync` after a full sync (sink target) | {} (of which directory read {}) |",
            ms(self.noop_sync),
            opt_ms(full.noop_sync.read_ms)
        );
        let _ = writeln!(
            out,
            "| `ldap2scim plan` with the snapshot current | {} (of which directory read {}) |",
            ms(self.noop_plan),
            opt_ms(full.noop_plan.read_ms)
        );
        let _ = writeln!(
            out,
            "| **ratio** no-op sync / baseline (goal ≤ 1.5) | **{:.2}** {} |",
            self.noop_ratio(),
            verdict(self.noop_ratio() <= 1.5)
        );
        let _ = writeln!(
            out,
            "| SCIM writes in the no-op sync: sink count / ldap2scim's own count (goal 0) | **{} / {}** {} (requests of any kind: {}) |",
            full.noop_sink_writes,
            full.noop_sync.writes.map_or("?".into(), |w| w.to_string()),
            verdict(full.noop_sink_writes == 0 && full.noop_sync.writes == Some(0)),
            full.noop_sink_requests
        );
        if let Some((wall, writes, requests, base)) = self.noop_real {
            let _ = writeln!(
                out,
                "| no-op sync against scim2-server ({} users, through the recording proxy) | {} = {:.2}× its ldapsearch baseline ({}); **{writes} writes** {}, {requests} requests |",
                o.push_users,
                ms(wall),
                ratio(wall, base),
                ms(base),
                verdict(writes == 0)
            );
        }

        let _ = writeln!(
            out,
            "\n### 3. Initial push to scim2-server ({} users + {} groups, members_per_request {})\n",
            o.push_users,
            self.pushes.first().map_or(0, |p| p.objects - o.push_users),
            o.members_per_request
                .map_or("default".to_string(), |n| n.to_string())
        );
        let _ = writeln!(
            out,
            "**Users and department groups** (`g-all` left out by the groups filter; each user in \
             one group of 10), against wrk and against the load generator's same phases:\n\n\
             | concurrency | ldap2scim sync | objects/s | ÷ wrk POST /Users (goal ≥ 0.70) | ÷ load generator, same objects |\n|---|---|---|---|---|"
        );
        for p in &self.pushes {
            let (objects, run) = &p.departments;
            let rate = *objects as f64 / run.wall.as_secs_f64();
            let vs_wrk = p.capacity.as_ref().map_or("–".to_string(), |w| {
                let r = rate / w.rate;
                format!("**{r:.2}** {} ({:.0}/s)", verdict(r >= 0.7), w.rate)
            });
            // The load generator's users, groups and small-group phases are the same objects
            // (it creates g-all too: one request more).
            let (gen_requests, gen_seconds) = p
                .replay
                .phases
                .iter()
                .filter(|(name, _, _)| !name.contains("g-all"))
                .fold((0, 0.0), |(n, t), (_, r, s)| (n + r, t + s));
            let gen_rate = *objects as f64 / gen_seconds.max(1e-9);
            let _ = writeln!(
                out,
                "| {} | {:.1} s, exit {}, {} writes | {rate:.0} | {vs_wrk} | {:.2} ({gen_requests} requests in {gen_seconds:.1} s) |",
                p.concurrency,
                run.wall.as_secs_f64(),
                run.code,
                run.writes.map_or("?".into(), |w| w.to_string()),
                rate / gen_rate,
            );
        }
        let _ = writeln!(
            out,
            "\n**With `g-all`** (every user, through the nested groups: its 100 member PATCHes \
             cost the server more as the group grows):\n"
        );
        let _ = writeln!(
            out,
            "| concurrency | ldap2scim sync | objects/s | write requests/s | wrk POST /Users capacity | objects/s ÷ wrk (for reference: wrk does none of g-all's server work) |\n|---|---|---|---|---|---|"
        );
        for p in &self.pushes {
            let (cap, r) = match &p.capacity {
                Some(w) => (
                    format!(
                        "{:.0}/s ({} requests in {:.1} s, {} non-2xx, {} socket errors)",
                        w.rate, w.requests, w.seconds, w.non_2xx, w.socket_errors
                    ),
                    format!("{:.2}", p.objects_per_s / w.rate),
                ),
                None => ("not measured (no wrk)".into(), "–".into()),
            };
            let _ = writeln!(
                out,
                "| {} | {:.1} s, exit {}, {} writes | {:.0} | {:.0} | {cap} | {r} |",
                p.concurrency,
                p.sync.wall.as_secs_f64(),
                p.sync.code,
                p.sync.writes.map_or("?".into(), |w| w.to_string()),
                p.objects_per_s,
                p.writes_per_s,
            );
        }
        let _ = writeln!(
            out,
            "\nThe server's capacity for the same objects, measured by the load generator (users with \
             ldap2scim's body, the groups, the memberships in batches of the same size; as fast as the \
             server answers; goal ≥ 0.70):\n"
        );
        let _ = writeln!(
            out,
            "| concurrency | load generator | its objects/s | ldap2scim objects/s | **ratio** ldap2scim ÷ load generator |\n|---|---|---|---|---|"
        );
        for p in &self.pushes {
            let r = p.objects_per_s / p.replay.objects_per_s;
            let _ = writeln!(
                out,
                "| {} | {:.1} s, {} requests | {:.0} | {:.0} | **{r:.2}** {} |",
                p.concurrency,
                p.replay.seconds,
                p.replay.requests,
                p.replay.objects_per_s,
                p.objects_per_s,
                verdict(r >= 0.7)
            );
        }

        if let Some(p) = self.pushes.first() {
            let _ = writeln!(
                out,
                "\nWhere the server's time goes (the load generator at concurrency {}, phase by phase; \
                 wrk's POST /Users rate for comparison):\n\n\
                 | phase | requests | time | requests/s | ÷ wrk |\n|---|---|---|---|---|",
                p.concurrency
            );
            for (name, requests, seconds) in &p.replay.phases {
                let rate = *requests as f64 / seconds.max(1e-9);
                let vs_wrk = p
                    .capacity
                    .as_ref()
                    .map_or("–".to_string(), |c| format!("{:.2}", rate / c.rate));
                let _ = writeln!(
                    out,
                    "| {name} | {requests} | {seconds:.1} s | {rate:.0} | {vs_wrk} |"
                );
            }
        }

        let _ = writeln!(
            out,
            "\n### 4. Peak RSS (VmHWM) and time by directory size (sink target)\n"
        );
        let _ = writeln!(
            out,
            "| users | groups | initial sync | no-op sync | no-op plan | initial sync time (read) | push rate to the sink |\n|---|---|---|---|---|---|---|"
        );
        for s in &self.sizes {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {:.1} s ({}) | {:.0} objects/s |",
                s.users,
                s.groups,
                mib(s.initial_sync.peak_rss_kib),
                mib(s.noop_sync.peak_rss_kib),
                mib(s.noop_plan.peak_rss_kib),
                s.initial_sync.wall.as_secs_f64(),
                opt_ms(s.initial_sync.read_ms),
                s.sink_push_rate
            );
        }
        let peak = full
            .initial_sync
            .peak_rss_kib
            .max(full.noop_sync.peak_rss_kib);
        let _ = writeln!(
            out,
            "\nGrowth per user (smallest → largest size): initial sync {:.0} B, no-op sync {:.0} B, plan {:.0} B. Peak at {} users: {} (goal ≤ 300 MB) {}",
            self.bytes_per_user(|s| &s.initial_sync),
            self.bytes_per_user(|s| &s.noop_sync),
            self.bytes_per_user(|s| &s.noop_plan),
            full.users,
            mib(peak),
            verdict(peak as f64 * 1024.0 <= 300e6)
        );
        if let Some(f) = &self.feed {
            self.render_feed(&mut out, f);
        }
        if let Some(h) = &self.ha {
            let secs = |d: Duration| d.as_secs_f64();
            let _ = writeln!(
                out,
                "\n### 6. `[ha]`: the ledger's cost on the initial push (sink target, PostgreSQL on loopback)\n\n\
                 | users | objects | sync without [ha] | sync with [ha] | ratio | ledger rows | standby applies the ledger | rows/s |\n|---|---|---|---|---|---|---|---|"
            );
            let _ = writeln!(
                out,
                "| {} | {} | {:.2} s | {:.2} s | {:.2} | {} | {:.2} s ({} rows) | {:.0} |",
                h.users,
                h.objects,
                secs(h.plain.wall),
                secs(h.with_ha.wall),
                ratio(h.with_ha.wall, h.plain.wall),
                h.ledger_rows,
                secs(h.catch_up),
                h.applied,
                h.applied as f64 / secs(h.catch_up).max(1e-9)
            );
        }
        if let Some(sample) = &self.sample_user {
            let _ = writeln!(
                out,
                "\nThe user body ldap2scim POSTs (wrk POSTs the same, with a unique name per request):\n\n    {sample}"
            );
        }
        out
    }
}

impl Report {
    fn render_feed(&self, out: &mut String, f: &FeedResult) {
        let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1000.0);
        let mib = |kib: u64| format!("{:.1} MiB", kib as f64 / 1024.0);
        let base = self.baseline();
        let _ = writeln!(
            out,
            "\n### 5. Change feed (syncrepl, {} users, sink target)\n",
            f.users
        );
        let _ = writeln!(out, "| what | figure |\n|---|---|");
        let _ = writeln!(
            out,
            "| initial sync (full read, builds the mirror) | {:.1} s, peak {} |",
            f.initial_sync.wall.as_secs_f64(),
            mib(f.initial_sync.peak_rss_kib)
        );
        let _ = writeln!(
            out,
            "| second sync (every target planned against the mirror once) | {:.1} s, peak {} |",
            f.first_delta.wall.as_secs_f64(),
            mib(f.first_delta.peak_rss_kib)
        );
        let r = ratio(f.noop, base);
        let _ = writeln!(
            out,
            "| **no-op delta** `sync` (nothing changed) ÷ ldapsearch baseline {} (goal ≤ 0.05) | {} = **{r:.3}** {}; **{} writes** {}; peak {} |",
            ms(base),
            ms(f.noop),
            verdict(r <= 0.05),
            f.noop_writes,
            verdict(f.noop_writes == 0),
            mib(f.noop_rss_kib)
        );
        let r = ratio(f.delta_plan, base);
        let where_ = f
            .delta_plan_run
            .stderr
            .lines()
            .find(|l| l.contains("directory read from the change feed"))
            .map(|l| {
                ["read_ms", "load_ms", "assemble_ms"]
                    .iter()
                    .filter_map(|k| {
                        l.split(&format!("{k}="))
                            .nth(1)
                            .and_then(|v| v.split_whitespace().next())
                            .map(|v| format!("{k} {v}"))
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "| **delta of {} changed users**: `plan` (read and plan) ÷ baseline (goal ≤ 0.1) | {} = **{r:.2}** {} ({where_}) |",
            f.changed,
            ms(f.delta_plan),
            verdict(r <= 0.1)
        );
        let _ = writeln!(
            out,
            "| the `sync` that applied them | {:.2} s, {} write requests, peak {} |",
            f.delta_sync.wall.as_secs_f64(),
            f.delta_sync.writes.map_or("?".into(), |w| w.to_string()),
            mib(f.delta_sync.peak_rss_kib)
        );
        if let Some(l) = &f.live {
            let _ = writeln!(
                out,
                "| **live latency**, {} changes one every 200 ms (`live_delay = \"0s\"`), modify → PATCH at the target: p50 (goal ≤ 0.5 s) / p99 (goal ≤ 2 s) / max | **{:.2} s** {} / **{:.2} s** {} / {:.2} s ({} of {} arrived) |",
                l.changes,
                l.p50.as_secs_f64(),
                verdict(l.p50 <= Duration::from_millis(500)),
                l.p99.as_secs_f64(),
                verdict(l.p99 <= Duration::from_secs(2)),
                l.max.as_secs_f64(),
                l.arrived,
                l.changes
            );
            let noop_before = self.full().noop_sync.peak_rss_kib;
            let _ = writeln!(
                out,
                "| **daemon RSS** after its initial sync / after {} live changes, against the full-read no-op sync's peak {} (goal: not higher) | {} / **{}** {} |",
                l.total_changes,
                mib(noop_before),
                mib(l.rss_initial_kib),
                mib(l.rss_after_kib),
                verdict(l.rss_after_kib <= noop_before)
            );
        }
    }
}

/// Section 5: the change feed on `slapd` (the full-size directory), against a fresh sink.
fn measure_feed(slapd: &Slapd, users: usize, reps: usize) -> FeedResult {
    let sink = Sink::start();
    let mut config = bench_config(slapd, &sink.url(), sink.token(), 4);
    config.set("ldap", "change_feed", "\"auto\"");
    progress(&format!("change feed, {users} users: initial sync"));
    let initial_sync = expect_ok(command(&config, &["sync"]), "feed: initial sync");
    let first_delta = expect_ok(command(&config, &["sync"]), "feed: second sync");
    progress("change feed: no-op deltas");
    sink.reset_counts();
    let mut noops = Vec::new();
    let mut noop_rss_kib = 0;
    for _ in 0..reps.max(3) {
        let run = expect_ok(command(&config, &["sync"]), "feed: no-op delta");
        noop_rss_kib = noop_rss_kib.max(run.peak_rss_kib);
        noops.push(run.wall);
    }
    let noop_writes = sink.writes();
    let changed = (users / 100).max(1);
    progress(&format!("change feed: delta of {changed} changed users"));
    let mut plans = Vec::new();
    let mut delta_plan_run = None;
    let mut delta_sync = None;
    for rep in 0..reps {
        let ldif: String = (1..=changed)
            .map(|i| {
                format!(
                    "dn: uid=u{i:06},ou=people,{BASE_DN}\nchangetype: modify\nreplace: title\ntitle: Round {rep}\n\n"
                )
            })
            .collect();
        slapd.modify(&ldif);
        let plan = command(&config, &["plan"]);
        assert_eq!(
            plan.code, 2,
            "feed: the delta plan has changes:\n{}",
            plan.stderr
        );
        plans.push(plan.wall);
        delta_plan_run.get_or_insert(plan);
        let sync = expect_ok(command(&config, &["sync"]), "feed: delta sync");
        delta_sync.get_or_insert(sync);
    }
    let live = measure_live(slapd, users);
    FeedResult {
        users,
        initial_sync,
        first_delta,
        noop: median(noops),
        noop_writes,
        noop_rss_kib,
        changed,
        delta_plan: median(plans),
        delta_plan_run: delta_plan_run.expect("a delta plan ran"),
        delta_sync: delta_sync.expect("a delta sync ran"),
        live: Some(live),
    }
}

/// The daemon in live mode against a fresh sink: latency of 100 changes, then RSS.
fn measure_live(slapd: &Slapd, users: usize) -> LiveResult {
    let sink = Sink::start();
    let mut config = bench_config(slapd, &sink.url(), sink.token(), 4);
    config
        .set("ldap", "change_feed", "\"auto\"")
        .set("daemon", "schedule", "\"0 0 1 1 *\"")
        .set("daemon", "live_delay", "\"0s\"");
    progress(&format!("live: daemon initial sync of {users} users"));
    let daemon = Ldap2scim::new(&config.path())
        .args(["run", "--now"])
        .timeout(COMMAND_TIMEOUT)
        .spawn();
    let started = Instant::now();
    while !daemon.stderr().contains("live: watching the directory") {
        assert!(
            started.elapsed() < COMMAND_TIMEOUT,
            "live: the daemon never started watching:\n{}",
            daemon.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let rss = || {
        std::fs::read_to_string(format!("/proc/{}/status", daemon.pid()))
            .ok()
            .and_then(|s| kib_field(&s, "VmRSS:"))
            .unwrap_or(0)
    };
    let rss_initial_kib = rss();
    let changes = 100.min(users);
    progress(&format!("live: {changes} changes, one every 200 ms"));
    let mut made = Vec::new();
    for i in 1..=changes {
        slapd.modify(&format!(
            "dn: uid=u{i:06},ou=people,{BASE_DN}\nchangetype: modify\nreplace: title\ntitle: Live\n"
        ));
        made.push((format!("u{i:06}"), Instant::now()));
        std::thread::sleep(Duration::from_millis(200));
    }
    let wait = |n: usize| {
        let t = Instant::now();
        while sink.patches().len() < n && t.elapsed() < Duration::from_secs(120) {
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait(changes);
    let patches = sink.patches();
    let mut latencies: Vec<Duration> = made
        .iter()
        .filter_map(|(name, at)| {
            patches
                .iter()
                .filter(|(arrived, path)| {
                    arrived >= at && sink.user_name(path).as_deref() == Some(name)
                })
                .map(|(arrived, _)| *arrived - *at)
                .min()
        })
        .collect();
    latencies.sort();
    let arrived = latencies.len();
    let pick = |q: f64| {
        latencies
            .get(((arrived as f64 * q).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or(Duration::MAX)
    };
    let (p50, p99, max) = (
        pick(0.5),
        pick(0.99),
        latencies.last().copied().unwrap_or(Duration::MAX),
    );
    // 900 more changes, in batches of 100 every second: 1,000 live changes in all.
    let total_changes = 1000.min(users);
    progress("live: 900 more changes");
    for batch in 0..(total_changes - changes).div_ceil(100) {
        let ldif: String = (0..100)
            .map(|k| changes + 1 + batch * 100 + k)
            .filter(|i| *i <= total_changes)
            .map(|i| {
                format!(
                    "dn: uid=u{i:06},ou=people,{BASE_DN}\nchangetype: modify\nreplace: title\ntitle: Live\n\n"
                )
            })
            .collect();
        slapd.modify(&ldif);
        std::thread::sleep(Duration::from_secs(1));
    }
    wait(total_changes);
    let rss_after_kib = rss();
    let _ = daemon.stop();
    LiveResult {
        changes,
        arrived,
        p50,
        p99,
        max,
        rss_initial_kib,
        rss_after_kib,
        total_changes,
    }
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-9)
}

fn verdict(met: bool) -> &'static str {
    if met {
        "(met)"
    } else {
        "(**missed**)"
    }
}

fn opt_ms(ms: Option<u64>) -> String {
    ms.map_or("?".into(), |m| format!("{m} ms"))
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// Runs every measurement of the benchmark and returns the numbers.
pub fn run(options: &Options) -> Report {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let started = chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string();
    let mut report = Report {
        options: options.clone(),
        started,
        machine: machine(),
        directory_load_s: 0.0,
        sizes: Vec::new(),
        ldapsearch_users: Duration::ZERO,
        ldapsearch_groups: Duration::ZERO,
        ldapsearch_disabled: Duration::ZERO,
        library_read: Duration::ZERO,
        library_read_counts: (0, 0),
        noop_sync: Duration::ZERO,
        noop_plan: Duration::ZERO,
        pushes: Vec::new(),
        noop_real: None,
        sample_user: None,
        feed: None,
        ha: None,
    };
    let sizes = options.rss_sizes();
    let largest = *sizes.last().expect("a size");
    for &users in &sizes {
        progress(&format!("directory of {users} users: slapadd"));
        let loaded = Instant::now();
        let slapd = Slapd::start_bulk(&bulk_directory(users, GROUP_SIZE));
        let load_s = loaded.elapsed().as_secs_f64();
        let sink = Sink::start();
        let config = bench_config(&slapd, &sink.url(), sink.token(), 4);
        if users == largest {
            report.directory_load_s = load_s;
            measure_read(&mut report, &slapd, &config);
        }
        let result = measure_size(users, &config, &sink);
        if report.sample_user.is_none() {
            report.sample_user = sink.sample_user();
        }
        if users == largest {
            let mut syncs = vec![result.noop_sync.wall];
            let mut plans = vec![result.noop_plan.wall];
            for _ in 1..options.reps {
                syncs.push(expect_ok(command(&config, &["sync"]), "no-op sync").wall);
                plans.push(expect_ok(command(&config, &["plan"]), "no-op plan").wall);
            }
            report.noop_sync = median(syncs);
            report.noop_plan = median(plans);
            report.feed = Some(measure_feed(&slapd, users, options.reps));
        }
        report.sizes.push(result);
    }
    measure_pushes(&mut report, options);
    report.ha = Some(measure_ha(options.push_users));
    report
}

/// Section 6: the initial sync of `users` to the sink with `[ha]` (the lease and the ledger in
/// a PostgreSQL on loopback) against the same sync without it, and a standby applying that
/// ledger to an empty snapshot.
fn measure_ha(users: usize) -> HaResult {
    progress(&format!("[ha]: directory of {users} users, PostgreSQL"));
    let slapd = Slapd::start_bulk(&bulk_directory(users, GROUP_SIZE));
    let pg = Postgres::start();
    pg.create_database("bench");
    let plain_sink = Sink::start();
    let plain_config = bench_config(&slapd, &plain_sink.url(), plain_sink.token(), 4);
    progress("[ha]: initial sync to the sink without [ha]");
    let plain = expect_ok(
        command(&plain_config, &["sync"]),
        "initial sync without [ha]",
    );
    let sink = Sink::start();
    let mut config = bench_config(&slapd, &sink.url(), sink.token(), 4);
    let dsn_file = config.dir().join("ha.dsn");
    std::fs::write(&dsn_file, pg.dsn("bench")).expect("write the DSN file");
    config
        .set(
            "ha",
            "lease",
            &format!(
                "{{ postgres = {{ file = {} }} }}",
                toml_str(&dsn_file.to_string_lossy())
            ),
        )
        .set("ha", "instance", "\"bench-a\"");
    progress("[ha]: initial sync to the sink with [ha]");
    let with_ha = expect_ok(command(&config, &["sync"]), "initial sync with [ha]");
    let ledger_rows = pg
        .psql("bench", "SELECT count(*) FROM ldap2scim_ledger")
        .trim()
        .parse()
        .unwrap_or(0);
    progress("[ha]: a standby applies the ledger");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let standby = ldap2scim::ha::Ha::new(
        ldap2scim::config::HaConfig {
            dsn: ldap2scim::config::Secret::new(pg.dsn("bench")),
            lease_ttl: Duration::from_secs(30),
            instance: "bench-b".into(),
        },
        false,
    );
    let dir = temp_dir("ha-standby");
    let snapshot = ldap2scim::snapshot::Snapshot::open(dir.path()).expect("open a snapshot");
    runtime.block_on(standby.step(false));
    let started = Instant::now();
    let applied = runtime
        .block_on(standby.catch_up(&snapshot))
        .expect("the standby applies the ledger");
    HaResult {
        users,
        objects: sink.creates(),
        plain,
        with_ha,
        ledger_rows,
        catch_up: started.elapsed(),
        applied,
    }
}

/// `--serve N`: a directory of N users and the sink, with one full sync done, kept up until
/// standard input closes, so `sync` or `plan` can be profiled by hand (perf, heaptrack) with the
/// configuration whose path it prints. `--serve-push N`: the directory and an empty
/// scim2-server instead, nothing synced (one push; point the target at a fresh server for more).
fn serve_for_profiling(users: usize, push: bool) {
    let slapd = Slapd::start_bulk(&bulk_directory(users, GROUP_SIZE));
    let sink = Sink::start();
    let scim2 = push.then(Scim2Server::start);
    let config = match &scim2 {
        Some(server) => bench_config(&slapd, &server.base_url(), server.token(), 4),
        None => {
            let config = bench_config(&slapd, &sink.url(), sink.token(), 4);
            expect_ok(command(&config, &["sync"]), "initial sync");
            config
        }
    };
    println!("LDAP2SCIM_CONFIG={}", config.path().display());
    println!("LDAP_URL={}", slapd.ldap_url());
    let _ = std::io::stdout().flush();
    let mut rest = String::new();
    let _ = std::io::stdin().read_to_string(&mut rest);
}

/// ldapsearch against `source::read`, alternating, `reps` times each.
fn measure_read(report: &mut Report, slapd: &Slapd, config: &TestConfig) {
    progress("directory read: ldapsearch vs source::read");
    let cfg = ldap2scim::config::load(&config.path()).expect("the bench configuration loads");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let (mut users, mut groups, mut disabled, mut reads) = (vec![], vec![], vec![], vec![]);
    for _ in 0..report.options.reps {
        users.push(ldapsearch(
            slapd,
            &cfg.ldap.users.base,
            &cfg.ldap.users.filter,
            &["*", "entryUUID"],
        ));
        let g = cfg.ldap.groups.as_ref().expect("groups configured");
        groups.push(ldapsearch(slapd, &g.base, &g.filter, &["*", "entryUUID"]));
        let df = cfg.ldap.users.disabled_filter.as_deref().unwrap_or("");
        disabled.push(ldapsearch(
            slapd,
            &cfg.ldap.users.base,
            &format!("(&{}{df})", cfg.ldap.users.filter),
            &["1.1"],
        ));
        let t = Instant::now();
        let directory = runtime
            .block_on(ldap2scim::source::read(&cfg.ldap, chrono::Utc::now()))
            .expect("source::read");
        reads.push(t.elapsed());
        report.library_read_counts = (directory.users.len(), directory.groups.len());
    }
    report.ldapsearch_users = median(users);
    report.ldapsearch_groups = median(groups);
    report.ldapsearch_disabled = median(disabled);
    report.library_read = median(reads);
}

/// Initial sync, no-op sync and no-op plan against the sink, with their peak memory.
fn measure_size(users: usize, config: &TestConfig, sink: &Sink) -> SizeResult {
    progress(&format!("{users} users: initial sync to the sink"));
    let initial_sync = expect_ok(command(config, &["sync"]), "initial sync");
    let objects = sink.creates();
    progress(&format!("{users} users: no-op sync and plan"));
    sink.reset_counts();
    let noop_sync = expect_ok(command(config, &["sync"]), "no-op sync");
    let (noop_sink_writes, noop_sink_requests) = (sink.writes(), sink.requests());
    let noop_plan = command(config, &["plan"]);
    assert_eq!(
        noop_plan.code, 0,
        "plan after a full sync must have nothing to do:\n{}\n{}",
        noop_plan.stdout, noop_plan.stderr
    );
    SizeResult {
        users,
        groups: users.div_ceil(GROUP_SIZE) + 1,
        sink_push_rate: objects as f64 / initial_sync.wall.as_secs_f64(),
        initial_sync,
        noop_sync,
        noop_plan,
        noop_sink_writes,
        noop_sink_requests,
    }
}

/// The push to a fresh scim2-server, and wrk against another fresh one, per concurrency.
fn measure_pushes(report: &mut Report, options: &Options) {
    let users = options.push_users;
    progress(&format!("push directory of {users} users: slapadd"));
    let slapd = Slapd::start_bulk(&bulk_directory(users, GROUP_SIZE));
    let objects = users + users.div_ceil(GROUP_SIZE) + 1;
    let template = wrk_template(report.sample_user.as_ref());
    for &concurrency in &options.concurrencies {
        let capacity = wrk_available().then(|| {
            progress(&format!(
                "scim2-server capacity: wrk -c{concurrency} for {} s",
                options.wrk_seconds
            ));
            let server = Scim2Server::start();
            wrk(&server, concurrency, options.wrk_seconds, &template)
        });
        progress(&format!(
            "scim2-server capacity for the same objects: load generator at concurrency {concurrency}"
        ));
        let replay = replay(
            users,
            concurrency,
            options.members_per_request.unwrap_or(100),
            &template,
        );
        progress(&format!(
            "push {objects} objects to scim2-server at concurrency {concurrency}"
        ));
        let server = Scim2Server::start();
        let mut target_extra = format!("concurrency = {concurrency}\n");
        if let Some(n) = options.members_per_request {
            let _ = writeln!(target_extra, "members_per_request = {n}");
        }
        let mut config = bench_config(&slapd, &server.base_url(), server.token(), concurrency);
        config.target("bench", &server.base_url(), server.token(), &target_extra);
        let sync = expect_ok(command(&config, &["sync"]), "initial push");
        let secs = sync.wall.as_secs_f64();
        if report.noop_real.is_none() {
            progress("no-op sync against scim2-server, through the recording proxy");
            let proxy = RecordingProxy::start(&server.base_url());
            config.target("bench", &proxy.url(), server.token(), &target_extra);
            let noop = expect_ok(command(&config, &["sync"]), "no-op sync (scim2-server)");
            let base = ldapsearch(
                &slapd,
                &format!("ou=people,{BASE_DN}"),
                "(objectClass=inetOrgPerson)",
                &["*", "entryUUID"],
            ) + ldapsearch(
                &slapd,
                &format!("ou=groups,{BASE_DN}"),
                "(objectClass=groupOfNames)",
                &["*", "entryUUID"],
            );
            report.noop_real = Some((noop.wall, proxy.writes(), proxy.requests().len(), base));
        }
        progress(&format!(
            "push the users and department groups (no g-all) at concurrency {concurrency}"
        ));
        let server = Scim2Server::start();
        let mut config = bench_config(&slapd, &server.base_url(), server.token(), concurrency);
        config.target("bench", &server.base_url(), server.token(), &target_extra);
        config.set(
            "ldap.groups",
            "filter",
            "\"(&(objectClass=groupOfNames)(!(cn=g-all)))\"",
        );
        let departments = (
            objects - 1,
            expect_ok(command(&config, &["sync"]), "push without g-all"),
        );
        report.pushes.push(PushResult {
            concurrency,
            objects,
            departments,
            objects_per_s: objects as f64 / secs,
            writes_per_s: sync.writes.unwrap_or(0) as f64 / secs,
            sync,
            capacity,
            replay,
        });
    }
}

/// The harness configuration for `slapd`, with page size 1000 (ldap2scim's default, and what
/// ldapsearch pages with), and one target `bench`.
fn bench_config(slapd: &Slapd, url: &str, token: &str, concurrency: usize) -> TestConfig {
    let mut config = TestConfig::new(slapd);
    config
        .set("ldap", "page_size", "1000")
        .set("ldap", "change_feed", "\"none\"");
    config.target(
        "bench",
        url,
        token,
        &format!("concurrency = {concurrency}\n"),
    );
    config
}

fn progress(what: &str) {
    eprintln!("scale: {what}");
}

fn expect_ok(run: CommandRun, what: &str) -> CommandRun {
    assert_eq!(
        run.code, 0,
        "{what} failed:\n--- stdout ---\n{}\n--- stderr ---\n{}",
        run.stdout, run.stderr
    );
    run
}

/// Runs `ldap2scim --config CFG ARGS`, polling its peak RSS.
fn command(config: &TestConfig, args: &[&str]) -> CommandRun {
    let started = Instant::now();
    let mut process = Ldap2scim::new(&config.path())
        .args(args)
        .timeout(COMMAND_TIMEOUT)
        .spawn();
    let status = format!("/proc/{}/status", process.pid());
    let mut peak = 0;
    let output = loop {
        if let Some(hwm) = std::fs::read_to_string(&status)
            .ok()
            .and_then(|s| kib_field(&s, "VmHWM:"))
        {
            peak = peak.max(hwm);
        }
        if let Some(output) = process.wait_timeout(Duration::ZERO) {
            break output;
        }
        assert!(
            started.elapsed() < COMMAND_TIMEOUT,
            "ldap2scim {args:?} ran longer than {COMMAND_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    let wall = started.elapsed();
    CommandRun {
        code: output.code,
        wall,
        peak_rss_kib: peak,
        read_ms: output
            .stderr
            .lines()
            .find(|l| l.contains("directory read"))
            .and_then(|l| l.split("elapsed_ms=").nth(1))
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok()),
        writes: output
            .stdout
            .lines()
            .chain(output.stderr.lines())
            .find_map(|l| l.strip_suffix(" write requests"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|n| n.parse().ok()),
        stdout: output.stdout,
        stderr: output.stderr,
    }
}

fn kib_field(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// Wall time of `ldapsearch` paging (1000) as the service account over StartTLS, LDIF to
/// /dev/null.
fn ldapsearch(slapd: &Slapd, base: &str, filter: &str, attrs: &[&str]) -> Duration {
    let started = Instant::now();
    let status = Command::new("ldapsearch")
        .env("LDAPTLS_CACERT", slapd.ca_file())
        .env("LDAPTLS_REQCERT", "demand")
        .args(["-ZZ", "-x", "-LLL", "-H", &slapd.ldap_url()])
        .args(["-D", slapd.bind_dn(), "-w", slapd.bind_pw()])
        .args(["-E", "pr=1000/noprompt", "-b", base, filter])
        .args(attrs)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .status()
        .expect("run ldapsearch");
    assert!(status.success(), "ldapsearch {base} {filter} failed");
    started.elapsed()
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| kib_field(&m, "MemTotal:"))
        .map_or("?".into(), |k| format!("{:.0} GiB", k as f64 / 1048576.0));
    let load = std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    format!("{cores} cores ({cpu}), {mem} RAM, load average at start {load}")
}

fn wrk_available() -> bool {
    Command::new("wrk")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// The JSON of a user POST with `__NAME__` where the unique parts go: ldap2scim's own first
/// POST /Users body when the sink captured one.
fn wrk_template(sample: Option<&Value>) -> String {
    let Some(sample) = sample else {
        return json!({
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
            "userName": "__NAME__",
            "externalId": "__NAME__",
            "name": { "givenName": "User", "familyName": "__NAME__" },
            "displayName": "User __NAME__",
            "emails": [{ "type": "work", "value": "__NAME__@example.org", "primary": true }],
            "active": true
        })
        .to_string();
    };
    let mut body = sample.clone();
    let user_name = body["userName"].as_str().unwrap_or("").to_string();
    body["externalId"] = json!("__NAME__");
    let text = body.to_string();
    if user_name.is_empty() {
        text
    } else {
        text.replace(&user_name, "__NAME__")
    }
}

/// wrk POSTing unique users to a fresh `server` at `concurrency` connections.
fn wrk(server: &Scim2Server, concurrency: usize, seconds: u64, template: &str) -> WrkResult {
    let dir = temp_dir("wrk");
    let script = dir.path().join("post-user.lua");
    let lua = format!(
        r#"-- POST /Users with a unique userName per request; prints one BENCH line.
local threads = {{}}
local template = [==[{template}]==]
function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end
function init(args)
  counter = 0
end
function request()
  counter = counter + 1
  local name = string.format("w%d-%d", tid, counter)
  local body = string.gsub(template, "__NAME__", name)
  return wrk.format("POST", nil, {{
    ["Content-Type"] = "application/scim+json",
    ["Accept"] = "application/scim+json",
    ["Authorization"] = "Bearer {token}",
  }}, body)
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("BENCH requests=%d non2xx=%d socket=%d us=%d\n",
    summary.requests, e.status, e.connect + e.read + e.write + e.timeout, summary.duration))
end
"#,
        token = server.token()
    );
    std::fs::write(&script, lua).expect("write the wrk script");
    let threads = concurrency.clamp(1, 2);
    let out = Command::new("wrk")
        .args(["-t", &threads.to_string(), "-c", &concurrency.to_string()])
        .args(["-d", &format!("{seconds}s"), "--timeout", "10s", "-s"])
        .arg(&script)
        .arg(format!("{}/Users", server.base_url()))
        .output()
        .expect("run wrk");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("BENCH "))
        .unwrap_or_else(|| {
            panic!(
                "wrk printed no result:\n{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let field = |name: &str| -> u64 {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let (requests, non_2xx) = (field("requests="), field("non2xx="));
    let seconds = field("us=") as f64 / 1e6;
    WrkResult {
        requests,
        non_2xx,
        socket_errors: field("socket="),
        seconds,
        rate: requests.saturating_sub(non_2xx) as f64 / seconds.max(1e-9),
    }
}

/// A SCIM target that accepts everything at once: it gives each created resource an id and
/// answers every other write with success, and lists nothing. With it, a full sync of 100,000
/// users measures ldap2scim alone (and its memory), since no real server would finish in time.
/// HTTP/1.1 with keep-alive, one thread per connection, on 127.0.0.1.
pub struct Sink {
    shared: Arc<SinkShared>,
    port: u16,
    token: String,
}

#[derive(Default)]
struct SinkShared {
    creates: AtomicUsize,
    writes: AtomicUsize,
    requests: AtomicUsize,
    next_id: AtomicUsize,
    sample_user: Mutex<Option<Value>>,
    stopping: AtomicBool,
    /// Sink id → userName of every user created.
    user_names: Mutex<std::collections::HashMap<String, String>>,
    /// When each PATCH of a user arrived, and its path.
    patches: Mutex<Vec<(Instant, String)>>,
}

impl Sink {
    pub fn start() -> Sink {
        let listener = TcpListener::bind(("127.0.0.1", 0)).expect("bind the sink");
        let port = listener.local_addr().expect("sink address").port();
        let shared = Arc::new(SinkShared::default());
        let accept = Arc::clone(&shared);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if accept.stopping.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let conn = Arc::clone(&accept);
                std::thread::spawn(move || {
                    let _ = serve(stream, &conn);
                });
            }
        });
        Sink {
            shared,
            port,
            token: support::random_token(),
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/v2", self.port)
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    /// POSTs answered so far.
    pub fn creates(&self) -> usize {
        self.shared.creates.load(Ordering::Relaxed)
    }

    /// Requests other than GET since the last reset.
    pub fn writes(&self) -> usize {
        self.shared.writes.load(Ordering::Relaxed)
    }

    /// Requests of any kind since the last reset.
    pub fn requests(&self) -> usize {
        self.shared.requests.load(Ordering::Relaxed)
    }

    pub fn reset_counts(&self) {
        self.shared.writes.store(0, Ordering::Relaxed);
        self.shared.requests.store(0, Ordering::Relaxed);
    }

    /// The first POST /Users body.
    /// The userName of the user a sink path (`…/Users/sink-…`) names.
    pub fn user_name(&self, path: &str) -> Option<String> {
        let id = path.rsplit('/').next()?;
        let names = self
            .shared
            .user_names
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        names.get(id).cloned()
    }

    /// The PATCHes of users received so far: (arrival, path).
    pub fn patches(&self) -> Vec<(Instant, String)> {
        self.shared
            .patches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn sample_user(&self) -> Option<Value> {
        self.shared
            .sample_user
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::Relaxed);
        // Wake the accept loop so that it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn serve(stream: TcpStream, shared: &SinkShared) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let mut parts = request_line.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let path = parts.next().unwrap_or("").to_string();
        let mut length = 0;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header)? == 0 {
                return Ok(());
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body)?;
        let (status, reply) = answer(&method, &path, &body, shared);
        // A 204 has no body, and so no Content-Length either.
        let length = if status.starts_with("204") {
            String::new()
        } else {
            format!(
                "Content-Type: application/scim+json\r\nContent-Length: {}\r\n",
                reply.len()
            )
        };
        let mut response = format!("HTTP/1.1 {status}\r\n{length}\r\n").into_bytes();
        response.extend_from_slice(reply.as_bytes());
        writer.write_all(&response)?;
    }
}

fn answer(method: &str, path: &str, body: &[u8], shared: &SinkShared) -> (&'static str, String) {
    shared.requests.fetch_add(1, Ordering::Relaxed);
    if method == "GET" {
        if path.contains("/ServiceProviderConfig") {
            let spc = json!({
                "schemas": ["urn:ietf:params:scim:schemas:core:2.0:ServiceProviderConfig"],
                "patch": { "supported": true },
                "bulk": { "supported": false },
                "filter": { "supported": true, "maxResults": 1000 },
                "etag": { "supported": false },
                "sort": { "supported": false },
                "changePassword": { "supported": false },
            });
            return ("200 OK", spc.to_string());
        }
        let empty = json!({
            "schemas": ["urn:ietf:params:scim:api:messages:2.0:ListResponse"],
            "totalResults": 0, "startIndex": 1, "itemsPerPage": 0, "Resources": []
        });
        return ("200 OK", empty.to_string());
    }
    shared.writes.fetch_add(1, Ordering::Relaxed);
    if method == "PATCH" && path.contains("/Users/") {
        let arrived = Instant::now();
        let mut patches = shared.patches.lock().unwrap_or_else(|e| e.into_inner());
        patches.push((arrived, path.to_string()));
    }
    match method {
        "POST" => {
            shared.creates.fetch_add(1, Ordering::Relaxed);
            let mut resource: Value = serde_json::from_slice(body).unwrap_or_else(|_| json!({}));
            if path.ends_with("/Users") {
                let mut sample = shared.sample_user.lock().unwrap_or_else(|e| e.into_inner());
                if sample.is_none() {
                    *sample = Some(resource.clone());
                }
            }
            let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
            resource["id"] = json!(format!("sink-{id:08}"));
            if let (true, Some(name)) = (path.ends_with("/Users"), resource["userName"].as_str()) {
                let mut names = shared.user_names.lock().unwrap_or_else(|e| e.into_inner());
                names.insert(format!("sink-{id:08}"), name.to_string());
            }
            ("201 Created", resource.to_string())
        }
        "PUT" => ("200 OK", String::from_utf8_lossy(body).into_owned()),
        _ => ("204 No Content", String::new()),
    }
}

/// The load generator for "the same work": a fresh scim2-server receives the objects ldap2scim
/// pushes (the same users with ldap2scim's own body, the same groups, the same memberships in
/// batches of the same size), from `concurrency` workers sending as fast as the server answers.
/// Its time is the server's capacity for provisioning this directory; unlike wrk's POST-only
/// rate it includes what a large group's member PATCHes cost the server.
fn replay(
    users: usize,
    concurrency: usize,
    members_per_request: usize,
    template: &str,
) -> ReplayResult {
    let server = Scim2Server::start();
    let (base, token) = (server.base_url(), server.token().to_string());
    let started = Instant::now();
    let mut phases = Vec::new();
    let mut phase_started = Instant::now();
    let mut phase = |name: &'static str, requests: usize| {
        phases.push((name, requests, phase_started.elapsed().as_secs_f64()));
        phase_started = Instant::now();
    };
    // Phase 1: users, as ldap2scim's body with each user's own name.
    let user_ids = run_pool(concurrency, users, |agent, i| {
        let name = format!("u{:06}", i + 1);
        let body: Value = serde_json::from_str(&template.replace("__NAME__", &name))
            .expect("the captured user body is JSON");
        created_id(agent, &base, &token, "/Users", &body)
    });
    phase("users (POST)", users);
    // Phase 2: the groups (g-0001… and g-all), without members.
    let small = users.div_ceil(GROUP_SIZE);
    let group_ids = run_pool(concurrency, small + 1, |agent, g| {
        let name = if g == small {
            "g-all".to_string()
        } else {
            format!("g-{:04}", g + 1)
        };
        let body = json!({
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
            "displayName": name,
            "externalId": name,
        });
        created_id(agent, &base, &token, "/Groups", &body)
    });
    phase("groups (POST)", small + 1);
    // Phase 3: memberships, in batches of `members_per_request`: each small group's members,
    // then every user into g-all (timed apart: its PATCHes cost the server more as it grows).
    let mut batches: Vec<(usize, Vec<usize>)> = Vec::new();
    for g in 0..small {
        let members: Vec<usize> = (g * GROUP_SIZE..((g + 1) * GROUP_SIZE).min(users)).collect();
        for chunk in members.chunks(members_per_request.max(1)) {
            batches.push((g, chunk.to_vec()));
        }
    }
    let small_patches = batches.len();
    let all: Vec<usize> = (0..users).collect();
    for chunk in all.chunks(members_per_request.max(1)) {
        batches.push((small, chunk.to_vec()));
    }
    let patches = batches.len();
    let patch = |agent: &ureq::Agent, b: usize| {
        let (g, members) = &batches[b];
        let body = json!({
            "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
            "Operations": [{
                "op": "add",
                "path": "members",
                "value": members.iter().map(|m| json!({"value": user_ids[*m]})).collect::<Vec<_>>(),
            }],
        });
        let path = format!("/Groups/{}", group_ids[*g]);
        let (status, answer) = support::scim_send(agent, "PATCH", &base, &token, &path, &body);
        assert!(status < 300, "replay PATCH {path}: {status} {answer}");
        String::new()
    };
    run_pool(concurrency, small_patches, patch);
    phase("members of the small groups (PATCH)", small_patches);
    run_pool(concurrency, patches - small_patches, |agent, b| {
        patch(agent, small_patches + b)
    });
    phase("members of g-all (PATCH)", patches - small_patches);
    let seconds = started.elapsed().as_secs_f64();
    let objects = users + small + 1;
    ReplayResult {
        requests: users + small + 1 + patches,
        seconds,
        objects_per_s: objects as f64 / seconds,
        phases,
    }
}

/// The SCIM id of a resource POSTed to `path`.
fn created_id(agent: &ureq::Agent, base: &str, token: &str, path: &str, body: &Value) -> String {
    let (status, answer) = support::scim_send(agent, "POST", base, token, path, body);
    assert_eq!(status, 201, "replay POST {path}: {answer}");
    answer["id"]
        .as_str()
        .expect("a created resource has an id")
        .to_string()
}

/// Runs `job(agent, i)` for i in 0..n on `workers` threads (each with its own keep-alive
/// connection), and returns the results in order.
fn run_pool<F>(workers: usize, n: usize, job: F) -> Vec<String>
where
    F: Fn(&ureq::Agent, usize) -> String + Sync,
{
    let next = AtomicUsize::new(0);
    let results = Mutex::new(vec![String::new(); n]);
    std::thread::scope(|scope| {
        for _ in 0..workers.max(1) {
            scope.spawn(|| {
                let agent = support::scim_agent();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let id = job(&agent, i);
                    results.lock().expect("results")[i] = id;
                }
            });
        }
    });
    results.into_inner().expect("results")
}
