//! A whole test world: one fresh slapd, both SCIM servers, each behind a recording proxy,
//! and the ldap2scim configuration pointing at them. Most end-to-end tests start here.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::*;

/// One SCIM server with the proxy ldap2scim talks to.
pub struct Target {
    pub server: Box<dyn ScimServer>,
    pub proxy: RecordingProxy,
}

impl Target {
    pub fn name(&self) -> &'static str {
        self.server.name()
    }
    pub fn users(&self) -> Vec<Value> {
        scim_list(&self.server.base_url(), self.server.token(), "Users")
    }
    pub fn groups(&self) -> Vec<Value> {
        scim_list(&self.server.base_url(), self.server.token(), "Groups")
    }
    /// userName → active, for every user on the server.
    pub fn user_states(&self) -> BTreeMap<String, bool> {
        self.users()
            .iter()
            .map(|u| {
                (
                    u["userName"].as_str().unwrap().to_string(),
                    u["active"].as_bool().unwrap_or(true),
                )
            })
            .collect()
    }
    pub fn user(&self, user_name: &str) -> Value {
        let matches: Vec<Value> = self
            .users()
            .into_iter()
            .filter(|u| u["userName"] == user_name)
            .collect();
        assert_eq!(
            matches.len(),
            1,
            "{}: users named {user_name}: {matches:?}",
            self.name()
        );
        matches.into_iter().next().unwrap()
    }
    /// displayName → set of member userNames, for every group on the server.
    pub fn memberships(&self) -> BTreeMap<String, BTreeSet<String>> {
        let by_id: BTreeMap<String, String> = self
            .users()
            .iter()
            .map(|u| {
                (
                    u["id"].as_str().unwrap().to_string(),
                    u["userName"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        self.groups()
            .iter()
            .map(|g| {
                let full = scim_get(
                    &self.server.base_url(),
                    self.server.token(),
                    &format!("/Groups/{}", g["id"].as_str().unwrap()),
                );
                let members = full["members"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|m| {
                        by_id
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

pub struct World {
    pub slapd: Slapd,
    pub config: TestConfig,
    pub targets: Vec<Target>,
}

impl World {
    pub fn start(seed: &str, target_extra: &str) -> World {
        let (slapd, servers) = std::thread::scope(|s| {
            let slapd = s.spawn(|| Slapd::start(seed));
            let servers = all_scim_servers();
            (slapd.join().unwrap(), servers)
        });
        let mut config = TestConfig::new(&slapd);
        // Small test directories shrink by large fractions; the shrink guard has its own tests.
        config.set("ldap", "max_shrink", "\"100%\"");
        let mut targets = Vec::new();
        for server in servers {
            let proxy = RecordingProxy::start(&server.base_url());
            config.target(server.name(), &proxy.url(), server.token(), target_extra);
            targets.push(Target { server, proxy });
        }
        World {
            slapd,
            config,
            targets,
        }
    }

    pub fn run(&self, args: &[&str]) -> Output {
        ldap2scim(&self.config.path(), args)
    }

    pub fn sync_expect(&self, code: i32) -> Output {
        let out = self.run(&["sync"]);
        out.expect_code(code);
        out
    }

    pub fn sync_ok(&self) -> Output {
        let out = self.run(&["sync"]);
        out.expect_code(0);
        out
    }

    /// `plan --format json`: the changes per target as (action, resource, name) plus the full JSON.
    pub fn plan_json(&self) -> (Output, Value) {
        let out = self.run(&["plan", "--format", "json"]);
        let json = out.json();
        (out, json)
    }

    pub fn assert_converged(&self) {
        let out = self.run(&["plan"]);
        assert_eq!(out.code, 0, "a plan after sync must be empty:\n{out}");
        for t in &self.targets {
            t.proxy.clear();
        }
        self.sync_ok();
        for t in &self.targets {
            assert_eq!(
                t.proxy.writes(),
                0,
                "{}: a sync with no directory change wrote: {:?}",
                t.name(),
                t.proxy.requests()
            );
        }
    }
}

/// One target's part of a `plan --format json` report.
pub fn target_json<'a>(plan: &'a Value, target: &str) -> &'a Value {
    plan["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["target"] == target)
        .expect("target in plan")
}

pub fn changes_of(plan: &Value, target: &str) -> Vec<(String, String, String)> {
    let t = plan["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["target"] == target)
        .expect("target in plan");
    t["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["action"].as_str().unwrap().to_string(),
                c["resource"].as_str().unwrap().to_string(),
                c["name"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

pub fn change(action: &str, resource: &str, name: &str) -> (String, String, String) {
    (action.into(), resource.into(), name.into())
}
