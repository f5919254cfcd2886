//! The configuration's tests that load whole files: every key, its default, and every
//! problem reported with its file and key. Tests of one value parser live beside it.

use std::collections::HashMap;
use std::fs;
use std::path::Path;
use std::time::Duration;

use super::values::{parse_percent, parse_rate_limit};
use super::walk::INLINE_SECRET;
use super::*;

/// Writes `files` (relative path, content) into a fresh temporary directory.
fn tree(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (path, content) in files {
        let path = dir.path().join(path);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, content).unwrap();
    }
    dir
}

/// A tree of `main` as config.toml beside the minimal target file.
fn with_main(main: &str) -> tempfile::TempDir {
    tree(&[
        ("config.toml", main),
        ("targets.d/app.toml", MINIMAL_TARGET),
    ])
}

/// The minimal main file with its `url = "ldap://127.0.0.1"` line replaced by `url_line`.
fn main_with_url(url_line: &str) -> String {
    MINIMAL_MAIN.replace("url = \"ldap://127.0.0.1\"", url_line)
}

/// A tree of the minimal main file beside `target` as the one target file.
fn with_target(target: &str) -> tempfile::TempDir {
    tree(&[
        ("config.toml", MINIMAL_MAIN),
        ("targets.d/app.toml", target),
    ])
}

/// Asserts each (key, message) pair, in order.
fn expect_messages(errors: &[ConfigError], expected: &[(&str, &str)]) {
    for (key, text) in expected {
        assert_eq!(message(errors, key), *text, "the message on {key}");
    }
}

fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let vars: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |name| vars.get(name).cloned()
}

fn load_ok(dir: &tempfile::TempDir, vars: &[(&str, &str)]) -> Config {
    match load_with_env(&dir.path().join("config.toml"), &env(vars)) {
        Ok(config) => config,
        Err(errors) => panic!("expected a valid config, got:\n{errors}"),
    }
}

fn load_err(dir: &tempfile::TempDir, vars: &[(&str, &str)]) -> Vec<ConfigError> {
    match load_with_env(&dir.path().join("config.toml"), &env(vars)) {
        Ok(config) => panic!("expected errors, got {config:#?}"),
        Err(errors) => errors.0,
    }
}

/// (file name, key) of each error, sorted.
fn locations(dir: &tempfile::TempDir, errors: &[ConfigError]) -> Vec<(String, String)> {
    let mut locations: Vec<(String, String)> = errors
        .iter()
        .map(|e| {
            let file = e.file.strip_prefix(dir.path()).unwrap_or(&e.file);
            (file.display().to_string(), e.key.clone())
        })
        .collect();
    locations.sort();
    locations
}

fn message<'e>(errors: &'e [ConfigError], key: &str) -> &'e str {
    &errors
        .iter()
        .find(|e| e.key == key)
        .unwrap_or_else(|| panic!("no error on {key} in {errors:#?}"))
        .message
}

fn urls(ldap: &LdapConfig) -> Vec<&str> {
    ldap.urls.iter().map(LdapServer::as_str).collect()
}

const MINIMAL_MAIN: &str = r#"
[ldap]
url = "ldap://127.0.0.1"

[ldap.users]
base = "ou=people,dc=example,dc=org"
"#;

const MINIMAL_TARGET: &str = r#"
url = "https://app.example.com/scim/v2/"
auth = { bearer = { env = "APP_TOKEN" } }
"#;

