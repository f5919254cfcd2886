//! Issue 11: a hostile target harms only itself (promises 4, 7, 9, 10). Each test puts a
//! scripted hostile server (`support::HostileServer`, loopback only) or a real SCIM server
//! behind ldap2scim and runs the binary end to end: redirects, echoed credentials, endless
//! bodies, lying paging, malicious ids, 501s, a private CA, OAuth2 client authentication and a
//! revoked token.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};
use support::*;

/// A slapd with one user (alice, title Engineer) and a configuration without targets.
fn directory() -> (Slapd, TestConfig) {
    let slapd = Slapd::start(&person(
        "alice",
        "Alice Liddell",
        "Liddell",
        "Alice",
        "alice@example.org",
        "Engineer",
    ));
    let mut config = TestConfig::new(&slapd);
    config.set("ldap", "max_shrink", "\"100%\"");
    (slapd, config)
}

/// Writes a secret file next to the configuration and returns its TOML `{ file = … }`.
fn secret_file(config: &TestConfig, name: &str, value: &str) -> String {
    let path = config.dir().join(name);
    std::fs::write(&path, value).expect("write secret");
    format!("{{ file = {} }}", toml_str(&path.to_string_lossy()))
}

fn run(config: &TestConfig, args: &[&str]) -> Output {
    Ldap2scim::new(&config.path())
        .args(args)
        .timeout(Duration::from_secs(120))
        .run()
}

/// The plan report's entry for `target`.
fn plan_target(plan: &Value, target: &str) -> Value {
    plan["targets"]
        .as_array()
        .expect("targets")
        .iter()
        .find(|t| t["target"] == target)
        .unwrap_or_else(|| panic!("{target} in {plan}"))
        .clone()
}

fn audit(config: &TestConfig) -> String {
    std::fs::read_to_string(config.state_dir().join("audit.jsonl")).unwrap_or_default()
}

fn oauth2(token_url: &str, secret: &str, extra: &str) -> String {
    format!(
        "auth = {{ oauth2 = {{ token_url = {}, client_id = \"ldap2scim:app\", client_secret = {secret}{extra} }} }}",
        toml_str(token_url)
    )
}

#[test]
fn an_oauth2_token_request_never_follows_a_redirect() {
    let (_slapd, mut config) = directory();
    let elsewhere = HostileServer::start(|_| {
        Some(HttpResponse::json(
            200,
            &json!({ "access_token": "stolen", "expires_in": 3600 }),
        ))
    });
    let away = format!("{}/token?leak=query-part", elsewhere.origin());
    let target = HostileServer::start(move |req| {
        (req.scim_path() == "/token").then(|| HttpResponse::redirect(307, &away))
    });
    let secret = random_token();
    let auth = oauth2(
        &format!("{}/token", target.origin()),
        &secret_file(&config, "app.secret", &secret),
        "",
    );
    config.target("app", &target.url(), "unused", &auth);
    let out = run(&config, &["sync"]);
    out.expect_code(3);
    assert!(
        elsewhere.requests().is_empty(),
        "the token request went to another origin: {:?}",
        elsewhere.requests()
    );
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(text.contains("app"), "{out}");
    assert!(text.contains("redirect"), "{out}");
    assert!(text.contains(&elsewhere.origin()), "{out}");
    assert!(!text.contains("query-part"), "the Location's query: {out}");
    assert!(!text.contains(&secret), "{out}");
    assert!(
        target.requests().iter().all(|r| r.scim_path() == "/token"),
        "no SCIM request without a token"
    );
}

/// A token endpoint and SCIM service that accept only `token` and check how the client
/// authenticated.
fn oauth_target(secret: String, token: String) -> HostileServer {
    HostileServer::start(move |req| {
        if req.scim_path() == "/token" {
            let basic = format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD
                    .encode(format!("ldap2scim%3Aapp:{}", form_encode(&secret)))
            );
            let by_basic = req.header("authorization") == Some(basic.as_str())
                && req.form("client_secret").is_none();
            let by_post = req.header("authorization").is_none()
                && req.form("client_id").as_deref() == Some("ldap2scim:app")
                && req.form("client_secret").as_deref() == Some(secret.as_str());
            let ok = req.form("grant_type").as_deref() == Some("client_credentials")
                && (by_basic || by_post);
            return Some(if ok {
                HttpResponse::json(
                    200,
                    &json!({ "access_token": token, "token_type": "Bearer", "expires_in": 3600 }),
                )
            } else {
                HttpResponse::json(401, &json!({ "error": "invalid_client" }))
            });
        }
        (req.header("authorization") != Some(format!("Bearer {token}").as_str()))
            .then(|| HttpResponse::scim_error(401, "bad token"))
    })
}

