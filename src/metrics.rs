//! The daemon's numbers and its HTTP endpoint (`daemon.listen`): `/metrics` in the Prometheus
//! text format, `/healthz` (200 while the process lives) and `/readyz` (200 once a cycle
//! succeeded and the latest one is not failing, 503 otherwise).
//!
//! A deliberately small HTTP/1.1 responder: one request per connection, GET/HEAD only, no
//! request body. It serves counters and nothing else; it never exposes configuration values.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::outcome::{Outcome, TargetStatus};

/// Upper bounds (seconds) of the cycle duration histogram.
const DURATION_BUCKETS: [f64; 12] = [
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0,
];

#[derive(Default, Clone)]
struct Histogram {
    counts: [u64; DURATION_BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        for (i, b) in DURATION_BUCKETS.iter().enumerate() {
            if v <= *b {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum += v;
    }
}

#[derive(Default, Clone)]
struct TargetMetrics {
    cycles: BTreeMap<&'static str, u64>,
    changes: BTreeMap<String, u64>,
    errors: BTreeMap<&'static str, u64>,
    throttled: u64,
    retries: u64,
    writes: u64,
    held: u64,
    /// Orphans waiting for `approve` after the last cycle.
    orphans: u64,
    /// Cycles that found this target's snapshot rows lost and rebuilt them.
    rebuilds: u64,
    last_success: Option<f64>,
    duration: Histogram,
}

#[derive(Default)]
struct State {
    targets: BTreeMap<String, TargetMetrics>,
    cycles_failed: BTreeMap<&'static str, u64>,
    cycle_duration: Histogram,
    ticks_skipped: u64,
    source_users: Option<u64>,
    source_groups: Option<u64>,
    read_seconds: Option<f64>,
    reloads: BTreeMap<&'static str, u64>,
    /// Directory reads by how they were made (full, delta, quiet).
    reads: BTreeMap<&'static str, u64>,
    feed_kind: Option<&'static str>,
    feed_changes: u64,
    feed_fallbacks: BTreeMap<&'static str, u64>,
    /// From a live change's receipt to the end of the cycle that applied it.
    live_latency: Histogram,
    ever_succeeded: bool,
    last_failed: bool,
    cycle_running: bool,
    /// `[ha]`: this instance's role, the lease's epoch, and whether the lease database answers.
    ha: Option<(&'static str, i64, bool)>,
}

/// Shared between the cycle and the HTTP endpoint.
#[derive(Default, Clone)]
pub struct Metrics(Arc<Mutex<State>>);

impl Metrics {
    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut s)
    }

    pub fn cycle_started(&self) {
        self.with(|s| s.cycle_running = true);
    }

    /// A tick came while a cycle was still running and was skipped.
    pub fn tick_skipped(&self) {
        self.with(|s| s.ticks_skipped += 1);
    }

    pub fn ticks_skipped(&self) -> u64 {
        self.with(|s| s.ticks_skipped)
    }

    pub fn reload(&self, accepted: bool) {
        self.with(|s| {
            *s.reloads
                .entry(if accepted { "accepted" } else { "rejected" })
                .or_default() += 1
        });
    }

    /// A pass that failed as a whole (`class`: "source", "snapshot", "config", …).
    pub fn cycle_failed(&self, class: &'static str, elapsed: Duration) {
        self.with(|s| {
            s.cycle_running = false;
            *s.cycles_failed.entry(class).or_default() += 1;
            s.cycle_duration.observe(elapsed.as_secs_f64());
            s.last_failed = true;
        });
    }

    /// A pass that ran; each target's own result is in `outcome`.
    pub fn cycle_finished(&self, outcome: &Outcome, elapsed: Duration, now_unix: f64) {
        self.with(|s| {
            s.cycle_running = false;
            let secs = elapsed.as_secs_f64();
            s.cycle_duration.observe(secs);
            s.source_users = Some(outcome.source_users as u64);
            s.source_groups = Some(outcome.source_groups as u64);
            s.read_seconds = Some(outcome.read_duration.as_secs_f64());
            let read = &outcome.read;
            *s.reads.entry(read.mode).or_default() += 1;
            s.feed_kind = read.feed;
            s.feed_changes += read.changes as u64;
            if let Some(reason) = read.fallback {
                *s.feed_fallbacks.entry(reason).or_default() += 1;
            }
            let mut failing = false;
            for t in &outcome.targets {
                let m = s.targets.entry(t.name.clone()).or_insert_with(|| {
                    // Every series the alert rules read exists at 0 from a target's first
                    // cycle on: `increase()` then counts its first step too.
                    let mut m = TargetMetrics::default();
                    for result in ["ok", "held", "error"] {
                        m.cycles.insert(result, 0);
                    }
                    for class in ERROR_CLASSES {
                        m.errors.insert(class, 0);
                    }
                    m
                });
                let status = match t.status {
                    TargetStatus::Ok => "ok",
                    TargetStatus::Held => "held",
                    TargetStatus::Error => "error",
                };
                *m.cycles.entry(status).or_default() += 1;
                m.duration.observe(t.elapsed.as_secs_f64());
                m.held = t.plan.held.len() as u64;
                m.orphans = t
                    .plan
                    .held
                    .iter()
                    .filter(|c| matches!(c, crate::plan::Change::Orphan { .. }))
                    .count() as u64;
                if t.rebuild.is_some() {
                    m.rebuilds += 1;
                }
                if let Some(e) = &t.error {
                    // A refused credential (401) is its own class: it needs a person to act.
                    let refused = matches!(e, crate::outcome::TargetFailure::Scim(s) if s.refuses_credential());
                    *m.errors.entry(if refused { "auth" } else { "plan" }).or_default() += 1;
                }
                if let Some(a) = &t.applied {
                    m.throttled += a.throttled as u64;
                    m.retries += a.retries as u64;
                    m.writes += a.writes as u64;
                    for r in &a.records {
                        if r.outcome == "ok" {
                            *m.changes
                                .entry(change_kind(r.resource.as_str(), r.action.as_str()))
                                .or_default() += 1;
                        }
                    }
                    for f in &a.failures {
                        *m.errors.entry(f.class.as_str()).or_default() += 1;
                    }
                }
                if t.status == TargetStatus::Error {
                    failing = true;
                } else {
                    m.last_success = Some(now_unix);
                }
            }
            s.last_failed = failing;
            if !failing {
                s.ever_succeeded = true;
            }
        });
    }

    /// A live change was applied this long after the daemon heard of it.
    pub fn live_latency(&self, elapsed: Duration) {
        self.with(|s| s.live_latency.observe(elapsed.as_secs_f64()));
    }

    /// Ready: a cycle has succeeded and the latest one did not fail (and, with `[ha]`, the
    /// lease database answers).
    pub fn ready(&self) -> bool {
        self.with(|s| ready(s))
    }

    /// `[ha]`: the role (`active`, `standby`, `unreachable`, `unknown`) and the lease's epoch.
    pub fn ha(&self, role: &'static str, epoch: i64) {
        self.with(|s| s.ha = Some((role, epoch, role != "unreachable")));
    }

    /// `[ha]`: a standby brought its snapshot up to the ledger (`ok`), or could not.
    pub fn standby_caught_up(&self, ok: bool) {
        self.with(|s| {
            s.ever_succeeded |= ok;
            s.last_failed = !ok;
        });
    }

    /// Why `/readyz` says not ready.
    fn not_ready_reason(&self) -> &'static str {
        self.with(|s| match s.ha {
            Some((_, _, false)) => {
                "not ready: the lease database ([ha]) cannot be reached; nothing is written\n"
            }
            _ => "not ready: no successful cycle yet, or the last cycle failed\n",
        })
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        self.with(|s| render(s))
    }
}