#[test]
fn full_config_loads() {
    let dir = tree(&[
        (
            "config.toml",
            r#"
[daemon]
schedule = "0,30 8-18/2 * 1-12 1-5"
timezone = "Europe/Berlin"
state_dir = "state"
targets_dir = "apps"
listen = "127.0.0.1:9464"

[ldap]
url = "ldaps://dc1.corp.example:636"
starttls = false
ca_file = "ca.pem"
bind_dn = "CN=sync,DC=corp,DC=example"
bind_password = { file = "secrets/ldap" }
dialect = "active-directory"
page_size = 500
timeout = "10s"
max_shrink = "12.5%"

[ldap.users]
base = "OU=People,DC=corp,DC=example"
disabled_filter = "(description=left)"

[ldap.groups]
base = "OU=Groups,DC=corp,DC=example"
nested = false
"#,
        ),
        ("ca.pem", "-----BEGIN CERTIFICATE-----\n"),
        ("secrets/ldap", "s3cret\n\n"),
        (
            "apps/slack.toml",
            r#"
url = "https://example.slack.com/scim/v2"
auth = { basic = { username = "sync", password = { env = "SLACK_PASSWORD" } } }
profile = "slack"
scope_groups = ["CN = Slack Users , OU=Groups,DC=corp,DC=example"]
deprovision = "deactivate-then-delete"
provision_disabled = true
delete_after = "7d"
max_deprovisions = 10
match_existing = ["externalId", "userName", "userName"]
protect = ["admin*", "break-glass-*"]
rate_limit = "180/min"
concurrency = 8
members_per_request = 50
"#,
        ),
        (
            "apps/aws.toml",
            r#"
url = "https://scim.us-east-1.amazonaws.com/abc/scim/v2"
auth = { oauth2 = { token_url = "https://login.example.com/token", client_id = "ldap2scim", client_secret = { env = "AWS_SECRET" } } }
profile = "aws-identity-center"
groups = "none"
max_deprovisions = "10%"
members_per_request = 500
"#,
        ),
    ]);
    let config = load_ok(
        &dir,
        &[("SLACK_PASSWORD", "pw"), ("AWS_SECRET", "client-secret")],
    );

    let daemon = &config.daemon;
    assert_eq!(daemon.schedule, "0,30 8-18/2 * 1-12 1-5");
    assert_eq!(daemon.timezone, "Europe/Berlin");
    assert_eq!(daemon.state_dir, dir.path().join("state"));
    assert_eq!(daemon.targets_dir, dir.path().join("apps"));
    assert_eq!(daemon.listen, Some("127.0.0.1:9464".parse().unwrap()));

    let ldap = &config.ldap;
    assert_eq!(urls(ldap), ["ldaps://dc1.corp.example:636"]);
    assert_eq!(ldap.ca_file, Some(dir.path().join("ca.pem")));
    assert_eq!(ldap.bind_dn.as_deref(), Some("CN=sync,DC=corp,DC=example"));
    assert_eq!(ldap.bind_password.as_ref().unwrap().expose(), "s3cret");
    assert_eq!(ldap.dialect, Dialect::ActiveDirectory);
    assert_eq!(ldap.page_size, 500);
    assert_eq!(ldap.timeout, Duration::from_secs(10));
    assert_eq!(ldap.max_shrink, 0.125);
    assert_eq!(
        ldap.users.filter,
        "(&(objectCategory=person)(objectClass=user))"
    );
    assert_eq!(
        ldap.users.disabled_filter.as_deref(),
        Some("(description=left)")
    );
    let groups = ldap.groups.as_ref().unwrap();
    assert_eq!(groups.filter, "(objectClass=group)");
    assert!(!groups.nested);

    let names: Vec<&str> = config.targets.iter().map(|t| t.name.0.as_str()).collect();
    assert_eq!(names, ["aws", "slack"]);

    let aws = &config.targets[0];
    assert_eq!(aws.profile, Profile::AwsIdentityCenter);
    assert_eq!(aws.groups, GroupScope::None);
    assert_eq!(aws.max_deprovisions, Limit::Percent(0.1));
    assert_eq!(aws.members_per_request, 100, "capped by the profile");
    match &aws.auth {
        Auth::OAuth2 {
            token_url,
            client_id,
            client_secret,
            scope,
            client_auth,
        } => {
            assert_eq!(*client_auth, ClientAuth::Basic, "RFC 6749's default");
            assert_eq!(token_url, "https://login.example.com/token");
            assert_eq!(client_id, "ldap2scim");
            assert_eq!(client_secret.expose(), "client-secret");
            assert_eq!(*scope, None);
        }
        other => panic!("unexpected auth {other:?}"),
    }
    assert_eq!(
        aws.mapping[0],
        ("userName".into(), "{userPrincipalName}".into())
    );

    let slack = &config.targets[1];
    assert_eq!(slack.file, dir.path().join("apps/slack.toml"));
    assert_eq!(slack.url, "https://example.slack.com/scim/v2");
    assert!(matches!(
        &slack.auth,
        Auth::Basic { username, password } if username == "sync" && password.expose() == "pw"
    ));
    assert_eq!(slack.profile, Profile::Slack);
    assert_eq!(
        slack.scope_groups,
        ["cn=slack users,ou=groups,dc=corp,dc=example"]
    );
    assert_eq!(slack.groups, GroupScope::Scoped);
    assert_eq!(slack.deprovision, Deprovision::DeactivateThenDelete);
    assert!(slack.provision_disabled);
    assert_eq!(slack.delete_after, Duration::from_secs(7 * 86_400));
    assert_eq!(slack.max_deprovisions, Limit::Count(10));
    assert_eq!(
        slack.match_existing,
        [MatchRule::ExternalId, MatchRule::UserName]
    );
    assert_eq!(slack.protect, ["admin*", "break-glass-*"]);
    assert_eq!(slack.rate_limit, Some(RateLimit { per_second: 3.0 }));
    assert_eq!(slack.concurrency, 8);
    assert_eq!(slack.members_per_request, 50);
}

