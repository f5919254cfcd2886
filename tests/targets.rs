//! Issue 4: targets in the real world. Faults injected by the harness proxy in front of both
//! real SCIM servers, Better Auth's own 429s, independence of targets, a chaos run and a
//! kill -9 loop. Each test ends by checking that every target mirrors the directory exactly.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use support::*;

/// What the directory says, kept by the test as it changes it.
#[derive(Clone, Default)]
struct Model {
    /// uid → (in the directory, title)
    users: BTreeMap<String, (bool, String)>,
    /// cn → member uids
    groups: BTreeMap<String, BTreeSet<String>>,
}

impl Model {
    fn seed(n: usize, groups: usize) -> (Model, String) {
        let mut m = Model::default();
        let mut ldif = String::new();
        for i in 0..n {
            let uid = format!("u{i:03}");
            ldif.push_str(&person(
                &uid,
                &format!("User {i}"),
                "User",
                "U",
                &format!("{uid}@example.org"),
                "T0",
            ));
            m.users.insert(uid, (true, "T0".into()));
        }
        for g in 0..groups {
            let cn = format!("g{g}");
            let members: Vec<String> = (0..n)
                .filter(|i| i % groups == g)
                .map(|i| format!("u{i:03}"))
                .collect();
            let dns: Vec<String> = members.iter().map(|u| person_dn(u)).collect();
            ldif.push_str(&group(
                &cn,
                &dns.iter().map(String::as_str).collect::<Vec<_>>(),
            ));
            m.groups.insert(cn, members.into_iter().collect());
        }
        (m, ldif)
    }

    /// Applies `steps` random changes to the directory and the model.
    /// With `only_seeded_leave`, only users of the seed (synced cleanly before) leave: a user
    /// created and deleted while every sync in between failed never reached a target, and
    /// rightly never will.
    fn mutate(
        &mut self,
        slapd: &Slapd,
        rng: &mut Rng,
        steps: usize,
        next_uid: &mut usize,
        only_seeded_leave: bool,
    ) {
        for _ in 0..steps {
            let live: Vec<String> = self
                .users
                .iter()
                .filter(|(_, (live, _))| *live)
                .map(|(u, _)| u.clone())
                .collect();
            match rng.below(5) {
                0 => {
                    let uid = format!("n{:03}", *next_uid);
                    *next_uid += 1;
                    slapd.add(&person(
                        &uid,
                        &format!("New {uid}"),
                        "New",
                        "N",
                        &format!("{uid}@example.org"),
                        "T0",
                    ));
                    self.users.insert(uid, (true, "T0".into()));
                }
                1 if live.len() > 3 => {
                    let uid = &live[rng.below(live.len())];
                    if only_seeded_leave && !uid.starts_with('u') {
                        continue;
                    }
                    // groupOfNames needs a member: never delete a group's last one.
                    if self
                        .groups
                        .values()
                        .any(|m| m.len() == 1 && m.contains(uid))
                    {
                        continue;
                    }
                    slapd.delete(&person_dn(uid));
                    self.users.get_mut(uid).unwrap().0 = false;
                    // slapd's refint drops the member values that named it.
                    for members in self.groups.values_mut() {
                        members.remove(uid);
                    }
                }
                2 if !live.is_empty() => {
                    let uid = &live[rng.below(live.len())];
                    let title = format!("T{}", rng.below(1000));
                    slapd.modify(&format!(
                        "dn: {}\nchangetype: modify\nreplace: title\ntitle: {title}\n",
                        person_dn(uid)
                    ));
                    self.users.get_mut(uid).unwrap().1 = title;
                }
                3 if !live.is_empty() => {
                    let uid = &live[rng.below(live.len())];
                    let cn = format!("g{}", rng.below(self.groups.len()));
                    if self.groups.get_mut(&cn).unwrap().insert(uid.clone()) {
                        slapd.modify(&format!(
                            "dn: {}\nchangetype: modify\nadd: member\nmember: {}\n",
                            group_dn(&cn),
                            person_dn(uid)
                        ));
                    }
                }
                _ => {
                    let cn = format!("g{}", rng.below(self.groups.len()));
                    let members: Vec<String> = self.groups[&cn].iter().cloned().collect();
                    if members.len() > 1 {
                        let uid = &members[rng.below(members.len())];
                        slapd.modify(&format!(
                            "dn: {}\nchangetype: modify\ndelete: member\nmember: {}\n",
                            group_dn(&cn),
                            person_dn(uid)
                        ));
                        self.groups.get_mut(&cn).unwrap().remove(uid);
                    }
                }
            }
        }
    }