fn form_encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[test]
fn oauth2_clients_authenticate_as_rfc_6749_says() {
    let (_slapd, mut config) = directory();
    // Characters that form-urlencoding changes: the Basic form must encode them first.
    let secret = format!("s3cr+t/{} x:y", random_token());
    let basic = oauth_target(secret.clone(), random_token());
    let post = oauth_target(secret.clone(), random_token());
    let secret_toml = secret_file(&config, "app.secret", &secret);
    config.target(
        "basic",
        &basic.url(),
        "unused",
        &oauth2(&format!("{}/token", basic.origin()), &secret_toml, ""),
    );
    config.target(
        "post",
        &post.url(),
        "unused",
        &oauth2(
            &format!("{}/token", post.origin()),
            &secret_toml,
            ", client_auth = \"post\"",
        ),
    );
    let out = run(&config, &["sync"]);
    out.expect_code(0);
    for server in [&basic, &post] {
        let users = server.resources("Users");
        assert_eq!(users.len(), 1, "{out}");
        assert_eq!(users[0]["userName"], "alice", "{out}");
    }
    let token_requests = |s: &HostileServer| {
        s.requests()
            .into_iter()
            .filter(|r| r.scim_path() == "/token")
            .collect::<Vec<_>>()
    };
    assert!(token_requests(&basic).iter().all(|r| r
        .header("authorization")
        .is_some_and(|a| a.starts_with("Basic "))
        && r.form("client_secret").is_none()));
    assert!(token_requests(&post)
        .iter()
        .all(|r| r.header("authorization").is_none() && r.form("client_secret").is_some()));
    assert!(!out.stderr.contains(&secret) && !out.stdout.contains(&secret));
}

#[test]
fn a_token_endpoint_error_is_reported_without_the_secret() {
    let (_slapd, mut config) = directory();
    let secret = random_token();
    let echoed = secret.clone();
    let target = HostileServer::start(move |req| {
        (req.scim_path() == "/token").then(|| {
            HttpResponse::json(
                400,
                &json!({
                    "error": "invalid_client",
                    "error_description": format!("client secret {echoed} is not valid here"),
                }),
            )
        })
    });
    let auth = oauth2(
        &format!("{}/token", target.origin()),
        &secret_file(&config, "app.secret", &secret),
        "",
    );
    config.target("app", &target.url(), "unused", &auth);
    let out = run(&config, &["sync"]);
    out.expect_code(3);
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(text.contains("invalid_client"), "{out}");
    assert!(text.contains("is not valid here"), "{out}");
    assert!(!text.contains(&secret), "{out}");
    assert!(!audit(&config).contains(&secret));
    let plan = run(&config, &["plan", "--format", "json"]);
    plan.expect_code(1);
    assert!(!plan.stdout.contains(&secret) && !plan.stderr.contains(&secret));
}

#[test]
fn a_write_is_never_redirected_to_another_origin() {
    let (_slapd, mut config) = directory();
    let elsewhere = HostileServer::start(|_| None);
    let away = format!("{}/Users?token=query-part", elsewhere.url());
    let target = HostileServer::start(move |req| {
        (req.method == "POST").then(|| HttpResponse::redirect(307, &away))
    });
    let token = random_token();
    config.target("app", &target.url(), &token, "");
    let out = run(&config, &["sync"]);
    out.expect_code(3);
    assert!(
        elsewhere.requests().is_empty(),
        "a write followed a redirect to another origin: {:?}",
        elsewhere.requests()
    );
    assert!(elsewhere.resources("Users").is_empty());
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(text.contains(&elsewhere.origin()), "{out}");
    assert!(text.contains("not followed"), "{out}");
    assert!(!text.contains("query-part"), "{out}");
    // Even a same-origin redirect of a write is not followed.
    assert_eq!(
        target
            .requests()
            .iter()
            .filter(|r| r.method == "POST")
            .count(),
        1
    );
}