#[test]
fn defaults_apply() {
    let dir = tree(&[
        ("config.toml", MINIMAL_MAIN),
        ("targets.d/app.toml", MINIMAL_TARGET),
    ]);
    let config = load_ok(&dir, &[("APP_TOKEN", "t")]);

    assert_eq!(config.daemon.schedule, "*/15 * * * *");
    assert_eq!(config.daemon.timezone, "UTC");
    assert_eq!(config.daemon.state_dir, Path::new("/var/lib/ldap2scim"));
    assert_eq!(config.daemon.targets_dir, dir.path().join("targets.d"));
    assert_eq!(config.daemon.listen, None);

    let ldap = &config.ldap;
    assert!(!ldap.starttls);
    assert_eq!(ldap.ca_file, None);
    assert_eq!(ldap.bind_dn, None);
    assert!(ldap.bind_password.is_none());
    assert_eq!(ldap.dialect, Dialect::OpenLdap);
    assert_eq!(ldap.page_size, 1000);
    assert_eq!(ldap.timeout, Duration::from_secs(30));
    assert_eq!(ldap.max_shrink, 0.2);
    assert_eq!(ldap.users.filter, "(objectClass=inetOrgPerson)");
    assert_eq!(ldap.users.disabled_filter, None);
    assert!(ldap.groups.is_none());

    let target = &config.targets[0];
    assert_eq!(target.name, TargetName("app".into()));
    assert_eq!(target.url, "https://app.example.com/scim/v2");
    assert!(matches!(&target.auth, Auth::Bearer(token) if token.expose() == "t"));
    assert_eq!(target.profile, Profile::Generic);
    assert!(target.scope_groups.is_empty());
    assert_eq!(target.groups, GroupScope::All);
    assert_eq!(target.deprovision, Deprovision::Deactivate);
    assert!(!target.provision_disabled);
    assert_eq!(target.delete_after, Duration::from_secs(30 * 86_400));
    assert_eq!(target.max_deprovisions, Limit::Percent(0.05));
    assert_eq!(target.match_existing, [MatchRule::ExternalId]);
    assert!(target.protect.is_empty());
    assert_eq!(target.rate_limit, None);
    assert_eq!(target.concurrency, 4);
    assert_eq!(target.members_per_request, 100);
    let paths: Vec<&str> = target.mapping.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        paths,
        [
            "userName",
            "name.givenName",
            "name.familyName",
            "displayName",
            "emails[type eq \"work\"].value",
            "title"
        ]
    );
    assert_eq!(target.mapping[0].1, "{uid}");
}

#[test]
fn profiles_bring_their_limits() {
    let slack = format!("{MINIMAL_TARGET}profile = \"slack\"\n");
    let aws =
        format!("{MINIMAL_TARGET}profile = \"aws-identity-center\"\nmembers_per_request = 500\n");
    let dir = tree(&[
        ("config.toml", MINIMAL_MAIN),
        ("targets.d/slack.toml", &slack),
        ("targets.d/aws.toml", &aws),
    ]);
    let config = load_ok(&dir, &[("APP_TOKEN", "t")]);
    let by = |n: &str| config.targets.iter().find(|t| t.name.0 == n).unwrap();
    assert_eq!(
        by("slack").rate_limit,
        Some(RateLimit { per_second: 3.0 }),
        "180 writes a minute"
    );
    assert_eq!(
        by("aws").members_per_request,
        100,
        "AWS takes at most 100 member changes"
    );
    assert_eq!(by("aws").timeout, Duration::from_secs(30));
}

#[test]
fn groups_table_defaults() {
    let main = format!("{MINIMAL_MAIN}\n[ldap.groups]\nbase = \"ou=groups,dc=example,dc=org\"\n");
    let dir = with_main(&main);
    let groups = load_ok(&dir, &[("APP_TOKEN", "t")]).ldap.groups.unwrap();
    assert_eq!(groups.base, "ou=groups,dc=example,dc=org");
    assert_eq!(groups.filter, "(objectClass=groupOfNames)");
    assert!(groups.nested);
}

#[test]
fn url_may_be_an_array() {
    let main = main_with_url("url = [\"ldaps://a.example.org\", \"ldaps://b.example.org:636\"]");
    let dir = with_main(&main);
    let config = load_ok(&dir, &[("APP_TOKEN", "t")]);
    assert_eq!(
        urls(&config.ldap),
        ["ldaps://a.example.org", "ldaps://b.example.org:636"]
    );

    let main = main_with_url("url = [\"ldaps://a.example.org\", \"http://b\", 7]\nstarttls = true");
    let dir = with_main(&main);
    let errors = load_err(&dir, &[("APP_TOKEN", "t")]);
    assert_eq!(
        locations(&dir, &errors),
        [
            ("config.toml".into(), "ldap.starttls".into()),
            ("config.toml".into(), "ldap.url[1]".into()),
            ("config.toml".into(), "ldap.url[2]".into()),
        ]
    );

    let main = MINIMAL_MAIN.replace("url = \"ldap://127.0.0.1\"", "url = []");
    let dir = with_main(&main);
    let errors = load_err(&dir, &[("APP_TOKEN", "t")]);
    assert_eq!(message(&errors, "ldap.url"), "at least one url is needed");
}

