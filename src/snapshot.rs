//! The local snapshot: per target, what ldap2scim last pushed and what it owns. Backed by sled;
//! this file and `mirror.rs` (the directory's mirror, kept in the same database) are the only
//! ones that know sled exists.
//!
//! The snapshot is a cache, the target is the truth: losing it costs a rebuild (matching by
//! `externalId`), never a duplicate. A row advances only after the target acknowledged the
//! change, and [`Snapshot::flush`] runs before a cycle reports success.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::map::{FlatAttrs, SharedAttrs};
use crate::model::action::HeldKey;
use crate::model::{DirectoryId, ScimId};

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot open the snapshot in {path} (daemon.state_dir): {reason}. If another ldap2scim is running on this state directory, wait for it or stop it")]
    Open { path: PathBuf, reason: String },
    /// The files are there but sled cannot read them: never treated as an empty snapshot
    /// (that would forget every leaver's account).
    #[error("the snapshot in {path} (daemon.state_dir) cannot be read: {reason}. Nothing was changed on any target. Move it aside (`mv {path}/snapshot {path}/snapshot.broken`) and run `ldap2scim sync`: the snapshot is rebuilt from the targets, and accounts of people who left meanwhile are listed as orphans to deprovision with `ldap2scim approve`")]
    Unreadable { path: PathBuf, reason: String },
    #[error("snapshot storage error in {path}: {source}")]
    Storage {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("snapshot storage error in {path}: cannot encode a record: {source}")]
    Encode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("snapshot row {key} in {path} is unreadable ({source}); move the snapshot aside (daemon.state_dir) to rebuild it from the targets: accounts of people who left meanwhile are then listed as orphans for `ldap2scim approve`")]
    Corrupt {
        path: PathBuf,
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Ownership {
    /// ldap2scim created the resource.
    Created,
    /// The resource existed on the target and was adopted through a `match_existing` rule.
    Adopted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "state")]
pub enum UserState {
    Active,
    Deactivated { since: DateTime<Utc> },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserRow {
    pub scim_id: ScimId,
    pub user_name: String,
    /// Hash of `attrs`, the representation last acknowledged by the target.
    pub hash: String,
    /// Stored apart from the row and loaded only for the users a cycle needs them for
    /// ([`TargetSnapshot::load_attrs`]): a cycle compares hashes first, so a no-op cycle never
    /// holds every user's attributes twice.
    #[serde(skip, default = "crate::map::no_attrs")]
    pub attrs: SharedAttrs,
    pub etag: Option<String>,
    pub state: UserState,
    pub owned: Ownership,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupRow {
    pub scim_id: ScimId,
    pub display_name: String,
    /// Members the target acknowledged, as directory ids of users.
    pub members: BTreeSet<DirectoryId>,
    pub etag: Option<String>,
    pub owned: Ownership,
}

/// Everything the snapshot holds for one target, loaded at once.
#[derive(Debug, Clone, Default)]
pub struct TargetState {
    pub users: BTreeMap<DirectoryId, UserRow>,
    pub groups: BTreeMap<DirectoryId, GroupRow>,
    /// Set when the rows were narrowed to the users a fast delta touches (the change feed
    /// named only attribute changes of existing users): how many rows there are in all.
    pub narrowed_from: Option<RowCounts>,
}

/// The directory id of each user row, by the row's SCIM id (as text): built once per pass
/// and looked up per item, never a scan per item.
pub type ScimIndex<'a> = std::collections::HashMap<&'a str, &'a DirectoryId>;

impl TargetState {
    /// Which user row holds each SCIM id ([`ScimIndex`]).
    pub fn user_index(&self) -> ScimIndex<'_> {
        self.users
            .iter()
            .map(|(id, r)| (r.scim_id.0.as_str(), id))
            .collect()
    }

    /// Which group row holds each SCIM id.
    pub fn group_index(&self) -> ScimIndex<'_> {
        self.groups
            .iter()
            .map(|(id, r)| (r.scim_id.0.as_str(), id))
            .collect()
    }
}

/// Records kept beside the rows: the last good directory read and per-target run results.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReadStats {
    pub users: usize,
    pub groups: usize,
    pub at: Option<DateTime<Utc>>,
}

/// How far a target has applied the directory's mirror: everything up to `seq`, under the
/// target settings whose digest is `settings`. Recorded only after a clean cycle (nothing
/// failed, held or waiting), so a target that fails catches up from the mirror later.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedProgress {
    pub seq: u64,
    pub settings: String,
    /// When the first deactivated account becomes due for deletion (`deactivate-then-delete`):
    /// from then on the target has work although nothing changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub due: Option<DateTime<Utc>>,
}

