//! Saved plans: `plan --out FILE` writes the JSON report with a fingerprint on every change
//! and a header naming the configuration and the time; `sync --plan FILE` applies exactly
//! the changes whose fingerprints still match, and reports the others as stale. This is how a
//! change board approves a big first sync: what is applied is what was reviewed, or nothing.
//!
//! A fingerprint is a digest of the change as planned (its attributes, members, the account
//! it adopts as the target showed it) and of the snapshot rows it was computed against: when
//! the directory, the snapshot or the target moved, the change a new plan computes differs,
//! and so does its fingerprint.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::Change;
use crate::config::Config;
use crate::snapshot::TargetState;

/// The fingerprint of `change` planned against `state` (the target's snapshot rows).
pub fn fingerprint(change: &Change, state: &TargetState) -> String {
    let mut text = format!("{change:?}");
    for id in std::iter::once(change.id()).chain(change.from_id()) {
        if let Some(row) = state.users.get(id) {
            text.push_str(&format!(
                "|user:{}:{}:{:?}:{:?}:{:?}",
                row.scim_id.0, row.hash, row.etag, row.state, row.owned
            ));
        }
        if let Some(row) = state.groups.get(id) {
            text.push_str(&format!("|group:{row:?}"));
        }
    }
    crate::model::bytes_hash(text.as_bytes())
}

/// A digest of the configuration: the main file and every target file, as written.
pub fn configuration_fingerprint(config: &Config) -> Result<String, String> {
    let mut text = String::new();
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
    };
    text.push_str(&read(&config.path)?);
    for t in &config.targets {
        text.push_str(&format!("\n--- {}\n", t.name.0));
        text.push_str(&read(&t.file)?);
    }
    Ok(crate::model::bytes_hash(text.as_bytes()))
}

/// One change of a saved plan, as the plan file names it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SavedChange {
    pub action: String,
    pub resource: String,
    pub external_id: String,
    pub name: String,
    pub fingerprint: String,
}

impl SavedChange {
    /// The saved form of a change planned now.
    pub fn of(change: &Change, fingerprint: String) -> SavedChange {
        SavedChange {
            action: change.action().to_string(),
            resource: change.resource().to_string(),
            external_id: change.id().0.clone(),
            name: change.name().to_string(),
            fingerprint,
        }
    }

    fn key(&self) -> (&str, &str, &str, &str) {
        (
            &self.action,
            &self.resource,
            &self.external_id,
            &self.fingerprint,
        )
    }
}

/// A plan file, read and checked.
#[derive(Debug, Clone)]
pub struct SavedPlan {
    /// Target name → its changes.
    pub targets: BTreeMap<String, Vec<SavedChange>>,
}

/// The header a saved plan carries (under `"saved"`).
pub fn header(config: &Config, now: DateTime<Utc>) -> Result<Value, String> {
    Ok(serde_json::json!({
        "created_at": now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "configuration": configuration_fingerprint(config)?,
        "ldap2scim": env!("CARGO_PKG_VERSION"),
    }))
}

