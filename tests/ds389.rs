//! The change feed against a real 389 Directory Server with its Content Synchronization
//! plugin (RFC 4533 over the Retro Changelog): its feed names entries by nsUniqueId, not by
//! the entryUUID ldap2scim identifies them with, and deltas must still plan what a full read
//! plans.

mod support;

use support::*;

fn config_for(ds: &Ds389, target: &Scim2Server) -> TestConfig {
    let mut config = TestConfig::for_directory(
        &ds.url(),
        std::path::Path::new("/nonexistent"),
        ds.bind_dn(),
        DS389_PASSWORD,
    );
    config
        .set("ldap", "starttls", "false")
        .unset("ldap", "ca_file")
        .set("ldap", "max_shrink", "\"100%\"");
    config.target("scim2-server", &target.base_url(), target.token(), "");
    config
}

fn plans(config: &TestConfig) -> (Output, Output) {
    let delta = ldap2scim(&config.path(), &["plan", "--format", "json"]);
    let full = ldap2scim(&config.path(), &["plan", "--full", "--format", "json"]);
    (delta, full)
}

#[test]
fn content_sync_on_389_ds_reads_deltas_that_plan_like_a_full_read() {
    let ds = Ds389::start();
    ds.add(
        &(staff(6)
            + &group("inner", &[&person_dn("p002"), &person_dn("p003")])
            + &group("outer", &[&group_dn("inner"), &person_dn("p000")])),
    );
    let server = Scim2Server::start();
    let config = config_for(&ds, &server);
    let check = ldap2scim(&config.path(), &["check", "--connect"]);
    assert!(check.stdout.contains("change feed: syncrepl"), "{check}");
    let first = ldap2scim(&config.path(), &["sync"]);
    first.expect_code(0);
    assert!(
        first.stderr.contains("no mirror of the directory yet"),
        "{first}"
    );

    ds.modify(&format!(
        "dn: {}\nchangetype: modify\nreplace: title\ntitle: Engineer\n",
        person_dn("p001")
    ));
    ds.add(&person(
        "p100",
        "New Hire",
        "Hire",
        "New",
        "p100@example.org",
        "Staff",
    ));
    ds.delete(&person_dn("p005"));
    ds.modify(&format!(
        "dn: {}\nchangetype: modify\nadd: employeeType\nemployeeType: disabled\n",
        person_dn("p004")
    ));
    ds.modify(&format!(
        "dn: {}\nchangetype: modify\nadd: member\nmember: {}\n",
        group_dn("inner"),
        person_dn("p001")
    ));
    let (delta, full) = plans(&config);
    assert_eq!(delta.code, 2, "{delta}");
    assert_eq!(delta.json(), full.json(), "delta:\n{delta}\nfull:\n{full}");
    let synced = ldap2scim(&config.path(), &["sync"]);
    synced.expect_code(0);
    assert!(
        synced
            .stderr
            .contains("directory read from the change feed"),
        "{synced}"
    );
    let (delta, full) = plans(&config);
    assert_eq!((delta.code, full.code), (0, 0), "{delta}\n{full}");

    let users = scim_list(&server.base_url(), server.token(), "Users");
    let active = |name: &str| {
        users
            .iter()
            .find(|u| u["userName"] == name)
            .map(|u| u["active"].as_bool().unwrap_or(true))
    };
    assert_eq!(active("p005"), Some(false), "the leaver is deactivated");
    assert_eq!(
        active("p004"),
        Some(false),
        "the disabled user is deactivated"
    );
    assert_eq!(active("p100"), Some(true), "the new hire is created");
    let groups = scim_list(&server.base_url(), server.token(), "Groups");
    let outer = groups
        .iter()
        .find(|g| g["displayName"] == "outer")
        .expect("outer group");
    let p001 = users.iter().find(|u| u["userName"] == "p001").unwrap()["id"].clone();
    assert!(
        outer["members"]
            .as_array()
            .is_some_and(|m| m.iter().any(|x| x["value"] == p001)),
        "a member of the inner group is a member of the outer one: {outer}"
    );
}