impl FeedProgress {
    /// Whether a target with this progress has applied mirror `seq` under `settings`, and
    /// nothing has come due since.
    pub fn covers(&self, seq: u64, settings: &str, now: DateTime<Utc>) -> bool {
        self.seq == seq && self.settings == settings && self.due.is_none_or(|d| now < d)
    }
}

/// The last time the change feed could not go on, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeedFallback {
    pub at: DateTime<Utc>,
    pub reason: String,
}

/// What `status` and `plan` show of the change feed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FeedStatus {
    pub kind: String,
    pub cookie_at: Option<DateTime<Utc>>,
    pub last_full: Option<DateTime<Utc>>,
    pub users: usize,
    pub groups: usize,
    pub fallback: Option<FeedFallback>,
}

/// How many rows a target had when a cycle last wrote them (a lower bound while a cycle
/// runs: it is written before rows are removed). Fewer rows at the next load means rows were
/// lost, which is said, never taken for "nothing is managed".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowCounts {
    pub users: usize,
    pub groups: usize,
}

/// An account on a target with a directory-style `externalId` that matches no directory
/// entry, found when the target's rows were rebuilt. Kept until it is deprovisioned through
/// `approve`, comes back into the directory, or disappears from the target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Orphan {
    pub scim_id: ScimId,
    pub user_name: String,
    pub found: DateTime<Utc>,
}

/// A target's orphans, by their `externalId` (as a directory id).
pub type Orphans = BTreeMap<DirectoryId, Orphan>;

/// One change a safety limit held, as `approve` shows it before releasing it (the held set
/// itself is stored as (action, directory id) pairs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldChange {
    pub action: String,
    pub resource: String,
    pub name: String,
    pub external_id: String,
    /// A rebind: the directory id that held the account before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_external_id: Option<String>,
}

/// The last time a target's rows were found lost and rebuilt from the target, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rebuild {
    pub at: DateTime<Utc>,
    pub reason: String,
}

/// A loss of the snapshot (its files replaced or damaged) that not every target has been
/// rebuilt from yet. Written when the loss is noticed, before the marker names the new
/// snapshot: the marker then matches again, and without this record a cycle that stops early
/// (a failed directory read) or an `approve` would make a partial loss look like a healthy
/// snapshot. A target is taken off once a cycle listed its accounts and stored its orphans.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingRebuild {
    pub since: DateTime<Utc>,
    pub reason: String,
    /// Targets rebuilt since.
    #[serde(default)]
    pub done: BTreeSet<String>,
}

const PENDING_KEY: &str = "rebuild_pending";

/// The record of a target's last cycle, for `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastRun {
    #[serde(with = "rfc3339")]
    pub at: DateTime<Utc>,
    /// `ok`, `held` or `error`.
    pub status: String,
    /// Why the target could not be planned at all, if it could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub applied: usize,
    #[serde(default)]
    pub failed: usize,
    #[serde(default)]
    pub held: usize,
    #[serde(default)]
    pub writes: usize,
}

/// Dates as `DateTime::to_rfc3339` writes them (what `status` has always shown).
mod rfc3339 {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.to_rfc3339())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let text = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&text)
            .map(|t| t.with_timezone(&Utc))
            .map_err(serde::de::Error::custom)
    }
}

#[derive(Clone)]
pub struct Snapshot {
    db: sled::Db,
    path: PathBuf,
    /// Why this snapshot is not the one that was written here before, if it is not.
    lost: Option<String>,
}

/// Beside the sled directory, a file naming the snapshot that lives there. sled opens a
/// damaged data file as an empty database without a word; the marker outliving it is how that
/// is noticed (a deleted state directory takes the marker along: that case is noticed on the
/// targets, by their accounts with directory-style externalIds).
const MARKER_FILE: &str = "snapshot.id";
const MARKER_KEY: &str = "snapshot_id";

impl Snapshot {
    /// Opens (creating if needed) the snapshot in `state_dir`, for a command that writes it.
    pub fn open(state_dir: &Path) -> Result<Self, SnapshotError> {
        let mut snapshot = Self::open_sled(state_dir)?;
        snapshot.check_marker(state_dir, true)?;
        Ok(snapshot)
    }

