//! The local snapshot: per target, what ldap2scim last pushed and what it owns. Backed by sled;
//! this is the only file that knows sled exists.
//!
//! The snapshot is a cache, the target is the truth: losing it costs a rebuild (matching by
//! `externalId`), never a duplicate. A row advances only after the target acknowledged the
//! change, and [`Snapshot::flush`] runs before a cycle reports success.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

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
        std::fs::create_dir_all(state_dir).map_err(|e| open_err(e.to_string()))?;
        // sled's default 1 GiB page cache dwarfs what a cycle needs; rows are read once. 8 MiB
        // is as fast as 16 for a 100k no-op and initial sync, and 15 MB smaller (BENCHMARKS.md).
        let db = sled::Config::new()
            .cache_capacity(8 * 1024 * 1024)
            .path(&path)
            .open()
            .map_err(|e| open_err(e.to_string()))?;
        Ok(Snapshot { db, path })
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
            pending: Default::default(),
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
        let db = self.db.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || db.flush())
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
///
/// Row writes are collected and applied as one `sled::Batch` (atomic: a user's row and its
/// attributes always land together) every [`PENDING_MAX`] writes, before any read, and by
/// [`commit`](Self::commit), which the applier calls at the end of every apply. One batch per
/// row cost too much: sled writes its I/O buffer out for every batch (a 10,000-user push made
/// 251,000 context switches and spent 3.4 s in the kernel). A crash loses at most the rows of
/// the last unapplied batch, each with its attributes: like a lost create answer (the next
/// cycle finds the resource by externalId) or an update sent again (the same values).
#[derive(Clone)]
pub struct TargetSnapshot {
    tree: sled::Tree,
    path: PathBuf,
    pending: Arc<Mutex<Pending>>,
}

/// Row writes not applied to sled yet, in order.
#[derive(Default)]
struct Pending {
    batch: sled::Batch,
    writes: usize,
}

/// Row writes per batch.
const PENDING_MAX: usize = 256;

const USER_PREFIX: &str = "u:";
const GROUP_PREFIX: &str = "g:";
const ATTRS_PREFIX: &str = "a:";

impl TargetSnapshot {
    /// Applies the row writes collected so far (one atomic batch).
    pub fn commit(&self) -> Result<(), SnapshotError> {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        self.apply_pending(&mut pending)
    }

    fn apply_pending(&self, pending: &mut Pending) -> Result<(), SnapshotError> {
        if pending.writes == 0 {
            return Ok(());
        }
        let batch = std::mem::take(&mut pending.batch);
        pending.writes = 0;
        self.tree.apply_batch(batch).map_err(|e| self.storage(e))
    }

    /// Adds writes to the pending batch (applied once it is full).
    fn write(&self, add: impl FnOnce(&mut sled::Batch)) -> Result<(), SnapshotError> {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        add(&mut pending.batch);
        pending.writes += 1;
        if pending.writes >= PENDING_MAX {
            self.apply_pending(&mut pending)?;
        }
        Ok(())
    }

    pub fn load(&self) -> Result<TargetState, SnapshotError> {
        self.commit()?;
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

    /// Writes a user's row and its attributes, together.
    pub fn put_user(&self, id: &DirectoryId, row: &UserRow) -> Result<(), SnapshotError> {
        let (row_bytes, attrs) = (encode(row), row.attrs.json().as_bytes().to_vec());
        self.write(|batch| {
            batch.insert(format!("{USER_PREFIX}{id}").as_bytes(), row_bytes);
            batch.insert(format!("{ATTRS_PREFIX}{id}").as_bytes(), attrs);
        })
    }

    pub fn remove_user(&self, id: &DirectoryId) -> Result<(), SnapshotError> {
        self.write(|batch| {
            batch.remove(format!("{USER_PREFIX}{id}").as_bytes());
            batch.remove(format!("{ATTRS_PREFIX}{id}").as_bytes());
        })
    }

    /// Fills in `attrs` of the given users' rows (those a plan may diff attribute by attribute).
    pub fn load_attrs<'a>(
        &self,
        state: &mut TargetState,
        ids: impl IntoIterator<Item = &'a DirectoryId>,
    ) -> Result<(), SnapshotError> {
        self.commit()?;
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
        let bytes = encode(row);
        self.write(|batch| batch.insert(format!("{GROUP_PREFIX}{id}").as_bytes(), bytes))
    }

    pub fn remove_group(&self, id: &DirectoryId) -> Result<(), SnapshotError> {
        self.write(|batch| batch.remove(format!("{GROUP_PREFIX}{id}").as_bytes()))
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
            let target = snap.target("app").unwrap();
            target.put_user(&id, &row).unwrap();
            target.commit().unwrap();
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

    /// Row writes reach sled in atomic batches (a row always with its attributes): when a
    /// batch is full, on `commit`, and before the writer's own reads.
    #[test]
    fn row_writes_land_in_batches_and_on_commit() {
        let dir = tempfile::tempdir().unwrap();
        let snap = Snapshot::open(dir.path()).unwrap();
        let writer = snap.target("app").unwrap();
        // Another handle on the same tree sees only what reached sled.
        let stored = || snap.target("app").unwrap().load().unwrap();
        let row = |n: usize| UserRow {
            scim_id: ScimId(format!("s{n}")),
            user_name: format!("user{n}"),
            hash: format!("h{n}"),
            attrs: FlatAttrs::from([("n".to_string(), serde_json::json!(n))]).into(),
            etag: None,
            state: UserState::Active,
            owned: Ownership::Created,
        };
        let id = |n: usize| DirectoryId::new(&format!("u{n}"));
        for n in 0..PENDING_MAX - 1 {
            writer.put_user(&id(n), &row(n)).unwrap();
        }
        assert!(stored().users.is_empty(), "a batch is not full yet");
        writer
            .put_user(&id(PENDING_MAX), &row(PENDING_MAX))
            .unwrap();
        let mut state = stored();
        assert_eq!(state.users.len(), PENDING_MAX, "a full batch is applied");
        let ids: Vec<DirectoryId> = state.users.keys().cloned().collect();
        snap.target("app")
            .unwrap()
            .load_attrs(&mut state, &ids)
            .unwrap();
        for (id, r) in &state.users {
            let n: usize = id.0[1..].parse().unwrap();
            assert_eq!(r, &row(n), "each row with its own attributes");
        }
        writer.remove_user(&id(0)).unwrap();
        writer
            .put_group(
                &DirectoryId::new("g"),
                &GroupRow {
                    scim_id: ScimId("sg".into()),
                    display_name: "g".into(),
                    members: [id(1)].into(),
                    etag: None,
                    owned: Ownership::Created,
                },
            )
            .unwrap();
        assert_eq!(stored().users.len(), PENDING_MAX);
        assert_eq!(
            writer.load().unwrap().groups.len(),
            1,
            "the writer reads its own writes"
        );
        let state = stored();
        assert_eq!(state.users.len(), PENDING_MAX - 1);
        assert!(state.groups.contains_key(&DirectoryId::new("g")));
        writer.put_user(&id(0), &row(0)).unwrap();
        writer.commit().unwrap();
        assert_eq!(stored().users.len(), PENDING_MAX, "commit applies the rest");
    }
}
