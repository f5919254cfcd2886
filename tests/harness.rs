//! Tests of the test harness itself (tests/support): the servers start, answer, run side by
//! side, and leave nothing behind. They use only the harness, not the ldap2scim library.

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

/// Three people, a group of two, and a group nesting it plus the third person.
fn small_directory() -> String {
    [
        person(
            "alice",
            "Alice Liddell",
            "Liddell",
            "Alice",
            "alice@example.org",
            "Engineer",
        ),
        person(
            "bob",
            "Bob Builder",
            "Builder",
            "Bob",
            "bob@example.org",
            "Manager",
        ),
        person(
            "carol",
            "Carol Danvers",
            "Danvers",
            "Carol",
            "carol@example.org",
            "Pilot",
        ),
        group("eng", &[&person_dn("alice"), &person_dn("bob")]),
        group("all", &[&group_dn("eng"), &person_dn("carol")]),
    ]
    .concat()
}

fn user(name: &str) -> Value {
    json!({
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
        "userName": name,
        "externalId": format!("ext-{name}"),
        "emails": [{ "value": name, "type": "work", "primary": true }],
        "active": true,
    })
}

/// Values of `attr` in an LDIF text, e.g. every `memberOf`.
fn values(ldif: &str, attr: &str) -> Vec<String> {
    let prefix = format!("{attr}: ");
    ldif.lines()
        .filter_map(|line| line.strip_prefix(&prefix))
        .map(str::to_string)
        .collect()
}

#[test]
fn slapd_serves_memberof_over_starttls_to_the_sync_account() {
    let t0 = Instant::now();
    let slapd = Slapd::start(&small_directory());
    eprintln!("slapd with seed ready in {:?}", t0.elapsed());

    let alice = slapd.sync_search(
        "ou=people,dc=example,dc=org",
        "(uid=alice)",
        &["memberOf", "entryUUID"],
        None,
    );
    let mut member_of = values(&alice, "memberOf");
    member_of.sort();
    assert_eq!(member_of, vec![group_dn("eng")], "{alice}");
    assert_eq!(values(&alice, "entryUUID").len(), 1, "{alice}");
    let eng = slapd.sync_search(
        "ou=groups,dc=example,dc=org",
        "(cn=eng)",
        &["memberOf"],
        None,
    );
    assert_eq!(values(&eng, "memberOf"), vec![group_dn("all")]);

    // Paging: pages of 1 entry still return all three people.
    let people = slapd.sync_search(
        "ou=people,dc=example,dc=org",
        "(objectClass=inetOrgPerson)",
        &["uid"],
        Some(1),
    );
    let mut uids = values(&people, "uid");
    uids.sort();
    assert_eq!(uids, ["alice", "bob", "carol"], "{people}");

    // Online changes go through the overlays too.
    slapd.modify(&format!(
        "dn: {}\nchangetype: modify\ndelete: member\nmember: {}\n",
        group_dn("eng"),
        person_dn("bob")
    ));
    let bob = slapd.search(&person_dn("bob"), "(objectClass=*)", &["memberOf"]);
    assert!(values(&bob, "memberOf").is_empty(), "{bob}");
    slapd.delete(&person_dn("carol"));
    let all = slapd.search(&group_dn("all"), "(objectClass=*)", &["member"]);
    assert_eq!(
        values(&all, "member"),
        vec![group_dn("eng")],
        "refint: {all}"
    );
}

#[test]
fn slapd_over_ldaps_and_bulk_load() {
    let slapd = Slapd::start_bulk(&bulk_directory(250, 100));
    let out = std::process::Command::new("ldapsearch")
        .env("LDAPTLS_CACERT", slapd.ca_file())
        .args(["-x", "-LLL", "-H", &slapd.ldaps_url()])
        .args(["-D", slapd.bind_dn(), "-w", slapd.bind_pw()])
        .args(["-b", "ou=people,dc=example,dc=org", "-E", "pr=100/noprompt"])
        .args(["(objectClass=inetOrgPerson)", "1.1"])
        .output()
        .expect("run ldapsearch");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dns = String::from_utf8_lossy(&out.stdout).matches("dn: ").count();
    assert_eq!(dns, 250);
    let u1 = slapd.search(&person_dn("u000001"), "(objectClass=*)", &["memberOf"]);
    assert_eq!(values(&u1, "memberOf"), vec![group_dn("g-0001")]);
    let all = slapd.search(&group_dn("g-all"), "(objectClass=*)", &["member"]);
    assert_eq!(values(&all, "member").len(), 3);
}