#[test]
fn mapping_overrides_removes_and_keeps_order() {
    let target = format!(
        "{MINIMAL_TARGET}{}",
        r#"
[mapping]
userName = "{mail}"
title = ""
"urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:department" = "{departmentNumber}"
"phoneNumbers[type eq \"mobile\"].value" = "{mobile}"
nickName = "{{ uid | upper }}"
"#
    );
    let dir = with_target(&target);
    let config = load_ok(&dir, &[("APP_TOKEN", "t")]);
    let mapping: Vec<(&str, &str)> = config.targets[0]
        .mapping
        .iter()
        .map(|(p, t)| (p.as_str(), t.as_str()))
        .collect();
    assert_eq!(
        mapping,
        [
            ("userName", "{mail}"),
            ("name.givenName", "{givenName}"),
            ("name.familyName", "{sn}"),
            ("displayName", "{cn}"),
            ("emails[type eq \"work\"].value", "{mail}"),
            (
                "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:department",
                "{departmentNumber}"
            ),
            ("phoneNumbers[type eq \"mobile\"].value", "{mobile}"),
            ("nickName", "{{ uid | upper }}"),
        ]
    );
}

#[test]
fn mapping_rejects_identity_keys_and_a_missing_user_name() {
    let target = format!(
        "{MINIMAL_TARGET}{}",
        r#"
[mapping]
externalId = "{entryUUID}"
active = "true"
userName = ""
displayName = 3
"#
    );
    let dir = with_target(&target);
    let errors = load_err(&dir, &[("APP_TOKEN", "t")]);
    assert_eq!(errors.len(), 4, "{errors:#?}");
    expect_messages(
        &errors,
        &[
            (
                "mapping.externalId",
                "externalId is always the directory id",
            ),
            (
                "mapping.active",
                "active follows the directory's disabled state",
            ),
            (
                "mapping.userName",
                "userName must be mapped; it cannot be removed",
            ),
            ("mapping.displayName", "expected a string, found an integer"),
        ],
    );
}

#[test]
fn every_kind_of_error_is_reported_at_once() {
    let dir = tree(&[
        (
            "config.toml",
            r#"
[daemon]
shedule = "*/5 * * * *"
schedule = "61 * * * *"

[ldap]
url = "ldap://127.0.0.1"
bind_dn = "cn=sync,dc=example,dc=org"
bind_password = "hunter2"
page_size = "big"
timeout = "30x"
max_shrink = "120%"

[ldap.users]
filter = "(uid=*)"
"#,
        ),
        (
            "targets.d/app.toml",
            r#"
url = "ftp://app.example.com/scim"
auth = { bearer = { env = "MISSING_TOKEN" } }
profil = "slack"

[mapping]
"name.nickName" = "{uid}"
title = "{title"
"#,
        ),
    ]);
    let errors = load_err(&dir, &[]);
    let main = "config.toml".to_owned();
    let target = "targets.d/app.toml".to_owned();
    assert_eq!(
        locations(&dir, &errors),
        [
            (main.clone(), "daemon.schedule".to_owned()),
            (main.clone(), "daemon.shedule".to_owned()),
            (main.clone(), "ldap.bind_password".to_owned()),
            (main.clone(), "ldap.max_shrink".to_owned()),
            (main.clone(), "ldap.page_size".to_owned()),
            (main.clone(), "ldap.timeout".to_owned()),
            (main.clone(), "ldap.users.base".to_owned()),
            (target.clone(), "auth.bearer".to_owned()),
            (target.clone(), "mapping.\"name.nickName\"".to_owned()),
            (target.clone(), "mapping.title".to_owned()),
            (target.clone(), "profil".to_owned()),
            (target.clone(), "url".to_owned()),
        ]
    );
    expect_messages(
        &errors,
        &[
            (
                "daemon.shedule",
                "unknown key \"shedule\"; did you mean \"schedule\"?",
            ),
            (
                "profil",
                "unknown key \"profil\"; did you mean \"profile\"?",
            ),
            ("ldap.page_size", "expected an integer, found a string"),
            ("ldap.users.base", "required key is missing"),
            ("ldap.bind_password", INLINE_SECRET),
            (
                "auth.bearer",
                "environment variable MISSING_TOKEN is not set",
            ),
        ],
    );
    assert!(message(&errors, "daemon.schedule").contains("61 is out of range 0-59"));
    assert!(message(&errors, "ldap.timeout").contains("invalid duration \"30x\""));
    assert!(message(&errors, "ldap.max_shrink").contains("invalid percentage \"120%\""));
    assert!(message(&errors, "url").contains("http:// or https://"));
    assert!(message(&errors, "mapping.title").contains("unclosed '{'"));
    assert!(message(&errors, "mapping.\"name.nickName\"")
        .starts_with("unsupported SCIM attribute path \"name.nickName\""));

    let everything = ConfigErrors(errors).to_string();
    assert_eq!(everything.lines().count(), 12);
    assert!(
        !everything.contains("hunter2"),
        "a secret leaked: {everything}"
    );
}