    fn open_sled(state_dir: &Path) -> Result<Self, SnapshotError> {
        let path = state_dir.join("snapshot");
        let open_err = |reason: String| SnapshotError::Open {
            path: state_dir.to_path_buf(),
            reason,
        };
        crate::lock::private_dir(state_dir).map_err(|e| open_err(e.to_string()))?;
        // sled's default 1 GiB page cache dwarfs what a cycle needs; rows are read once. 8 MiB
        // is as fast as 16 for a 100k no-op and initial sync, and 15 MB smaller (BENCHMARKS.md).
        let config = sled::Config::new()
            .cache_capacity(8 * 1024 * 1024)
            .path(&path);
        // sled panics on some damaged files instead of returning an error: either way the
        // snapshot is unreadable, and that must stop the cycle, not end the process unexplained.
        let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| config.open()));
        let unreadable = |reason: String| SnapshotError::Unreadable {
            path: state_dir.to_path_buf(),
            reason,
        };
        let db = match opened {
            Ok(Ok(db)) => db,
            Ok(Err(e @ sled::Error::Io(_))) => return Err(open_err(e.to_string())),
            Ok(Err(e)) => return Err(unreadable(e.to_string())),
            Err(panic) => {
                let what = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "sled gave up reading it".into());
                return Err(unreadable(what));
            }
        };
        let snapshot = Snapshot {
            db,
            path,
            lost: None,
        };
        snapshot.make_private();
        Ok(snapshot)
    }

    /// Compares the snapshot's id with the marker beside it; `write` (a command that writes
    /// the snapshot) gives a new or reset snapshot an id and the marker its value.
    fn check_marker(&mut self, state_dir: &Path, write: bool) -> Result<(), SnapshotError> {
        let marker = state_dir.join(MARKER_FILE);
        let stored: Option<String> = self.get_meta(MARKER_KEY)?;
        let on_disk = std::fs::read_to_string(&marker)
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        if let Some(expected) = &on_disk {
            if stored.as_deref() != Some(expected.as_str()) {
                self.lost = Some(format!(
                    "{} names snapshot {expected}, but the snapshot there is {}: its files were removed, replaced or damaged, and what they held is gone",
                    marker.display(),
                    stored.as_deref().unwrap_or("a new, empty one")
                ));
            }
        }
        if !write || (stored.is_some() && stored == on_disk) {
            return Ok(());
        }
        if let Some(why) = &self.lost {
            // Kept until every target is rebuilt: the marker below stops saying it.
            let pending = PendingRebuild {
                since: Utc::now(),
                reason: why.clone(),
                done: BTreeSet::new(),
            };
            self.put_meta(PENDING_KEY, &pending)?;
        }
        let id = match &stored {
            Some(id) => id.clone(),
            None => {
                let id = format!(
                    "{:x}-{:x}",
                    Utc::now().timestamp_nanos_opt().unwrap_or_default(),
                    std::process::id()
                );
                self.put_meta(MARKER_KEY, &id)?;
                id
            }
        };
        // The id reaches sled's disk before the marker names it: a crash in between leaves
        // no marker, never a marker without its snapshot.
        self.db.flush().map_err(|e| self.storage(e))?;
        let write_marker =
            || crate::lock::write_private_file(&marker, format!("{id}\n").as_bytes());
        write_marker().map_err(|e| SnapshotError::Storage {
            path: marker.clone(),
            source: e.into(),
        })
    }

    /// The database, for the directory's mirror (`mirror.rs`), which lives beside the rows.
    pub(crate) fn sled_db(&self) -> &sled::Db {
        &self.db
    }

    /// The sled directory (for messages).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Why this snapshot is not the one written here before (its files were replaced or
    /// damaged), if that is so: every target's rows are then to be treated as lost.
    pub fn lost(&self) -> Option<&str> {
        self.lost.as_deref()
    }

    /// sled creates its files with the process umask; the snapshot holds who works where, so
    /// its directory and files are made private (0700 / 0600) whatever the umask was. Inside a
    /// 0700 state directory nothing is exposed between two of these passes.
    fn make_private(&self) {
        if let Err(e) = crate::lock::private_tree(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot make the snapshot files private (0600)");
        }
    }

    /// Opens the snapshot if it exists, for read-only commands; `None` if there is none yet.
    pub fn open_existing(state_dir: &Path) -> Result<Option<Self>, SnapshotError> {
        if state_dir.join("snapshot").exists() {
            let mut snapshot = Self::open_sled(state_dir)?;
            snapshot.check_marker(state_dir, false)?;
            Ok(Some(snapshot))
        } else {
            Ok(None)
        }
    }

    /// Whether a target has rows at all (without creating its tree, for read-only commands).
    pub fn has_target(&self, name: &str) -> bool {
        let wanted = format!("target/{name}");
        self.db
            .tree_names()
            .iter()
            .any(|t| t.as_ref() == wanted.as_bytes())
    }

    pub fn target(&self, name: &str) -> Result<TargetSnapshot, SnapshotError> {
        let tree = self
            .db
            .open_tree(format!("target/{name}"))
            .map_err(|e| self.storage(e))?;
        Ok(TargetSnapshot {
            tree,
            path: self.path.clone(),
        })
    }

    /// `[ha]`: the last sequence number of the lease database's ledger applied here.
    pub fn ledger_seq(&self) -> Result<i64, SnapshotError> {
        Ok(self.get_meta("ha/ledger_seq")?.unwrap_or(0))
    }

    pub fn set_ledger_seq(&self, seq: i64) -> Result<(), SnapshotError> {
        self.put_meta("ha/ledger_seq", &seq)
    }

    pub fn last_read(&self) -> Result<Option<ReadStats>, SnapshotError> {
        get_json(&self.meta()?, "last_read", &self.path)
    }

    pub fn set_last_read(&self, stats: &ReadStats) -> Result<(), SnapshotError> {
        put_json(&self.meta()?, "last_read", stats, &self.path)
    }

    /// A JSON record in the meta tree; the typed accessors below name every key.
    fn get_meta<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, SnapshotError> {
        get_json(&self.meta()?, key, &self.path)
    }

    fn put_meta<T: Serialize>(&self, key: &str, value: &T) -> Result<(), SnapshotError> {
        put_json(&self.meta()?, key, value, &self.path)
    }

    fn remove_meta(&self, key: &str) -> Result<(), SnapshotError> {
        self.meta()?.remove(key).map_err(|e| self.storage(e))?;
        Ok(())
    }

    /// Writes another snapshot's id into this one, as a copy restored from elsewhere would
    /// carry: the next open notices the loss. For rehearsing a restore (tests); never called
    /// by ldap2scim itself.
    pub fn stamp_foreign_id(&self, id: &str) -> Result<(), SnapshotError> {
        self.put_meta(MARKER_KEY, &id)
    }

    /// What `target`'s last cycle did (none before its first).
    pub fn feed_progress(&self, target: &str) -> Result<Option<FeedProgress>, SnapshotError> {
        self.get_meta(&format!("feed_progress/{target}"))
    }

    /// Records (or, with `None`, forgets) how far `target` applied the mirror.
    pub fn set_feed_progress(
        &self,
        target: &str,
        progress: Option<&FeedProgress>,
    ) -> Result<(), SnapshotError> {
        let key = format!("feed_progress/{target}");
        match progress {
            Some(p) => self.put_meta(&key, p),
            None => self.remove_meta(&key),
        }
    }

    pub fn feed_fallback(&self) -> Result<Option<FeedFallback>, SnapshotError> {
        self.get_meta("feed_fallback")
    }

    pub fn set_feed_fallback(&self, reason: &str, at: DateTime<Utc>) -> Result<(), SnapshotError> {
        self.put_meta(
            "feed_fallback",
            &FeedFallback {
                at,
                reason: reason.to_string(),
            },
        )
    }

    pub fn last_run(&self, target: &str) -> Result<Option<LastRun>, SnapshotError> {
        self.get_meta(&format!("status/{target}"))
    }

    pub fn set_last_run(&self, target: &str, run: &LastRun) -> Result<(), SnapshotError> {
        self.put_meta(&format!("status/{target}"), run)
    }

    /// The changes a safety limit held on `target`'s last cycle (what `approve` releases).
    pub fn held(&self, target: &str) -> Result<BTreeSet<HeldKey>, SnapshotError> {
        Ok(self
            .get_meta(&format!("held/{target}"))?
            .unwrap_or_default())
    }

    pub fn set_held(&self, target: &str, held: &BTreeSet<HeldKey>) -> Result<(), SnapshotError> {
        let key = format!("held/{target}");
        if held.is_empty() {
            self.remove_meta(&key)
        } else {
            self.put_meta(&key, held)
        }
    }

    /// The held changes an operator released with `approve`, for the next sync only.
    pub fn approved(&self, target: &str) -> Result<Option<BTreeSet<HeldKey>>, SnapshotError> {
        self.get_meta(&format!("approved/{target}"))
    }

    pub fn set_approved(
        &self,
        target: &str,
        approved: &BTreeSet<HeldKey>,
    ) -> Result<(), SnapshotError> {
        self.put_meta(&format!("approved/{target}"), approved)
    }

    /// An approval releases one held set, in the sync right after it.
    pub fn clear_approved(&self, target: &str) -> Result<(), SnapshotError> {
        self.remove_meta(&format!("approved/{target}"))
    }

    /// The attribute paths `target` does not keep (absent from its answers after we sent
    /// them).
    pub fn not_kept(&self, target: &str) -> Result<BTreeSet<String>, SnapshotError> {
        Ok(self
            .get_meta(&format!("not_kept/{target}"))?
            .unwrap_or_default())
    }

    pub fn set_not_kept(
        &self,
        target: &str,
        paths: &BTreeSet<String>,
    ) -> Result<(), SnapshotError> {
        self.put_meta(&format!("not_kept/{target}"), paths)
    }

    /// Whether `target`'s rows were lost, and how it shows: the whole snapshot was, a loss
    /// noticed earlier was not rebuilt for it yet, or it holds fewer rows than it recorded
    /// (the counts are a lower bound while a cycle runs, so a crash mid-cycle never looks
    /// like a loss).
    pub fn lost_rows(&self, target: &str, users: usize, groups: usize) -> Option<String> {
        if let Some(why) = self.lost() {
            return Some(why.to_string());
        }
        match self.rebuild_pending(target) {
            Ok(Some(why)) => return Some(why),
            Ok(None) => {}
            Err(e) => {
                return Some(format!(
                    "its record of a pending rebuild is unreadable ({e})"
                ))
            }
        }
        let recorded = match self.row_counts(target) {
            Ok(r) => r?,
            Err(e) => return Some(format!("its row counts are unreadable ({e})")),
        };
        (users < recorded.users || groups < recorded.groups).then(|| {
            format!(
                "it recorded {} user and {} group rows for this target, {users} and {groups} are left",
                recorded.users, recorded.groups,
            )
        })
    }

    /// Takes `done` off `target`'s orphans (deprovisioned, or found to be orphans no more).
    pub fn forget_orphans(&self, target: &str, done: &[DirectoryId]) -> Result<(), SnapshotError> {
        if done.is_empty() {
            return Ok(());
        }
        let mut orphans = self.orphans(target)?;
        for id in done {
            orphans.remove(id);
        }
        self.set_orphans(target, &orphans)
    }

    /// The row counts recorded for `target` (none before the first cycle that wrote them).
    pub fn row_counts(&self, target: &str) -> Result<Option<RowCounts>, SnapshotError> {
        self.get_meta(&format!("rows/{target}"))
    }

    pub fn set_row_counts(&self, target: &str, counts: RowCounts) -> Result<(), SnapshotError> {
        self.put_meta(&format!("rows/{target}"), &counts)
    }

    /// The orphans waiting on `target` for `approve`.
    pub fn orphans(&self, target: &str) -> Result<Orphans, SnapshotError> {
        Ok(self
            .get_meta(&format!("orphans/{target}"))?
            .unwrap_or_default())
    }

    pub fn set_orphans(&self, target: &str, orphans: &Orphans) -> Result<(), SnapshotError> {
        let key = format!("orphans/{target}");
        if orphans.is_empty() {
            self.remove_meta(&key)
        } else {
            self.put_meta(&key, orphans)
        }
    }

    /// What the held changes of `target`'s last cycle were, for `approve` to show.
    pub fn held_changes(&self, target: &str) -> Result<Vec<HeldChange>, SnapshotError> {
        Ok(self
            .get_meta(&format!("held_changes/{target}"))?
            .unwrap_or_default())
    }

    pub fn set_held_changes(&self, target: &str, held: &[HeldChange]) -> Result<(), SnapshotError> {
        let key = format!("held_changes/{target}");
        if held.is_empty() {
            self.remove_meta(&key)
        } else {
            self.put_meta(&key, &held)
        }
    }

    pub fn last_rebuild(&self, target: &str) -> Result<Option<Rebuild>, SnapshotError> {
        self.get_meta(&format!("rebuilt/{target}"))
    }

    pub fn set_last_rebuild(&self, target: &str, rebuild: &Rebuild) -> Result<(), SnapshotError> {
        self.put_meta(&format!("rebuilt/{target}"), rebuild)
    }

    /// The loss not every target has been rebuilt from, if there is one.
    pub fn pending_rebuild(&self) -> Result<Option<PendingRebuild>, SnapshotError> {
        self.get_meta(PENDING_KEY)
    }

    /// Why `target`'s rows are still to be rebuilt from the target (a loss noticed earlier,
    /// by this or another command), if they are.
    pub fn rebuild_pending(&self, target: &str) -> Result<Option<String>, SnapshotError> {
        Ok(self
            .pending_rebuild()?
            .filter(|p| !p.done.contains(target))
            .map(|p| {
                format!(
                    "{} (noticed at {}; this target has not been rebuilt since)",
                    p.reason,
                    p.since.to_rfc3339()
                )
            }))
    }

    /// `target` was rebuilt (its accounts listed, its orphans stored); the record goes once
    /// every target in `all` was.
    pub fn set_rebuilt<'a>(
        &self,
        target: &str,
        all: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), SnapshotError> {
        let Some(mut pending) = self.pending_rebuild()? else {
            return Ok(());
        };
        pending.done.insert(target.to_string());
        let mut all = all.into_iter();
        if all.all(|t| pending.done.contains(t)) {
            self.remove_meta(PENDING_KEY)
        } else {
            self.put_meta(PENDING_KEY, &pending)
        }
    }

    fn meta(&self) -> Result<sled::Tree, SnapshotError> {
        self.db.open_tree("meta").map_err(|e| self.storage(e))
    }

    /// Writes everything to disk. sled flushes lazily; a cycle calls this before it reports
    /// success.
    pub async fn flush(&self) -> Result<(), SnapshotError> {
        let path = self.path.clone();
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let flushed = this.db.flush();
            // A flush may have started new files.
            this.make_private();
            flushed
        })
        .await
        .map_err(|e| SnapshotError::Storage {
            path: path.clone(),
            source: e.into(),
        })?
        .map_err(|e| SnapshotError::Storage {
            path,
            source: e.into(),
        })?;
        Ok(())
    }

    fn storage(&self, e: sled::Error) -> SnapshotError {
        SnapshotError::Storage {
            path: self.path.clone(),
            source: e.into(),
        }
    }
}