impl SavedPlan {
    /// Reads `path`, refusing a file that is not a saved plan, was made from another
    /// configuration, or is older than `max_age`. The error is the whole message.
    pub fn read(
        path: &Path,
        config: &Config,
        now: DateTime<Utc>,
        max_age: Duration,
    ) -> Result<SavedPlan, String> {
        let shown = path.display();
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the plan file {shown} (--plan): {e}"))?;
        let json: Value = serde_json::from_str(&text).map_err(|e| {
            format!("the plan file {shown} is not JSON ({e}); write it with `ldap2scim plan --out FILE`")
        })?;
        let saved = &json["saved"];
        let not_saved = || {
            format!("the plan file {shown} has no \"saved\" header with a configuration and a time; write it with `ldap2scim plan --out FILE`")
        };
        let configuration = saved["configuration"].as_str().ok_or_else(not_saved)?;
        let created_at = saved["created_at"]
            .as_str()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .ok_or_else(not_saved)?
            .with_timezone(&Utc);
        if configuration != configuration_fingerprint(config)? {
            return Err(format!(
                "the plan file {shown} was made from another configuration (the main file or a target file changed since, or it is another deployment's); nothing is applied: plan again"
            ));
        }
        let age = now.signed_duration_since(created_at);
        let max = chrono::Duration::from_std(max_age).unwrap_or(chrono::Duration::MAX);
        if age > max {
            return Err(format!(
                "the plan file {shown} was made at {created_at}, more than --max-age ({}) ago; nothing is applied: plan again",
                humantime_like(max_age)
            ));
        }
        if age < -chrono::Duration::minutes(5) {
            return Err(format!(
                "the plan file {shown} says it was made at {created_at}, in the future; nothing is applied"
            ));
        }
        let mut targets = BTreeMap::new();
        for t in json["targets"].as_array().ok_or_else(not_saved)? {
            let name = t["target"].as_str().ok_or_else(not_saved)?.to_owned();
            let mut changes = Vec::new();
            for c in t["changes"].as_array().into_iter().flatten() {
                let field = |k: &str| c[k].as_str().map(str::to_owned);
                let (Some(action), Some(resource), Some(external_id), Some(fingerprint)) = (
                    field("action"),
                    field("resource"),
                    field("external_id"),
                    field("fingerprint"),
                ) else {
                    return Err(format!(
                        "the plan file {shown} has a change of target {name} without action, resource, external_id or fingerprint; write it with `ldap2scim plan --out FILE`"
                    ));
                };
                changes.push(SavedChange {
                    action,
                    resource,
                    external_id,
                    name: field("name").unwrap_or_default(),
                    fingerprint,
                });
            }
            targets.insert(name, changes);
        }
        Ok(SavedPlan { targets })
    }

    /// Before the limits: keeps the changes planned now for `target` that the saved plan
    /// names (same action, resource and entry), so the limits count only those. Fingerprints
    /// are compared afterwards, by [`finish`](Self::finish), on the changes as the limits
    /// leave them (a member change may be split when something is held, as it was when the
    /// plan was saved).
    pub fn narrow(&self, target: &str, changes: &mut Vec<Change>) {
        let saved = self
            .targets
            .get(target)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let named: BTreeSet<(String, String, &str)> = saved
            .iter()
            .map(|s| (s.action.clone(), s.resource.clone(), s.external_id.as_str()))
            .collect();
        changes.retain(|c| {
            named.contains(&(
                c.action().to_string(),
                c.resource().to_string(),
                c.id().0.as_str(),
            ))
        });
    }

    /// After the limits and the orphans: keeps exactly the changes (and held changes) the
    /// saved plan has with the same fingerprint; returns the saved changes that match none
    /// of them (stale).
    pub fn finish(
        &self,
        target: &str,
        changes: &mut Vec<Change>,
        held: &mut Vec<Change>,
        state: &TargetState,
    ) -> Vec<SavedChange> {
        let saved = self
            .targets
            .get(target)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let wanted: BTreeSet<(&str, &str, &str, &str)> =
            saved.iter().map(SavedChange::key).collect();
        let mut matched: BTreeSet<SavedChange> = BTreeSet::new();
        for list in [changes, held] {
            list.retain(|c| {
                let now = SavedChange::of(c, fingerprint(c, state));
                let keep = wanted.contains(&now.key());
                if keep {
                    matched.insert(now);
                }
                keep
            });
        }
        let matched: BTreeSet<(&str, &str, &str, &str)> =
            matched.iter().map(SavedChange::key).collect();
        saved
            .iter()
            .filter(|s| !matched.contains(&s.key()))
            .cloned()
            .collect()
    }
}

impl SavedPlan {
    /// Whether the saved plan names a change about the directory id `id` on `target`.
    pub fn names(&self, target: &str, id: &str) -> bool {
        self.targets
            .get(target)
            .is_some_and(|cs| cs.iter().any(|c| c.external_id == id))
    }
}

fn humantime_like(d: Duration) -> String {
    let s = d.as_secs();
    if s.is_multiple_of(86_400) {
        format!("{}d", s / 86_400)
    } else if s.is_multiple_of(3_600) {
        format!("{}h", s / 3_600)
    } else if s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}