/// `user-create`, `group-add-members`, …
/// The `class` values of `ldap2scim_errors_total`: a target's own failure (`plan`, `auth`)
/// and an apply failure's class.
const ERROR_CLASSES: [&str; 9] = [
    "plan",
    "auth",
    "http_4xx",
    "http_5xx",
    "transport",
    "malformed",
    "client",
    "snapshot",
    "skipped",
];

fn change_kind(resource: &str, action: &str) -> String {
    format!("{}-{}", resource.to_ascii_lowercase(), action)
}

fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn histogram(out: &mut String, name: &str, labels: &str, h: &Histogram) {
    let sep = if labels.is_empty() { "" } else { "," };
    for (b, c) in DURATION_BUCKETS.iter().zip(h.counts) {
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {c}");
    }
    let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", h.count);
    let braces = if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    };
    let _ = writeln!(out, "{name}_sum{braces} {}", h.sum);
    let _ = writeln!(out, "{name}_count{braces} {}", h.count);
}

/// `metric{target="…",by="…"} n`, for every target and every value of `by` counted.
fn per_target_by<K: std::fmt::Display>(
    out: &mut String,
    targets: &BTreeMap<String, TargetMetrics>,
    metric: &str,
    by: &str,
    counts: fn(&TargetMetrics) -> &BTreeMap<K, u64>,
) {
    for (name, m) in targets {
        for (value, n) in counts(m) {
            let _ = writeln!(
                out,
                "{metric}{{target=\"{}\",{by}=\"{value}\"}} {n}",
                label(name)
            );
        }
    }
}