    fn assert_mirrored(&self, world: &World) {
        for t in &world.targets {
            let users = t.users();
            let mut seen = BTreeSet::new();
            for u in &users {
                let name = u["userName"].as_str().unwrap().to_string();
                assert!(
                    seen.insert(name.clone()),
                    "{}: duplicate user {name}",
                    t.name()
                );
                let (live, title) = self
                    .users
                    .get(&name)
                    .unwrap_or_else(|| panic!("{}: unexpected user {name}", t.name()));
                assert_eq!(
                    u["active"].as_bool(),
                    Some(*live),
                    "{}: {name} active",
                    t.name()
                );
                if *live {
                    assert_eq!(
                        u["title"].as_str(),
                        Some(title.as_str()),
                        "{}: {name} title",
                        t.name()
                    );
                }
            }
            assert_eq!(
                seen.len(),
                self.users.len(),
                "{}: every user is there once",
                t.name()
            );
            let groups = t.groups();
            assert_eq!(
                groups.len(),
                self.groups.len(),
                "{}: no duplicate group",
                t.name()
            );
            let m = t.memberships();
            for (cn, members) in &self.groups {
                assert_eq!(&m[cn], members, "{}: members of {cn}", t.name());
            }
        }
    }
}

/// A tiny deterministic generator (xorshift), so a failing seed can be replayed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n.max(1) as u64) as usize
    }
}

fn retry_after(status: u16, secs: &str) -> Fault {
    Fault::Status(status, Some(("Retry-After".into(), secs.into())))
}

#[test]
fn a_scripted_sequence_of_faults_still_converges_in_one_sync() {
    let (model, seed) = Model::seed(12, 2);
    let world = World::start(&seed, "timeout = \"2s\"");
    for t in &world.targets {
        t.proxy.push_faults(vec![
            retry_after(429, "1"),
            Fault::Status(500, None),
            retry_after(503, "1"),
            Fault::Reset,
            Fault::Delay(Duration::from_secs(3)),
            Fault::Garbage,
            Fault::Status(502, None),
            Fault::Pass,
            Fault::Status(429, Some(("X-Retry-After".into(), "1".into()))),
        ]);
    }
    let out = world.sync_ok();
    assert!(
        out.stderr.contains("retrying"),
        "the retries are in the log:\n{out}"
    );
    for t in &world.targets {
        assert_eq!(
            t.proxy.pending_faults(),
            0,
            "{}: every fault was served",
            t.name()
        );
    }
    model.assert_mirrored(&world);
    world.assert_converged();
}

#[test]
fn a_create_whose_answer_was_lost_is_not_duplicated() {
    let (model, seed) = Model::seed(5, 1);
    let world = World::start(&seed, "");
    for t in &world.targets {
        // The first user POST and the first group POST are done upstream, but their answers never arrive.
        t.proxy.push_faults_for("POST", vec![Fault::DropResponse]);
    }
    world.sync_ok();
    model.assert_mirrored(&world);
    for t in &world.targets {
        let posts = t
            .proxy
            .requests()
            .iter()
            .filter(|r| r.method == "POST")
            .count();
        assert_eq!(
            posts,
            5 + 1,
            "{}: one POST per resource, the lost one not sent again",
            t.name()
        );
    }
    world.assert_converged();
}