#[test]
fn secrets_never_reach_messages() {
    let dir = tree(&[
            (
                "config.toml",
                "[ldap]\nurl = \"ldap://x\"\nbind_password = \"hunter2\"\n[ldap.users]\nbase = \"dc=x\"\n",
            ),
            ("targets.d/a.toml", "url = \"https://a.example\"\nauth = { bearer = \"tok3n\" }\n"),
            ("targets.d/b.toml", "url = \"https://b.example\"\nauth = { bearer = { file = \"missing\" } }\nbroken = \"p4ssw0rd\n"),
        ]);
    let everything = ConfigErrors(load_err(&dir, &[])).to_string();
    assert!(!everything.contains("hunter2"), "{everything}");
    assert!(!everything.contains("tok3n"), "{everything}");
    assert!(!everything.contains("p4ssw0rd"), "{everything}");
    assert!(
        everything.contains("b.toml: (syntax): line 3, column"),
        "{everything}"
    );
}

#[test]
fn secret_from_a_file_relative_to_the_target_file() {
    let target = MINIMAL_TARGET.replace("{ env = \"APP_TOKEN\" }", "{ file = \"token\" }");
    let dir = tree(&[
        ("config.toml", MINIMAL_MAIN),
        ("targets.d/app.toml", &target),
        ("targets.d/token", "abc \n"),
    ]);
    let config = load_ok(&dir, &[]);
    assert!(matches!(&config.targets[0].auth, Auth::Bearer(s) if s.expose() == "abc"));

    let target = MINIMAL_TARGET.replace(
        "{ env = \"APP_TOKEN\" }",
        "{ file = \"nope\", env = \"X\" }",
    );
    let dir = with_target(&target);
    let errors = load_err(&dir, &[("X", "x")]);
    assert!(message(&errors, "auth.bearer").contains("exactly one source"));
}

#[test]
fn secret_from_a_systemd_credential() {
    let target =
        MINIMAL_TARGET.replace("{ env = \"APP_TOKEN\" }", "{ credential = \"app-token\" }");
    let dir = tree(&[
        ("config.toml", MINIMAL_MAIN),
        ("targets.d/app.toml", &target),
        ("creds/app-token", "from-systemd\n"),
    ]);
    let creds = dir.path().join("creds");
    let creds = creds.to_str().unwrap();
    let config = load_ok(&dir, &[("CREDENTIALS_DIRECTORY", creds)]);
    assert!(matches!(&config.targets[0].auth, Auth::Bearer(s) if s.expose() == "from-systemd"));

    // Not under systemd: said, with what to do.
    let errors = load_err(&dir, &[]);
    let text = message(&errors, "auth.bearer");
    assert!(
        text.contains("$CREDENTIALS_DIRECTORY is not set")
            && text.contains("LoadCredential=app-token"),
        "{text}"
    );
    // A credential that is not there, and a name that is a path.
    let missing = MINIMAL_TARGET.replace("{ env = \"APP_TOKEN\" }", "{ credential = \"nope\" }");
    let dir2 = tree(&[
        ("config.toml", MINIMAL_MAIN),
        ("targets.d/app.toml", &missing),
    ]);
    let errors = load_err(&dir2, &[("CREDENTIALS_DIRECTORY", creds)]);
    assert!(
        message(&errors, "auth.bearer").starts_with("cannot read systemd credential nope"),
        "{}",
        message(&errors, "auth.bearer")
    );
    let path = MINIMAL_TARGET.replace(
        "{ env = \"APP_TOKEN\" }",
        "{ credential = \"../etc/passwd\" }",
    );
    let dir3 = tree(&[("config.toml", MINIMAL_MAIN), ("targets.d/app.toml", &path)]);
    let errors = load_err(&dir3, &[("CREDENTIALS_DIRECTORY", creds)]);
    assert!(message(&errors, "auth.bearer").contains("not a systemd credential name"));
}

