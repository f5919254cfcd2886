//! Issue 6, the daemon and its operators, against real servers on loopback: `run` on a
//! schedule (every minute), a directory change arriving, `/metrics`, `/healthz`, `/readyz`,
//! sd_notify, SIGHUP with a broken then a fixed configuration, SIGTERM in the middle of a
//! cycle with nothing lost, overlapping ticks skipped and counted, the state directory lock,
//! `status` and the audit trail (without secrets).

mod support;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

const TARGET: &str = "app";

fn seed(users: usize) -> String {
    let mut ldif = String::new();
    for i in 0..users {
        let uid = format!("user{i:03}");
        ldif.push_str(&person(
            &uid,
            &format!("User {i}"),
            "Tester",
            "User",
            &format!("{uid}@example.org"),
            "Engineer",
        ));
    }
    ldif.push_str(&group("staff", &[&person_dn("user000")]));
    ldif
}

/// The value of one sample line (`name{labels} value`) in a Prometheus exposition.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

fn users(server: &Scim2Server) -> Vec<Value> {
    scim_list(&server.base_url(), server.token(), "Users")
}

fn user_title(server: &Scim2Server, user_name: &str) -> Option<String> {
    users(server)
        .into_iter()
        .find(|u| u["userName"] == user_name)
        .and_then(|u| u["title"].as_str().map(str::to_string))
}

/// Everything the notify socket received so far.
fn drain(socket: &UnixDatagram, into: &mut Vec<String>) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = socket.recv(&mut buf) {
        into.push(String::from_utf8_lossy(&buf[..n]).to_string());
    }
}

struct World {
    slapd: Slapd,
    server: Scim2Server,
    proxy: RecordingProxy,
    config: TestConfig,
    port: u16,
}

impl World {
    fn start(users: usize, target_extra: &str) -> World {
        let (slapd, server) = std::thread::scope(|s| {
            let slapd = s.spawn(|| Slapd::start(&seed(users)));
            let server = Scim2Server::start();
            (slapd.join().unwrap(), server)
        });
        let proxy = RecordingProxy::start(&server.base_url());
        let mut config = TestConfig::new(&slapd);
        config.set("ldap", "max_shrink", "\"100%\"");
        let port = free_port();
        config.set("daemon", "listen", &toml_str(&format!("127.0.0.1:{port}")));
        config.target(TARGET, &proxy.url(), server.token(), target_extra);
        World {
            slapd,
            server,
            proxy,
            config,
            port,
        }
    }

    fn secrets(&self) -> [&str; 2] {
        [self.server.token(), self.slapd.bind_pw()]
    }
}

