//! Issue 15, an active/standby pair (`[ha]`), against real servers on loopback: one slapd, two
//! SCIM servers, a real PostgreSQL for the lease and the ledger, and two `run` instances, each
//! with its own state directory and its own recording proxy in front of each SCIM server (so
//! every write is known to come from one instance or the other).
//!
//! - one writes, the other writes nothing; `kill -9` of the active in the middle of a
//!   2,000-user push, ten times at random moments: the standby finishes it, the targets end
//!   with exactly the directory (no duplicate, nothing missing), and a change made during the
//!   failover reaches every target;
//! - `kill -STOP` of the active beyond the lease: the standby takes over, and after `kill
//!   -CONT` the old active sends no write;
//! - PostgreSQL stopped: nobody writes, `/readyz` and `status` say why; started again: the
//!   pair resumes.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

const TTL: &str = "3s";
const USERS: usize = 2000;

/// One instance of the pair: its configuration (its own state directory) and its proxies, one
/// per SCIM server, in the servers' order.
struct Instance {
    config: TestConfig,
    proxies: Vec<RecordingProxy>,
}

impl Instance {
    fn new(name: &'static str, slapd: &Slapd, servers: &[Box<dyn ScimServer>]) -> Instance {
        let mut config = TestConfig::new(slapd);
        config
            .set("ldap", "max_shrink", "\"100%\"")
            .set(
                "ha",
                "lease",
                r#"{ postgres = { env = "LDAP2SCIM_HA_DSN" } }"#,
            )
            .set("ha", "lease_ttl", &format!("\"{TTL}\""))
            .set("ha", "instance", &format!("\"{name}\""));
        let mut proxies = Vec::new();
        for server in servers {
            let proxy = RecordingProxy::start(&server.base_url());
            // g-all (every user, nested) is left out: Better Auth takes 1,000 direct members.
            config.target(
                server.name(),
                &proxy.url(),
                server.token(),
                "concurrency = 4\ngroups_filter = [\"g-0*\"]\n",
            );
            proxies.push(proxy);
        }
        Instance { config, proxies }
    }

    fn writes(&self) -> usize {
        self.proxies.iter().map(RecordingProxy::writes).sum()
    }

    /// `run --now`, with cycles every `tick` instead of the schedule (and so no cycle cut
    /// short by a quarter hour coming due).
    fn run(&self, dsn: &str, tick: Option<&str>) -> Daemon {
        let mut cmd = Ldap2scim::new(&self.config.path())
            .env("LDAP2SCIM_HA_DSN", dsn)
            .args(["run", "--now"]);
        if let Some(t) = tick {
            cmd = cmd.env("LDAP2SCIM_TICK_INTERVAL", t);
        }
        cmd.spawn()
    }

    fn command(&self, dsn: &str, args: &[&str]) -> Output {
        Ldap2scim::new(&self.config.path())
            .env("LDAP2SCIM_HA_DSN", dsn)
            .args(args.iter().copied())
            .run()
    }
}

fn wait_for_log(daemon: &Daemon, text: &str, timeout: Duration) {
    assert!(
        wait_until(timeout, || daemon.stderr().contains(text)),
        "the daemon did not log {text:?} within {timeout:?}:\n{}",
        daemon.stderr()
    );
}

