//! Issue 14, mapping: minijinja expressions with filters and fallbacks, several emails and
//! phone numbers, the enterprise extension, a template that fails for one entry, group names
//! by template and `groups_filter`, against slapd, scim2-server and Better Auth.

mod support;

use std::collections::BTreeSet;

use serde_json::Value;
use support::*;

const ENTERPRISE: &str = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User";

fn people() -> String {
    let dn = person_dn;
    [
        format!(
            "dn: {}\nobjectClass: inetOrgPerson\nuid: alice\ncn: Alice Liddell\nsn: Liddell\ngivenName: Alice\nmail: Alice@Example.org\nmail: alice.home@example.net\ntelephoneNumber: +1 555 0100\nmobile: +1 (555) 0199\nemployeeNumber: 1001\ndepartmentNumber: R&D\ndepartmentNumber: Tools\no: Example Corp\nou: Platform\ntitle:   senior engineer \nstreet: 1 Main St\nl: Springfield\npostalCode: 12345\n\n",
            dn("alice")
        ),
        // No mail: the work email falls back to uid@fallback; no title: "Staff".
        format!(
            "dn: {}\nobjectClass: inetOrgPerson\nuid: bob\ncn: Bob Builder\nsn: Builder\ngivenName: Bob\nemployeeNumber: 1002\n\n",
            dn("bob")
        ),
        // No employeeNumber: its template has no default, so this entry is a problem.
        format!(
            "dn: {}\nobjectClass: inetOrgPerson\nuid: carol\ncn: Carol Ann\nsn: Ann\ngivenName: Carol\nmail: carol@example.org\n\n",
            dn("carol")
        ),
    ]
    .concat()
}

const MAPPING: &str = r#"
[mapping]
displayName = "{{ givenName }} {{ sn | upper }}"
title = "{% if title %}{{ title | trim | title }}{% else %}Staff{% endif %}"
"emails[type eq \"work\"].value" = "{{ (mail or uid ~ '@fallback.example.org') | lower }}"
"emails[type eq \"home\"].value" = "{{ values.mail[1] | default('') }}"
"phoneNumbers[type eq \"work\"].value" = "{telephoneNumber}"
"phoneNumbers[type eq \"mobile\"].value" = "{{ mobile | default('') | regex_replace('[^0-9+]', '') }}"
"urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:employeeNumber" = "{{ employeeNumber }}"
"urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:department" = "{{ values.departmentNumber | default([]) | join(' / ') }}"
"urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:organization" = "{{ o | default('Example') }}"
"urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:division" = "{ou}"
"urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:costCenter" = "{{ 'CC-' ~ employeeNumber[:2] }}"
"addresses[type eq \"work\"].streetAddress" = "{street}"
"addresses[type eq \"work\"].locality" = "{l}"
"addresses[type eq \"work\"].postalCode" = "{postalCode}"
"addresses[type eq \"work\"].country" = "{{ c | default('US') }}"
"#;

fn typed<'a>(user: &'a Value, attr: &str, ty: &str) -> Option<&'a str> {
    user[attr].as_array()?.iter().find(|i| i["type"] == ty)?["value"].as_str()
}