#[test]
fn reads_follow_redirects_within_their_origin_only() {
    let (_slapd, mut config) = directory();
    let elsewhere = HostileServer::start(|_| None);
    let away = elsewhere.url();
    // Lookups (GET with a filter) are redirected within the same origin: followed.
    let same = HostileServer::start(|req| {
        if req.method == "GET" && req.scim_path() == "/Users" && req.query("filter").is_some() {
            let query = req
                .target
                .split_once('?')
                .map_or("", |(_, q)| q)
                .to_string();
            return Some(HttpResponse::redirect(
                302,
                &format!("{SCIM_PREFIX}/Lookup?{query}"),
            ));
        }
        (req.scim_path() == "/Lookup")
            .then(|| HttpResponse::json(200, &list_response(0, 1, vec![])))
    });
    // Lookups redirected to another origin: not followed, and the token stays home.
    let cross = HostileServer::start(move |req| {
        (req.method == "GET" && req.query("filter").is_some()).then(|| {
            HttpResponse::redirect(
                307,
                &format!("{away}{}", req.target.trim_start_matches(SCIM_PREFIX)),
            )
        })
    });
    let token = random_token();
    config.target("same", &same.url(), &token, "");
    config.target("cross", &cross.url(), &token, "");
    let out = run(&config, &["sync"]);
    out.expect_code(3);
    assert_eq!(same.resources("Users").len(), 1, "{out}");
    assert!(same.requests().iter().any(|r| r.scim_path() == "/Lookup"));
    assert!(
        elsewhere.requests().is_empty(),
        "a read followed a redirect to another origin: {:?}",
        elsewhere.requests()
    );
    assert!(cross.resources("Users").is_empty());
    let plan = run(&config, &["plan", "--format", "json"]);
    plan.expect_code(1);
    let json = plan.json();
    assert_eq!(plan_target(&json, "same")["status"], "ok", "{plan}");
    let cross_report = plan_target(&json, "cross");
    assert_eq!(cross_report["status"], "error", "{plan}");
    assert!(
        cross_report["error"]
            .as_str()
            .is_some_and(|e| e.contains(&elsewhere.origin())),
        "{plan}"
    );
}

#[test]
fn a_target_ca_file_is_its_trust_anchor() {
    let (_slapd, mut config) = directory();
    let (ca, other_ca) = std::thread::scope(|s| {
        let a = s.spawn(ThrowawayCa::new);
        let b = s.spawn(ThrowawayCa::new);
        (a.join().unwrap(), b.join().unwrap())
    });
    let server = HostileServer::start_tls(&ca, |_| None);
    let token = random_token();
    let ca_line =
        |c: &ThrowawayCa| format!("ca_file = {}", toml_str(&c.ca_file().to_string_lossy()));
    config.target("right", &server.url(), &token, &ca_line(&ca));
    config.target("wrong", &server.url(), &token, &ca_line(&other_ca));
    config.target("system", &server.url(), &token, "");
    let plan = run(&config, &["plan", "--format", "json"]);
    plan.expect_code(1);
    let json = plan.json();
    assert_eq!(plan_target(&json, "right")["status"], "ok", "{plan}");
    for name in ["wrong", "system"] {
        let t = plan_target(&json, name);
        assert_eq!(t["status"], "error", "{plan}");
        let e = t["error"].as_str().unwrap_or_default().to_lowercase();
        assert!(
            e.contains("certificate") || e.contains("issuer"),
            "{name}: {e}"
        );
    }
    let out = run(&config, &["sync"]);
    out.expect_code(3);
    assert_eq!(
        server.resources("Users").len(),
        1,
        "only `right` got through: {out}"
    );
}