#[test]
fn a_rejected_change_is_reported_with_the_targets_detail_and_not_retried() {
    let (_, seed) = Model::seed(3, 1);
    let world = World::start(&seed, "");
    world.sync_ok();
    world.slapd.modify(&format!(
        "dn: {}\nchangetype: modify\nreplace: title\ntitle: Nope\n",
        person_dn("u001")
    ));
    for t in &world.targets {
        t.proxy
            .push_faults_for("PATCH", vec![Fault::Status(400, None)]);
        t.proxy.clear();
    }
    let out = world.run(&["sync"]);
    assert_eq!(out.code, 3, "{out}");
    assert!(
        out.stdout.contains("HTTP 400") && out.stdout.contains("injected fault"),
        "{out}"
    );
    for t in &world.targets {
        let patches = t
            .proxy
            .requests()
            .iter()
            .filter(|r| r.method == "PATCH")
            .count();
        assert_eq!(patches, 1, "{}: a 400 is not retried", t.name());
    }
    // Nothing was lost: the next sync sends it.
    world.sync_ok();
    for t in &world.targets {
        assert_eq!(t.user("u001")["title"], "Nope");
    }
}

#[test]
fn better_auths_own_rate_limit_is_respected() {
    let (model, seed) = Model::seed(40, 2);
    let slapd = Slapd::start(&seed);
    let server = BetterAuth::start_with(Some("2:15"));
    let mut config = TestConfig::new(&slapd);
    config.target("limited", &server.base_url(), server.token(), "");
    let out = ldap2scim(&config.path(), &["sync"]);
    out.expect_code(0);
    assert!(
        out.stderr.contains("HTTP 429"),
        "real 429s were met and waited out:\n{out}"
    );
    // Our own reads count against the same limit: wait for the window to pass.
    let mut users = Vec::new();
    let read = wait_until(Duration::from_secs(60), || {
        let path = "/Users?startIndex=1&count=100";
        match scim_try_request("GET", &server.base_url(), server.token(), path, None) {
            Ok((200, body)) => {
                users = body["Resources"].as_array().cloned().unwrap_or_default();
                true
            }
            _ => {
                std::thread::sleep(Duration::from_millis(500));
                false
            }
        }
    });
    assert!(read, "Better Auth kept answering 429");
    assert_eq!(users.len(), model.users.len());
}

#[test]
fn a_dead_and_a_slow_target_do_not_delay_a_healthy_one() {
    let (model, seed) = Model::seed(10, 1);
    let mut world = World::start(&seed, "");
    world.config.target(
        "dead",
        &format!("http://127.0.0.1:{}/scim/v2", free_port()),
        "tok",
        "",
    );
    // The first server becomes the healthy target; the second's proxy delays everything.
    let healthy = &world.targets[0];
    let slow = &world.targets[1];
    slow.proxy.push_faults(
        (0..200)
            .map(|_| Fault::Delay(Duration::from_millis(300)))
            .collect(),
    );
    let started = Instant::now();
    let out = world.run(&["sync"]);
    let total = started.elapsed();
    assert_eq!(out.code, 3, "the dead target fails:\n{out}");
    let done_at = |name: &str| -> f64 {
        let line = out
            .stderr
            .lines()
            .find(|l| l.contains("target reconciled") && l.contains(&format!("target={name}")))
            .unwrap_or_else(|| panic!("no summary for {name}:\n{out}"));
        seconds_of(line)
    };
    let start_line = out
        .stderr
        .lines()
        .find(|l| l.contains("directory read"))
        .expect("read line");
    let t0 = seconds_of(start_line);
    let healthy_took = done_at(healthy.name()) - t0;
    let slow_took = done_at(slow.name()) - t0;
    assert!(
        healthy_took * 3.0 < slow_took,
        "healthy target done in {healthy_took:.2}s, the slow one in {slow_took:.2}s (whole run {total:?})"
    );
    assert!(out.stdout.contains("target dead: error"), "{out}");
    model.assert_mirrored(&world);
}

/// Seconds since midnight of a log line's RFC 3339 timestamp.
fn seconds_of(line: &str) -> f64 {
    let ts = line.split_whitespace().next().unwrap();
    let time = ts.split('T').nth(1).unwrap().trim_end_matches('Z');
    let mut parts = time.split(':');
    let h: f64 = parts.next().unwrap().parse().unwrap();
    let m: f64 = parts.next().unwrap().parse().unwrap();
    let s: f64 = parts.next().unwrap().parse().unwrap();
    h * 3600.0 + m * 60.0 + s
}