fn render(s: &State) -> String {
    let mut out = String::new();
    let t = &s.targets;

    header(
        &mut out,
        "ldap2scim_cycles_total",
        "counter",
        "Reconcile cycles per target, by result.",
    );
    per_target_by(&mut out, t, "ldap2scim_cycles_total", "result", |m| {
        &m.cycles
    });
    header(
        &mut out,
        "ldap2scim_changes_total",
        "counter",
        "Changes the target acknowledged, by kind.",
    );
    per_target_by(&mut out, t, "ldap2scim_changes_total", "kind", |m| {
        &m.changes
    });
    header(
        &mut out,
        "ldap2scim_errors_total",
        "counter",
        "Target errors, by class (auth: the target refused the credential, 401; plan: the target could not be planned otherwise; others: a change failed).",
    );
    per_target_by(&mut out, t, "ldap2scim_errors_total", "class", |m| {
        &m.errors
    });
    for (metric, kind, help, get) in [
        (
            "ldap2scim_throttled_total",
            "counter",
            "Answers from the target asking to slow down (429, or the profile's own rate-limit answer: github-emu's 403).",
            (|m: &TargetMetrics| m.throttled) as fn(&TargetMetrics) -> u64,
        ),
        ("ldap2scim_retries_total", "counter", "Requests retried.", |m| {
            m.retries
        }),
        (
            "ldap2scim_write_requests_total",
            "counter",
            "Write requests sent, retries included.",
            |m| m.writes,
        ),
        (
            "ldap2scim_held_changes",
            "gauge",
            "Destructive changes held by a safety limit after the last cycle.",
            |m| m.held,
        ),
        (
            "ldap2scim_orphans",
            "gauge",
            "Accounts with a directory-style externalId matching no directory entry, waiting for approve.",
            |m| m.orphans,
        ),
        (
            "ldap2scim_snapshot_rebuilds_total",
            "counter",
            "Cycles that found the target's snapshot rows lost (or missing while it holds accounts with directory-style externalIds) and rebuilt them.",
            |m| m.rebuilds,
        ),
    ] {
        header(&mut out, metric, kind, help);
        for (name, m) in t {
            let _ = writeln!(out, "{metric}{{target=\"{}\"}} {}", label(name), get(m));
        }
    }
    header(
        &mut out,
        "ldap2scim_last_success_timestamp_seconds",
        "gauge",
        "Unix time of the last cycle that did not fail for this target.",
    );
    for (name, m) in t {
        if let Some(ts) = m.last_success {
            let _ = writeln!(
                out,
                "ldap2scim_last_success_timestamp_seconds{{target=\"{}\"}} {ts}",
                label(name)
            );
        }
    }
    header(
        &mut out,
        "ldap2scim_target_cycle_duration_seconds",
        "histogram",
        "Duration of the cycles this target took part in.",
    );
    for (name, m) in t {
        histogram(
            &mut out,
            "ldap2scim_target_cycle_duration_seconds",
            &format!("target=\"{}\"", label(name)),
            &m.duration,
        );
    }
    header(
        &mut out,
        "ldap2scim_cycle_duration_seconds",
        "histogram",
        "Duration of whole reconcile cycles (directory read included).",
    );
    histogram(
        &mut out,
        "ldap2scim_cycle_duration_seconds",
        "",
        &s.cycle_duration,
    );
    header(
        &mut out,
        "ldap2scim_cycle_failures_total",
        "counter",
        "Cycles that failed as a whole, by class (source: the directory read; snapshot: the state directory).",
    );
    for (class, n) in &s.cycles_failed {
        let _ = writeln!(
            out,
            "ldap2scim_cycle_failures_total{{class=\"{class}\"}} {n}"
        );
    }
    header(
        &mut out,
        "ldap2scim_directory_entries",
        "gauge",
        "Entries in the last complete directory read.",
    );
    if let (Some(u), Some(g)) = (s.source_users, s.source_groups) {
        let _ = writeln!(out, "ldap2scim_directory_entries{{kind=\"users\"}} {u}");
        let _ = writeln!(out, "ldap2scim_directory_entries{{kind=\"groups\"}} {g}");
    }
    header(
        &mut out,
        "ldap2scim_directory_read_duration_seconds",
        "gauge",
        "How long the last complete directory read took.",
    );
    if let Some(secs) = s.read_seconds {
        let _ = writeln!(out, "ldap2scim_directory_read_duration_seconds {secs}");
    }
    header(
        &mut out,
        "ldap2scim_directory_reads_total",
        "counter",
        "Directory reads by mode: full (the whole directory), delta (the change feed's changes applied to the mirror), quiet (the feed named no change).",
    );
    for (mode, n) in &s.reads {
        let _ = writeln!(
            out,
            "ldap2scim_directory_reads_total{{mode=\"{mode}\"}} {n}"
        );
    }
    header(
        &mut out,
        "ldap2scim_change_feed_info",
        "gauge",
        "The change feed in use (kind=\"none\" without one).",
    );
    let _ = writeln!(
        out,
        "ldap2scim_change_feed_info{{kind=\"{}\"}} 1",
        s.feed_kind.unwrap_or("none")
    );
    header(
        &mut out,
        "ldap2scim_change_feed_changes_total",
        "counter",
        "Directory entries the change feed changed in the mirror.",
    );
    let _ = writeln!(
        out,
        "ldap2scim_change_feed_changes_total {}",
        s.feed_changes
    );
    header(
        &mut out,
        "ldap2scim_change_feed_fallbacks_total",
        "counter",
        "Delta reads that fell back to a full read, by reason.",
    );
    for (reason, n) in &s.feed_fallbacks {
        let _ = writeln!(
            out,
            "ldap2scim_change_feed_fallbacks_total{{reason=\"{reason}\"}} {n}"
        );
    }
    header(
        &mut out,
        "ldap2scim_live_change_latency_seconds",
        "histogram",
        "Live mode: from the directory change's receipt to the end of the cycle that applied it to every target.",
    );
    histogram(
        &mut out,
        "ldap2scim_live_change_latency_seconds",
        "",
        &s.live_latency,
    );
    header(
        &mut out,
        "ldap2scim_ticks_skipped_total",
        "counter",
        "Scheduled ticks skipped because a cycle was still running.",
    );
    let _ = writeln!(out, "ldap2scim_ticks_skipped_total {}", s.ticks_skipped);
    header(
        &mut out,
        "ldap2scim_config_reloads_total",
        "counter",
        "SIGHUP reloads, by result.",
    );
    for (r, n) in &s.reloads {
        let _ = writeln!(out, "ldap2scim_config_reloads_total{{result=\"{r}\"}} {n}");
    }
    header(
        &mut out,
        "ldap2scim_cycle_running",
        "gauge",
        "1 while a cycle runs.",
    );
    let _ = writeln!(out, "ldap2scim_cycle_running {}", u8::from(s.cycle_running));
    header(
        &mut out,
        "ldap2scim_ready",
        "gauge",
        "1 when /readyz answers 200.",
    );
    let _ = writeln!(out, "ldap2scim_ready {}", u8::from(ready(s)));
    if let Some((role, epoch, db_up)) = s.ha {
        header(
            &mut out,
            "ldap2scim_ha_active",
            "gauge",
            "1 while this instance holds the lease and may write ([ha]).",
        );
        let _ = writeln!(out, "ldap2scim_ha_active {}", u8::from(role == "active"));
        header(
            &mut out,
            "ldap2scim_ha_epoch",
            "gauge",
            "The lease's epoch as this instance last saw it ([ha]).",
        );
        let _ = writeln!(out, "ldap2scim_ha_epoch {epoch}");
        header(
            &mut out,
            "ldap2scim_ha_lease_database_up",
            "gauge",
            "1 while the lease database answers ([ha]); at 0 nothing is written.",
        );
        let _ = writeln!(out, "ldap2scim_ha_lease_database_up {}", u8::from(db_up));
    }
    out
}