#[test]
fn echoed_credentials_are_redacted_everywhere() {
    let (_slapd, mut config) = directory();
    let echo_reads = Arc::new(AtomicBool::new(false));
    let echo = |scim_json: bool, echo_reads: Arc<AtomicBool>| {
        move |req: &HttpRequest| {
            let lookup = req.method == "GET" && req.query("filter").is_some();
            if req.method != "POST" && !(lookup && echo_reads.load(Ordering::SeqCst)) {
                return None;
            }
            let said = format!(
                "you sent Authorization: {} with {}",
                req.header("authorization").unwrap_or("nothing"),
                req.dump()
            );
            Some(if scim_json {
                HttpResponse::scim_error(400, &said)
            } else {
                HttpResponse::text(400, &said)
            })
        }
    };
    let bearer = HostileServer::start(echo(false, echo_reads.clone()));
    let basic = HostileServer::start(echo(true, echo_reads.clone()));
    let token = random_token();
    let password = random_token();
    config.target("bearer", &bearer.url(), &token, "");
    config.target(
        "basic",
        &basic.url(),
        "unused",
        &format!(
            "auth = {{ basic = {{ username = \"svc\", password = {} }} }}",
            secret_file(&config, "basic.pw", &password)
        ),
    );
    let basic_header = base64::engine::general_purpose::STANDARD.encode(format!("svc:{password}"));
    let secrets = [token.as_str(), password.as_str(), basic_header.as_str()];
    let assert_clean = |what: &str, text: &str| {
        for s in secrets {
            assert!(!text.contains(s), "{what} shows a secret:\n{text}");
        }
    };
    let out = Ldap2scim::new(&config.path())
        .arg("sync")
        .env("RUST_LOG", "ldap2scim=debug")
        .timeout(Duration::from_secs(120))
        .run();
    out.expect_code(3);
    // The echo did come back (redacted), so the check below means something.
    assert!(
        out.stdout.contains("you sent Authorization")
            || out.stderr.contains("you sent Authorization"),
        "{out}"
    );
    assert_clean("sync stdout", &out.stdout);
    assert_clean("sync stderr", &out.stderr);
    let trail = audit(&config);
    assert!(trail.contains("you sent Authorization"), "{trail}");
    assert_clean("audit.jsonl", &trail);

    echo_reads.store(true, Ordering::SeqCst);
    for format in ["json", "text", "markdown"] {
        let plan = run(&config, &["plan", "--format", format]);
        plan.expect_code(1);
        assert!(
            format!("{}{}", plan.stdout, plan.stderr).contains("you sent Authorization"),
            "{plan}"
        );
        assert_clean("plan stdout", &plan.stdout);
        assert_clean("plan stderr", &plan.stderr);
    }
}

#[test]
fn an_oversized_or_endless_response_is_an_error_not_a_retry() {
    let (_slapd, mut config) = directory();
    // Lookups answer a body that never ends.
    let endless = HostileServer::start(|req| {
        (req.method == "GET" && req.query("filter").is_some()).then(HttpResponse::endless)
    });
    // The create answers a body announced as 10 GB.
    let huge = HostileServer::start(|req| {
        (req.method == "POST").then(|| HttpResponse::declared(10 << 30))
    });
    let token = random_token();
    let extra = "max_response_size = \"64KiB\"\ntimeout = \"20s\"";
    config.target("endless", &endless.url(), &token, extra);
    config.target("huge", &huge.url(), &token, extra);
    let started = Instant::now();
    let out = run(&config, &["sync"]);
    let elapsed = started.elapsed();
    out.expect_code(3);
    assert!(elapsed < Duration::from_secs(15), "took {elapsed:?}: {out}");
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(text.contains("max_response_size"), "{out}");
    let lookups = endless
        .requests()
        .iter()
        .filter(|r| r.query("filter").is_some())
        .count();
    assert_eq!(lookups, 1, "an oversized answer is not asked again: {out}");
    let posts = huge
        .requests()
        .iter()
        .filter(|r| r.method == "POST")
        .count();
    assert_eq!(posts, 1, "an oversized answer is not asked again: {out}");
    assert!(
        endless.endless_bytes() < 64 << 20,
        "read {} bytes of an endless body",
        endless.endless_bytes()
    );
}