#[test]
fn two_slapds_run_side_by_side_and_leave_nothing_behind() {
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| Slapd::start(&person("a", "A", "A", "A", "a@example.org", "x")));
        let b = s.spawn(|| Slapd::start(&person("b", "B", "B", "B", "b@example.org", "y")));
        (a.join().expect("slapd a"), b.join().expect("slapd b"))
    });
    assert_ne!(a.ldap_url(), b.ldap_url());
    assert!(a.search(BASE_DN, "(uid=a)", &["uid"]).contains("uid: a"));
    assert!(!a.search(BASE_DN, "(uid=b)", &["uid"]).contains("uid: b"));
    assert!(b.search(BASE_DN, "(uid=b)", &["uid"]).contains("uid: b"));

    let pids = [a.pid(), b.pid()];
    let dirs = [a.dir().to_path_buf(), b.dir().to_path_buf()];
    let t0 = Instant::now();
    drop(a);
    eprintln!("slapd stopped in {:?}", t0.elapsed());
    drop(b);
    for pid in pids {
        assert!(is_reaped(pid), "slapd {pid} still exists");
    }
    if std::env::var_os("LDAP2SCIM_TEST_KEEP").is_none() {
        for dir in dirs {
            assert!(!dir.exists(), "{} not removed", dir.display());
        }
    }
}

#[test]
fn slapd_kill_stop_and_start_again() {
    let mut slapd = Slapd::start("");
    let pid = slapd.pid();
    slapd.kill();
    assert!(is_reaped(pid));
    assert!(!slapd.is_running());
    slapd.start_again();
    assert!(slapd
        .search(BASE_DN, "(ou=people)", &["ou"])
        .contains("ou: people"));
    slapd.stop();
    assert!(!slapd.is_running());
}

#[test]
fn every_scim_server_takes_a_user_and_lists_it_back() {
    let t0 = Instant::now();
    let servers = all_scim_servers();
    eprintln!("both SCIM servers ready in {:?}", t0.elapsed());
    let mut pids = Vec::new();
    for server in &servers {
        let (base, token) = (server.base_url(), server.token());
        pids.push(server.pid());
        let (status, created) = scim_post(&base, token, "/Users", &user("ann@example.org"));
        assert_eq!(status, 201, "{}: {created}", server.name());
        let id = created["id"].as_str().expect("id").to_string();
        let fetched = scim_get(&base, token, &format!("/Users/{id}"));
        assert_eq!(fetched["userName"], "ann@example.org", "{}", server.name());
        let users = scim_list(&base, token, "Users");
        assert_eq!(users.len(), 1, "{}: {users:?}", server.name());
        assert_eq!(users[0]["externalId"], "ext-ann@example.org");
        assert!(scim_list(&base, token, "Groups").is_empty());
        let (status, _) = scim_request("GET", &base, "wrong-token", "/Users", None);
        assert_eq!(status, 401, "{}", server.name());
        let spc = scim_get(&base, token, "/ServiceProviderConfig");
        assert!(
            spc["patch"]["supported"].is_boolean(),
            "{}: {spc}",
            server.name()
        );
    }
    drop(servers);
    for pid in pids {
        assert!(is_reaped(pid), "SCIM server {pid} still exists");
    }
}

#[test]
fn scim_list_reads_every_page() {
    let server = Scim2Server::start();
    let (base, token) = (server.base_url(), server.token());
    for i in 0..25 {
        let (status, body) = scim_post(&base, token, "/Users", &user(&format!("u{i}@example.org")));
        assert_eq!(status, 201, "{body}");
    }
    assert_eq!(scim_list_paged(&base, token, "Users", 10).len(), 25);
    assert_eq!(scim_list(&base, token, "Users").len(), 25);
}

#[test]
fn better_auth_rate_limit_answers_429() {
    let server = BetterAuth::start_with(Some("60:3"));
    let (base, token) = (server.base_url(), server.token());
    let statuses: Vec<u16> = (0..6)
        .map(|_| scim_request("GET", &base, token, "/Users", None).0)
        .collect();
    assert!(statuses.contains(&200), "{statuses:?}");
    assert!(statuses.contains(&429), "{statuses:?}");
}