#[test]
fn a_target_proxy_is_an_http_url_without_credentials() {
    let with = |proxy: &str| MINIMAL_TARGET.to_string() + &format!("proxy = \"{proxy}\"\n");
    let dir = with_target(&with("http://proxy.corp:3128"));
    let config = load_ok(&dir, &[("APP_TOKEN", "t")]);
    assert_eq!(
        config.targets[0].proxy.as_deref(),
        Some("http://proxy.corp:3128/")
    );
    let dir = with_target(&with("http://user:hunter2@proxy.corp:3128"));
    let errors = load_err(&dir, &[("APP_TOKEN", "t")]);
    let text = message(&errors, "proxy");
    assert!(
        text.contains("carries credentials") && !text.contains("hunter2"),
        "{text}"
    );
    let dir = with_target(&with("socks5://proxy.corp:1080"));
    let errors = load_err(&dir, &[("APP_TOKEN", "t")]);
    assert!(message(&errors, "proxy").contains("it must start with http:// or https://"));
}

#[test]
fn bind_dn_and_password_go_together() {
    let main = MINIMAL_MAIN.replace("[ldap.users]", "bind_dn = \"cn=sync\"\n[ldap.users]");
    let dir = with_main(&main);
    let errors = load_err(&dir, &[("APP_TOKEN", "t")]);
    assert_eq!(
        message(&errors, "ldap.bind_password"),
        "required when bind_dn is set"
    );
}

#[test]
fn targets_dir_problems() {
    let dir = tree(&[("config.toml", MINIMAL_MAIN)]);
    let errors = load_err(&dir, &[]);
    assert_eq!(errors.len(), 1);
    assert!(message(&errors, "daemon.targets_dir").starts_with("cannot read targets directory"));

    let dir = tree(&[("config.toml", MINIMAL_MAIN), ("targets.d/README", "")]);
    let errors = load_err(&dir, &[]);
    assert!(message(&errors, "daemon.targets_dir").starts_with("no target files (*.toml) in "));

    let dir = tree(&[
        ("config.toml", MINIMAL_MAIN),
        ("targets.d/bad name.toml", MINIMAL_TARGET),
    ]);
    let errors = load_err(&dir, &[("APP_TOKEN", "t")]);
    assert_eq!(
        locations(&dir, &errors),
        [("targets.d/bad name.toml".into(), "(file name)".into())]
    );
}

#[test]
fn missing_main_file_and_syntax_errors() {
    let dir = tree(&[]);
    let errors = load_err(&dir, &[]);
    assert_eq!(errors[0].key, "(file)");

    let dir = tree(&[("config.toml", "[ldap]\nurl = \n")]);
    let errors = load_err(&dir, &[]);
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].key, "(syntax)");
    assert!(
        errors[0].message.starts_with("line 2, column"),
        "{errors:?}"
    );
}

#[test]
fn auth_needs_exactly_one_kind() {
    let target = MINIMAL_TARGET.replace(
            "auth = { bearer = { env = \"APP_TOKEN\" } }",
            "auth = { bearer = { env = \"APP_TOKEN\" }, basic = { username = \"u\", password = { env = \"APP_TOKEN\" } } }",
        );
    let dir = with_target(&target);
    let errors = load_err(&dir, &[("APP_TOKEN", "t")]);
    assert_eq!(errors.len(), 1);
    assert!(message(&errors, "auth").starts_with("expected exactly one of"));

    let target = MINIMAL_TARGET.replace("bearer =", "bearr =");
    let dir = with_target(&target);
    let errors = load_err(&dir, &[("APP_TOKEN", "t")]);
    assert_eq!(
        message(&errors, "auth.bearr"),
        "unknown key \"bearr\"; did you mean \"bearer\"?"
    );
    assert_eq!(errors.len(), 1, "{errors:#?}");
}

#[test]
fn example_files_load() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    fs::copy(
        root.join("config.example.toml"),
        dir.path().join("config.toml"),
    )
    .unwrap();
    fs::create_dir(dir.path().join("targets.d")).unwrap();
    for entry in fs::read_dir(root.join("examples/targets.d")).unwrap() {
        let entry = entry.unwrap();
        fs::copy(
            entry.path(),
            dir.path().join("targets.d").join(entry.file_name()),
        )
        .unwrap();
    }
    let config = load_ok(
        &dir,
        &[
            ("LDAP2SCIM_LDAP_PASSWORD", "ldap-password"),
            ("EXAMPLE_APP_SCIM_TOKEN", "scim-token"),
        ],
    );
    assert_eq!(config.targets.len(), 1);
    assert_eq!(config.targets[0].name.0, "example-app");
    assert!(config.ldap.groups.is_some());
}

