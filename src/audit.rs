//! The audit trail: every change `sync` or `run` attempted against a target, one JSON object
//! per line in `<state_dir>/audit.jsonl` (time, run id, target, action, resource, directory id,
//! SCIM id, attributes changed, outcome). The file rotates by size: `audit.jsonl` →
//! `audit.jsonl.1` → … → `audit.jsonl.{KEEP}`, the oldest dropped.
//!
//! Records carry names and ids only, never attribute values or credentials. Writing the audit
//! trail never fails a cycle: a write error is returned for the caller to log.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::json;

use crate::config::Config;
use crate::outcome::Outcome;

pub const AUDIT_FILE: &str = "audit.jsonl";
/// Rotate once the current file reaches this size.
pub const MAX_BYTES: u64 = 10 * 1024 * 1024;
/// Rotated files kept besides the current one.
pub const KEEP: usize = 5;

pub struct AuditLog {
    path: PathBuf,
    max_bytes: u64,
    keep: usize,
}

impl AuditLog {
    pub fn new(state_dir: &Path) -> AuditLog {
        AuditLog {
            path: state_dir.join(AUDIT_FILE),
            max_bytes: MAX_BYTES,
            keep: KEEP,
        }
    }

    pub fn with_limits(state_dir: &Path, max_bytes: u64, keep: usize) -> AuditLog {
        AuditLog {
            max_bytes,
            keep,
            ..AuditLog::new(state_dir)
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends every applied record of `outcome`; returns how many lines were written.
    /// Lines are written as they are built: a first sync of 100,000 people is 100,000 lines,
    /// which are never all held in memory at once.
    pub fn append(&self, outcome: &Outcome, at: DateTime<Utc>) -> std::io::Result<usize> {
        let records = || {
            outcome.targets.iter().flat_map(|t| {
                t.applied
                    .iter()
                    .flat_map(|a| &a.records)
                    .map(move |r| (t, r))
            })
        };
        if records().next().is_none() {
            return Ok(0);
        }
        self.rotate_if_needed()?;
        // Names and ids of people: readable by this service only (0600), whatever the umask.
        // Rotated files keep the mode through the rename.
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&self.path)?;
        crate::lock::restrict(&self.path, 0o600)?;
        for n in 1..=self.keep {
            // Files rotated by an older version kept whatever mode it gave them.
            let _ = crate::lock::restrict(&self.rotated(n), 0o600);
        }
        let mut out = std::io::BufWriter::with_capacity(1 << 16, file);
        let time = at.to_rfc3339_opts(SecondsFormat::Millis, true);
        let mut lines = 0;
        for (t, r) in records() {
            let mut line = json!({
                "time": time,
                "run_id": outcome.run_id,
                "target": t.name,
                "action": r.action,
                "resource": r.resource,
                "external_id": r.external_id,
                "name": r.name,
                "scim_id": r.scim_id,
                "attributes": &*r.attributes,
                "outcome": r.outcome,
            });
            // A rebind names both identities: the account moved from one entry to the other.
            if let Some(from) = &r.from_external_id {
                line["from_external_id"] = json!(from);
            }
            // With `[ha]`: the lease epoch the write was made under.
            if let Some(epoch) = outcome.epoch {
                line["epoch"] = json!(epoch);
            }
            serde_json::to_writer(&mut out, &line)?;
            out.write_all(b"\n")?;
            lines += 1;
        }
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_data()?;
        Ok(lines)
    }

    fn rotated(&self, n: usize) -> PathBuf {
        let mut name = self.path.as_os_str().to_owned();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    }

    fn rotate_if_needed(&self) -> std::io::Result<()> {
        let size = match std::fs::metadata(&self.path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        if size < self.max_bytes {
            return Ok(());
        }
        if self.keep == 0 {
            return std::fs::remove_file(&self.path);
        }
        let _ = std::fs::remove_file(self.rotated(self.keep));
        for n in (1..self.keep).rev() {
            let from = self.rotated(n);
            if from.exists() {
                std::fs::rename(&from, self.rotated(n + 1))?;
            }
        }
        std::fs::rename(&self.path, self.rotated(1))
    }
}

/// Appends the changes of a pass to the audit trail, stamped `at`; a failure to write it is
/// logged, not fatal (the changes already happened and are in the snapshot).
pub fn record(config: &Config, outcome: &Outcome, at: DateTime<Utc>) {
    let log = AuditLog::new(&config.daemon.state_dir);
    if let Err(e) = log.append(outcome, at) {
        tracing::error!(path = %log.path().display(), error = %e, "cannot append to the audit log");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::{Applied, ApplyReport};
    use crate::outcome::{TargetOutcome, TargetStatus};

    fn outcome(records: usize) -> Outcome {
        let report = ApplyReport {
            applied: records,
            records: (0..records)
                .map(|i| Applied {
                    action: crate::plan::Action::Update,
                    resource: crate::plan::ResourceKind::User,
                    external_id: format!("id-{i}"),
                    name: format!("user{i}@example.org"),
                    from_external_id: None,
                    scim_id: Some(format!("scim-{i}")),
                    attributes: vec!["title".to_string()].into(),
                    outcome: "ok".into(),
                })
                .collect(),
            ..ApplyReport::default()
        };
        Outcome {
            epoch: None,
            run_id: "abcd1234".into(),
            read_duration: Default::default(),
            source_users: records,
            source_groups: 0,
            targets: vec![TargetOutcome {
                name: "app".into(),
                elapsed: Default::default(),
                status: TargetStatus::Ok,
                error: None,
                plan: Default::default(),
                applied: Some(report),
                names: Default::default(),
                rebuild: None,
            }],
            read: Default::default(),
        }
    }

    #[test]
    fn one_line_per_record_with_the_contract_fields() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::new(dir.path());
        assert_eq!(log.append(&outcome(2), Utc::now()).unwrap(), 2);
        let text = std::fs::read_to_string(log.path()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        for key in [
            "time",
            "run_id",
            "target",
            "action",
            "resource",
            "external_id",
            "scim_id",
            "attributes",
            "outcome",
        ] {
            assert!(lines[0].get(key).is_some(), "{key} missing: {}", lines[0]);
        }
        assert_eq!(lines[1]["external_id"], "id-1");
        assert_eq!(lines[0]["run_id"], "abcd1234");
    }

    #[test]
    fn a_rebind_record_names_both_identities() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::new(dir.path());
        let mut o = outcome(1);
        let records = &mut o.targets[0].applied.as_mut().unwrap().records;
        records[0].action = crate::plan::Action::Rebind;
        records[0].from_external_id = Some("old-id".into());
        log.append(&o, Utc::now()).unwrap();
        let line: serde_json::Value =
            serde_json::from_str(std::fs::read_to_string(log.path()).unwrap().trim()).unwrap();
        assert_eq!(line["action"], "rebind");
        assert_eq!(line["external_id"], "id-0");
        assert_eq!(line["from_external_id"], "old-id");
        // Other records carry no such key.
        log.append(&outcome(1), Utc::now()).unwrap();
        let text = std::fs::read_to_string(log.path()).unwrap();
        let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert!(last.get("from_external_id").is_none());
    }

    #[test]
    fn the_log_and_its_rotations_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::with_limits(dir.path(), 300, 2);
        // A file an older version left readable to everyone.
        std::fs::write(log.rotated(2), "{}\n").unwrap();
        std::fs::set_permissions(log.rotated(2), std::fs::Permissions::from_mode(0o644)).unwrap();
        for _ in 0..3 {
            log.append(&outcome(2), Utc::now()).unwrap();
        }
        for path in [log.path().to_path_buf(), log.rotated(1), log.rotated(2)] {
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", path.display());
        }
    }

    #[test]
    fn rotates_by_size_and_keeps_a_bounded_number_of_files() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::with_limits(dir.path(), 300, 2);
        for _ in 0..6 {
            log.append(&outcome(2), Utc::now()).unwrap();
        }
        assert!(log.path().exists());
        assert!(log.rotated(1).exists());
        assert!(log.rotated(2).exists());
        assert!(!log.rotated(3).exists());
        // Nothing is lost between the current file and the newest rotated one.
        let recent = std::fs::read_to_string(log.rotated(1)).unwrap();
        assert!(recent.lines().count() >= 2);
    }
}