/// One target's rows.
#[derive(Clone)]
pub struct TargetSnapshot {
    tree: sled::Tree,
    path: PathBuf,
}

const USER_PREFIX: &str = "u:";
const GROUP_PREFIX: &str = "g:";
const ATTRS_PREFIX: &str = "a:";

impl TargetSnapshot {
    pub fn load(&self) -> Result<TargetState, SnapshotError> {
        let mut state = TargetState::default();
        for item in self
            .tree
            .scan_prefix(USER_PREFIX)
            .chain(self.tree.scan_prefix(GROUP_PREFIX))
        {
            let (k, v) = item.map_err(|e| self.storage(e))?;
            let key = String::from_utf8_lossy(&k).to_string();
            if let Some(id) = key.strip_prefix(USER_PREFIX) {
                state
                    .users
                    .insert(DirectoryId(id.to_string()), self.decode(&key, &v)?);
            } else if let Some(id) = key.strip_prefix(GROUP_PREFIX) {
                state
                    .groups
                    .insert(DirectoryId(id.to_string()), self.decode(&key, &v)?);
            }
        }
        Ok(state)
    }

    /// The rows of `users` only, and (`with_groups`) every group row: what a fast delta
    /// (attribute changes of those users) plans and applies; its plan sees no group row, so a
    /// dry run leaves them out. `narrowed_from` counts every row: as `recorded` at the end of
    /// the last cycle where given (a fast delta follows only cycles that finished), else by
    /// their keys.
    pub fn load_narrow(
        &self,
        users: &BTreeSet<DirectoryId>,
        recorded: Option<RowCounts>,
        with_groups: bool,
    ) -> Result<TargetState, SnapshotError> {
        let mut state = TargetState::default();
        for id in users {
            let key = format!("{USER_PREFIX}{id}");
            if let Some(v) = self.tree.get(&key).map_err(|e| self.storage(e))? {
                state.users.insert(id.clone(), self.decode(&key, &v)?);
            }
        }
        if with_groups {
            for item in self.tree.scan_prefix(GROUP_PREFIX) {
                let (k, v) = item.map_err(|e| self.storage(e))?;
                let key = String::from_utf8_lossy(&k).to_string();
                if let Some(id) = key.strip_prefix(GROUP_PREFIX) {
                    state
                        .groups
                        .insert(DirectoryId(id.to_string()), self.decode(&key, &v)?);
                }
            }
        }
        state.narrowed_from = Some(match recorded {
            Some(counts) => counts,
            None => self.count_rows()?,
        });
        Ok(state)
    }