#[test]
fn expressions_multi_valued_attributes_and_the_enterprise_extension_reach_both_servers() {
    let world = World::start(&people(), MAPPING);
    let (out, plan) = world.plan_json();
    assert_eq!(out.code, 2, "{out}");
    for t in &world.targets {
        let target = target_json(&plan, t.name());
        let problems = target["problems"].as_array().unwrap();
        assert_eq!(problems.len(), 1, "{}: {target:#}", t.name());
        let reason = problems[0]["reason"].as_str().unwrap();
        assert!(
            problems[0]["name"].as_str().unwrap().contains("uid=carol")
                && reason.contains("employeeNumber")
                && reason.contains("default"),
            "{reason}"
        );
        let created: BTreeSet<String> = changes_of(&plan, t.name())
            .into_iter()
            .filter(|(action, kind, _)| action == "create" && kind == "User")
            .map(|(_, _, name)| name)
            .collect();
        assert_eq!(created, ["alice", "bob"].map(String::from).into());
    }
    // The entry whose template fails is reported, the others are applied: exit 3.
    let out = world.run(&["sync"]);
    assert!(out.code == 3 || out.code == 0, "{out}");

    let scim2 = &world.targets[0];
    assert_eq!(scim2.name(), "scim2-server");
    let alice = scim2.user("alice");
    assert_eq!(alice["displayName"], "Alice LIDDELL", "{alice:#}");
    assert_eq!(alice["title"], "Senior Engineer");
    assert_eq!(typed(&alice, "emails", "work"), Some("alice@example.org"));
    assert_eq!(
        typed(&alice, "emails", "home"),
        Some("alice.home@example.net")
    );
    assert_eq!(typed(&alice, "phoneNumbers", "work"), Some("+1 555 0100"));
    assert_eq!(typed(&alice, "phoneNumbers", "mobile"), Some("+15550199"));
    let enterprise = &alice[ENTERPRISE];
    assert_eq!(enterprise["employeeNumber"], "1001", "{alice:#}");
    assert_eq!(enterprise["department"], "R&D / Tools");
    assert_eq!(enterprise["organization"], "Example Corp");
    assert_eq!(enterprise["division"], "Platform");
    assert_eq!(enterprise["costCenter"], "CC-10");
    let address = alice["addresses"]
        .as_array()
        .and_then(|a| a.iter().find(|i| i["type"] == "work"))
        .unwrap_or_else(|| panic!("no work address: {alice:#}"));
    assert_eq!(address["streetAddress"], "1 Main St");
    assert_eq!(address["locality"], "Springfield");
    assert_eq!(address["postalCode"], "12345");
    assert_eq!(address["country"], "US");
    let bob = scim2.user("bob");
    assert_eq!(bob["title"], "Staff");
    assert_eq!(
        typed(&bob, "emails", "work"),
        Some("bob@fallback.example.org")
    );
    assert!(typed(&bob, "emails", "home").is_none(), "{bob:#}");
    assert_eq!(bob[ENTERPRISE]["organization"], "Example");
    // Never an empty value for the entry that failed: it is not there at all.
    for t in &world.targets {
        assert!(
            !t.user_states().contains_key("carol"),
            "{}: carol was pushed",
            t.name()
        );
        // Better Auth keeps what it models (userName, the work email).
        let alice = t.user("alice");
        assert_eq!(alice["userName"], "alice");
    }

    // Fixing the entry provisions it; changing a multi-valued source is an update.
    world.slapd.modify(&format!(
        "dn: {}\nchangetype: modify\nadd: employeeNumber\nemployeeNumber: 1003\n",
        person_dn("carol")
    ));
    world.slapd.modify(&format!(
        "dn: {}\nchangetype: modify\nadd: departmentNumber\ndepartmentNumber: Ops\n",
        person_dn("alice")
    ));
    let (_, plan) = world.plan_json();
    for t in &world.targets {
        let changes = changes_of(&plan, t.name());
        assert!(
            changes.contains(&change("create", "User", "carol")),
            "{changes:?}"
        );
        assert!(
            changes.contains(&change("update", "User", "alice")),
            "{changes:?}"
        );
    }
    world.sync_ok();
    assert_eq!(
        scim2.user("alice")[ENTERPRISE]["department"],
        "R&D / Tools / Ops"
    );
    assert_eq!(scim2.user("carol")[ENTERPRISE]["costCenter"], "CC-10");
    world.assert_converged();
}

#[test]
fn check_names_every_bad_template_with_its_file_and_key_at_once() {
    let mapping = r#"
groups_filter = "(cn=app-*"
[mapping]
displayName = "{{ givenName | lowr }}"
title = "{{ title | regex_replace('(', '') }}"
nickName = "{{ uid "
[group_mapping]
displayName = "{{ cn | nosuch }}"
"#;
    let world = World::start(&people(), mapping);
    let out = world.run(&["check"]);
    assert_eq!(out.code, 1, "{out}");
    for t in &world.targets {
        for (key, why) in [
            ("mapping.displayName", "unknown filter"),
            ("mapping.title", "invalid regular expression"),
            ("mapping.nickName", "syntax error"),
            ("group_mapping.displayName", "unknown filter"),
            ("groups_filter", "invalid LDAP filter"),
        ] {
            let line = out
                .stderr
                .lines()
                .find(|l| l.contains(&format!("{}.toml: {key}:", t.name())))
                .unwrap_or_else(|| panic!("no error on {key} of {}:\n{out}", t.name()));
            assert!(line.contains(why), "{line}");
        }
    }
}

