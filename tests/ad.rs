//! Issue 5, Active Directory end to end: a real Samba AD DC → ldap2scim (dialect
//! `active-directory`, over LDAPS) → scim2-server, all inside the test's own network namespace
//! (see `support::samba`). Skips, saying why, where Samba or network namespaces are missing.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde_json::Value;
use support::*;

const PEOPLE: &str = "OU=People,DC=example,DC=org";
const GROUPS: &str = "OU=Groups,DC=example,DC=org";
const SYNC_PW: &str = "sync-Passw0rd";
/// How many members the big group gets (more than AD's default MaxValRange of 1500).
const BIG: usize = 1600;

/// accountExpires values (100-ns intervals since 1601-01-01 UTC).
const Y2000: &str = "125911584000000000"; // 2000-01-01T00:00:00Z
const Y2100: &str = "157469184000000000"; // 2100-01-01T00:00:00Z
const NEVER: &str = "9223372036854775807";

fn user(sam: &str, uac: u32, extra: &str) -> String {
    format!(
        "dn: CN={sam},{PEOPLE}\nobjectClass: user\nsAMAccountName: {sam}\n\
         userPrincipalName: {sam}@example.org\ngivenName: {sam}\nsn: Test\n\
         mail: {sam}@example.org\nuserAccountControl: {uac}\n{extra}\n"
    )
}

fn group(name: &str, members: &[String]) -> String {
    let mut ldif = format!(
        "dn: CN={name},{GROUPS}\nobjectClass: group\nsAMAccountName: {name}\n\
         groupType: -2147483646\n"
    );
    for m in members {
        let _ = writeln!(ldif, "member: {m}");
    }
    ldif.push('\n');
    ldif
}

fn dn(kind: &str, name: &str) -> String {
    match kind {
        "user" => format!("CN={name},{PEOPLE}"),
        _ => format!("CN={name},{GROUPS}"),
    }
}

/// The two OUs, and svc-sync in CN=Users (outside the synced OU) with a password and no
/// replication right: the bind account of [`bind_as_svc_sync`].
fn ous_and_bind_account() -> String {
    let pw: Vec<u8> = format!("\"{SYNC_PW}\"")
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect();
    format!(
        "dn: {PEOPLE}\nobjectClass: organizationalUnit\n\n\
         dn: {GROUPS}\nobjectClass: organizationalUnit\n\n\
         dn: CN=svc-sync,CN=Users,DC=example,DC=org\nobjectClass: user\n\
         sAMAccountName: svc-sync\nuserPrincipalName: svc-sync@example.org\n\
         unicodePwd:: {}\nuserAccountControl: 512\n\n",
        ldif_base64(&pw)
    )
}

/// A configuration binding as svc-sync over LDAPS, in the AD dialect.
fn bind_as_svc_sync(dc: &SambaDc) -> TestConfig {
    let mut config = TestConfig::for_directory(
        dc.ldaps_url(),
        &dc.ca_file(),
        "svc-sync@example.org",
        SYNC_PW,
    );
    config
        .set("ldap", "starttls", "false")
        .active_directory(PEOPLE, GROUPS);
    config
}

/// The directory of this test:
/// - alice (enabled), bob (disabled, 514), carol (expired in 2000), dave (accountExpires
///   "never"), erin (expires in 2100): all password-less with userAccountControl 544 (fast);
/// - bulk00001… (BIG of them) in BigGroup;
/// - Backend {alice, carol} ⊂ Engineering {Backend, bob, AllStaff} and AllStaff {Engineering,
///   dave}: Engineering and AllStaff contain each other (a cycle);
/// - svc-sync in CN=Users (outside the synced OU), with a password: ldap2scim's bind account.
fn seed() -> String {
    let mut ldif = ous_and_bind_account();
    ldif.push_str(&user("alice", 544, ""));
    ldif.push_str(&user("bob", 514, ""));
    ldif.push_str(&user("carol", 544, &format!("accountExpires: {Y2000}\n")));
    ldif.push_str(&user("dave", 544, &format!("accountExpires: {NEVER}\n")));
    ldif.push_str(&user("erin", 544, &format!("accountExpires: {Y2100}\n")));
    for i in 1..=BIG {
        let _ = write!(
            ldif,
            "dn: CN=bulk{i:05},{PEOPLE}\nobjectClass: user\nsAMAccountName: bulk{i:05}\n\
             userPrincipalName: bulk{i:05}@example.org\nsn: Bulk\nuserAccountControl: 544\n\n"
        );
    }
    let bulk: Vec<String> = (1..=BIG)
        .map(|i| dn("user", &format!("bulk{i:05}")))
        .collect();
    ldif.push_str(&group("BigGroup", &bulk));
    ldif.push_str(&group(
        "Backend",
        &[dn("user", "alice"), dn("user", "carol")],
    ));
    // Engineering is added before AllStaff exists, so the cycle is closed by a modify below.
    ldif.push_str(&group(
        "Engineering",
        &[dn("group", "Backend"), dn("user", "bob")],
    ));
    ldif.push_str(&group(
        "AllStaff",
        &[dn("group", "Engineering"), dn("user", "dave")],
    ));
    ldif
}