    /// Writes a user's row and its attributes, atomically.
    ///
    /// One `sled::Batch` per acknowledged change is what it costs (sled writes its I/O buffer
    /// out for every batch: half the system time of a push). Cheaper forms were measured and
    /// rejected: two loose inserts can leave a row whose stale hash hides a later change after
    /// a crash between them, and collecting many changes per batch widens the window in which
    /// a crash loses acknowledged rows (a lost reactivation row, followed by a leave, would
    /// keep the account active). BENCHMARKS.md has the numbers.
    pub fn put_user(&self, id: &DirectoryId, row: &UserRow) -> Result<(), SnapshotError> {
        let mut batch = sled::Batch::default();
        batch.insert(
            format!("{USER_PREFIX}{id}").as_bytes(),
            encode(row, &self.path)?,
        );
        batch.insert(
            format!("{ATTRS_PREFIX}{id}").as_bytes(),
            row.attrs.json().as_bytes(),
        );
        self.tree.apply_batch(batch).map_err(|e| self.storage(e))
    }

    pub fn remove_user(&self, id: &DirectoryId) -> Result<(), SnapshotError> {
        let mut batch = sled::Batch::default();
        batch.remove(format!("{USER_PREFIX}{id}").as_bytes());
        batch.remove(format!("{ATTRS_PREFIX}{id}").as_bytes());
        self.tree.apply_batch(batch).map_err(|e| self.storage(e))
    }

