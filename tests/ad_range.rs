//! Issue 5, Active Directory range retrieval and continuation references, against a fake LDAP
//! server over a real socket (Samba does not force ranges): a group's `member` comes back as
//! `member;range=0-1499` and must be read to its end, or the read fails and nothing changes.

mod support;

use std::collections::BTreeSet;

use serde_json::Value;
use support::*;

const PEOPLE: &str = "OU=People,DC=example,DC=org";
const GROUPS: &str = "OU=Groups,DC=example,DC=org";

/// GUID bytes that are valid UTF-8 (ldap3 then hands them over as text, not bytes).
const UTF8_GUID: &[u8; 16] = b"ABCDabcd01234567";

/// The canonical string of AD GUID bytes, written out independently of ldap2scim's code:
/// the first three fields are little-endian.
fn guid_string(b: &[u8]) -> String {
    let hex = |r: &[u8]| r.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let rev = |r: &[u8]| r.iter().rev().copied().collect::<Vec<u8>>();
    format!(
        "{}-{}-{}-{}-{}",
        hex(&rev(&b[0..4])),
        hex(&rev(&b[4..6])),
        hex(&rev(&b[6..8])),
        hex(&b[8..10]),
        hex(&b[10..16])
    )
}

/// A version-4 GUID as AD stores it: byte 8 carries the variant bits (0b10xx_xxxx), so the
/// bytes are never valid UTF-8 and ldap3 hands them over as binary.
fn guid(kind: u8, n: u32) -> [u8; 16] {
    let mut g = [0u8; 16];
    g[0..4].copy_from_slice(&n.to_le_bytes());
    g[4] = kind;
    g[7] = 0x40;
    g[8] = 0x80 | kind;
    g[9..13].copy_from_slice(&n.to_be_bytes());
    g[15] = 0xee;
    g
}

fn user_dn(i: usize) -> String {
    format!("CN=user{i:05},{PEOPLE}")
}

fn user(i: usize) -> FakeEntry {
    let sam = format!("user{i:05}");
    let upn = format!("{sam}@example.org");
    FakeEntry::new(
        &user_dn(i),
        &[
            ("objectClass", &["top", "person", "user"]),
            ("cn", &[&sam]),
            ("sAMAccountName", &[&sam]),
            ("userPrincipalName", &[&upn]),
            ("userAccountControl", &["512"]),
            ("accountExpires", &["9223372036854775807"]),
        ],
    )
    .with_bytes("objectGUID", &guid(1, i as u32))
}

fn group(name: &str, n: u32) -> FakeEntry {
    FakeEntry::new(
        &format!("CN={name},{GROUPS}"),
        &[("objectClass", &["top", "group"]), ("cn", &[name])],
    )
    .with_bytes("objectGUID", &guid(2, n))
}

/// `users` users, a group `Big` holding all of them (served in ranges of `step`), a group
/// `Small` with three plain members, and a user whose GUID bytes are valid UTF-8.
fn directory(users: usize, step: usize) -> (Vec<FakeEntry>, usize) {
    let mut entries: Vec<FakeEntry> = (1..=users).map(user).collect();
    entries.push(
        FakeEntry::new(
            &format!("CN=utf8,{PEOPLE}"),
            &[
                ("objectClass", &["top", "person", "user"]),
                ("cn", &["utf8"]),
                ("sAMAccountName", &["utf8"]),
                ("userPrincipalName", &["utf8@example.org"]),
                ("userAccountControl", &["512"]),
            ],
        )
        .with_bytes("objectGUID", UTF8_GUID),
    );
    entries.push(group("Big", 1).with_ranged_members((1..=users).map(user_dn).collect()));
    entries.push(group("Small", 2).with_ranged_members(vec![
        user_dn(1),
        user_dn(2),
        format!("CN=utf8,{PEOPLE}"),
    ]));
    (entries, step)
}

/// An AD-dialect configuration for the fake (plain LDAP, no TLS: the fake speaks none).
fn ad_config(fake: &FakeLdap) -> TestConfig {
    let mut config = TestConfig::for_directory(
        &fake.url(),
        std::path::Path::new("/nonexistent"),
        "CN=sync,CN=Users,DC=example,DC=org",
        "sync-password",
    );
    config
        .set("ldap", "starttls", "false")
        .unset("ldap", "ca_file")
        .active_directory(PEOPLE, GROUPS);
    config
}

fn summary(plan: &Value) -> &Value {
    &plan["targets"][0]["summary"]
}

#[test]
fn ranged_group_of_3500_members_is_read_to_the_end() {
    let (entries, step) = directory(3500, 1500);
    let fake = FakeLdap::start(entries, step);
    let scim = Scim2Server::start();
    let mut config = ad_config(&fake);
    config.target("app", &scim.base_url(), scim.token(), "");

    let started = std::time::Instant::now();
    let out = ldap2scim(&config.path(), &["plan", "--format", "json"]);
    eprintln!(
        "plan over 3501 users and a 3500-member ranged group: {:?}",
        started.elapsed()
    );
    out.expect_code(2);
    let plan = out.json();
    let s = summary(&plan);
    assert_eq!(s["users_created"], 3501, "{s}");
    assert_eq!(s["groups_created"], 2, "{s}");
    // 3500 in Big (all three ranges), 3 in Small.
    assert_eq!(s["members_added"], 3503, "{s}");

    // The ranges were asked for one after the other on the group's DN, to the end.
    let big = format!("CN=Big,{GROUPS}");
    assert_eq!(
        fake.log().range_requests,
        vec![
            (big.clone(), "member;range=1500-*".to_string()),
            (big, "member;range=3000-*".to_string()),
        ]
    );
    // The paged search was really paged (page_size 500).
    assert!(fake.log().subtree_searches >= 8, "{:?}", fake.log());

    // objectGUID whose bytes are valid UTF-8 still becomes the canonical GUID.
    let changes = plan["targets"][0]["changes"].as_array().unwrap();
    let utf8 = changes
        .iter()
        .find(|c| c["resource"] == "User" && c["name"] == "utf8@example.org")
        .expect("a create for utf8@example.org");
    assert_eq!(utf8["external_id"], guid_string(UTF8_GUID));
    assert_eq!(utf8["external_id"], "44434241-6261-6463-3031-323334353637");
    let binary = changes
        .iter()
        .find(|c| c["resource"] == "User" && c["name"] == "user00007@example.org")
        .expect("a create for user00007");
    assert_eq!(binary["external_id"], guid_string(&guid(1, 7)));
}

