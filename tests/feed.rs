//! The change feed against a real slapd with syncprov: delta cycles read only what changed
//! (RFC 4533 refreshOnly from a stored cookie), plan exactly what a full read plans, and any
//! doubt about the feed falls back to a full read with every guard.

mod support;

use serde_json::Value;
use support::*;

/// A nested directory: `outer` holds `inner` (p002, p003) and p000; `everyone` holds p000, p001.
fn nested_seed() -> String {
    staff(8)
        + &group("everyone", &[&person_dn("p000"), &person_dn("p001")])
        + &group("inner", &[&person_dn("p002"), &person_dn("p003")])
        + &group("outer", &[&group_dn("inner"), &person_dn("p000")])
}

/// `plan --format json` without `--full` (a delta where the feed can) and with it; the read
/// durations aside, they must be the same.
fn delta_and_full_plans(w: &World) -> (Value, Value) {
    let delta = w.run(&["plan", "--format", "json"]);
    assert!(delta.code == 0 || delta.code == 2, "plan: {delta}");
    let full = w.run(&["plan", "--full", "--format", "json"]);
    assert!(full.code == 0 || full.code == 2, "plan --full: {full}");
    assert_eq!(delta.code, full.code, "delta:\n{delta}\nfull:\n{full}");
    (delta.json(), full.json())
}

fn assert_delta_plans_like_full(w: &World) {
    let (delta, full) = delta_and_full_plans(w);
    assert_eq!(
        delta, full,
        "the delta plan differs from the full plan:\ndelta: {delta:#}\nfull: {full:#}"
    );
}

/// The LDIF of a new hire, `p100`.
fn new_hire() -> String {
    person(
        "p100",
        "New Hire",
        "Hire",
        "New",
        "p100@example.org",
        "Staff",
    )
}

/// No target received a write since its proxy was last cleared.
fn assert_no_writes(w: &World) {
    for t in &w.targets {
        assert_eq!(
            t.proxy.writes(),
            0,
            "{}: {:?}",
            t.name(),
            t.proxy.requests()
        );
    }
}

fn stderr(out: &Output) -> String {
    out.stderr.clone()
}

#[test]
fn delta_cycles_read_only_what_changed_and_plan_what_a_full_read_plans() {
    let w = World::start(&nested_seed(), "");
    let first = w.sync_ok();
    assert!(
        stderr(&first).contains("there is no mirror of the directory yet"),
        "the first cycle reads everything and builds the mirror: {first}"
    );
    // Nothing changed: the next cycle plans the whole mirror once and finds nothing to do;
    // from then on a quiet delta, no write, no plan.
    w.sync_ok();
    for t in &w.targets {
        t.proxy.clear();
    }
    let quiet = w.sync_ok();
    assert!(
        stderr(&quiet).contains("the change feed named no change"),
        "{quiet}"
    );
    assert_no_writes(&w);
    let status = w.run(&["status"]);
    assert!(
        status
            .stdout
            .contains("changes waiting: 0 users and 0 groups"),
        "{status}"
    );

    // A title, a new hire, a leaver, a disabled user, a member added to the inner group (a
    // member of the outer one too), a rename.
    w.slapd.modify(&format!(
        "dn: {}\nchangetype: modify\nreplace: title\ntitle: Staff Engineer\n",
        person_dn("p001")
    ));
    w.slapd.add(&new_hire());
    w.slapd.delete(&person_dn("p007"));
    w.slapd.modify(&format!(
        "dn: {}\nchangetype: modify\nadd: employeeType\nemployeeType: disabled\n",
        person_dn("p006")
    ));
    w.slapd.modify(&format!(
        "dn: {}\nchangetype: modify\nadd: member\nmember: {}\n",
        group_dn("inner"),
        person_dn("p004")
    ));
    w.slapd.modify(&format!(
        "dn: {}\nchangetype: modrdn\nnewrdn: uid=p005b\ndeleteoldrdn: 1\n",
        person_dn("p005")
    ));
    // `status` asks the directory what waits (the user changes: p001, p100, p007, p006,
    // p005 renamed; the group changes: inner), and stores nothing.
    for _ in 0..2 {
        let status = w.run(&["status"]);
        assert!(
            status
                .stdout
                .contains("changes waiting: 5 users and 1 groups"),
            "{status}"
        );
    }
    assert_delta_plans_like_full(&w);
    let (delta, _) = delta_and_full_plans(&w);
    let changes = changes_of(&delta, w.targets[0].name());
    for expected in [
        change("update", "User", "p001"),
        change("create", "User", "p100"),
        change("deactivate", "User", "p007"),
        change("deactivate", "User", "p006"),
        change("add-members", "Group", "outer"),
        change("add-members", "Group", "inner"),
    ] {
        assert!(
            changes.contains(&expected),
            "{expected:?} not in {changes:?}"
        );
    }
    let synced = w.sync_ok();
    assert!(
        stderr(&synced).contains("directory read from the change feed"),
        "{synced}"
    );
    w.assert_converged();
    let outer = &w.targets[0].memberships()["outer"];
    assert!(outer.contains("p004"), "{outer:?}");
}