fn groups_seed() -> String {
    let members = [person_dn("alice"), person_dn("bob")];
    let members: Vec<&str> = members.iter().map(String::as_str).collect();
    let mut ldif = [
        person("alice", "Alice L", "L", "Alice", "alice@example.org", ""),
        person("bob", "Bob B", "B", "Bob", "bob@example.org", ""),
    ]
    .concat();
    for (cn, description) in [
        ("app-sales", "Sales"),
        ("app-eng", "Engineering"),
        ("internal-ops", "Operations"),
        ("app-eng-admins", "Admins"),
    ] {
        ldif.push_str(&group(cn, &members).replace(
            &format!("cn: {cn}\n"),
            &format!("cn: {cn}\ndescription: {description}\n"),
        ));
    }
    ldif
}

/// Rewrites the target file's `groups_filter` (a top-level line, first in the file) and its
/// `[group_mapping]` (at the end).
fn set_target_groups(world: &World, name: &str, filter: &str, group_mapping: &str) {
    let path = world.config.target_path(name);
    let text = std::fs::read_to_string(&path).unwrap();
    let mut kept = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if line == "[group_mapping]" {
            lines.next();
        } else if !line.starts_with("groups_filter") {
            kept.push(line);
        }
    }
    let mut out = format!("{filter}\n{}\n", kept.join("\n"));
    if !group_mapping.is_empty() {
        out.push_str(&format!("[group_mapping]\n{group_mapping}\n"));
    }
    std::fs::write(&path, out).unwrap();
}

fn group_names(t: &Target) -> BTreeSet<String> {
    t.memberships().into_keys().collect()
}

#[test]
fn group_names_by_template_and_groups_filter_choose_what_each_target_gets() {
    let world = World::start(&groups_seed(), "");
    let [scim2, better] = &world.targets[..] else {
        panic!("two targets")
    };
    set_target_groups(
        &world,
        scim2.name(),
        "groups_filter = \"(&(cn=app-*)(!(description=admins)))\"",
        "displayName = \"{{ cn | replace('app-', '') | upper }}\"",
    );
    set_target_groups(
        &world,
        better.name(),
        "groups_filter = [\"internal-*\", \"APP-ENG\"]",
        "",
    );
    world.run(&["check"]).expect_code(0);
    world.sync_ok();
    assert_eq!(
        group_names(scim2),
        ["ENG", "SALES"].map(String::from).into()
    );
    assert_eq!(
        scim2.memberships()["SALES"],
        ["alice", "bob"].map(String::from).into()
    );
    assert_eq!(
        group_names(better),
        ["app-eng", "internal-ops"].map(String::from).into()
    );
    world.assert_converged();

    // A changed template renames in place (an update, not a delete and a create); a group
    // the filter no longer chooses leaves that target only.
    set_target_groups(
        &world,
        scim2.name(),
        "groups_filter = \"(cn=app-sales)\"",
        "displayName = \"{{ description }} team\"",
    );
    let (_, plan) = world.plan_json();
    let changes = changes_of(&plan, scim2.name());
    assert!(
        changes.contains(&change("update", "Group", "Sales team")),
        "{changes:?}"
    );
    assert!(
        changes.contains(&change("delete", "Group", "ENG")),
        "{changes:?}"
    );
    assert!(
        !changes
            .iter()
            .any(|(a, k, _)| a == "create" && k == "Group"),
        "{changes:?}"
    );
    assert!(changes_of(&plan, better.name()).is_empty());
    world.sync_ok();
    assert_eq!(group_names(scim2), ["Sales team"].map(String::from).into());
    assert_eq!(
        group_names(better),
        ["app-eng", "internal-ops"].map(String::from).into()
    );
    world.assert_converged();

    // A group whose name template fails is reported and left as it is, never deleted.
    world.slapd.modify(&format!(
        "dn: {}\nchangetype: modify\ndelete: description\n",
        group_dn("app-sales")
    ));
    let (out, plan) = world.plan_json();
    let target = target_json(&plan, scim2.name());
    assert!(
        changes_of(&plan, scim2.name()).is_empty(),
        "{out}\n{target:#}"
    );
    let problems = target["problems"].as_array().unwrap();
    assert!(
        problems.len() == 1
            && problems[0]["name"]
                .as_str()
                .unwrap()
                .contains("cn=app-sales")
            && problems[0]["reason"]
                .as_str()
                .unwrap()
                .contains("description"),
        "{target:#}"
    );
    world.run(&["sync"]);
    assert_eq!(group_names(scim2), ["Sales team"].map(String::from).into());
}