#[test]
fn hardening_keys_and_their_defaults() {
    let dir = tree(&[
        ("config.toml", MINIMAL_MAIN),
        ("targets.d/app.toml", MINIMAL_TARGET),
    ]);
    let config = load_ok(&dir, &[("APP_TOKEN", "t")]);
    assert!(!config.ldap.allow_plaintext);
    assert_eq!(config.ldap.urls[0].transport, LdapTransport::Plain);
    let t = &config.targets[0];
    assert!(!t.allow_plaintext);
    assert_eq!(t.ca_file, None);
    assert_eq!(t.max_response_size, 32 * 1024 * 1024);
    assert_eq!(t.max_value_length, 64 * 1024);
    assert_eq!(t.rebind, Rebind::Allow);

    let target = r#"
url = "https://app.example.com/scim/v2/"
auth = { oauth2 = { token_url = "https://login.example.com/t", client_id = "c", client_secret = { env = "APP_TOKEN" }, client_auth = "post" } }
ca_file = "ca.pem"
max_response_size = "1MiB"
max_value_length = "100B"
rebind = "hold"
"#;
    let dir = tree(&[
        ("config.toml", MINIMAL_MAIN),
        ("targets.d/app.toml", target),
        ("targets.d/ca.pem", "not checked here"),
    ]);
    let config = load_ok(&dir, &[("APP_TOKEN", "t")]);
    let t = &config.targets[0];
    assert_eq!(t.ca_file, Some(dir.path().join("targets.d/ca.pem")));
    assert_eq!(t.max_response_size, 1 << 20);
    assert_eq!(t.max_value_length, 100);
    assert_eq!(t.rebind, Rebind::Hold);
    assert!(matches!(
        t.auth,
        Auth::OAuth2 {
            client_auth: ClientAuth::Post,
            ..
        }
    ));
}

#[test]
fn schemes_are_case_insensitive_and_cleartext_needs_allow_plaintext() {
    // `LDAP://` is ldap://: with starttls it is StartTLS, not a cleartext bind.
    let main = main_with_url(
        "url = [\"LDAP://ldap.example.org\", \"LDAPS://b.example.org\"]\nstarttls = true",
    );
    let dir = with_main(&main);
    let errors = load_err(&dir, &[("APP_TOKEN", "t")]);
    assert_eq!(
        locations(&dir, &errors),
        [("config.toml".into(), "ldap.starttls".into())],
        "{errors:?}"
    );
    let main = main_with_url("url = \"LDAP://ldap.example.org\"\nstarttls = true");
    let dir = with_main(&main);
    let config = load_ok(&dir, &[("APP_TOKEN", "t")]);
    assert_eq!(config.ldap.urls[0].transport, LdapTransport::StartTls);
    assert_eq!(config.ldap.urls[0].as_str(), "ldap://ldap.example.org");

    // Cleartext to another host: refused unless allow_plaintext says so.
    let plain = MINIMAL_MAIN.replace("ldap://127.0.0.1", "Ldap://ldap.example.org");
    let target =
        "url = \"HTTP://app.example.com/scim\"\nauth = { bearer = { env = \"APP_TOKEN\" } }\n";
    let dir = tree(&[("config.toml", &plain), ("targets.d/app.toml", target)]);
    let errors = load_err(&dir, &[("APP_TOKEN", "t")]);
    assert_eq!(
        locations(&dir, &errors),
        [
            ("config.toml".into(), "ldap.url".into()),
            ("targets.d/app.toml".into(), "url".into()),
        ]
    );
    assert!(message(&errors, "ldap.url").contains("allow_plaintext"));
    let allowed = plain.replace("[ldap.users]", "allow_plaintext = true\n[ldap.users]");
    let dir = tree(&[
        ("config.toml", &allowed),
        (
            "targets.d/app.toml",
            &format!("{target}allow_plaintext = true\n"),
        ),
    ]);
    let config = load_ok(&dir, &[("APP_TOKEN", "t")]);
    assert!(config.ldap.allow_plaintext);
    assert_eq!(config.targets[0].url, "http://app.example.com/scim");

    // Loopback needs nothing.
    let target = "url = \"http://[::1]:8080/scim\"\nauth = { bearer = { env = \"APP_TOKEN\" } }\n";
    let dir = tree(&[
        ("config.toml", MINIMAL_MAIN),
        ("targets.d/app.toml", target),
    ]);
    load_ok(&dir, &[("APP_TOKEN", "t")]);
}