fn user_names(server: &dyn ScimServer) -> Vec<String> {
    scim_list_paged(&server.base_url(), server.token(), "Users", 500)
        .iter()
        .map(|u| u["userName"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// A user added while the pair is in trouble (`newhire`).
fn new_hire() -> String {
    person(
        "newhire",
        "New Hire",
        "Hire",
        "New",
        "newhire@example.org",
        "Engineer",
    )
}

fn directory_names(n: usize) -> BTreeSet<String> {
    (1..=n).map(|i| format!("u{i:06}")).collect()
}

/// Waits until every server holds exactly `expected` users (by userName), then checks that no
/// userName appears twice.
fn assert_targets_hold(servers: &[Box<dyn ScimServer>], expected: &BTreeSet<String>, what: &str) {
    for server in servers {
        let mut last = Vec::new();
        let done = wait_until(Duration::from_secs(120), || {
            last = user_names(server.as_ref());
            last.iter().cloned().collect::<BTreeSet<_>>() == *expected
        });
        let got: BTreeSet<String> = last.iter().cloned().collect();
        assert!(
            done,
            "{what}: {} does not hold exactly the directory: {} users, missing {:?}, extra {:?}",
            server.name(),
            last.len(),
            expected.difference(&got).take(10).collect::<Vec<_>>(),
            got.difference(expected).take(10).collect::<Vec<_>>()
        );
        assert_eq!(
            last.len(),
            expected.len(),
            "{what}: {} has duplicate accounts",
            server.name()
        );
    }
}

/// The listings of whole collections begun (the first page of a GET of /Users or /Groups
/// without a filter): what a lost snapshot costs, and what a warm standby must not need.
fn listings(proxy: &RecordingProxy) -> Vec<String> {
    proxy
        .requests()
        .into_iter()
        .filter(|r| {
            r.method == "GET"
                && (r.path.starts_with("/Users") || r.path.starts_with("/Groups"))
                && !r.path.contains("filter=")
                && !r.path[1..].contains('/')
                && r.path.contains("startIndex=1&")
        })
        .map(|r| r.path)
        .collect()
}

fn lease_epoch(pg: &Postgres, db: &str) -> i64 {
    pg.psql(db, "SELECT epoch FROM ldap2scim_lease WHERE id = 1")
        .trim()
        .parse()
        .unwrap_or(0)
}

/// A small pseudo-random number (no dependency): the test's kill moments.
fn random_below(n: usize, salt: usize) -> usize {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as usize;
    (t ^ (salt.wrapping_mul(2654435761))) % n.max(1)
}

/// One round: a fresh pair of SCIM servers and a fresh lease database; A pushes the
/// directory, B waits; A is killed (SIGKILL) once its proxies have seen `kill_at` writes; B
/// finishes the push. With `change_during_failover`, a user is added while nobody holds the
/// lease.
fn kill_round(slapd: &Slapd, pg: &Postgres, round: usize, kill_at: usize, change: bool) {
    let servers = all_scim_servers();
    let db = format!("round{round}");
    pg.create_database(&db);
    let dsn = pg.dsn(&db);
    let a = Instance::new("sync-a", slapd, &servers);
    let b = Instance::new("sync-b", slapd, &servers);
    let mut active = a.run(&dsn, Some("1h"));
    wait_for_log(&active, "holds the lease", Duration::from_secs(30));
    let standby = b.run(&dsn, Some("1h"));
    wait_for_log(&standby, "standby", Duration::from_secs(30));
    let reached = wait_until(Duration::from_secs(120), || a.writes() >= kill_at);
    assert!(
        reached,
        "round {round}: A never reached {kill_at} writes:\n{}",
        active.stderr()
    );
    active.signal("KILL");
    let killed_after = a.writes();
    assert_eq!(
        b.writes(),
        0,
        "round {round}: the standby wrote while A held the lease"
    );
    let mut expected = directory_names(USERS);
    if change {
        slapd.add(&new_hire());
        expected.insert("newhire".into());
    }
    wait_for_log(&standby, "holds the lease", Duration::from_secs(30));
    assert_targets_hold(&servers, &expected, &format!("round {round}"));
    wait_for_log(&standby, "cycle summary", Duration::from_secs(120));
    let log = standby.stderr();
    assert!(
        !log.contains("snapshot lost") && !log.contains("orphan"),
        "round {round}: the promoted standby treated something as lost or orphaned:\n{log}"
    );
    // Its mirror followed the directory while it waited: promoted, it plans every target
    // against it, without reading the whole directory again.
    let promoted = &log[log.find("this instance holds the lease").unwrap()..];
    assert!(
        !promoted.contains("reading the whole directory"),
        "round {round}: the promoted standby read the whole directory:\n{promoted}"
    );
    // Nothing is listed to rebuild rows (the ledger has them) and nothing is an orphan. The
    // users still to create are looked up before they are (ours from a lost answer?), as A
    // looked up all of them on its first cycle: B lists no more than A did.
    assert!(
        !log.contains("rebuild") && !log.contains("lost"),
        "round {round}: the promoted standby rebuilt its rows:\n{log}"
    );
    for ((pb, pa), server) in b.proxies.iter().zip(&a.proxies).zip(&servers) {
        let (lb, la) = (listings(pb).len(), listings(pa).len());
        assert!(
            lb <= la,
            "round {round}: the promoted standby listed {} {lb} times, the first active {la}: {:?}\n{log}",
            server.name(),
            listings(pb)
        );
    }
    // Groups: every group of the directory is there once, on every server.
    for server in &servers {
        let list = || -> Vec<String> {
            scim_list_paged(&server.base_url(), server.token(), "Groups", 500)
                .iter()
                .map(|g| g["displayName"].as_str().unwrap_or_default().to_string())
                .collect()
        };
        let mut groups = Vec::new();
        wait_until(Duration::from_secs(60), || {
            groups = list();
            groups.len() >= USERS / 50
        });
        let unique: BTreeSet<&String> = groups.iter().collect();
        assert_eq!(
            unique.len(),
            groups.len(),
            "round {round}: {} has duplicate groups",
            server.name()
        );
        assert_eq!(groups.len(), USERS / 50, "round {round}: {}", server.name());
    }
    eprintln!(
        "round {round}: A killed after {killed_after} writes (aimed at {kill_at}); B wrote {}",
        b.writes()
    );
    // The audit trail of B names the epoch its writes were made under.
    let audit = std::fs::read_to_string(b.config.state_dir().join("audit.jsonl")).unwrap();
    let epoch = lease_epoch(pg, &db);
    assert!(
        epoch >= 2,
        "round {round}: the epoch after a failover is {epoch}"
    );
    for line in audit.lines().take(50) {
        let record: Value = serde_json::from_str(line).unwrap();
        assert_eq!(record["epoch"], epoch, "round {round}: {line}");
    }
    if change {
        slapd.delete(&person_dn("newhire"));
    }
    drop(standby);
}

#[test]
fn the_standby_finishes_a_push_when_the_active_is_killed_ten_times() {
    let slapd = Slapd::start_bulk(&bulk_directory(USERS, 50));
    let pg = Postgres::start();
    // Writes of a whole push: 2,000 users and 41 groups with their members, per server.
    for round in 0..10 {
        let kill_at = 20 + random_below(3000, round);
        kill_round(&slapd, &pg, round, kill_at, round == 0);
    }
}

#[test]
fn a_paused_active_sends_nothing_after_the_standby_took_over() {
    let slapd = Slapd::start_bulk(&bulk_directory(USERS, 50));
    let pg = Postgres::start();
    pg.create_database("pause");
    let dsn = pg.dsn("pause");
    let servers = all_scim_servers();
    let a = Instance::new("sync-a", &slapd, &servers);
    let b = Instance::new("sync-b", &slapd, &servers);
    let mut active = a.run(&dsn, Some("1h"));
    wait_for_log(&active, "holds the lease", Duration::from_secs(30));
    let standby = b.run(&dsn, Some("1h"));
    wait_for_log(&standby, "standby", Duration::from_secs(30));
    assert!(wait_until(Duration::from_secs(120), || a.writes() >= 300));
    let epoch_before = lease_epoch(&pg, "pause");
    active.signal("STOP");
    let stopped_at = Instant::now();
    // B takes over once the lease ended (3 s), with a new epoch.
    assert!(
        wait_until(Duration::from_secs(30), || lease_epoch(&pg, "pause")
            > epoch_before),
        "the standby did not take over:\n{}",
        standby.stderr()
    );
    let new_epoch_seen = Instant::now();
    assert!(wait_until(Duration::from_secs(60), || b.writes() > 0));
    active.signal("CONT");
    let resumed_at = Instant::now();
    // The push goes on from B; A, awake again, must not write.
    assert_targets_hold(&servers, &directory_names(USERS), "after the pause");
    std::thread::sleep(Duration::from_secs(4));
    // Nothing from A arrives once the new epoch began: not while it is stopped (what a busy
    // proxy reads then was sent before the pause), and not after it runs again.
    let arrivals: Vec<Instant> = a
        .proxies
        .iter()
        .flat_map(RecordingProxy::write_arrivals)
        .collect();
    let late: Vec<Duration> = arrivals
        .iter()
        .filter(|t| **t >= new_epoch_seen)
        .map(|t| *t - stopped_at)
        .collect();
    let during = arrivals
        .iter()
        .filter(|t| **t > stopped_at && **t < new_epoch_seen)
        .count();
    assert!(
        late.is_empty(),
        "the old active wrote after the new epoch began ({:?} after the pause; it ran again {:?} after the pause; {during} arrivals between the pause and the new epoch): {late:?}\n{}",
        new_epoch_seen - stopped_at,
        resumed_at - stopped_at,
        active.stderr()
    );
    eprintln!("pause: {during} of A's writes were read by its proxies after it stopped, before the new epoch (sent before it stopped)");
    wait_for_log(&active, "standby", Duration::from_secs(10));
    let status = b.command(&dsn, &["status"]);
    assert!(
        status
            .stdout
            .contains("lease held by sync-b (this instance)")
            && status.stdout.contains("instance sync-a")
            && status
                .stdout
                .contains("instance sync-b (this instance): active"),
        "{status}"
    );
}

#[test]
fn without_the_lease_database_nobody_writes_and_the_pair_resumes_after() {
    let slapd = Slapd::start(&people(5));
    let mut pg = Postgres::start();
    pg.create_database("outage");
    let dsn = pg.dsn("outage");
    let servers = vec![Box::new(Scim2Server::start()) as Box<dyn ScimServer>];
    let mut a = Instance::new("sync-a", &slapd, &servers);
    let port = free_port();
    a.config
        .set("daemon", "listen", &format!("\"127.0.0.1:{port}\""));
    let b = Instance::new("sync-b", &slapd, &servers);
    let active = a.run(&dsn, Some("1s"));
    wait_for_log(&active, "holds the lease", Duration::from_secs(30));
    let standby = b.run(&dsn, Some("1s"));
    wait_for_log(&standby, "standby", Duration::from_secs(30));
    let five: BTreeSet<String> = (0..5).map(|i| format!("p{i:03}")).collect();
    assert_targets_hold(&servers, &five, "before the outage");

    pg.stop();
    wait_for_log(
        &active,
        "the lease database cannot be reached",
        Duration::from_secs(15),
    );
    wait_for_log(
        &standby,
        "the lease database cannot be reached",
        Duration::from_secs(15),
    );
    let (a0, b0) = (a.writes(), b.writes());
    slapd.add(&new_hire());
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        (a.writes(), b.writes()),
        (a0, b0),
        "an instance wrote without the lease database"
    );
    assert!(!user_names(servers[0].as_ref()).contains(&"newhire".to_string()));
    let (code, body) = http_get(port, "/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("lease database"), "{body}");
    let status = a.command(&dsn, &["status"]);
    assert!(
        status
            .stdout
            .contains("the lease database cannot be reached"),
        "{status}"
    );

    pg.start_again();
    let mut with_hire = five.clone();
    with_hire.insert("newhire".into());
    assert_targets_hold(&servers, &with_hire, "after the outage");
    let (code, body) = http_get(port, "/readyz");
    assert!(
        wait_until(Duration::from_secs(15), || http_get(port, "/readyz").0
            == 200),
        "{code} {body}"
    );
    drop(standby);
    drop(active);
}

#[test]
fn a_sync_by_hand_on_the_standby_writes_nothing() {
    let slapd = Slapd::start(&people(3));
    let pg = Postgres::start();
    pg.create_database("hand");
    let dsn = pg.dsn("hand");
    let servers = vec![Box::new(Scim2Server::start()) as Box<dyn ScimServer>];
    let a = Instance::new("sync-a", &slapd, &servers);
    let b = Instance::new("sync-b", &slapd, &servers);
    let active = a.run(&dsn, Some("1h"));
    wait_for_log(&active, "holds the lease", Duration::from_secs(30));
    let three: BTreeSet<String> = (0..3).map(|i| format!("p{i:03}")).collect();
    assert_targets_hold(&servers, &three, "first sync");
    // Run by hand with no daemon here: the lease is A's.
    let out = b.command(&dsn, &["sync"]);
    assert_eq!(out.code, 1, "{out}");
    assert!(
        out.stderr.contains("sync-a holds the lease") && out.stderr.contains("nothing was written"),
        "{out}"
    );
    // Forwarded to B's daemon, a standby: the same.
    let standby = b.run(&dsn, Some("1h"));
    wait_for_log(&standby, "ha: applied the ledger", Duration::from_secs(30));
    let out = b.command(&dsn, &["sync"]);
    assert_eq!(out.code, 1, "{out}");
    assert!(
        out.stderr.contains("sync-a holds the lease") && out.stderr.contains("nothing was written"),
        "{out}"
    );
    assert_eq!(b.writes(), 0);
    // `plan` on the standby works, from its ledger-fed snapshot: nothing to do.
    let plan = b.command(&dsn, &["plan"]);
    assert_eq!(
        plan.code, 0,
        "the standby's snapshot is not up to the ledger:\n{plan}"
    );
    drop(standby);
    drop(active);
}

#[test]
fn a_rebinds_memberships_reach_the_ledger() {
    let seed = staff(3) + &group("g-0001", &[&person_dn("p001"), &person_dn("p002")]);
    let slapd = Slapd::start(&seed);
    let pg = Postgres::start();
    pg.create_database("rebind");
    let dsn = pg.dsn("rebind");
    let servers = vec![Box::new(Scim2Server::start()) as Box<dyn ScimServer>];
    let a = Instance::new("sync-a", &slapd, &servers);
    let first = a.command(&dsn, &["sync"]);
    assert_eq!(first.code, 0, "{first}");
    let old = slapd.entry_uuid(&person_dn("p001"));
    // The entry is replaced under the same uid and put back in the group: a rebind.
    slapd.delete(&person_dn("p001"));
    slapd.add(&person(
        "p001",
        "Someone Else",
        "Else",
        "Someone",
        "p001@example.org",
        "Newcomer",
    ));
    let team = slapd.search(&group_dn("g-0001"), "(objectClass=*)", &["member"]);
    if !team.contains(&person_dn("p001")) {
        slapd.modify(&format!(
            "dn: {}\nchangetype: modify\nadd: member\nmember: {}\n",
            group_dn("g-0001"),
            person_dn("p001")
        ));
    }
    let new = slapd.entry_uuid(&person_dn("p001"));
    let out = a.command(&dsn, &["sync"]);
    assert_eq!(out.code, 0, "{out}");
    assert!(out.stdout.contains("users rebound 1"), "{out}");
    // The group's row in the ledger names the account's new directory entry, as the
    // snapshot does: a standby taking over plans no membership change for it.
    let members = pg.psql(
        "rebind",
        "SELECT row_data->'members' FROM ldap2scim_ledger WHERE kind = 'group'",
    );
    assert!(
        members.contains(&new) && !members.contains(&old),
        "old {old}, new {new}: {members}"
    );
    assert_eq!(
        a.command(&dsn, &["plan"]).code,
        0,
        "a plan after the rebind must be empty"
    );
}