#[test]
fn chaos_twenty_cycles_of_changes_and_faults_then_one_clean_cycle() {
    let (mut model, seed) = Model::seed(20, 3);
    let world = World::start(&seed, "timeout = \"2s\"");
    world.sync_ok();
    let mut rng = Rng(0x5eed_1234_abcd);
    let mut next_uid = 0;
    for cycle in 0..20 {
        model.mutate(&world.slapd, &mut rng, 4, &mut next_uid, true);
        for t in &world.targets {
            let faults: Vec<Fault> = (0..6)
                .map(|_| match rng.below(8) {
                    0 => retry_after(429, "0"),
                    1 => Fault::Status(500, None),
                    2 => retry_after(503, "0"),
                    3 => Fault::Reset,
                    4 => Fault::DropResponse,
                    5 => Fault::Garbage,
                    _ => Fault::Pass,
                })
                .collect();
            t.proxy.clear_faults();
            t.proxy.push_faults(faults);
        }
        let out = world.run(&["sync"]);
        assert!(matches!(out.code, 0 | 3), "cycle {cycle}:\n{out}");
    }
    for t in &world.targets {
        t.proxy.clear_faults();
    }
    world.sync_ok();
    model.assert_mirrored(&world);
    world.assert_converged();
}

#[test]
fn kill_dash_nine_at_random_moments_then_sync_leaves_targets_exact() {
    let (mut model, seed) = Model::seed(15, 2);
    let world = World::start(&seed, "concurrency = 2");
    let mut rng = Rng(0x0dd_c0ffee);
    let mut next_uid = 0;
    let iterations: usize = std::env::var("LDAP2SCIM_KILL_LOOP")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    for i in 0..iterations {
        model.mutate(&world.slapd, &mut rng, 6, &mut next_uid, false);
        let mut run = Ldap2scim::new(&world.config.path()).arg("sync").spawn();
        std::thread::sleep(Duration::from_millis(rng.below(400) as u64));
        run.signal("KILL");
        let _ = run.wait_timeout(Duration::from_secs(10));
        let out = world.run(&["sync"]);
        assert!(
            out.code == 0,
            "iteration {i}: the sync after kill -9 must converge:\n{out}"
        );
        model.assert_mirrored(&world);
    }
    world.assert_converged();
}

#[test]
fn a_target_without_patch_or_filter_gets_full_puts_and_listings() {
    let (mut model, seed) = Model::seed(8, 2);
    let slapd = Slapd::start(&seed);
    let dir = temp_dir("spc");
    let spc = dir.path().join("spc.json");
    std::fs::write(
        &spc,
        serde_json::json!({
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:ServiceProviderConfig"],
            "patch": {"supported": false},
            "bulk": {"supported": false, "maxOperations": 0, "maxPayloadSize": 0},
            "filter": {"supported": false, "maxResults": 50},
            "changePassword": {"supported": false},
            "sort": {"supported": false},
            "etag": {"supported": false},
            "authenticationSchemes": [],
        })
        .to_string(),
    )
    .unwrap();
    let server = Scim2Server::start_with(&["--service-provider-config", &spc.to_string_lossy()]);
    let proxy = RecordingProxy::start(&server.base_url());
    let mut config = TestConfig::new(&slapd);
    config.set("ldap", "max_shrink", &toml_str("100%"));
    config.target("nopatch", &proxy.url(), server.token(), "");
    ldap2scim(&config.path(), &["sync"]).expect_code(0);
    let mut next_uid = 0;
    let mut rng = Rng(7);
    model.mutate(&slapd, &mut rng, 12, &mut next_uid, false);
    ldap2scim(&config.path(), &["sync"]).expect_code(0);
    std::fs::remove_dir_all(config.state_dir()).unwrap();
    ldap2scim(&config.path(), &["sync"]).expect_code(0);
    let requests = proxy.requests();
    assert!(
        requests.iter().all(|r| r.method != "PATCH"),
        "no PATCH: {requests:?}"
    );
    assert!(
        requests.iter().all(|r| !r.path.contains("filter=")),
        "no filter: {requests:?}"
    );
    assert!(
        requests.iter().any(|r| r.method == "PUT"),
        "updates went as PUT"
    );

    let by_id: BTreeMap<String, String> = scim_list(&server.base_url(), server.token(), "Users")
        .iter()
        .map(|u| {
            (
                u["id"].as_str().unwrap().into(),
                u["userName"].as_str().unwrap().into(),
            )
        })
        .collect();
    for (uid, (live, title)) in &model.users {
        let u = scim_list(&server.base_url(), server.token(), "Users")
            .into_iter()
            .find(|u| u["userName"] == uid.as_str())
            .unwrap_or_else(|| panic!("{uid} missing"));
        assert_eq!(u["active"].as_bool(), Some(*live), "{uid}");
        if *live {
            assert_eq!(u["title"].as_str(), Some(title.as_str()), "{uid}");
        }
    }
    for g in scim_list(&server.base_url(), server.token(), "Groups") {
        let cn = g["displayName"].as_str().unwrap();
        let full = scim_get(
            &server.base_url(),
            server.token(),
            &format!("/Groups/{}", g["id"].as_str().unwrap()),
        );
        let members: BTreeSet<String> = full["members"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| by_id[m["value"].as_str().unwrap()].clone())
            .collect();
        assert_eq!(members, model.groups[cn], "members of {cn}");
    }
    assert_eq!(
        by_id.len(),
        model.users.len(),
        "no duplicates after the snapshot was lost"
    );
}