#[test]
fn a_member_removed_from_a_nested_group_and_a_group_deleted_are_deltas_too() {
    let w = World::start(&nested_seed(), "");
    w.sync_ok();
    w.slapd.modify(&format!(
        "dn: {}\nchangetype: modify\ndelete: member\nmember: {}\n",
        group_dn("inner"),
        person_dn("p003")
    ));
    w.slapd.delete(&group_dn("everyone"));
    assert_delta_plans_like_full(&w);
    w.sync_ok();
    w.assert_converged();
    let m = w.targets[0].memberships();
    assert!(!m["outer"].contains("p003"), "{m:?}");
    assert!(!m.contains_key("everyone"), "{m:?}");
}

#[test]
fn the_change_feed_setting_none_reads_everything_every_time() {
    let mut w = World::start(&nested_seed(), "");
    w.config.set("ldap", "change_feed", "\"none\"");
    w.sync_ok();
    let again = w.sync_ok();
    assert!(
        !stderr(&again).contains("change feed"),
        "no feed without one: {again}"
    );
    w.slapd.add(&new_hire());
    w.sync_ok();
    w.assert_converged();
}

#[test]
fn sync_full_reads_everything_and_a_changed_mapping_rebuilds_the_mirror() {
    let w = World::start(&nested_seed(), "");
    w.sync_ok();
    let full = w.run(&["sync", "--full"]);
    full.expect_code(0);
    assert!(stderr(&full).contains("--full"), "{full}");
    // A target file changed: that target is planned against the whole mirror again.
    let name = w.targets[0].name();
    let path = w.config.target_path(name);
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("{text}\n# touched\n")).unwrap();
    let after = w.sync_ok();
    assert!(
        !stderr(&after).contains("the change feed named no change"),
        "a target whose settings changed is planned: {after}"
    );
    // A mapping that reads another attribute: the mirror's view changed, a full read.
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        format!("{text}\n[mapping]\nnickName = \"{{uid}}{{employeeNumber}}\"\n"),
    )
    .unwrap();
    let rebuilt = w.sync_ok();
    assert!(
        stderr(&rebuilt).contains("mapped attributes changed"),
        "{rebuilt}"
    );
    w.assert_converged();
}

/// A title for every one of `uids`.
fn retitle(w: &World, uids: &[String], title: &str) {
    let ldif: String = uids
        .iter()
        .map(|u| {
            format!(
                "dn: {}\nchangetype: modify\nreplace: title\ntitle: {title}\n\n",
                person_dn(u)
            )
        })
        .collect();
    w.slapd.modify(&ldif);
}

fn uids(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("p{i:03}")).collect()
}