/// The "done when" of issue 6: `run` every minute; a directory change arrives; metrics;
/// SIGHUP broken then fixed; sd_notify; audit trail without secrets.
#[test]
fn run_every_minute_reloads_on_sighup_and_reports_through_metrics_and_systemd() {
    let mut w = World::start(3, "");
    w.config.set("daemon", "schedule", &toml_str("* * * * *"));
    let notify_path = w.config.dir().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_nonblocking(true).unwrap();
    let mut notes = Vec::new();

    let mut daemon = Ldap2scim::new(&w.config.path())
        .args(["run", "--now"])
        .env("NOTIFY_SOCKET", &notify_path.to_string_lossy())
        .env("WATCHDOG_USEC", "400000")
        .spawn();

    // The first cycle (--now) provisions everyone.
    assert!(
        wait_until(Duration::from_secs(60), || users(&w.server).len() == 3),
        "the first cycle did not provision the users:\n{}",
        daemon.stderr()
    );
    assert!(wait_until(Duration::from_secs(20), || http_get(
        w.port, "/readyz"
    )
    .0 == 200));
    assert_eq!(http_get(w.port, "/healthz").0, 200);
    assert!(wait_until(Duration::from_secs(5), || {
        drain(&notify, &mut notes);
        notes.iter().any(|n| n.starts_with("STATUS=last cycle"))
            && notes.iter().any(|n| n == "WATCHDOG=1")
    }));
    assert_eq!(
        notes.first().map(String::as_str),
        Some("READY=1"),
        "{notes:?}"
    );
    let stderr = daemon.stderr();
    let summary = stderr
        .lines()
        .find(|l| l.contains("cycle summary"))
        .unwrap_or_else(|| panic!("no per-target summary line:\n{stderr}"));
    assert!(
        summary.contains("run_id=") && summary.contains("target=app"),
        "{summary}"
    );

    // A directory change reaches the target at the next scheduled minute.
    w.slapd.modify(&format!(
        "dn: {}\nchangetype: modify\nreplace: title\ntitle: Staff Engineer\n",
        person_dn("user001")
    ));
    assert!(
        wait_until(Duration::from_secs(90), || user_title(&w.server, "user001")
            .as_deref()
            == Some("Staff Engineer")),
        "the change did not arrive within a scheduled cycle:\n{}",
        daemon.stderr()
    );
    // Give the cycle a moment to record its metrics after the last write.
    assert!(wait_until(Duration::from_secs(20), || {
        let (_, m) = http_get(w.port, "/metrics");
        sample(
            &m,
            "ldap2scim_changes_total{target=\"app\",kind=\"user-update\"}",
        ) == Some(1.0)
    }));
    let (status, metrics) = http_get(w.port, "/metrics");
    assert_eq!(status, 200);
    for series in [
        "ldap2scim_cycles_total{target=\"app\",result=\"ok\"}",
        "ldap2scim_changes_total{target=\"app\",kind=\"user-create\"}",
        "ldap2scim_held_changes{target=\"app\"}",
        "ldap2scim_throttled_total{target=\"app\"}",
        "ldap2scim_retries_total{target=\"app\"}",
        "ldap2scim_last_success_timestamp_seconds{target=\"app\"}",
        "ldap2scim_cycle_duration_seconds_count",
        "ldap2scim_directory_entries{kind=\"users\"}",
        "ldap2scim_ticks_skipped_total",
    ] {
        assert!(
            sample(&metrics, series).is_some(),
            "{series} missing:\n{metrics}"
        );
    }
    assert!(
        sample(
            &metrics,
            "ldap2scim_cycles_total{target=\"app\",result=\"ok\"}"
        )
        .unwrap()
            >= 2.0
    );
    assert_eq!(
        sample(
            &metrics,
            "ldap2scim_changes_total{target=\"app\",kind=\"user-create\"}"
        ),
        Some(3.0)
    );
    assert_eq!(
        sample(&metrics, "ldap2scim_directory_entries{kind=\"users\"}"),
        Some(3.0)
    );

    // SIGHUP with a broken configuration: every problem is logged, the old one keeps running.
    let good_target = std::fs::read_to_string(w.config.target_path(TARGET)).unwrap();
    w.config.set("daemon", "schedule", &toml_str("61 * * * *"));
    std::fs::write(
        w.config.target_path(TARGET),
        format!("{good_target}\nno_such_key = 1\n"),
    )
    .unwrap();
    daemon.signal("HUP");
    assert!(
        wait_until(Duration::from_secs(10), || {
            let e = daemon.stderr();
            e.contains("was rejected")
                && e.contains("no_such_key")
                && e.contains("invalid schedule")
        }),
        "{}",
        daemon.stderr()
    );
    let stderr = daemon.stderr();
    assert!(
        stderr.contains("invalid schedule"),
        "the schedule error is not logged:\n{stderr}"
    );
    assert!(
        stderr.contains("no_such_key"),
        "the target file error is not logged:\n{stderr}"
    );
    assert!(daemon.is_running());
    assert_eq!(http_get(w.port, "/healthz").0, 200);

    // SIGHUP with a fixed one: accepted, from the next cycle.
    w.config.set("daemon", "schedule", &toml_str("*/1 * * * *"));
    std::fs::write(w.config.target_path(TARGET), &good_target).unwrap();
    daemon.signal("HUP");
    assert!(
        wait_until(Duration::from_secs(10), || daemon
            .stderr()
            .contains("configuration reloaded")),
        "{}",
        daemon.stderr()
    );
    let (_, metrics) = http_get(w.port, "/metrics");
    assert_eq!(
        sample(
            &metrics,
            "ldap2scim_config_reloads_total{result=\"rejected\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &metrics,
            "ldap2scim_config_reloads_total{result=\"accepted\"}"
        ),
        Some(1.0)
    );

    let out = daemon.stop();
    out.expect_code(0);

    // The audit trail has every applied change, and neither it nor the logs hold a secret.
    let audit = std::fs::read_to_string(w.config.state_dir().join("audit.jsonl")).unwrap();
    let records: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        records
            .iter()
            .filter(|r| r["action"] == "create" && r["resource"] == "User")
            .count()
            == 3,
        "{audit}"
    );
    let update = records
        .iter()
        .find(|r| r["action"] == "update")
        .unwrap_or_else(|| panic!("no update in the audit log:\n{audit}"));
    assert_eq!(update["target"], TARGET);
    assert_eq!(update["outcome"], "ok");
    assert!(
        update["scim_id"].is_string() && update["run_id"].is_string() && update["time"].is_string()
    );
    assert!(
        update["attributes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a == "title"),
        "{update}"
    );
    for secret in w.secrets() {
        assert!(!audit.contains(secret), "a secret is in the audit log");
        assert!(
            !out.stderr.contains(secret),
            "a secret is in the daemon's log"
        );
        assert!(
            !out.stdout.contains(secret),
            "a secret is on the daemon's stdout"
        );
    }
}