#[test]
fn urls_with_inline_credentials_point_at_auth() {
    let target = "url = \"https://svc:hunter2@app.example.com/scim\"\nauth = { bearer = { env = \"APP_TOKEN\" } }\n";
    let dir = tree(&[
        ("config.toml", MINIMAL_MAIN),
        ("targets.d/app.toml", target),
    ]);
    let errors = load_err(&dir, &[("APP_TOKEN", "t")]);
    let m = message(&errors, "url");
    assert!(m.contains("auth"), "{m}");
    assert!(!m.contains("hunter2"), "{m}");
    assert!(!ConfigErrors(errors.clone()).to_string().contains("hunter2"));
}

#[test]
fn percentages_limits_and_rates() {
    assert_eq!(parse_percent("20%"), Ok(0.2));
    assert_eq!(parse_percent("0%"), Ok(0.0));
    assert_eq!(parse_percent("100%"), Ok(1.0));
    for bad in ["20", "101%", "-1%", "x%"] {
        assert!(parse_percent(bad).is_err(), "{bad:?} accepted");
    }
    assert_eq!(parse_rate_limit("10/s").unwrap().per_second, 10.0);
    assert_eq!(parse_rate_limit("180/m").unwrap().per_second, 3.0);
    assert_eq!(parse_rate_limit("180/min").unwrap().per_second, 3.0);
    assert_eq!(parse_rate_limit("3600/h").unwrap().per_second, 1.0);
    for bad in ["10", "0/s", "10/d", "x/s"] {
        assert!(parse_rate_limit(bad).is_err(), "{bad:?} accepted");
    }

    for (value, expected) in [
        ("7", Some(Limit::Count(7))),
        ("\"7\"", Some(Limit::Count(7))),
        ("\"5%\"", Some(Limit::Percent(0.05))),
        ("-1", None),
        ("\"many\"", None),
        ("true", None),
    ] {
        let target = format!("{MINIMAL_TARGET}max_deprovisions = {value}\n");
        let dir = with_target(&target);
        let result = load_with_env(&dir.path().join("config.toml"), &env(&[("APP_TOKEN", "t")]));
        match (result, expected) {
            (Ok(config), Some(limit)) => assert_eq!(config.targets[0].max_deprovisions, limit),
            (Err(errors), None) => assert_eq!(errors.0[0].key, "max_deprovisions"),
            (result, _) => panic!("{value}: unexpected {result:?}"),
        }
    }
}

#[test]
fn ha_is_optional_and_reads_its_lease_secret() {
    let none = load_ok(&with_main(MINIMAL_MAIN), &[("APP_TOKEN", "t")]);
    assert!(none.ha.is_none());

    let main = format!(
        "{MINIMAL_MAIN}\n[ha]\nlease = {{ postgres = {{ env = \"HA_DSN\" }} }}\nlease_ttl = \"10s\"\ninstance = \"sync-a\"\n"
    );
    let dsn = "host=db user=l password=s3cret";
    let config = load_ok(&with_main(&main), &[("APP_TOKEN", "t"), ("HA_DSN", dsn)]);
    let ha = config.ha.expect("[ha]");
    assert_eq!(ha.dsn.expose(), dsn);
    assert_eq!(ha.lease_ttl, Duration::from_secs(10));
    assert_eq!(ha.instance, "sync-a");
    assert!(!format!("{ha:?}").contains("s3cret"));

    // Defaults: a 30 s lease, the host name.
    let main = format!("{MINIMAL_MAIN}\n[ha]\nlease = {{ postgres = {{ env = \"HA_DSN\" }} }}\n");
    let ha = load_ok(&with_main(&main), &[("APP_TOKEN", "t"), ("HA_DSN", dsn)])
        .ha
        .unwrap();
    assert_eq!(ha.lease_ttl, Duration::from_secs(30));
    assert_eq!(Some(ha.instance), super::main_file::host_name());
}

#[test]
fn ha_errors_name_their_keys() {
    let main = format!(
        "{MINIMAL_MAIN}\n[ha]\nlease = {{ postgres = \"host=db password=hunter2\" }}\nlease_ttl = \"1s\"\ninstance = \"\"\nleader = true\n"
    );
    let errors = load_err(&with_main(&main), &[("APP_TOKEN", "t")]);
    let all = ConfigErrors(errors.clone()).to_string();
    assert!(!all.contains("hunter2"), "{all}");
    for key in [
        "ha.lease.postgres",
        "ha.lease_ttl",
        "ha.instance",
        "ha.leader",
    ] {
        message(&errors, key);
    }
    assert!(message(&errors, "ha.lease_ttl").contains("at least 2s"));

    let main = format!("{MINIMAL_MAIN}\n[ha]\nlease_ttl = \"30s\"\n");
    let errors = load_err(&with_main(&main), &[("APP_TOKEN", "t")]);
    assert_eq!(message(&errors, "ha.lease"), "required key is missing");
}