fn with_manager(uid: &str, manager: Option<&str>) -> String {
    let mut ldif = person(
        uid,
        &format!("{uid} person"),
        "P",
        uid,
        &format!("{uid}@example.org"),
        "",
    );
    if let Some(m) = manager {
        ldif = ldif.replacen("\n\n", &format!("\nmanager: {m}\n\n"), 1);
    }
    ldif
}

const MANAGER_MAPPING: &str = r#"
[mapping]
"urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:manager" = "{manager}"
"#;

fn manager_of(t: &Target, uid: &str) -> Option<String> {
    t.user(uid)[ENTERPRISE]["manager"]["value"]
        .as_str()
        .map(str::to_owned)
}

fn id_of(t: &Target, uid: &str) -> String {
    t.user(uid)["id"].as_str().unwrap().to_owned()
}

#[test]
fn managers_are_linked_by_scim_id_even_when_created_in_the_same_cycle() {
    // boss ← alice ← bob: a chain created in one cycle; eve's manager is not in the directory.
    let ghost = person_dn("ghost");
    let seed = [
        // The reports come first in the directory: the order of creates is the apply's.
        with_manager("bob", Some(&person_dn("alice").to_uppercase())),
        with_manager("alice", Some(&person_dn("boss"))),
        with_manager("boss", None),
        with_manager("eve", Some(&ghost)),
    ]
    .concat();
    let world = World::start(&seed, MANAGER_MAPPING);
    let (_, plan) = world.plan_json();
    for t in &world.targets {
        let target = target_json(&plan, t.name());
        let problems = target["problems"].as_array().unwrap();
        assert!(
            problems.len() == 1
                && problems[0]["name"] == "eve"
                && problems[0]["reason"]
                    .as_str()
                    .unwrap()
                    .contains("is not in the directory read"),
            "{target:#}"
        );
    }
    world.sync_ok();
    let scim2 = &world.targets[0];
    assert_eq!(
        manager_of(scim2, "alice"),
        Some(id_of(scim2, "boss")),
        "{:#} {:?}",
        scim2.user("alice"),
        scim2.proxy.requests()
    );
    assert_eq!(manager_of(scim2, "bob"), Some(id_of(scim2, "alice")));
    assert_eq!(manager_of(scim2, "boss"), None);
    assert_eq!(manager_of(scim2, "eve"), None, "never a dangling reference");
    world.assert_converged();

    // A manager change is an update; a manager that appears links its reports.
    world.slapd.modify(&format!(
        "dn: {}\nchangetype: modify\nreplace: manager\nmanager: {}\n",
        person_dn("bob"),
        person_dn("boss")
    ));
    world.slapd.add(&with_manager("ghost", None));
    let (_, plan) = world.plan_json();
    for t in &world.targets {
        let changes = changes_of(&plan, t.name());
        for expected in [
            change("update", "User", "bob"),
            change("create", "User", "ghost"),
            change("update", "User", "eve"),
        ] {
            assert!(changes.contains(&expected), "{}: {changes:?}", t.name());
        }
    }
    world.sync_ok();
    assert_eq!(manager_of(scim2, "bob"), Some(id_of(scim2, "boss")));
    assert_eq!(manager_of(scim2, "eve"), Some(id_of(scim2, "ghost")));
    world.assert_converged();

    // The manager's account deleted by hand and made again: its reports follow the new id.
    let old_boss = id_of(scim2, "boss");
    let code = scim_delete(
        &scim2.server.base_url(),
        scim2.server.token(),
        &format!("/Users/{old_boss}"),
    );
    assert!(code == 204 || code == 200, "{code}");
    world.slapd.modify(&format!(
        "dn: {}\nchangetype: modify\nreplace: title\ntitle: Chief\n",
        person_dn("boss")
    ));
    world.run(&["sync"]);
    world.sync_ok();
    let new_boss = id_of(scim2, "boss");
    assert_ne!(new_boss, old_boss);
    assert_eq!(manager_of(scim2, "alice"), Some(new_boss.clone()));
    assert_eq!(manager_of(scim2, "bob"), Some(new_boss));
    world.assert_converged();

    // A manager who leaves: the field is emptied on the reports (never a dangling id).
    world.slapd.delete(&person_dn("ghost"));
    let (_, plan) = world.plan_json();
    for t in &world.targets {
        let changes = changes_of(&plan, t.name());
        assert!(
            changes.contains(&change("update", "User", "eve")),
            "{}: {changes:?}",
            t.name()
        );
    }
    world.sync_ok();
    assert_eq!(manager_of(scim2, "eve"), None);
    world.assert_converged();
}
