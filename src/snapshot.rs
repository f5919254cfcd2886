//! The local snapshot: per target, what ldap2scim last pushed and what it owns. Backed by sled;
//! this is the only file that knows sled exists.
//!
//! The snapshot is a cache, the target is the truth: losing it costs a rebuild (matching by
//! `externalId`), never a duplicate. A row advances only after the target acknowledged the
//! change, and [`Snapshot::flush`] runs before a cycle reports success.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::map::{FlatAttrs, SharedAttrs};
use crate::model::{DirectoryId, ScimId};

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot open the snapshot in {path} (daemon.state_dir): {reason}. If another ldap2scim is running on this state directory, wait for it or stop it")]
    Open { path: PathBuf, reason: String },
    #[error("snapshot storage error in {path}: {reason}")]
    Storage { path: PathBuf, reason: String },
    #[error("snapshot row {key} in {path} is unreadable ({reason}); delete daemon.state_dir to rebuild it from the targets")]
    Corrupt {
        path: PathBuf,
        key: String,
        reason: String,
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
}

impl TargetState {
    pub fn user_by_scim_id(&self, id: &ScimId) -> Option<(&DirectoryId, &UserRow)> {
        self.users.iter().find(|(_, r)| &r.scim_id == id)
    }
}

/// Records kept beside the rows: the last good directory read and per-target run results.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReadStats {
    pub users: usize,
    pub groups: usize,
    pub at: Option<DateTime<Utc>>,
}

#[derive(Clone)]
pub struct Snapshot {
    db: sled::Db,
    path: PathBuf,
}

impl Snapshot {
    /// Opens (creating if needed) the snapshot in `state_dir`.
    pub fn open(state_dir: &Path) -> Result<Self, SnapshotError> {
        let path = state_dir.join("snapshot");
        let open_err = |reason: String| SnapshotError::Open {
            path: state_dir.to_path_buf(),
            reason,
        };
        crate::lock::private_dir(state_dir).map_err(|e| open_err(e.to_string()))?;
        // sled's default 1 GiB page cache dwarfs what a cycle needs; rows are read once. 8 MiB
        // is as fast as 16 for a 100k no-op and initial sync, and 15 MB smaller (BENCHMARKS.md).
        let db = sled::Config::new()
            .cache_capacity(8 * 1024 * 1024)
            .path(&path)
            .open()
            .map_err(|e| open_err(e.to_string()))?;
        let snapshot = Snapshot { db, path };
        snapshot.make_private();
        Ok(snapshot)
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
            Self::open(state_dir).map(Some)
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

    pub fn last_read(&self) -> Result<Option<ReadStats>, SnapshotError> {
        get_json(&self.meta()?, "last_read", &self.path)
    }

    pub fn set_last_read(&self, stats: &ReadStats) -> Result<(), SnapshotError> {
        put_json(&self.meta()?, "last_read", stats, &self.path)
    }

    /// An arbitrary JSON record in the meta tree (run status, held changes).
    pub fn get_meta<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, SnapshotError> {
        get_json(&self.meta()?, key, &self.path)
    }

    pub fn put_meta<T: Serialize>(&self, key: &str, value: &T) -> Result<(), SnapshotError> {
        put_json(&self.meta()?, key, value, &self.path)
    }

    pub fn remove_meta(&self, key: &str) -> Result<(), SnapshotError> {
        self.meta()?.remove(key).map_err(|e| self.storage(e))?;
        Ok(())
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
            reason: e.to_string(),
        })?
        .map_err(|e| SnapshotError::Storage {
            path,
            reason: e.to_string(),
        })?;
        Ok(())
    }

    fn storage(&self, e: sled::Error) -> SnapshotError {
        SnapshotError::Storage {
            path: self.path.clone(),
            reason: e.to_string(),
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
        batch.insert(format!("{USER_PREFIX}{id}").as_bytes(), encode(row));
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
            reason: e.to_string(),
        })
    }

    fn storage(&self, e: sled::Error) -> SnapshotError {
        SnapshotError::Storage {
            path: self.path.clone(),
            reason: e.to_string(),
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
        reason: e.to_string(),
    })?
    else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| SnapshotError::Corrupt {
            path: path.to_path_buf(),
            key: key.to_string(),
            reason: e.to_string(),
        })
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("snapshot rows always serialize")
}

fn put_json<T: Serialize>(
    tree: &sled::Tree,
    key: &str,
    value: &T,
    path: &Path,
) -> Result<(), SnapshotError> {
    let bytes = serde_json::to_vec(value).expect("snapshot rows always serialize");
    tree.insert(key, bytes)
        .map_err(|e| SnapshotError::Storage {
            path: path.to_path_buf(),
            reason: e.to_string(),
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
    }
}