    /// How many user and group rows there are (a scan of their keys).
    pub fn count_rows(&self) -> Result<RowCounts, SnapshotError> {
        let count = |prefix: &str| -> Result<usize, SnapshotError> {
            let mut n = 0;
            for k in self.tree.scan_prefix(prefix).keys() {
                k.map_err(|e| self.storage(e))?;
                n += 1;
            }
            Ok(n)
        };
        Ok(RowCounts {
            users: count(USER_PREFIX)?,
            groups: count(GROUP_PREFIX)?,
        })
    }

    /// Fills in `attrs` of the given users' rows (those a plan may diff attribute by attribute).
    pub fn load_attrs<'a>(
        &self,
        state: &mut TargetState,
        ids: impl IntoIterator<Item = &'a DirectoryId>,
    ) -> Result<(), SnapshotError> {
        for id in ids {
            let key = format!("{ATTRS_PREFIX}{id}");
            if let (Some(row), Some(bytes)) = (
                state.users.get_mut(id),
                self.tree.get(&key).map_err(|e| self.storage(e))?,
            ) {
                row.attrs = SharedAttrs::pack(&self.decode::<FlatAttrs>(&key, &bytes)?);
            }
        }
        Ok(())
    }

    pub fn put_group(&self, id: &DirectoryId, row: &GroupRow) -> Result<(), SnapshotError> {
        put_json(&self.tree, &format!("{GROUP_PREFIX}{id}"), row, &self.path)
    }

    pub fn remove_group(&self, id: &DirectoryId) -> Result<(), SnapshotError> {
        self.tree
            .remove(format!("{GROUP_PREFIX}{id}"))
            .map_err(|e| self.storage(e))?;
        Ok(())
    }

    fn decode<T: DeserializeOwned>(&self, key: &str, bytes: &[u8]) -> Result<T, SnapshotError> {
        serde_json::from_slice(bytes).map_err(|e| SnapshotError::Corrupt {
            path: self.path.clone(),
            key: key.to_string(),
            source: e,
        })
    }

    fn storage(&self, e: sled::Error) -> SnapshotError {
        SnapshotError::Storage {
            path: self.path.clone(),
            source: e.into(),
        }
    }
}