/// SIGTERM while a cycle is applying: the request in flight finishes, nothing new starts, the
/// process exits 0 within the bound; a `sync` afterwards converges and `plan` has nothing to do.
/// Ticks every second (test-only interval) while cycles take longer: skipped and counted.
#[test]
fn sigterm_mid_cycle_loses_nothing_and_overlapping_ticks_are_skipped() {
    let users_total = 30;
    let w = World::start(users_total, "concurrency = 1\n");
    // Every create waits 300 ms at the proxy: the first cycle lasts about 9 s.
    w.proxy.push_faults_for(
        "POST",
        vec![Fault::Delay(Duration::from_millis(300)); users_total + 5],
    );
    let mut daemon = Ldap2scim::new(&w.config.path())
        .args(["run"])
        .env("LDAP2SCIM_TICK_INTERVAL", "1s")
        .spawn();
    assert!(
        wait_until(Duration::from_secs(60), || users(&w.server).len() >= 5),
        "the cycle did not start writing:\n{}",
        daemon.stderr()
    );
    assert!(
        wait_until(Duration::from_secs(20), || {
            let (_, m) = http_get(w.port, "/metrics");
            sample(&m, "ldap2scim_ticks_skipped_total").unwrap_or(0.0) >= 2.0
        }),
        "ticks during a running cycle were not counted as skipped:\n{}",
        http_get(w.port, "/metrics").1
    );
    assert_eq!(
        http_get(w.port, "/readyz").0,
        503,
        "not ready before the first cycle finished"
    );
    let stderr = daemon.stderr();
    assert!(stderr.contains("cycle is still running"), "{stderr}");
    assert_eq!(
        stderr.matches("cycle started").count(),
        1,
        "two cycles at once:\n{stderr}"
    );

    let before = users(&w.server).len();
    assert!(
        before < users_total,
        "the cycle finished before the stop: make it slower"
    );
    let asked = Instant::now();
    daemon.signal("TERM");
    let out = daemon
        .wait_timeout(Duration::from_secs(35))
        .expect("the daemon did not stop within the bound");
    let took = asked.elapsed();
    out.expect_code(0);
    assert!(took < Duration::from_secs(30), "stopping took {took:?}");
    assert!(
        out.stderr
            .contains("the cycle finishes the request in flight"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("cycle summary"), "{}", out.stderr);
    let after_stop = users(&w.server).len();
    assert!(after_stop < users_total, "the stop did not stop the cycle");

    // Nothing lost: every create that reached the target is in the snapshot (no duplicate on
    // resume), and one sync converges.
    w.proxy.clear_faults();
    w.proxy.clear();
    ldap2scim(&w.config.path(), &["sync"]).expect_code(0);
    let all = users(&w.server);
    assert_eq!(all.len(), users_total);
    let created_again = w
        .proxy
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path.starts_with("/Users"))
        .count();
    assert_eq!(
        created_again,
        users_total - after_stop,
        "creates were repeated or lost"
    );
    ldap2scim(&w.config.path(), &["plan"]).expect_code(0);

    // `status` tells the last run, its result and the next run.
    let status = ldap2scim(&w.config.path(), &["status"]);
    status.expect_code(0);
    assert!(status.stdout.contains("target app: last run"), "{status}");
    assert!(status.stdout.contains("result ok"), "{status}");
    assert!(status.stdout.contains("next scheduled run"), "{status}");

    let audit = std::fs::read_to_string(w.config.state_dir().join("audit.jsonl")).unwrap();
    let creates = audit
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["action"] == "create" && r["resource"] == "User" && r["outcome"] == "ok")
        .count();
    assert_eq!(
        creates, users_total,
        "the audit log misses creates:\n{audit}"
    );
}