/// A small world: 30 users, Big served in ranges of 10, synced once successfully.
struct Synced {
    fake: FakeLdap,
    scim: Scim2Server,
    proxy: RecordingProxy,
    config: TestConfig,
}

impl Synced {
    fn start() -> Synced {
        let (entries, _) = directory(30, 10);
        let fake = FakeLdap::start(entries, 10);
        let scim = Scim2Server::start();
        let proxy = RecordingProxy::start(&scim.base_url());
        let mut config = ad_config(&fake);
        config.target("app", &proxy.url(), scim.token(), "");
        ldap2scim(&config.path(), &["sync"]).expect_code(0);
        let world = Synced {
            fake,
            scim,
            proxy,
            config,
        };
        assert_eq!(world.big_members().len(), 30);
        world.proxy.clear();
        world
    }

    /// The userNames of Big's members on the SCIM server.
    fn big_members(&self) -> BTreeSet<String> {
        let base = self.scim.base_url();
        let token = self.scim.token();
        let users = scim_list(&base, token, "Users");
        let group = scim_list(&base, token, "Groups")
            .into_iter()
            .find(|g| g["displayName"] == "Big")
            .expect("group Big on the target");
        let group = scim_get(
            &base,
            token,
            &format!("/Groups/{}", group["id"].as_str().unwrap()),
        );
        group["members"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| {
                users
                    .iter()
                    .find(|u| u["id"] == m["value"])
                    .and_then(|u| u["userName"].as_str())
                    .map(str::to_string)
            })
            .collect()
    }
}

#[test]
fn broken_range_fails_the_read_and_leaves_the_target_untouched() {
    let world = Synced::start();
    let users_before = scim_list(&world.scim.base_url(), world.scim.token(), "Users").len();
    for fault in [
        RangeFault::Error { at: 10 },
        RangeFault::Skip { at: 10 },
        RangeFault::Missing { at: 20 },
        RangeFault::Short { at: 10 },
    ] {
        world.fake.set_fault(Some(fault.clone()));
        let requests_before = world.fake.log().range_requests.len();
        let out = ldap2scim(&world.config.path(), &["sync"]);
        assert_eq!(out.code, 1, "{fault:?}: sync must fail:\n{out}");
        assert!(
            out.stderr.to_lowercase().contains("incomplete"),
            "{fault:?}: the error must say the read is incomplete:\n{out}"
        );
        assert!(
            out.stderr.contains("CN=Big,OU=Groups,DC=example,DC=org"),
            "{fault:?}: the error must name the group:\n{out}"
        );
        assert!(
            world.fake.log().range_requests.len() > requests_before,
            "{fault:?}: no range was requested"
        );
        assert_eq!(
            world.proxy.writes(),
            0,
            "{fault:?}: {:?}",
            world.proxy.requests()
        );
        let out = ldap2scim(&world.config.path(), &["plan"]);
        assert_eq!(out.code, 1, "{fault:?}: plan must fail too:\n{out}");
    }
    assert_eq!(world.big_members().len(), 30);
    assert_eq!(
        scim_list(&world.scim.base_url(), world.scim.token(), "Users").len(),
        users_before
    );

    // Once the server behaves again, the same directory plans nothing.
    world.fake.set_fault(None);
    ldap2scim(&world.config.path(), &["plan"]).expect_code(0);
}

#[test]
fn continuation_references_are_never_chased() {
    // `elsewhere` would be the referred server: it must never see a connection.
    let elsewhere = FakeLdap::start(Vec::new(), 10);
    let referral = format!(
        "ldap://127.0.0.1:{}/OU=Elsewhere,DC=example,DC=org??sub",
        elsewhere.port()
    );
    let (entries, step) = directory(5, 10);
    let fake =
        FakeLdap::start_with_references(entries, step, vec![(PEOPLE.to_string(), vec![referral])]);
    let scim = Scim2Server::start();
    let mut config = ad_config(&fake);
    config.target("app", &scim.base_url(), scim.token(), "");

    // Active Directory hands out references as a matter of course: ignored, not followed.
    let out = ldap2scim(&config.path(), &["plan", "--format", "json"]);
    out.expect_code(2);
    assert_eq!(summary(&out.json())["users_created"], 6);

    // Anywhere else a reference means part of the tree is elsewhere: the read is incomplete.
    config.set("ldap", "dialect", "\"openldap\"");
    let out = ldap2scim(&config.path(), &["plan"]);
    assert_eq!(out.code, 1, "{out}");
    assert!(out.stderr.contains("continuation reference"), "{out}");

    assert_eq!(elsewhere.connections(), 0, "a referral was chased");
}