#[test]
fn a_lying_listing_fails_only_its_target_in_bounded_time() {
    let (_slapd, mut config) = directory();
    let healthy = Scim2Server::start();
    // No filter support: lookups list everything, and the listing never ends by its count.
    let liar = HostileServer::start(|req| match (req.method.as_str(), req.scim_path()) {
        ("GET", "/ServiceProviderConfig") => Some(HttpResponse::json(
            200,
            &json!({
                "schemas": ["urn:ietf:params:scim:schemas:core:2.0:ServiceProviderConfig"],
                "filter": { "supported": false, "maxResults": 100 },
                "patch": { "supported": true },
            }),
        )),
        ("GET", "/Users") => {
            let start: usize = req
                .query("startIndex")
                .and_then(|s| s.parse().ok())
                .unwrap_or(1);
            let same = json!({ "id": "always-the-same", "userName": "someone-else", "externalId": "nobody" });
            Some(HttpResponse::json(
                200,
                &list_response(1_000_000_000, start, vec![same]),
            ))
        }
        _ => None,
    });
    config.target("healthy", &healthy.base_url(), healthy.token(), "");
    config.target("liar", &liar.url(), &random_token(), "");
    let started = Instant::now();
    let out = run(&config, &["sync"]);
    out.expect_code(3);
    assert!(started.elapsed() < Duration::from_secs(60), "{out}");
    let users = scim_list(&healthy.base_url(), healthy.token(), "Users");
    assert_eq!(users.len(), 1, "the healthy target got its change: {out}");
    assert!(
        liar.resources("Users").is_empty(),
        "no create after an incomplete listing"
    );
    let listings = liar
        .requests()
        .iter()
        .filter(|r| r.scim_path() == "/Users")
        .count();
    assert!(listings <= 5, "{listings} listing requests");
    let plan = run(&config, &["plan", "--format", "json"]);
    plan.expect_code(1);
    let t = plan_target(&plan.json(), "liar");
    assert_eq!(t["status"], "error", "{plan}");
    assert!(
        t["error"].as_str().is_some_and(|e| e.contains("paging")),
        "{plan}"
    );
}

#[test]
fn a_malicious_id_is_refused_and_never_becomes_a_path() {
    let (slapd, mut config) = directory();
    // A create answered with an id that would climb out of the SCIM base.
    let creator = HostileServer::start(|req| {
        (req.method == "POST").then(|| {
            let mut r = req.json();
            r["id"] = json!("../../x?y=");
            HttpResponse::json(201, &r)
        })
    });
    // Lookups answered with such an id.
    let lister = HostileServer::start(|req| {
        (req.method == "GET" && req.query("filter").is_some()).then(|| {
            HttpResponse::json(
                200,
                &list_response(1, 1, vec![json!({ "id": "../admin", "userName": "alice" })]),
            )
        })
    });
    let token = random_token();
    config.target("creator", &creator.url(), &token, "");
    config.target("lister", &lister.url(), &token, "");
    let out = run(&config, &["sync"]);
    out.expect_code(3);
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(text.contains("malformed"), "{out}");
    assert!(
        lister.requests().iter().all(|r| r.method == "GET"),
        "no write after a bad listing"
    );
    // The directory changes; whatever ldap2scim remembered, no request leaves the SCIM base.
    slapd.modify(&format!(
        "dn: {}\nchangetype: modify\nreplace: title\ntitle: Staff Engineer\n",
        person_dn("alice")
    ));
    let again = run(&config, &["sync"]);
    assert_ne!(again.code, 0, "{again}");
    for server in [&creator, &lister] {
        for r in server.requests() {
            assert!(
                r.target.starts_with(&format!("{SCIM_PREFIX}/")) && !r.target.contains(".."),
                "a request outside the SCIM base: {} {}",
                r.method,
                r.target
            );
            assert!(!r.target.contains("x?y"), "{} {}", r.method, r.target);
        }
    }
}

#[test]
fn a_501_is_final_and_names_the_refused_attributes() {
    let (slapd, mut config) = directory();
    let refuse = Arc::new(AtomicBool::new(false));
    let flag = refuse.clone();
    let target = HostileServer::start(move |req| {
        (req.method == "PATCH" && flag.load(Ordering::SeqCst))
            .then(|| HttpResponse::scim_error(501, "PATCH of this attribute is not implemented"))
    });
    config.target("app", &target.url(), &random_token(), "");
    run(&config, &["sync"]).expect_code(0);
    assert_eq!(target.resources("Users").len(), 1);
    refuse.store(true, Ordering::SeqCst);
    slapd.modify(&format!(
        "dn: {}\nchangetype: modify\nreplace: title\ntitle: Staff Engineer\n",
        person_dn("alice")
    ));
    let out = run(&config, &["sync"]);
    out.expect_code(3);
    let patches = target
        .requests()
        .iter()
        .filter(|r| r.method == "PATCH")
        .count();
    assert_eq!(patches, 1, "a 501 is not retried: {out}");
    let text = format!("{}{}{}", out.stdout, out.stderr, audit(&config));
    assert!(text.contains("501"), "{out}");
    assert!(
        text.contains("title"),
        "the refused attribute is named: {out}"
    );
    assert!(text.contains("mapping"), "the fix is suggested: {out}");
}