#[test]
fn entra_style_removes_members_by_value_array_on_better_auth() {
    let (mut model, seed) = Model::seed(6, 1);
    let slapd = Slapd::start(&seed);
    let server = BetterAuth::start();
    let proxy = RecordingProxy::start(&server.base_url());
    let mut config = TestConfig::new(&slapd);
    config.target(
        "entra",
        &proxy.url(),
        server.token(),
        "profile = \"entra-style\"\nmembers_per_request = 2",
    );
    ldap2scim(&config.path(), &["sync"]).expect_code(0);
    for uid in ["u000", "u001", "u002"] {
        slapd.modify(&format!(
            "dn: {}\nchangetype: modify\ndelete: member\nmember: {}\n",
            group_dn("g0"),
            person_dn(uid)
        ));
        model.groups.get_mut("g0").unwrap().remove(uid);
    }
    proxy.clear();
    ldap2scim(&config.path(), &["sync"]).expect_code(0);
    let patches: Vec<_> = proxy
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH")
        .collect();
    assert_eq!(patches.len(), 2, "3 removals in batches of 2: {patches:?}");
    let group = &scim_list(&server.base_url(), server.token(), "Groups")[0];
    let full = scim_get(
        &server.base_url(),
        server.token(),
        &format!("/Groups/{}", group["id"].as_str().unwrap()),
    );
    assert_eq!(
        full["members"].as_array().map_or(0, |m| m.len()),
        model.groups["g0"].len()
    );
}

#[test]
fn a_412_refetches_the_etag_and_retries_once() {
    let (_, seed) = Model::seed(3, 1);
    let slapd = Slapd::start(&seed);
    let server = Scim2Server::start();
    let proxy = RecordingProxy::start(&server.base_url());
    let mut config = TestConfig::new(&slapd);
    config.target("etags", &proxy.url(), server.token(), "");
    ldap2scim(&config.path(), &["sync"]).expect_code(0);
    slapd.modify(&format!(
        "dn: {}\nchangetype: modify\nreplace: title\ntitle: Moved\n",
        person_dn("u001")
    ));
    proxy.clear();
    proxy.push_faults_for("PATCH", vec![Fault::Status(412, None)]);
    let out = ldap2scim(&config.path(), &["sync"]);
    out.expect_code(0);
    assert!(out.stderr.contains("412"), "{out}");
    let seen: Vec<(String, u16)> = proxy
        .requests()
        .into_iter()
        .filter(|r| r.path.starts_with("/Users/"))
        .map(|r| (r.method, r.status))
        .collect();
    assert_eq!(seen.len(), 3, "PATCH 412, GET, PATCH: {seen:?}");
    assert_eq!(seen[0], ("PATCH".to_string(), 412));
    assert_eq!(seen[1].0, "GET");
    assert_eq!(seen[2].0, "PATCH");
    let u = scim_list(&server.base_url(), server.token(), "Users")
        .into_iter()
        .find(|u| u["userName"] == "u001")
        .unwrap();
    assert_eq!(u["title"], "Moved");
}