/// Decodes standard base64 (the test's own decoder, so the GUID check owes nothing to
/// ldap2scim's code).
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {text}"),
        }
    };
    let clean: Vec<u8> = text.bytes().filter(|&c| c != b'=').collect();
    let mut out = Vec::new();
    for chunk in clean.chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &c)| acc | (value(c) << (18 - 6 * i)));
        for i in 0..chunk.len() - 1 {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    out
}

/// The GUID of `dn` as ldapsearch shows it (`objectGUID:: base64`), formatted canonically
/// (first three fields little-endian) by the test itself.
fn guid_of(dc: &SambaDc, dn: &str) -> String {
    let ldif = dc.search(dn, "(objectClass=*)", &["objectGUID"]);
    let b64 = ldif
        .lines()
        .find_map(|l| l.strip_prefix("objectGUID:: "))
        .unwrap_or_else(|| panic!("no binary objectGUID for {dn}:\n{ldif}"));
    let b = base64_decode(b64.trim());
    assert_eq!(b.len(), 16, "{dn}: {b:?}");
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

struct Target<'a> {
    scim: &'a Scim2Server,
}

impl Target<'_> {
    fn users(&self) -> Vec<Value> {
        scim_list_paged(&self.scim.base_url(), self.scim.token(), "Users", 500)
    }
    fn user(&self, user_name: &str) -> Value {
        self.users()
            .into_iter()
            .find(|u| u["userName"] == user_name)
            .unwrap_or_else(|| panic!("no user {user_name} on the target"))
    }
    /// displayName → member userNames.
    fn memberships(&self) -> BTreeMap<String, BTreeSet<String>> {
        let base = self.scim.base_url();
        let token = self.scim.token();
        let names: BTreeMap<String, String> = self
            .users()
            .iter()
            .map(|u| {
                (
                    u["id"].as_str().unwrap().to_string(),
                    u["userName"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        scim_list(&base, token, "Groups")
            .iter()
            .map(|g| {
                let full = scim_get(
                    &base,
                    token,
                    &format!("/Groups/{}", g["id"].as_str().unwrap()),
                );
                let members = full["members"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|m| {
                        names
                            .get(m["value"].as_str().unwrap())
                            .cloned()
                            .unwrap_or_else(|| format!("?{}", m["value"]))
                    })
                    .collect();
                (g["displayName"].as_str().unwrap().to_string(), members)
            })
            .collect()
    }
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| format!("{n}@example.org")).collect()
}

#[test]
fn ad_sync_end_to_end() {
    let Some(dc) = SambaDc::start_isolated("ad_sync_end_to_end") else {
        return;
    };
    let t = std::time::Instant::now();
    dc.add(&seed());
    // Close the cycle: Engineering ∋ AllStaff ∋ Engineering.
    dc.modify(&format!(
        "dn: {}\nchangetype: modify\nadd: member\nmember: {}\n",
        dn("group", "Engineering"),
        dn("group", "AllStaff")
    ));
    eprintln!("seeded {} users in {:?}", BIG + 6, t.elapsed());

    let scim = Scim2Server::start();
    let target = Target { scim: &scim };
    let mut config = bind_as_svc_sync(&dc);
    config.target(
        "app",
        &scim.base_url(),
        scim.token(),
        "provision_disabled = false\nconcurrency = 8\n\n[mapping]\ndisplayName = \"{sAMAccountName}\"\n",
    );

    let t = std::time::Instant::now();
    let out = ldap2scim(&config.path(), &["sync"]);
    eprintln!("first sync of {} users: {:?}", BIG + 3, t.elapsed());
    out.expect_code(0);

    // userName is the UPN; bob (disabled) and carol (expired) were not created.
    let users = target.users();
    assert_eq!(users.len(), BIG + 3, "alice, dave, erin and the bulk users");
    let names: BTreeSet<String> = users
        .iter()
        .map(|u| u["userName"].as_str().unwrap().to_string())
        .collect();
    for present in ["alice", "dave", "erin", "bulk00001", "bulk01600"] {
        assert!(
            names.contains(&format!("{present}@example.org")),
            "{present}"
        );
    }
    for absent in ["bob", "carol", "svc-sync"] {
        assert!(
            !names.contains(&format!("{absent}@example.org")),
            "{absent}"
        );
    }
    // externalId is the objectGUID as the canonical lowercase GUID; sAMAccountName maps.
    let alice = target.user("alice@example.org");
    assert_eq!(alice["externalId"], guid_of(&dc, &dn("user", "alice")));
    assert_eq!(alice["displayName"], "alice");
    assert_eq!(alice["active"], true);

    // Nested groups, through the Engineering ⇄ AllStaff cycle; only provisioned users count.
    let memberships = target.memberships();
    assert_eq!(memberships["Backend"], set(&["alice"]));
    assert_eq!(memberships["Engineering"], set(&["alice", "dave"]));
    assert_eq!(memberships["AllStaff"], set(&["alice", "dave"]));
    assert_eq!(memberships["BigGroup"].len(), BIG);

    // Nothing changed: nothing to do.
    ldap2scim(&config.path(), &["plan"]).expect_code(0);

    // Disabling (bit 2) and expiring (accountExpires in the past) deactivate.
    dc.modify(&format!(
        "dn: {}\nchangetype: modify\nreplace: userAccountControl\nuserAccountControl: 546\n\n\
         dn: {}\nchangetype: modify\nreplace: accountExpires\naccountExpires: {Y2000}\n",
        dn("user", "alice"),
        dn("user", "dave")
    ));
    ldap2scim(&config.path(), &["sync"]).expect_code(0);
    assert_eq!(target.user("alice@example.org")["active"], false);
    assert_eq!(target.user("dave@example.org")["active"], false);
    assert_eq!(target.user("erin@example.org")["active"], true);

    // erin expires in 2100: with the clock there, she is inactive too.
    Ldap2scim::new(&config.path())
        .args(["sync"])
        .env("LDAP2SCIM_NOW", "2100-06-01T00:00:00Z")
        .run()
        .expect_code(0);
    assert_eq!(target.user("erin@example.org")["active"], false);
    assert_eq!(target.user("bulk00001@example.org")["active"], true);
}

#[test]
fn ad_continuation_references_are_not_chased() {
    let Some(dc) = SambaDc::start_isolated("ad_continuation_references_are_not_chased") else {
        return;
    };
    dc.add(&format!(
        "dn: {PEOPLE}\nobjectClass: organizationalUnit\n\n\
         dn: {GROUPS}\nobjectClass: organizationalUnit\n\n{}{}",
        user("alice", 544, ""),
        group("Staff", &[dn("user", "alice")])
    ));
    // A subtree search from the domain root makes Samba return continuation references
    // (refldap://example.org/CN=Configuration,… and the DNS zones). Following one would mean
    // resolving example.org; ldap2scim reads what this DC has and follows none.
    let ldif = dc.search("DC=example,DC=org", "(objectClass=user)", &["1.1"]);
    assert!(
        ldif.lines().any(|l| l.starts_with("# refldap")),
        "Samba returned no continuation reference; the test proves nothing:\n{ldif}"
    );
    let scim = Scim2Server::start();
    let mut config =
        TestConfig::for_directory(dc.ldap_url(), &dc.ca_file(), dc.admin_dn(), dc.admin_pw());
    config
        .set("ldap", "starttls", "true")
        .set("ldap", "dialect", "\"active-directory\"")
        .set("ldap", "max_shrink", "\"100%\"")
        .set("ldap.users", "base", &toml_str("DC=example,DC=org"))
        .set(
            "ldap.users",
            "filter",
            &toml_str("(&(objectClass=user)(userPrincipalName=*@example.org)(sn=*))"),
        )
        .unset("ldap.users", "disabled_filter")
        .set("ldap.groups", "base", &toml_str("DC=example,DC=org"))
        .set(
            "ldap.groups",
            "filter",
            &toml_str("(&(objectClass=group)(cn=Staff))"),
        );
    config.target("app", &scim.base_url(), scim.token(), "");
    let out = ldap2scim(&config.path(), &["plan", "--format", "json"]);
    out.expect_code(2);
    let plan = out.json();
    assert_eq!(plan["targets"][0]["summary"]["users_created"], 1, "{plan}");
    assert_eq!(plan["targets"][0]["summary"]["members_added"], 1, "{plan}");

    // The same read in the OpenLDAP dialect, where a reference means part of the tree lives
    // elsewhere: refused as incomplete. This proves ldap2scim did see Samba's references.
    config.set("ldap", "dialect", "\"openldap\"");
    let out = ldap2scim(&config.path(), &["plan"]);
    assert_eq!(out.code, 1, "{out}");
    assert!(out.stderr.contains("continuation reference"), "{out}");
}

/// `plan --format json` as a delta (the feed) and with `--full`: the same plan, and the delta
/// was read from the feed.
fn assert_delta_plans_like_full(config: &std::path::Path) -> Value {
    let delta = ldap2scim(config, &["plan", "--format", "json"]);
    assert!(delta.code == 0 || delta.code == 2, "{delta}");
    assert!(
        delta.stderr.contains("directory read from the change feed")
            || delta.stderr.contains("the change feed named no change"),
        "the plan did not read from the change feed:\n{delta}"
    );
    let full = ldap2scim(config, &["plan", "--full", "--format", "json"]);
    assert_eq!(delta.code, full.code, "delta:\n{delta}\nfull:\n{full}");
    let (d, f) = (delta.json(), full.json());
    assert_eq!(d, f, "delta: {d:#}\nfull: {f:#}");
    d
}

/// A sync that read only the feed's changes.
fn sync_from_the_feed(config: &std::path::Path) {
    let out = ldap2scim(config, &["sync"]);
    out.expect_code(0);
    assert!(
        out.stderr.contains("directory read from the change feed"),
        "the sync did not read from the change feed:\n{out}"
    );
}

/// Issue 13 on Active Directory: DirSync deltas (a member added to and removed from a nested
/// group, a user disabled, a user deleted, a user renamed) plan what a full read plans, and
/// the uSNChanged watermark does the same where it is configured.
fn ad_feed(test: &str, feed: &str) {
    let Some(dc) = SambaDc::start_isolated(test) else {
        return;
    };
    // frank is disabled at the first full read; gina lives in a sub-OU; hank is outside the
    // synced OU but already in Outer.
    let sub = format!("OU=Sub,{PEOPLE}");
    let gina = format!("CN=gina,{sub}");
    let hank = "CN=hank,CN=Users,DC=example,DC=org";
    dc.add(&format!(
        "dn: {PEOPLE}\nobjectClass: organizationalUnit\n\n\
         dn: {GROUPS}\nobjectClass: organizationalUnit\n\n\
         dn: {sub}\nobjectClass: organizationalUnit\n\n\
         dn: {gina}\nobjectClass: user\nsAMAccountName: gina\nuserPrincipalName: gina@example.org\n\
         sn: Test\nuserAccountControl: 544\n\n\
         dn: {hank}\nobjectClass: user\nsAMAccountName: hank\nuserPrincipalName: hank@example.org\n\
         sn: Test\nuserAccountControl: 544\n\n{}{}{}{}{}{}{}",
        user("alice", 544, ""),
        user("bob", 544, ""),
        user("carol", 544, ""),
        user("dave", 544, ""),
        user("frank", 546, ""),
        group("Inner", &[dn("user", "alice"), gina.clone()]),
        group(
            "Outer",
            &[dn("group", "Inner"), dn("user", "bob"), hank.to_string()]
        ),
    ));
    let scim = Scim2Server::start();
    let target = Target { scim: &scim };
    let mut config =
        TestConfig::for_directory(dc.ldap_url(), &dc.ca_file(), dc.admin_dn(), dc.admin_pw());
    config
        .set("ldap", "starttls", "true")
        .set("ldap", "change_feed", &toml_str(feed))
        .active_directory(PEOPLE, GROUPS);
    config.target(
        "app",
        &scim.base_url(),
        scim.token(),
        "[mapping]\ndisplayName = \"{sAMAccountName}\"\n",
    );
    let check = ldap2scim(&config.path(), &["check", "--connect"]);
    check.expect_code(0);
    let mode = match feed {
        "usn" => "change feed: usn",
        _ => "change feed: dirsync (with the replication right",
    };
    assert!(check.stdout.contains(mode), "{check}");

    // The first sync reads everything and builds the mirror; then a quiet delta.
    let first = ldap2scim(&config.path(), &["sync"]);
    first.expect_code(0);
    assert!(
        first.stderr.contains("reading the whole directory"),
        "{first}"
    );
    let quiet = ldap2scim(&config.path(), &["sync"]);
    quiet.expect_code(0);
    assert!(
        quiet.stderr.contains("the change feed named no change"),
        "{quiet}"
    );
    let status = ldap2scim(&config.path(), &["status"]);
    assert!(
        status.stdout.contains(&format!("change feed: {feed}")),
        "{status}"
    );
    assert_eq!(
        target.memberships()["Outer"],
        set(&["alice", "bob", "gina"])
    );

    // frank, disabled at the full read, is enabled: created now, as a full read would.
    dc.modify(&format!(
        "dn: {}\nchangetype: modify\nreplace: userAccountControl\nuserAccountControl: 544\n",
        dn("user", "frank")
    ));
    assert_delta_plans_like_full(&config.path());
    sync_from_the_feed(&config.path());
    assert_eq!(target.user("frank@example.org")["active"], true);

    // hank moves into the synced OU, already a member of Outer: the group is read again.
    dc.modify(&format!(
        "dn: {hank}\nchangetype: modrdn\nnewrdn: CN=hank\ndeleteoldrdn: 1\nnewsuperior: {PEOPLE}\n"
    ));
    assert_delta_plans_like_full(&config.path());
    sync_from_the_feed(&config.path());
    assert_eq!(
        target.memberships()["Outer"],
        set(&["alice", "bob", "gina", "hank"])
    );

    // The sub-OU is renamed: gina's DN changes without the feed naming her, so a full read
    // decides, and she keeps her groups.
    dc.modify(&format!(
        "dn: {sub}\nchangetype: modrdn\nnewrdn: OU=Sub2\ndeleteoldrdn: 1\n"
    ));
    let renamed = ldap2scim(&config.path(), &["sync"]);
    renamed.expect_code(0);
    assert!(renamed.stderr.contains("the container"), "{renamed}");
    ldap2scim(&config.path(), &["plan", "--full"]).expect_code(0);
    assert_eq!(target.memberships()["Inner"], set(&["alice", "gina"]));

    // carol joins the inner group: a member delta in the outer one too.
    dc.modify(&format!(
        "dn: {}\nchangetype: modify\nadd: member\nmember: {}\n",
        dn("group", "Inner"),
        dn("user", "carol")
    ));
    let status = ldap2scim(&config.path(), &["status"]);
    assert!(
        status
            .stdout
            .contains("changes waiting: 0 users and 1 groups"),
        "{status}"
    );
    assert_delta_plans_like_full(&config.path());
    sync_from_the_feed(&config.path());
    assert_eq!(
        target.memberships()["Outer"],
        set(&["alice", "bob", "carol", "gina", "hank"])
    );

    // alice leaves it again.
    dc.modify(&format!(
        "dn: {}\nchangetype: modify\ndelete: member\nmember: {}\n",
        dn("group", "Inner"),
        dn("user", "alice")
    ));
    assert_delta_plans_like_full(&config.path());
    sync_from_the_feed(&config.path());
    assert_eq!(
        target.memberships()["Outer"],
        set(&["bob", "carol", "gina", "hank"])
    );
    assert_eq!(target.memberships()["Inner"], set(&["carol", "gina"]));

    // bob is disabled (userAccountControl bit 2).
    dc.modify(&format!(
        "dn: {}\nchangetype: modify\nreplace: userAccountControl\nuserAccountControl: 546\n",
        dn("user", "bob")
    ));
    assert_delta_plans_like_full(&config.path());
    sync_from_the_feed(&config.path());
    assert_eq!(target.user("bob@example.org")["active"], false);

    // dave is deleted: a tombstone in the feed, a deprovision on the target.
    dc.modify(&format!("dn: {}\nchangetype: delete\n", dn("user", "dave")));
    let plan = assert_delta_plans_like_full(&config.path());
    assert_eq!(
        plan["targets"][0]["summary"]["users_deactivated"], 1,
        "{plan}"
    );
    sync_from_the_feed(&config.path());
    assert_eq!(target.user("dave@example.org")["active"], false);

    // carol is renamed: same account, the group still has her.
    dc.modify(&format!(
        "dn: {}\nchangetype: modrdn\nnewrdn: CN=carol2\ndeleteoldrdn: 1\n",
        dn("user", "carol")
    ));
    assert_delta_plans_like_full(&config.path());
    sync_from_the_feed(&config.path());
    // (bob is deactivated, not removed: he keeps his memberships, as in a full read.)
    assert_eq!(
        target.memberships()["Outer"],
        set(&["bob", "carol", "gina", "hank"])
    );

    // A new hire, in the outer group.
    dc.add(&user("erin", 544, ""));
    dc.modify(&format!(
        "dn: {}\nchangetype: modify\nadd: member\nmember: {}\n",
        dn("group", "Outer"),
        dn("user", "erin")
    ));
    assert_delta_plans_like_full(&config.path());
    sync_from_the_feed(&config.path());
    assert_eq!(
        target.memberships()["Outer"],
        set(&["bob", "carol", "erin", "gina", "hank"])
    );
    assert_eq!(target.user("erin@example.org")["active"], true);

    // Everything applied: both ways plan nothing.
    ldap2scim(&config.path(), &["plan"]).expect_code(0);
    ldap2scim(&config.path(), &["plan", "--full"]).expect_code(0);
}

#[test]
fn ad_dirsync_deltas_plan_what_a_full_read_plans() {
    ad_feed("ad_dirsync_deltas_plan_what_a_full_read_plans", "dirsync");
}

#[test]
fn ad_usn_watermark_deltas_plan_what_a_full_read_plans() {
    ad_feed("ad_usn_watermark_deltas_plan_what_a_full_read_plans", "usn");
}

/// Live mode on Active Directory: the daemon polls DirSync every daemon.live_interval, and a
/// leaver, a changed attribute and a new member reach the target without the schedule; the
/// bind account without the replication right works in DirSync's object-security mode.
#[test]
fn ad_live_mode_polls_dirsync_and_applies_changes() {
    let Some(dc) = SambaDc::start_isolated("ad_live_mode_polls_dirsync_and_applies_changes") else {
        return;
    };
    dc.add(&format!(
        "{}{}{}{}",
        ous_and_bind_account(),
        user("alice", 544, ""),
        user("bob", 544, ""),
        group("Staff", &[dn("user", "alice")]),
    ));
    let scim = Scim2Server::start();
    let target = Target { scim: &scim };
    let mut config = bind_as_svc_sync(&dc);
    config
        .set("daemon", "schedule", "\"0 0 1 1 *\"")
        .set("daemon", "live_interval", "\"1s\"")
        .set("daemon", "live_delay", "\"0s\"");
    config.target(
        "app",
        &scim.base_url(),
        scim.token(),
        "[mapping]\ndisplayName = \"{sAMAccountName}\"\ntitle = \"{title}\"\n",
    );
    let check = ldap2scim(&config.path(), &["check", "--connect"]);
    check.expect_code(0);
    assert!(
        check
            .stdout
            .contains("change feed: dirsync in object-security mode"),
        "{check}"
    );
    let daemon = Daemon::watching(&config.path());
    dc.modify(&format!(
        "dn: {}\nchangetype: modify\nreplace: title\ntitle: Live\n\n\
         dn: {}\nchangetype: modify\nadd: member\nmember: {}\n",
        dn("user", "alice"),
        dn("group", "Staff"),
        dn("user", "bob")
    ));
    let applied = wait_until(std::time::Duration::from_secs(20), || {
        target.user("alice@example.org")["title"] == "Live"
            && target.memberships()["Staff"] == set(&["alice", "bob"])
    });
    assert!(applied, "not applied live:\n{}", daemon.stderr());
    dc.modify(&format!("dn: {}\nchangetype: delete\n", dn("user", "bob")));
    let gone = wait_until(std::time::Duration::from_secs(20), || {
        target.user("bob@example.org")["active"] == false
    });
    assert!(gone, "not deprovisioned live:\n{}", daemon.stderr());
    let log = daemon.stop().stderr;
    assert!(
        log.contains("directory read from the change feed")
            && !log.contains("reading the whole directory (reason"),
        "{log}"
    );
}