#[test]
fn a_revoked_token_fails_the_target_even_with_nothing_to_do() {
    let (_slapd, mut config) = directory();
    let servers = all_scim_servers();
    for s in &servers {
        config.target(s.name(), &s.base_url(), s.token(), "");
    }
    run(&config, &["sync"]).expect_code(0);
    run(&config, &["plan"]).expect_code(0);
    // The credentials are revoked (replaced by wrong ones); the directory did not change.
    for s in &servers {
        config.target(s.name(), &s.base_url(), &random_token(), "");
    }
    let out = run(&config, &["sync"]);
    out.expect_code(3);
    let plan = run(&config, &["plan", "--format", "json"]);
    plan.expect_code(1);
    let json = plan.json();
    for s in &servers {
        let t = plan_target(&json, s.name());
        assert_eq!(t["status"], "error", "{}: {plan}", s.name());
        let e = t["error"].as_str().unwrap_or_default();
        assert!(e.contains("401") || e.contains("403"), "{}: {e}", s.name());
    }
    let status = run(&config, &["status"]);
    status.expect_code(0);
    for s in &servers {
        assert!(
            status
                .stdout
                .lines()
                .any(|l| l.starts_with(&format!("target {}:", s.name()))
                    && l.contains("result error")),
            "{}: {status}",
            s.name()
        );
    }
}

#[test]
fn a_token_lifetime_beyond_the_clock_is_capped_not_a_crash() {
    let (_slapd, mut config) = directory();
    let token = random_token();
    let issued = token.clone();
    let target = HostileServer::start(move |req| {
        if req.scim_path() == "/token" {
            return Some(HttpResponse::json(
                200,
                &json!({ "access_token": issued, "token_type": "Bearer", "expires_in": u64::MAX }),
            ));
        }
        (req.header("authorization") != Some(format!("Bearer {issued}").as_str()))
            .then(|| HttpResponse::scim_error(401, "bad token"))
    });
    let secret = random_token();
    let auth = oauth2(
        &format!("{}/token", target.origin()),
        &secret_file(&config, "app.secret", &secret),
        "",
    );
    config.target("app", &target.url(), "unused", &auth);
    let out = run(&config, &["sync"]);
    out.expect_code(0);
    assert!(!out.stderr.contains("panicked"), "{out}");
    assert_eq!(target.resources("Users").len(), 1, "{out}");
    assert!(!format!("{}{}", out.stdout, out.stderr).contains(&token));
}

/// A token endpoint and SCIM service that accept only the token issued last: the first one
/// for `first` SCIM requests, each later one for `later` (0: refused at once).
fn rotating_oauth_target(first: usize, later: usize) -> HostileServer {
    let current: Mutex<Option<(String, usize)>> = Mutex::new(None);
    let issued = std::sync::atomic::AtomicUsize::new(0);
    HostileServer::start(move |req| {
        let mut current = current.lock().unwrap_or_else(|e| e.into_inner());
        if req.scim_path() == "/token" {
            let token = random_token();
            let uses = if issued.fetch_add(1, Ordering::SeqCst) == 0 {
                first
            } else {
                later
            };
            *current = Some((token.clone(), uses));
            return Some(HttpResponse::json(
                200,
                &json!({ "access_token": token, "token_type": "Bearer", "expires_in": 3600 }),
            ));
        }
        let presented = req.header("authorization").unwrap_or_default().to_string();
        match current.as_mut() {
            Some((token, left)) if presented == format!("Bearer {token}") && *left > 0 => {
                *left -= 1;
                None
            }
            _ => Some(HttpResponse::scim_error(
                401,
                "the access token is not valid",
            )),
        }
    })
}

fn token_requests(server: &HostileServer) -> usize {
    server
        .requests()
        .iter()
        .filter(|r| r.scim_path() == "/token")
        .count()
}

#[test]
fn a_revoked_oauth2_token_is_dropped_and_replaced_once() {
    let (_slapd, mut config) = directory();
    // Revoked after two requests: the third one is refused, a fresh token gets it through.
    let rotating = rotating_oauth_target(2, usize::MAX);
    // Every token is refused: one fresh token is tried, then the 401 is final.
    let refusing = rotating_oauth_target(0, 0);
    for (name, server) in [("rotating", &rotating), ("refusing", &refusing)] {
        let auth = oauth2(
            &format!("{}/token", server.origin()),
            &secret_file(&config, &format!("{name}.secret"), &random_token()),
            "",
        );
        config.target(name, &server.url(), "unused", &auth);
    }
    let out = run(&config, &["sync"]);
    out.expect_code(3);
    assert_eq!(rotating.resources("Users").len(), 1, "{out}");
    assert_eq!(token_requests(&rotating), 2, "{out}");
    let refused = |s: &HostileServer| {
        s.requests()
            .iter()
            .filter(|r| r.scim_path() != "/token")
            .count()
    };
    assert_eq!(token_requests(&refusing), 2, "{out}");
    assert_eq!(refused(&refusing), 2, "a second 401 is final: {out}");
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(text.contains("refusing") && text.contains("401"), "{out}");
}