#[test]
fn a_user_deleted_by_hand_on_the_target_is_created_again_and_said_so() {
    let (model, seed) = Model::seed(4, 1);
    let world = World::start(&seed, "");
    world.sync_ok();
    for t in &world.targets {
        let id = t.user("u002")["id"].as_str().unwrap().to_string();
        assert_eq!(
            scim_delete(
                &t.server.base_url(),
                t.server.token(),
                &format!("/Users/{id}")
            ),
            204
        );
    }
    world.slapd.modify(&format!(
        "dn: {}\nchangetype: modify\nreplace: title\ntitle: Back\n",
        person_dn("u002")
    ));
    let out = world.sync_ok();
    assert!(
        out.stderr
            .contains("deleted on the target by hand; creating it again"),
        "{out}"
    );
    for t in &world.targets {
        assert_eq!(t.user("u002")["title"], "Back", "{}", t.name());
        assert_eq!(t.users().len(), 4, "{}", t.name());
    }
    // Its group membership went with it; the next cycle adds it back. (scim2-server keeps a
    // dangling reference to the deleted account in the group: not ours to clean, and it
    // names no user.)
    world.sync_ok();
    for t in &world.targets {
        let members: BTreeSet<String> = t.memberships()["g0"]
            .iter()
            .filter(|m| !m.starts_with('?'))
            .cloned()
            .collect();
        assert_eq!(members, model.groups["g0"], "{}", t.name());
    }
    world.assert_converged();
}

#[test]
fn a_user_deleted_and_remade_by_hand_under_the_same_name_is_adopted_not_duplicated() {
    let (_, seed) = Model::seed(4, 1);
    let world = World::start(&seed, "");
    world.sync_ok();
    for t in &world.targets {
        let old = t.user("u002");
        let (base, token) = (t.server.base_url(), t.server.token().to_string());
        let id = old["id"].as_str().unwrap();
        assert_eq!(scim_delete(&base, &token, &format!("/Users/{id}")), 204);
        // Someone makes the account again by hand: same userName, no externalId (another
        // address: Better Auth keeps the deleted account's email reserved).
        let body = serde_json::json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
            "userName": old["userName"], "title": "Hand Made", "active": true,
            "emails": [{"value": "u002.by.hand@example.org", "type": "work", "primary": true}]});
        let (code, made) = scim_post(&base, &token, "/Users", &body);
        assert_eq!(code, 201, "{}: {made}", t.name());
    }
    world.slapd.modify(&format!(
        "dn: {}\nchangetype: modify\nreplace: title\ntitle: Back\n",
        person_dn("u002")
    ));
    // The PATCH finds the old id gone, the create again answers 409 (the name is taken): the
    // hand-made account is adopted (match_existing has userName) and brought in line. Better
    // Auth keeps the deleted account's email reserved, so bringing the adopted account in
    // line conflicts there: reported, and still no second account.
    let out = world.run(&["sync"]);
    assert!(out.code == 0 || out.code == 3, "{out}");
    assert!(out.stderr.contains("creating it again"), "{out}");
    for t in &world.targets {
        let u = t.user("u002");
        assert_eq!(t.users().len(), 4, "{}: no duplicate", t.name());
        if out.stdout.contains(&format!("target {}: ok", t.name())) {
            assert_eq!(u["title"], "Back", "{}", t.name());
            assert!(u["externalId"].is_string(), "{}: {u}", t.name());
        } else {
            assert_eq!(t.name(), "betterauth", "{out}");
            assert!(out.stdout.contains("already uses this email"), "{out}");
        }
    }
    assert!(out.stdout.contains("target scim2-server: ok"), "{out}");
    assert!(out.stderr.contains("found and adopted"), "{out}");
}