fn get_json<T: DeserializeOwned>(
    tree: &sled::Tree,
    key: &str,
    path: &Path,
) -> Result<Option<T>, SnapshotError> {
    let Some(bytes) = tree.get(key).map_err(|e| SnapshotError::Storage {
        path: path.to_path_buf(),
        source: e.into(),
    })?
    else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| SnapshotError::Corrupt {
            path: path.to_path_buf(),
            key: key.to_string(),
            source: e,
        })
}

fn encode<T: Serialize>(value: &T, path: &Path) -> Result<Vec<u8>, SnapshotError> {
    serde_json::to_vec(value).map_err(|e| SnapshotError::Encode {
        path: path.to_path_buf(),
        source: e,
    })
}

fn put_json<T: Serialize>(
    tree: &sled::Tree,
    key: &str,
    value: &T,
    path: &Path,
) -> Result<(), SnapshotError> {
    let bytes = encode(value, path)?;
    tree.insert(key, bytes)
        .map_err(|e| SnapshotError::Storage {
            path: path.to_path_buf(),
            source: e.into(),
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn rows_round_trip_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let id = DirectoryId::new("u1");
        let row = UserRow {
            scim_id: ScimId("s1".into()),
            user_name: "jdoe".into(),
            hash: "h".into(),
            attrs: FlatAttrs::from([("title".to_string(), serde_json::json!("Engineer"))]).into(),
            etag: Some("W/\"1\"".into()),
            state: UserState::Deactivated { since: Utc::now() },
            owned: Ownership::Adopted,
        };
        {
            let snap = Snapshot::open(dir.path()).unwrap();
            snap.target("app").unwrap().put_user(&id, &row).unwrap();
            snap.set_last_read(&ReadStats {
                users: 3,
                groups: 1,
                at: None,
            })
            .unwrap();
            snap.flush().await.unwrap();
        }
        let snap = Snapshot::open(dir.path()).unwrap();
        let target = snap.target("app").unwrap();
        let mut state = target.load().unwrap();
        assert!(
            state.users[&id].attrs.is_empty(),
            "attributes load on demand"
        );
        target.load_attrs(&mut state, [&id]).unwrap();
        assert_eq!(state.users.get(&id), Some(&row));
        assert!(snap
            .target("other")
            .unwrap()
            .load()
            .unwrap()
            .users
            .is_empty());
        assert_eq!(snap.last_read().unwrap().unwrap().users, 3);
        assert_eq!(snap.lost(), None, "the same snapshot, reopened");
    }

    /// sled opens a damaged data file as an empty database; the marker beside it says so.
    #[tokio::test]
    async fn a_damaged_data_file_is_a_lost_snapshot_not_an_empty_one() {
        let dir = tempfile::tempdir().unwrap();
        {
            let snap = Snapshot::open(dir.path()).unwrap();
            assert_eq!(snap.lost(), None, "a new snapshot");
            snap.set_row_counts(
                "app",
                RowCounts {
                    users: 2,
                    groups: 0,
                },
            )
            .unwrap();
            snap.flush().await.unwrap();
        }
        std::fs::write(dir.path().join("snapshot/db"), vec![0xA5u8; 4096]).unwrap();
        let readonly = Snapshot::open_existing(dir.path()).unwrap().unwrap();
        assert!(readonly.lost().unwrap().contains("snapshot.id"));
        drop(readonly);
        let snap = Snapshot::open(dir.path()).unwrap();
        assert!(
            snap.lost()
                .unwrap()
                .contains("removed, replaced or damaged"),
            "{:?}",
            snap.lost()
        );
        assert_eq!(snap.row_counts("app").unwrap(), None);
        drop(snap);
        // Said once: the rebuilt snapshot is the one the marker names from then on.
        assert_eq!(Snapshot::open(dir.path()).unwrap().lost(), None);
    }

    /// The marker matches again once a writer opened the snapshot; the loss is kept as a
    /// pending rebuild per target until each one was rebuilt.
    #[tokio::test]
    async fn a_lost_snapshot_stays_pending_until_every_target_is_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        {
            let snap = Snapshot::open(dir.path()).unwrap();
            assert_eq!(snap.pending_rebuild().unwrap(), None);
            snap.flush().await.unwrap();
        }
        std::fs::write(dir.path().join("snapshot/db"), vec![0xA5u8; 4096]).unwrap();
        // A read-only command notices the loss but records nothing.
        let readonly = Snapshot::open_existing(dir.path()).unwrap().unwrap();
        assert!(readonly.lost().is_some());
        assert_eq!(readonly.pending_rebuild().unwrap(), None);
        drop(readonly);
        // A writer (e.g. a sync that then fails at the directory read, or `approve`).
        drop(Snapshot::open(dir.path()).unwrap());
        let snap = Snapshot::open(dir.path()).unwrap();
        assert_eq!(snap.lost(), None, "the marker names this snapshot now");
        for t in ["a", "b"] {
            let why = snap.rebuild_pending(t).unwrap().expect("still pending");
            assert!(why.contains("replaced or damaged"), "{why}");
        }
        snap.set_rebuilt("a", ["a", "b"]).unwrap();
        assert_eq!(snap.rebuild_pending("a").unwrap(), None);
        assert!(snap.rebuild_pending("b").unwrap().is_some());
        drop(snap);
        let snap = Snapshot::open(dir.path()).unwrap();
        assert!(snap.rebuild_pending("b").unwrap().is_some(), "kept on disk");
        snap.set_rebuilt("b", ["a", "b"]).unwrap();
        assert_eq!(snap.pending_rebuild().unwrap(), None, "all rebuilt: gone");
    }

    #[tokio::test]
    async fn orphans_are_kept_typed_in_the_meta() {
        let dir = tempfile::tempdir().unwrap();
        let snap = Snapshot::open(dir.path()).unwrap();
        assert!(snap.orphans("app").unwrap().is_empty());
        let orphans = Orphans::from([(
            DirectoryId::new("8f1c2f6e-0000-4000-8000-000000000001"),
            Orphan {
                scim_id: ScimId("s1".into()),
                user_name: "left@example.org".into(),
                found: Utc::now(),
            },
        )]);
        snap.set_orphans("app", &orphans).unwrap();
        assert_eq!(snap.orphans("app").unwrap(), orphans);
        assert!(snap.orphans("other").unwrap().is_empty());
        snap.set_orphans("app", &Orphans::new()).unwrap();
        assert!(snap.orphans("app").unwrap().is_empty());
    }
}