#[test]
fn proxy_records_requests_and_injects_faults() {
    let server = BetterAuth::start();
    let proxy = RecordingProxy::start(&server.base_url());
    assert!(
        proxy.url().ends_with("/api/auth/scim/v2"),
        "{}",
        proxy.url()
    );
    let (base, token) = (proxy.url(), server.token());

    let (status, created) = scim_post(&base, token, "/Users", &user("pat@example.org"));
    assert_eq!(status, 201, "{created}");
    let location = created["meta"]["location"].as_str().expect("meta.location");
    assert!(
        location.starts_with(&proxy.url()),
        "not rewritten: {location}"
    );
    let users = scim_list(&base, token, "Users");
    assert_eq!(users.len(), 1);
    let requests = proxy.requests();
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert_eq!(
        (requests[0].method.as_str(), requests[0].path.as_str()),
        ("POST", "/Users")
    );
    assert_eq!(requests[0].status, 201);
    assert_eq!(requests[1].method, "GET");
    assert!(requests[1].path.starts_with("/Users?"), "{requests:?}");
    assert_eq!(proxy.writes(), 1);

    proxy.clear();
    let retry_after = Some(("Retry-After".to_string(), "1".to_string()));
    proxy.push_faults(vec![
        Fault::Status(429, retry_after),
        Fault::Reset,
        Fault::Garbage,
    ]);
    let (status, body) = scim_request("GET", &base, token, "/Users", None);
    assert_eq!(status, 429);
    assert_eq!(body["status"], "429");
    assert_eq!(body["detail"], "injected fault");
    let reset = scim_try_request("GET", &base, token, "/Users", None);
    assert!(
        reset.is_err(),
        "a reset connection must fail the request: {reset:?}"
    );
    let (status, body) = scim_request("GET", &base, token, "/Users", None);
    assert_eq!(status, 200);
    assert!(body.is_string(), "garbage must not parse: {body}");
    let (status, _) = scim_request("GET", &base, token, "/Users", None);
    assert_eq!(status, 200, "faults are used up: pass through");
    let statuses: Vec<u16> = proxy.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [429, 0, 200, 200]);
    assert_eq!(proxy.requests()[1].fault, Some(Fault::Reset));
    assert_eq!(proxy.writes(), 0);

    // A lost response: the upstream created the user, the client never heard of it.
    proxy.push_faults_for("POST", vec![Fault::DropResponse]);
    let lost = scim_try_request(
        "POST",
        &base,
        token,
        "/Users",
        Some(&user("lost@example.org")),
    );
    assert!(lost.is_err(), "{lost:?}");
    assert_eq!(scim_list(&server.base_url(), token, "Users").len(), 2);

    // Delays hold the request back, then forward it.
    proxy.push_faults(vec![Fault::Delay(Duration::from_millis(300))]);
    let t0 = Instant::now();
    assert_eq!(scim_list(&base, token, "Users").len(), 2);
    assert!(t0.elapsed() >= Duration::from_millis(300));
    assert_eq!(proxy.pending_faults(), 0);
}

#[test]
fn proxy_in_front_of_scim2_server_and_a_dead_upstream() {
    let mut server = Scim2Server::start();
    let proxy = RecordingProxy::start(&server.base_url());
    let (base, token) = (proxy.url(), server.token().to_string());
    let (status, created) = scim_post(
        &base,
        &token,
        "/Groups",
        &json!({
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
            "displayName": "eng",
        }),
    );
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().expect("id");
    let patch = json!({
        "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
        "Operations": [{ "op": "replace", "path": "displayName", "value": "engineering" }],
    });
    let (status, _) = scim_patch(&base, &token, &format!("/Groups/{id}"), &patch);
    assert!(status == 200 || status == 204, "{status}");
    assert_eq!(
        scim_list(&base, &token, "Groups")[0]["displayName"],
        "engineering"
    );
    assert_eq!(proxy.writes(), 2);

    server.kill();
    let (status, body) = scim_request("GET", &base, &token, "/Users", None);
    assert_eq!(status, 502, "{body}");
}

#[test]
fn test_config_writes_the_documented_files() {
    let slapd = Slapd::start("");
    let mut config = TestConfig::new(&slapd);
    config
        .target(
            "app",
            "http://127.0.0.1:1/scim/v2",
            "tok3n",
            "max_deprovisions = \"2\"\ngroups = \"all\"",
        )
        .set("daemon", "schedule", "\"*/5 * * * *\"")
        .main_extra("# the end");
    let main = config.main_toml();
    assert!(
        main.contains(&format!("url = \"{}\"", slapd.ldap_url())),
        "{main}"
    );
    assert!(main.contains("starttls = true"), "{main}");
    assert!(
        main.contains("[ldap.groups]\nbase = \"ou=groups,dc=example,dc=org\""),
        "{main}"
    );
    assert!(main.contains("schedule = \"*/5 * * * *\""), "{main}");
    let pw_file = config.dir().join("ldap.pw");
    assert_eq!(std::fs::read_to_string(pw_file).unwrap(), "syncpw");
    assert!(config.state_dir().is_dir());

    let target = std::fs::read_to_string(config.target_path("app")).unwrap();
    assert!(
        target.starts_with("url = \"http://127.0.0.1:1/scim/v2\"\n"),
        "{target}"
    );
    assert!(target.contains("max_deprovisions = \"2\""), "{target}");
    assert!(!target.contains("100%"), "{target}");
    assert!(
        target.contains("match_existing = [\"externalId\", \"userName\"]"),
        "{target}"
    );
    assert_eq!(
        std::fs::read_to_string(config.dir().join("app.token")).unwrap(),
        "tok3n"
    );
    config.remove_target("app");
    assert!(!config.target_path("app").exists());
}

#[test]
fn the_runner_runs_the_binary_under_test() {
    let slapd = Slapd::start("");
    let config = TestConfig::new(&slapd);
    let out = Ldap2scim::new(&config.path())
        .arg("--help")
        .env("RUST_LOG", "info")
        .timeout(Duration::from_secs(60))
        .run();
    assert_eq!(out.code, 0, "{out}");
    assert!(!(out.stdout.is_empty() && out.stderr.is_empty()), "{out}");
}