#[test]
fn a_feed_cut_mid_refresh_advances_nothing_and_deprovisions_nothing() {
    let mut w = World::start(&people(60), "");
    let relay = TcpRelay::start(w.slapd.port());
    w.config.set(
        "ldap",
        "url",
        &toml_str(&format!("ldap://127.0.0.1:{}", relay.port())),
    );
    w.sync_ok();
    retitle(&w, &uids(0..60), "Engineer");
    for uid in uids(50..55) {
        w.slapd.delete(&person_dn(&uid));
    }
    for t in &w.targets {
        t.proxy.clear();
    }
    relay.cut_after(Some(6000));
    let cut = w.run(&["sync"]);
    cut.expect_code(1);
    assert!(relay.cuts() > 0, "the relay cut nothing: {cut}");
    assert!(
        cut.stderr.contains("Nothing was changed on any target"),
        "{cut}"
    );
    assert_no_writes(&w);
    // The cookie did not move: the next delta brings every change, and no more.
    relay.cut_after(None);
    assert_delta_plans_like_full(&w);
    w.sync_ok();
    w.assert_converged();
    let states = w.targets[0].user_states();
    assert!(!states["p050"], "{states:?}");
    assert!(states["p049"], "{states:?}");
    assert_eq!(w.targets[0].user("p010")["title"], "Engineer");
}

/// Sets an option of the syncprov overlay (over ldapi, as root).
fn syncprov_option(w: &World, attr: &str, value: &str) {
    w.slapd.modify(&format!(
        "dn: olcOverlay={{1}}syncprov,olcDatabase={{1}}mdb,cn=config\nchangetype: modify\nreplace: {attr}\n{attr}: {value}\n"
    ));
}

#[test]
fn a_restart_that_loses_the_session_log_carries_the_deletes_in_a_present_phase() {
    // The delete happens before the restart: the session log that saw it is gone, and the
    // cookie is older than what the new one covers.
    let mut w = World::start(&nested_seed(), "");
    w.sync_ok();
    w.slapd.delete(&person_dn("p007"));
    w.slapd.stop();
    w.slapd.start_again();
    retitle(&w, &uids(1..2), "Lead");
    assert_delta_plans_like_full(&w);
    let synced = w.sync_ok();
    assert!(synced.stderr.contains("present_phase=true"), "{synced}");
    w.assert_converged();
    let states = w.targets[0].user_states();
    assert!(!states["p007"], "{states:?}");
    assert_eq!(w.targets[0].user("p001")["title"], "Lead");
}

#[test]
fn a_present_phase_that_removes_too_many_holds_the_deprovisions() {
    let mut w = World::start(&people(10), "");
    w.config.set("ldap", "max_shrink", "\"20%\"");
    w.sync_ok();
    for uid in uids(5..10) {
        w.slapd.delete(&person_dn(&uid));
    }
    w.slapd.stop();
    w.slapd.start_again();
    let held = w.run(&["sync"]);
    held.expect_code(4);
    assert!(held.stderr.contains("present_phase=true"), "{held}");
    let states = w.targets[0].user_states();
    assert!(
        states.values().all(|active| *active),
        "nobody deprovisioned: {states:?}"
    );
    // Held again by the next delta, which has nothing new: the hold is not forgotten.
    w.run(&["sync"]).expect_code(4);
}

#[test]
fn feed_deletes_count_against_max_deprovisions() {
    let w = World::start(&people(10), "max_deprovisions = 1\n");
    w.sync_ok();
    for uid in uids(7..10) {
        w.slapd.delete(&person_dn(&uid));
    }
    w.run(&["sync"]).expect_code(4);
    let states = w.targets[0].user_states();
    assert!(states.values().all(|active| *active), "{states:?}");
}