#[test]
fn check_connect_fails_a_wrong_credential_and_names_the_target() {
    let (_slapd, mut config) = directory();
    let scim2 = Scim2Server::start();
    // Serves /ServiceProviderConfig to anyone, as many providers do; anything else needs
    // the right token.
    let right = random_token();
    let expected = format!("Bearer {right}");
    let open = HostileServer::start(move |req| match req.scim_path() {
        "/ServiceProviderConfig" => Some(HttpResponse::json(
            200,
            &json!({
                "schemas": ["urn:ietf:params:scim:schemas:core:2.0:ServiceProviderConfig"],
                "patch": { "supported": true },
                "filter": { "supported": true, "maxResults": 100 },
            }),
        )),
        _ => (req.header("authorization") != Some(expected.as_str()))
            .then(|| HttpResponse::scim_error(401, "invalid token")),
    });
    config.target("good", &scim2.base_url(), scim2.token(), "");
    let ok = run(&config, &["check", "--connect"]);
    ok.expect_code(0);
    assert!(
        ok.stdout
            .contains("target good: /ServiceProviderConfig answered"),
        "{ok}"
    );
    assert!(ok.stdout.contains("credentials were accepted"), "{ok}");

    let wrong = random_token();
    config.target("revoked", &scim2.base_url(), &wrong, "");
    config.target("open", &open.url(), &wrong, "");
    let out = run(&config, &["check", "--connect"]);
    out.expect_code(1);
    for name in ["revoked", "open"] {
        assert!(
            out.stderr
                .contains(&format!("target {name}: its credentials were refused")),
            "{name}: {out}"
        );
        assert!(!out.stdout.contains(&format!("target {name}:")), "{out}");
    }
    assert!(
        out.stderr.contains("401") || out.stderr.contains("403"),
        "{out}"
    );
    assert!(out.stdout.contains("target good:"), "{out}");
    let text = format!("{}{}", out.stdout, out.stderr);
    for secret in [wrong.as_str(), right.as_str(), scim2.token()] {
        assert!(!text.contains(secret), "{out}");
    }
}

#[test]
fn a_listing_of_id_less_resources_without_a_count_ends_with_an_error() {
    let (_slapd, mut config) = directory();
    // No filter support, so lookups list everything; every page is full, none of its
    // resources has an id, and no totalResults says when it ends.
    let liar = HostileServer::start(|req| match (req.method.as_str(), req.scim_path()) {
        ("GET", "/ServiceProviderConfig") => Some(HttpResponse::json(
            200,
            &json!({
                "schemas": ["urn:ietf:params:scim:schemas:core:2.0:ServiceProviderConfig"],
                "filter": { "supported": false, "maxResults": 10 },
                "patch": { "supported": true },
            }),
        )),
        ("GET", "/Users") => {
            let count: usize = req
                .query("count")
                .and_then(|s| s.parse().ok())
                .unwrap_or(10)
                .min(10);
            let nameless = json!({ "userName": "someone-else", "externalId": "nobody" });
            Some(HttpResponse::json(
                200,
                &json!({
                    "schemas": ["urn:ietf:params:scim:api:messages:2.0:ListResponse"],
                    "Resources": vec![nameless; count],
                }),
            ))
        }
        _ => None,
    });
    config.target("liar", &liar.url(), &random_token(), "");
    let started = Instant::now();
    let out = run(&config, &["sync"]);
    out.expect_code(3);
    assert!(started.elapsed() < Duration::from_secs(60), "{out}");
    assert!(liar.resources("Users").is_empty(), "{out}");
    let listings = liar
        .requests()
        .iter()
        .filter(|r| r.scim_path() == "/Users")
        .count();
    assert!(listings <= 5, "{listings} listing requests");
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(text.contains("no resource with a usable id"), "{out}");
}