/// One instance per state directory: a second `sync` is told which process holds it.
#[test]
fn a_second_instance_is_told_who_holds_the_state_directory() {
    // No server is contacted: `run` without --now waits for Monday 02:00.
    let ca = temp_dir("ca");
    let ca_file = ca.path().join("ca.pem");
    std::fs::write(&ca_file, "").unwrap();
    let mut config =
        TestConfig::for_directory("ldap://127.0.0.1:1", &ca_file, "cn=nobody", "unused");
    config.set("daemon", "schedule", &toml_str("0 2 * * 1"));
    config.target(TARGET, "http://127.0.0.1:1/scim/v2", &random_token(), "");
    let mut daemon = Ldap2scim::new(&config.path()).args(["run"]).spawn();
    assert!(
        wait_until(Duration::from_secs(20), || daemon
            .stderr()
            .contains("daemon started")),
        "{}",
        daemon.stderr()
    );
    let pid = daemon.pid();
    let second = ldap2scim(&config.path(), &["run"]);
    second.expect_code(1);
    assert!(
        second
            .stderr
            .contains(&format!("is in use by ldap2scim (pid {pid}, `run`)")),
        "{second}"
    );
    let status = ldap2scim(&config.path(), &["status"]);
    status.expect_code(0);
    assert!(
        status
            .stdout
            .contains(&format!("held by ldap2scim (pid {pid}, `run`)")),
        "{status}"
    );
    assert!(status.stdout.contains("next scheduled run"), "{status}");
    assert!(daemon.is_running());
    daemon.stop().expect_code(0);
}

/// An interactive `sync` draws a progress bar per target on a terminal; piped, it prints the
/// plain summary lines only.
#[test]
fn sync_shows_a_progress_bar_on_a_terminal_and_plain_lines_otherwise() {
    if !std::path::Path::new("/usr/bin/script").exists() {
        eprintln!("SKIPPED: script(1) from util-linux is not installed");
        return;
    }
    let w = World::start(4, "");
    let piped = ldap2scim(&w.config.path(), &["plan"]);
    piped.expect_code(2);
    let command = format!(
        "{} --config {} sync",
        ldap2scim_binary().display(),
        w.config.path().display()
    );
    let out = std::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env("TERM", "xterm")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("changes"),
        "no progress bar on a terminal:\n{text}"
    );
    assert!(text.contains(TARGET), "{text}");
    assert_eq!(users(&w.server).len(), 4);

    // Not a terminal: summary lines, no bar.
    w.slapd.modify(&format!(
        "dn: {}\nchangetype: modify\nreplace: title\ntitle: Lead\n",
        person_dn("user002")
    ));
    let plain = ldap2scim(&w.config.path(), &["sync"]);
    plain.expect_code(0);
    assert!(plain.stdout.starts_with("target app: ok"), "{plain}");
    assert!(!plain.stderr.contains("/1 changes"), "{plain}");
}