#[test]
fn e_sync_refresh_required_drops_the_cookie_and_reads_everything() {
    // When its session log does not cover a cookie (lost in a restart) and no entry is as old
    // as the cookie (every one changed since), syncprov with the reload hint cannot tell what
    // is still there: it answers e-syncRefreshRequired ("sync cookie is stale").
    let mut w = World::start(&nested_seed(), "");
    syncprov_option(&w, "olcSpReloadHint", "TRUE");
    w.sync_ok();
    w.slapd.delete(&person_dn("p007"));
    let every_dn: Vec<String> = w
        .slapd
        .search(w.slapd.base_dn(), "(objectClass=*)", &["1.1"])
        .lines()
        .filter_map(|l| l.strip_prefix("dn: ").map(str::to_string))
        .collect();
    let touch: String = every_dn
        .iter()
        .map(|dn| {
            format!("dn: {dn}\nchangetype: modify\nreplace: description\ndescription: touched\n\n")
        })
        .collect();
    w.slapd.modify(&touch);
    w.slapd.stop();
    w.slapd.start_again();
    let synced = w.sync_ok();
    assert!(
        synced.stderr.contains("e-syncRefreshRequired"),
        "the fallback is said: {synced}"
    );
    assert!(
        synced.stderr.contains("reading the whole directory"),
        "{synced}"
    );
    let status = w.run(&["status"]);
    assert!(status.stdout.contains("e-syncRefreshRequired"), "{status}");
    assert!(!w.targets[0].user_states()["p007"]);
    // The new cookie works: the next cycle is a delta again.
    retitle(&w, &uids(1..2), "Lead");
    let next = w.sync_ok();
    assert!(
        next.stderr.contains("directory read from the change feed"),
        "{next}"
    );
    w.assert_converged();
}

#[test]
fn a_directory_restored_from_an_older_backup_is_read_in_full() {
    let mut w = World::start(&nested_seed(), "");
    w.sync_ok();
    let backup = w.slapd.dir().join("backup.ldif");
    let dump = std::process::Command::new("/usr/sbin/slapcat")
        .arg("-F")
        .arg(w.slapd.dir().join("slapd.d"))
        .args(["-n", "1", "-l"])
        .arg(&backup)
        .output()
        .expect("slapcat");
    assert!(dump.status.success(), "{dump:?}");
    w.slapd.add(&new_hire());
    w.sync_ok();
    assert!(w.targets[0].user_states()["p100"]);
    // The directory goes back to the backup: the cookie is newer than the server.
    w.slapd.stop();
    let data = w.slapd.dir().join("data");
    for f in std::fs::read_dir(&data).unwrap() {
        std::fs::remove_file(f.unwrap().path()).unwrap();
    }
    let restore = std::process::Command::new("/usr/sbin/slapadd")
        .arg("-F")
        .arg(w.slapd.dir().join("slapd.d"))
        .args(["-q", "-w", "-n", "1", "-l"])
        .arg(&backup)
        .output()
        .expect("slapadd");
    assert!(restore.status.success(), "{restore:?}");
    w.slapd.start_again();
    let synced = w.sync_ok();
    assert!(
        synced.stderr.contains("reading the whole directory"),
        "{synced}"
    );
    assert!(
        !w.targets[0].user_states()["p100"],
        "the restored directory is the truth"
    );
    w.assert_converged();
}

/// A small deterministic generator (xorshift), seeded at random and printed, so a failing
/// run can be replayed with `LDAP2SCIM_FEED_SEED`.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        (!items.is_empty()).then(|| &items[self.below(items.len())])
    }
}

fn dns(w: &World, base: &str, filter: &str) -> Vec<String> {
    w.slapd
        .search(base, filter, &["1.1"])
        .lines()
        .filter_map(|l| l.strip_prefix("dn: ").map(str::to_string))
        .collect()
}

fn members(w: &World, group: &str) -> Vec<String> {
    w.slapd
        .search(group, "(objectClass=*)", &["member"])
        .lines()
        .filter_map(|l| l.strip_prefix("member: ").map(str::to_string))
        .collect()
}