#[test]
fn a_target_that_dies_mid_cycle_is_skipped_for_the_rest_of_it() {
    let (_, seed) = Model::seed(40, 1);
    let world = World::start(&seed, "concurrency = 1");
    for t in &world.targets {
        // Discovery and the lookups pass; then every write finds the connection closed.
        t.proxy
            .push_faults_for("POST", (0..200).map(|_| Fault::Reset).collect());
    }
    let out = world.run(&["sync"]);
    assert_eq!(out.code, 3, "{out}");
    assert!(
        out.stdout.contains("skipped for the rest of this cycle"),
        "{out}"
    );
    for t in &world.targets {
        let posts = t
            .proxy
            .requests()
            .iter()
            .filter(|r| r.method == "POST")
            .count();
        assert!(
            posts <= 3 * 5,
            "{}: gave up after three creates ({posts} POSTs), not forty",
            t.name()
        );
    }
}

/// Issue 14: a target behind an egress proxy (a real tinyproxy on loopback) is reached through
/// it: `proxy` in the target file, or `HTTPS_PROXY`/`HTTP_PROXY` as usual, with `NO_PROXY`
/// honoured; a proxy that is down fails that target and sends nothing around it. LDAP never
/// goes through it.
#[test]
fn a_target_behind_an_egress_proxy_is_reached_through_it() {
    let slapd = Slapd::start(&people(4));
    let scim = Scim2Server::start();
    let proxy = Tinyproxy::start();
    let scim_port = scim
        .base_url()
        .split(':')
        .nth(2)
        .unwrap_or("")
        .split('/')
        .next()
        .unwrap_or("")
        .to_string();
    let through = |p: &Tinyproxy| {
        p.requests()
            .iter()
            .filter(|r| r.contains(&format!("127.0.0.1:{scim_port}")))
            .count()
    };

    // A proxy that is down: the target fails, nothing reaches it some other way.
    let mut config = TestConfig::new(&slapd);
    let dead = format!("http://127.0.0.1:{}", free_port());
    config.target(
        "app",
        &scim.base_url(),
        scim.token(),
        &format!("proxy = {}\n", toml_str(&dead)),
    );
    let out = ldap2scim(&config.path(), &["sync"]);
    assert_ne!(out.code, 0, "{out}");
    assert!(
        out.stderr.contains(&format!("through the proxy {dead}")),
        "{out}"
    );
    assert!(scim_list(&scim.base_url(), scim.token(), "Users").is_empty());

    // Through the proxy: every request goes through it.
    config.target(
        "app",
        &scim.base_url(),
        scim.token(),
        &format!("proxy = {}\n", toml_str(&proxy.url())),
    );
    ldap2scim(&config.path(), &["sync"]).expect_code(0);
    assert_eq!(scim_list(&scim.base_url(), scim.token(), "Users").len(), 4);
    let proxied = through(&proxy);
    assert!(
        proxied >= 5,
        "the proxy forwarded {proxied} requests: {:?}",
        proxy.requests()
    );
    assert!(
        proxy
            .requests()
            .iter()
            .all(|r| !r.contains(&format!(":{}", slapd.port()))),
        "LDAP went through the proxy: {:?}",
        proxy.requests()
    );

    // HTTP_PROXY from the environment, with no proxy in the file; NO_PROXY bypasses it.
    config.target("app", &scim.base_url(), scim.token(), "");
    let before = through(&proxy);
    Ldap2scim::new(&config.path())
        .args(["plan"])
        .env("HTTP_PROXY", &proxy.url())
        .env("http_proxy", &proxy.url())
        .env("NO_PROXY", "")
        .env("no_proxy", "")
        .run()
        .expect_code(0);
    assert!(
        through(&proxy) > before,
        "HTTP_PROXY was not used: {:?}",
        proxy.requests()
    );
    let before = through(&proxy);
    Ldap2scim::new(&config.path())
        .args(["plan"])
        .env("HTTP_PROXY", &proxy.url())
        .env("http_proxy", &proxy.url())
        .env("NO_PROXY", "127.0.0.1")
        .env("no_proxy", "127.0.0.1")
        .run()
        .expect_code(0);
    assert_eq!(through(&proxy), before, "NO_PROXY was not honoured");
}