fn ready(s: &State) -> bool {
    s.ever_succeeded && !s.last_failed && s.ha.is_none_or(|(_, _, up)| up)
}

/// Binds `addr` (so a port in use is an error at start) and returns the listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves the endpoint until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Metrics) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            if let Err(e) =
                tokio::time::timeout(Duration::from_secs(10), answer(stream, &metrics)).await
            {
                debug!(%peer, error = %e, "metrics endpoint: request timed out");
            }
        });
    }
}

async fn answer(mut stream: tokio::net::TcpStream, metrics: &Metrics) {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    // Read the request head only; these endpoints take no body.
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16 * 1024 {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(),
        ),
        ("GET" | "HEAD", "/healthz") => ("200 OK", "text/plain; charset=utf-8", "ok\n".into()),
        ("GET" | "HEAD", "/readyz") if metrics.ready() => {
            ("200 OK", "text/plain; charset=utf-8", "ready\n".into())
        }
        ("GET" | "HEAD", "/readyz") => (
            "503 Service Unavailable",
            "text/plain; charset=utf-8",
            metrics.not_ready_reason().into(),
        ),
        ("GET" | "HEAD", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found\n".into(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "method not allowed\n".into(),
        ),
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if method != "HEAD" {
        response.push_str(&body);
    }
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut h = Histogram::default();
        h.observe(0.3);
        h.observe(7.0);
        let mut out = String::new();
        histogram(&mut out, "x", "", &h);
        assert!(out.contains("x_bucket{le=\"0.25\"} 0\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.5\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"10\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 2\n"), "{out}");
        assert!(out.contains("x_count 2\n"), "{out}");
    }

    /// Every series the shipped alerting rules and Grafana dashboard name is one the daemon
    /// exports (a histogram's `_bucket`, `_sum` and `_count` by its own name), and every
    /// `class` label value they match on is one it counts.
    #[test]
    fn contrib_rules_and_dashboard_name_only_exported_metrics() {
        // With `[ha]` set, so its series are exported too.
        let metrics = Metrics::default();
        metrics.ha("active", 1);
        let exported: std::collections::BTreeSet<String> = metrics
            .render()
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_string)
            .collect();
        assert!(exported.len() > 20, "{exported:?}");
        for (file, text) in [
            (
                "contrib/prometheus/ldap2scim.rules.yml",
                include_str!("../contrib/prometheus/ldap2scim.rules.yml"),
            ),
            (
                "contrib/prometheus/ldap2scim.rules.test.yml",
                include_str!("../contrib/prometheus/ldap2scim.rules.test.yml"),
            ),
            (
                "contrib/grafana/ldap2scim.json",
                include_str!("../contrib/grafana/ldap2scim.json"),
            ),
        ] {
            let mut named = 0;
            for (i, _) in text.match_indices("ldap2scim_") {
                let name: String = text[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|suffix| name.strip_suffix(suffix))
                    .filter(|b| exported.contains(*b))
                    .unwrap_or(&name);
                assert!(
                    exported.contains(base),
                    "{file} names {name}, which is not exported"
                );
                named += 1;
            }
            assert!(named > 5, "{file}");
        }
        // The class the token alert matches on is the one a refused credential counts in.
        let mut outcome = crate::outcome::held_orphan_outcome("-");
        outcome.targets[0].status = TargetStatus::Error;
        outcome.targets[0].error = Some(
            crate::scim::TargetError::Rejected {
                target: "app".into(),
                method: "GET".into(),
                path: "/ServiceProviderConfig".into(),
                status: 401,
                scim_type: None,
                detail: "invalid token".into(),
            }
            .into(),
        );
        let m = Metrics::default();
        m.cycle_finished(&outcome, Duration::from_secs(1), 0.0);
        let text = m.render();
        assert!(
            text.contains("ldap2scim_errors_total{target=\"app\",class=\"auth\"} 1\n"),
            "{text}"
        );
        assert!(
            include_str!("../contrib/prometheus/ldap2scim.rules.yml").contains("class=\"auth\"")
        );
    }

    #[test]
    fn the_series_the_alerts_read_exist_at_zero_from_a_targets_first_cycle() {
        let outcome = crate::outcome::held_orphan_outcome("-");
        let m = Metrics::default();
        m.cycle_finished(&outcome, Duration::from_secs(1), 0.0);
        let text = m.render();
        for series in [
            "ldap2scim_errors_total{target=\"app\",class=\"auth\"} 0\n",
            "ldap2scim_errors_total{target=\"app\",class=\"http_5xx\"} 0\n",
        ] {
            assert!(text.contains(series), "{series} missing:\n{text}");
        }
        assert!(
            text.contains("target=\"app\",result=\"error\"} 0\n"),
            "{text}"
        );
    }

    #[test]
    fn orphans_and_snapshot_rebuilds_are_exported() {
        let outcome = crate::outcome::held_orphan_outcome("the snapshot lost rows");
        let m = Metrics::default();
        m.cycle_finished(&outcome, Duration::from_secs(1), 0.0);
        let text = m.render();
        assert!(
            text.contains("ldap2scim_orphans{target=\"app\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("ldap2scim_snapshot_rebuilds_total{target=\"app\"} 1\n"),
            "{text}"
        );
    }

    #[test]
    fn the_change_feed_is_exported_by_read_mode_changes_fallbacks_and_latency() {
        let mut outcome = crate::outcome::held_orphan_outcome("x");
        let m = Metrics::default();
        outcome.read = crate::outcome::ReadWay {
            mode: "delta",
            feed: Some("syncrepl"),
            changes: 3,
            ..Default::default()
        };
        m.cycle_finished(&outcome, Duration::from_secs(1), 0.0);
        outcome.read = crate::outcome::ReadWay {
            mode: "full",
            feed: Some("syncrepl"),
            fallback: Some("refresh-required"),
            ..Default::default()
        };
        m.cycle_finished(&outcome, Duration::from_secs(1), 0.0);
        m.live_latency(Duration::from_millis(300));
        let text = m.render();
        for line in [
            "ldap2scim_directory_reads_total{mode=\"delta\"} 1\n",
            "ldap2scim_directory_reads_total{mode=\"full\"} 1\n",
            "ldap2scim_change_feed_info{kind=\"syncrepl\"} 1\n",
            "ldap2scim_change_feed_changes_total 3\n",
            "ldap2scim_change_feed_fallbacks_total{reason=\"refresh-required\"} 1\n",
            "ldap2scim_live_change_latency_seconds_bucket{le=\"0.5\"} 1\n",
        ] {
            assert!(text.contains(line), "{line} in:\n{text}");
        }
    }

    #[test]
    fn not_ready_until_a_cycle_succeeds() {
        let m = Metrics::default();
        assert!(!m.ready());
        m.cycle_failed("source", Duration::from_secs(1));
        assert!(!m.ready());
        m.tick_skipped();
        let text = m.render();
        assert!(text.contains("ldap2scim_ticks_skipped_total 1\n"), "{text}");
        assert!(
            text.contains("ldap2scim_cycle_failures_total{class=\"source\"} 1\n"),
            "{text}"
        );
    }
}