#[test]
fn twenty_rounds_of_random_changes_plan_the_same_as_a_delta_and_in_full() {
    let seed = std::env::var("LDAP2SCIM_FEED_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| random_u64() | 1);
    eprintln!("LDAP2SCIM_FEED_SEED={seed}");
    let mut rng = Rng(seed);
    let eng = "ou=eng,ou=people,dc=example,dc=org";
    let seed_ldif = format!("dn: {eng}\nobjectClass: organizationalUnit\nou: eng\n\n")
        + &staff(30)
        + &group("g2", &[&person_dn("p000"), &person_dn("p001")])
        + &group("g1", &[&group_dn("g2"), &person_dn("p002")])
        + &group("g0", &[&group_dn("g1"), &person_dn("p003")])
        + &group("g3", &[&group_dn("g1"), &person_dn("p004")])
        + &group("g4", &[&person_dn("p005"), &person_dn("p006")]);
    let w = World::start(&seed_ldif, "");
    w.sync_ok();
    let people = "ou=people,dc=example,dc=org";
    let groups = ["g0", "g1", "g2", "g3", "g4"].map(group_dn);
    let mut next_uid = 100;
    for round in 0..20 {
        let mut done = Vec::new();
        for _ in 0..(2 + rng.below(5)) {
            let users = dns(&w, people, "(objectClass=inetOrgPerson)");
            let Some(user) = rng.pick(&users).cloned() else {
                continue;
            };
            let rdn = user.split(',').next().unwrap().to_string();
            let parent = user.split_once(',').unwrap().1.to_string();
            // Every fourth round changes attributes only (the fast path).
            let op = if round % 4 == 3 { 8 } else { rng.below(9) };
            match op {
                0 => {
                    let uid = format!("n{next_uid}");
                    next_uid += 1;
                    let ldif = person(
                        &uid,
                        &format!("New {uid}"),
                        "New",
                        "N",
                        &format!("{uid}@example.org"),
                        "Staff",
                    );
                    w.slapd.add(&ldif);
                    done.push(format!("add {uid}"));
                }
                1 => {
                    let new_rdn = format!("{rdn}r");
                    w.slapd.modify(&format!(
                        "dn: {user}\nchangetype: modrdn\nnewrdn: {new_rdn}\ndeleteoldrdn: 1\n"
                    ));
                    done.push(format!("rename {user} to {new_rdn}"));
                }
                2 => {
                    let to = if parent.eq_ignore_ascii_case(eng) {
                        people
                    } else {
                        eng
                    };
                    w.slapd.modify(&format!(
                        "dn: {user}\nchangetype: modrdn\nnewrdn: {rdn}\ndeleteoldrdn: 1\nnewsuperior: {to}\n"
                    ));
                    done.push(format!("move {user} to {to}"));
                }
                3 => {
                    let disabled = w.slapd.search(&user, "(employeeType=disabled)", &["1.1"]);
                    let op = if disabled.contains("dn:") {
                        "delete: employeeType\n"
                    } else {
                        "add: employeeType\nemployeeType: disabled\n"
                    };
                    w.slapd
                        .modify(&format!("dn: {user}\nchangetype: modify\n{op}"));
                    done.push(format!("toggle disabled {user}"));
                }
                4 => {
                    w.slapd.delete(&user);
                    done.push(format!("delete {user}"));
                }
                5 | 6 => {
                    let g = rng.pick(&groups).unwrap().clone();
                    let now = members(&w, &g);
                    if now.iter().any(|m| m.eq_ignore_ascii_case(&user)) {
                        if now.len() > 1 {
                            w.slapd.modify(&format!(
                                "dn: {g}\nchangetype: modify\ndelete: member\nmember: {user}\n"
                            ));
                            done.push(format!("remove {user} from {g}"));
                        }
                    } else {
                        w.slapd.modify(&format!(
                            "dn: {g}\nchangetype: modify\nadd: member\nmember: {user}\n"
                        ));
                        done.push(format!("add {user} to {g}"));
                    }
                }
                _ => {
                    let title = format!("T{}", rng.below(1000));
                    w.slapd.modify(&format!(
                        "dn: {user}\nchangetype: modify\nreplace: title\ntitle: {title}\n"
                    ));
                    done.push(format!("title {user} {title}"));
                }
            }
        }
        // refint rewrites or drops the member values of a renamed, moved or deleted user in
        // the background: the round is over when no group names a missing entry, except as
        // its only member (refint cannot drop a groupOfNames' last value; such a group keeps
        // naming the deleted entry, and delta and full must agree on it too).
        let settled = wait_until(std::time::Duration::from_secs(10), || {
            let entries: Vec<String> = dns(&w, "dc=example,dc=org", "(objectClass=*)")
                .iter()
                .map(|d| d.to_ascii_lowercase())
                .collect();
            groups.iter().all(|g| {
                let now = members(&w, g);
                now.len() == 1
                    || now
                        .iter()
                        .all(|m| entries.contains(&m.to_ascii_lowercase()))
            })
        });
        if !settled {
            let entries: Vec<String> = dns(&w, "dc=example,dc=org", "(objectClass=*)")
                .iter()
                .map(|d| d.to_ascii_lowercase())
                .collect();
            let dangling: Vec<(String, String)> = groups
                .iter()
                .flat_map(|g| {
                    members(&w, g)
                        .into_iter()
                        .filter(|m| !entries.contains(&m.to_ascii_lowercase()))
                        .map(move |m| (g.clone(), m))
                })
                .collect();
            panic!(
                "refint did not settle in round {round} (seed {seed}): {dangling:?} after {done:?}"
            );
        }
        let (delta, full) = delta_and_full_plans(&w);
        assert_eq!(
            delta, full,
            "round {round} (seed {seed}): {done:?}\ndelta: {delta:#}\nfull: {full:#}"
        );
        let synced = w.sync_ok();
        if round % 4 == 3 {
            assert!(
                synced
                    .stderr
                    .contains("only attributes of existing users changed"),
                "round {round} (seed {seed}) took the fast path: {synced}"
            );
        }
        for args in [&["plan"][..], &["plan", "--full"][..]] {
            let out = w.run(args);
            assert_eq!(
                out.code, 0,
                "round {round} (seed {seed}) {done:?}: {args:?} after sync:\n{out}"
            );
        }
        // A cycle with nothing to do: every target has applied the mirror, so the next
        // round's attribute-only changes take the fast path.
        w.sync_ok();
    }
}

/// The daemon with a schedule that never comes during a test (the first minute of the year)
/// and live mode without a gathering delay: only the live watch can apply a change.
fn live_daemon(w: &mut World) -> Daemon {
    w.config
        .set("daemon", "schedule", "\"0 0 1 1 *\"")
        .set("daemon", "live_delay", "\"0s\"")
        .set("ldap", "timeout", "\"2s\"");
    Daemon::watching(&w.config.path())
}

fn title_of(t: &Target, user_name: &str) -> String {
    t.users()
        .into_iter()
        .find(|u| u["userName"] == user_name)
        .and_then(|u| u["title"].as_str().map(str::to_string))
        .unwrap_or_default()
}

#[test]
fn the_daemon_applies_directory_changes_as_they_happen() {
    let mut w = World::start(&nested_seed(), "");
    let daemon = live_daemon(&mut w);
    // Longer than ldap.timeout: the persistent search must not time out and reconnect.
    std::thread::sleep(std::time::Duration::from_secs(3));
    retitle(&w, &uids(1..2), "Live");
    let applied = wait_until(std::time::Duration::from_secs(20), || {
        w.targets.iter().all(|t| title_of(t, "p001") == "Live")
    });
    assert!(applied, "not applied live:\n{}", daemon.stderr());
    // A leaver loses the account in every target without waiting for the schedule.
    w.slapd.delete(&person_dn("p007"));
    let gone = wait_until(std::time::Duration::from_secs(20), || {
        w.targets.iter().all(|t| !t.user_states()["p007"])
    });
    assert!(gone, "not deprovisioned live:\n{}", daemon.stderr());
    // A member added to the inner group reaches the outer one.
    w.slapd.modify(&format!(
        "dn: {}\nchangetype: modify\nadd: member\nmember: {}\n",
        group_dn("inner"),
        person_dn("p005")
    ));
    let nested = wait_until(std::time::Duration::from_secs(20), || {
        w.targets
            .iter()
            .all(|t| t.memberships()["outer"].contains("p005"))
    });
    assert!(
        nested,
        "nested membership not applied live:\n{}",
        daemon.stderr()
    );
    let log = daemon.stop().stderr;
    assert!(
        !log.contains("reconnecting"),
        "no reconnect was needed:\n{log}"
    );
}

#[test]
fn a_dropped_live_connection_reconnects_and_resumes() {
    let mut w = World::start(&nested_seed(), "");
    let daemon = live_daemon(&mut w);
    w.slapd.stop();
    w.slapd.start_again();
    retitle(&w, &uids(2..3), "After restart");
    let applied = wait_until(std::time::Duration::from_secs(30), || {
        w.targets
            .iter()
            .all(|t| title_of(t, "p002") == "After restart")
    });
    let log = daemon.stop().stderr;
    assert!(applied, "not applied after the reconnect:\n{log}");
    assert!(log.contains("reconnecting"), "{log}");
}

#[test]
fn attribute_changes_of_existing_users_plan_only_those_users_and_the_same_as_in_full() {
    let w = World::start(&nested_seed(), "");
    w.sync_ok();
    // Once every target has applied the mirror (a cycle with nothing to do).
    w.sync_ok();
    retitle(&w, &uids(0..4), "Fast");
    let (delta, full) = delta_and_full_plans(&w);
    assert_eq!(delta, full, "delta: {delta:#}\nfull: {full:#}");
    let synced = w.sync_ok();
    assert!(
        synced
            .stderr
            .contains("only attributes of existing users changed"),
        "{synced}"
    );
    for t in &w.targets {
        assert_eq!(title_of(t, "p003"), "Fast", "{}", t.name());
    }
    // Applied in full: the next cycle is quiet, and both plans are empty.
    let next = w.sync_ok();
    assert!(
        next.stderr.contains("the change feed named no change"),
        "{next}"
    );
    for args in [&["plan"][..], &["plan", "--full"][..]] {
        assert_eq!(w.run(args).code, 0, "{args:?}");
    }
    // An account deleted by hand is made again by the update: its memberships come back in
    // the next cycle, which plans everything again.
    let t = &w.targets[1];
    let id = t.user("p000")["id"].as_str().unwrap().to_string();
    assert_eq!(
        scim_delete(
            &t.server.base_url(),
            t.server.token(),
            &format!("/Users/{id}")
        ),
        204
    );
    retitle(&w, &uids(0..1), "Back");
    let out = w.sync_ok();
    assert!(out.stderr.contains("creating it again"), "{out}");
    let again = w.sync_ok();
    assert!(
        !again.stderr.contains("the change feed named no change"),
        "the target that made an account again is planned in full: {again}"
    );
    w.assert_converged();
    assert!(w.targets[1].memberships()["everyone"].contains("p000"));
}

#[test]
fn an_entry_whose_id_is_rewritten_in_place_is_a_visible_rebind_as_in_a_full_read() {
    let w = World::start(&nested_seed(), "");
    w.sync_ok();
    // The same DN, another entryUUID (a restore that kept the DN, or relax): a full read
    // sees one entry leave and another arrive with the same userName.
    w.slapd.modify_relaxed(&format!(
        "dn: {}\nchangetype: modify\nreplace: entryUUID\nentryUUID: 0f0e0d0c-0b0a-4908-8706-050403020100\n",
        person_dn("p006")
    ));
    assert_delta_plans_like_full(&w);
    let (delta, _) = delta_and_full_plans(&w);
    let changes = changes_of(&delta, w.targets[0].name());
    assert!(
        changes.contains(&change("rebind", "User", "p006")),
        "the account moves visibly: {changes:?}"
    );
    w.sync_ok();
    w.assert_converged();
}
