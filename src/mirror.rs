//! The local mirror of the directory, kept in the snapshot's sled database beside the targets'
//! rows: every user and group entry in scope with the attributes the mappings read, who is
//! disabled, and the change feed's cookies. A delta cycle applies what the feed says changed
//! to it and rebuilds the whole [`Directory`](crate::model::Directory) from it, so a delta and
//! a full read go through the same group expansion, the same checks and the same guards.
//!
//! Entries and cookies advance together: a delta is one sled batch on one tree (the entries
//! and the `~meta` record with the new cookies), and a full read fills a new generation's tree
//! that a single write of the pointer then makes current. A crash leaves the old mirror and
//! its old cookie, which replays the same changes; a lost mirror costs a full read.
//!
//! Besides `snapshot.rs`, this is the only file that knows sled exists.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::model::{Attributes, DirectoryId, DirectoryUser};
use crate::snapshot::{Snapshot, SnapshotError};

const POINTER_KEY: &str = "mirror";
const META_KEY: &[u8] = b"~meta";
const USER: &str = "u:";
const DISABLED: &str = "x:";
const GROUP: &str = "g:";
/// The server's id of an entry in its feed, where it is not the entry's own id (389-DS names
/// entries by nsUniqueId in the feed, and by entryUUID in the entry).
const SYNC: &str = "s:";

/// One user entry as the feed and the full read hand it over.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MirrorUser {
    pub dn: String,
    pub attrs: Attributes,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub invalid_utf8: Vec<String>,
}

/// One group entry, its members still as DNs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MirrorGroup {
    pub dn: String,
    pub attrs: Attributes,
}

/// The feed's cookies, one per search (base64 of the server's opaque bytes).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Cookies {
    pub users: Option<String>,
    pub disabled: Option<String>,
    pub groups: Option<String>,
}

/// What the mirror was built from and how far it is.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MirrorMeta {
    /// The feed in use (`syncrepl`, `dirsync`, `usn`).
    pub kind: String,
    /// A digest of what the mirror depends on (servers, bases, filters, attributes asked
    /// for): another basis means the mirror is of another view and a full read is needed.
    pub basis: String,
    pub cookies: Cookies,
    /// Counts up with every change applied: a target that applied everything up to `seq`
    /// under the same settings has nothing to do when nothing changed since.
    pub seq: u64,
    pub users: usize,
    pub groups: usize,
    pub last_full: Option<DateTime<Utc>>,
    /// When the cookies last advanced (a full read or a delta).
    pub cookie_at: Option<DateTime<Utc>>,
    /// The server's root DSE `vendorName` at the last full read (how its feed is read).
    #[serde(default)]
    pub vendor: String,
    /// Active Directory: the earliest `accountExpires` still ahead among the users held
    /// (when it passes, an account turns inactive without any change the feed could name).
    #[serde(default)]
    pub expires: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct Pointer {
    generation: u64,
}

/// The whole mirror in memory.
#[derive(Debug, Default, Clone)]
pub struct MirrorCopy {
    pub users: BTreeMap<DirectoryId, MirrorUser>,
    pub disabled: BTreeSet<DirectoryId>,
    pub groups: BTreeMap<DirectoryId, MirrorGroup>,
    /// The feed's id → the entry's own id, where they differ (identity otherwise).
    pub sync: BTreeMap<DirectoryId, DirectoryId>,
}

/// One refresh of one kind of entry, as typed changes. As the source hands it over,
/// `deleted` and `present` hold the feed's ids; [`MirrorCopy::resolve`] turns them into the
/// entries' own ids.
#[derive(Debug)]
pub struct Changes<T> {
    /// By the entry's own id.
    pub changed: Vec<(DirectoryId, T)>,
    pub deleted: BTreeSet<DirectoryId>,
    /// After a present phase: every id still in scope.
    pub present: Option<BTreeSet<DirectoryId>>,
    /// (feed id, own id) of each changed entry.
    pub sync: Vec<(DirectoryId, DirectoryId)>,
}

impl<T> Default for Changes<T> {
    fn default() -> Self {
        Changes {
            changed: Vec::new(),
            deleted: BTreeSet::new(),
            present: None,
            sync: Vec::new(),
        }
    }
}

/// Everything one delta read returned.
#[derive(Debug, Default)]
pub struct Delta {
    pub users: Changes<MirrorUser>,
    /// Changed entries of the disabled-users search carry no attributes.
    pub disabled: Changes<()>,
    pub groups: Changes<MirrorGroup>,
}

impl<T> Changes<T> {
    /// Whether the refresh named no entry at all (no change, no delete, no present phase).
    pub fn names_nothing(&self) -> bool {
        self.changed.is_empty() && self.deleted.is_empty() && self.present.is_none()
    }
}

impl Delta {
    /// Whether none of the three refreshes named any entry.
    pub fn names_nothing(&self) -> bool {
        self.users.names_nothing() && self.disabled.names_nothing() && self.groups.names_nothing()
    }

    /// The DN a changed user or group has now, if the delta changed it.
    pub fn changed_dn(&self, id: &DirectoryId) -> Option<&str> {
        self.users
            .changed
            .iter()
            .find(|(i, _)| i == id)
            .map(|(_, u)| u.dn.as_str())
            .or_else(|| {
                self.groups
                    .changed
                    .iter()
                    .find(|(i, _)| i == id)
                    .map(|(_, g)| g.dn.as_str())
            })
    }
}

/// The writes a delta makes to the stored mirror, and how many entries it changed.
#[derive(Debug, Default)]
pub struct Writes {
    puts: Vec<(String, Vec<u8>)>,
    removes: Vec<String>,
    /// Entries added, changed or removed (a value sent again unchanged does not count).
    pub changed: usize,
}

impl Writes {
    /// Adds the feed ids [`MirrorCopy::resolve`] learned.
    pub fn and_learned(mut self, learned: Vec<(String, Vec<u8>)>) -> Writes {
        self.puts.extend(learned);
        self
    }
}

impl MirrorCopy {
    /// Learns the feed ids of the changed entries and turns the feed ids of `deleted` and
    /// `present` into the entries' own ids (an id the mirror never saw stays as it is, and
    /// so names no entry). Returns the index entries to store.
    pub fn resolve(&mut self, delta: &mut Delta) -> Vec<(String, Vec<u8>)> {
        let mut learned = Vec::new();
        let pairs = delta
            .users
            .sync
            .iter()
            .chain(&delta.disabled.sync)
            .chain(&delta.groups.sync);
        for (sync, id) in pairs {
            if sync != id && self.sync.get(sync) != Some(id) {
                self.sync.insert(sync.clone(), id.clone());
                learned.push((format!("{SYNC}{sync}"), id.0.clone().into_bytes()));
            }
        }
        let own = |sync: &DirectoryId| self.sync.get(sync).unwrap_or(sync).clone();
        for changes in [
            (&mut delta.users.deleted, &mut delta.users.present),
            (&mut delta.disabled.deleted, &mut delta.disabled.present),
            (&mut delta.groups.deleted, &mut delta.groups.present),
        ] {
            *changes.0 = changes.0.iter().map(own).collect();
            if let Some(p) = changes.1.as_mut() {
                *p = p.iter().map(own).collect();
            }
        }
        learned
    }

    /// Applies a delta in memory and returns what the stored mirror must write to match.
    pub fn apply(&mut self, delta: Delta) -> Result<Writes, serde_json::Error> {
        let mut w = Writes::default();
        apply_one(&mut self.users, delta.users, USER, &mut w)?;
        let mut disabled: BTreeMap<DirectoryId, ()> = std::mem::take(&mut self.disabled)
            .into_iter()
            .map(|d| (d, ()))
            .collect();
        apply_one(&mut disabled, delta.disabled, DISABLED, &mut w)?;
        self.disabled = disabled.into_keys().collect();
        apply_one(&mut self.groups, delta.groups, GROUP, &mut w)?;
        Ok(w)
    }
}

fn apply_one<T: Serialize + PartialEq>(
    map: &mut BTreeMap<DirectoryId, T>,
    changes: Changes<T>,
    prefix: &str,
    w: &mut Writes,
) -> Result<(), serde_json::Error> {
    let mut gone: Vec<DirectoryId> = changes.deleted.into_iter().collect();
    if let Some(present) = &changes.present {
        gone.extend(map.keys().filter(|id| !present.contains(*id)).cloned());
    }
    for id in gone {
        if map.remove(&id).is_some() {
            w.removes.push(format!("{prefix}{id}"));
            w.changed += 1;
        }
    }
    for (id, value) in changes.changed {
        if map.get(&id) == Some(&value) {
            continue;
        }
        w.puts
            .push((format!("{prefix}{id}"), serde_json::to_vec(&value)?));
        map.insert(id, value);
        w.changed += 1;
    }
    Ok(())
}

/// The stored mirror of one snapshot.
pub struct Mirror {
    db: sled::Db,
    path: PathBuf,
}

impl Mirror {
    pub fn of(snapshot: &Snapshot) -> Mirror {
        Mirror {
            db: snapshot.sled_db().clone(),
            path: snapshot.path().to_path_buf(),
        }
    }

    fn storage(&self, e: sled::Error) -> SnapshotError {
        SnapshotError::Storage {
            path: self.path.clone(),
            source: e.into(),
        }
    }

    fn corrupt(&self, key: &[u8], e: serde_json::Error) -> SnapshotError {
        SnapshotError::Corrupt {
            path: self.path.clone(),
            key: String::from_utf8_lossy(key).into_owned(),
            source: e,
        }
    }

    fn pointer(&self) -> Result<Option<Pointer>, SnapshotError> {
        let meta = self.db.open_tree("meta").map_err(|e| self.storage(e))?;
        match meta.get(POINTER_KEY).map_err(|e| self.storage(e))? {
            None => Ok(None),
            Some(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| self.corrupt(POINTER_KEY.as_bytes(), e)),
        }
    }

    fn tree(&self, generation: u64) -> Result<sled::Tree, SnapshotError> {
        self.db
            .open_tree(format!("mirror/{generation}"))
            .map_err(|e| self.storage(e))
    }

    /// The current mirror's record, if there is one.
    pub fn meta(&self) -> Result<Option<MirrorMeta>, SnapshotError> {
        let Some(p) = self.pointer()? else {
            return Ok(None);
        };
        let tree = self.tree(p.generation)?;
        match tree.get(META_KEY).map_err(|e| self.storage(e))? {
            None => Ok(None),
            Some(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| self.corrupt(META_KEY, e)),
        }
    }

    /// One user entry, if the mirror holds it.
    pub fn user(&self, id: &DirectoryId) -> Result<Option<MirrorUser>, SnapshotError> {
        let Some(p) = self.pointer()? else {
            return Ok(None);
        };
        let key = format!("{USER}{id}");
        match self
            .tree(p.generation)?
            .get(&key)
            .map_err(|e| self.storage(e))?
        {
            None => Ok(None),
            Some(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| self.corrupt(key.as_bytes(), e)),
        }
    }

    /// The entry's own id for a feed id (the same id where the index has none).
    pub fn own_id(&self, sync: &DirectoryId) -> Result<DirectoryId, SnapshotError> {
        let Some(p) = self.pointer()? else {
            return Ok(sync.clone());
        };
        Ok(self
            .tree(p.generation)?
            .get(format!("{SYNC}{sync}"))
            .map_err(|e| self.storage(e))?
            .map_or_else(
                || sync.clone(),
                |v| DirectoryId(String::from_utf8_lossy(&v).into_owned()),
            ))
    }

    /// Whether the mirror holds `id` as an entry of `kind`.
    pub fn holds(&self, kind: Kind, id: &DirectoryId) -> Result<bool, SnapshotError> {
        let Some(p) = self.pointer()? else {
            return Ok(false);
        };
        self.tree(p.generation)?
            .contains_key(format!("{}{id}", kind.prefix()))
            .map_err(|e| self.storage(e))
    }

    /// Whether the mirror holds `id` as disabled.
    pub fn is_disabled(&self, id: &DirectoryId) -> Result<bool, SnapshotError> {
        let Some(p) = self.pointer()? else {
            return Ok(false);
        };
        self.tree(p.generation)?
            .contains_key(format!("{DISABLED}{id}"))
            .map_err(|e| self.storage(e))
    }

    /// Loads the whole mirror.
    pub fn load(&self) -> Result<MirrorCopy, SnapshotError> {
        let mut copy = MirrorCopy::default();
        let Some(p) = self.pointer()? else {
            return Ok(copy);
        };
        for item in self.tree(p.generation)?.iter() {
            let (k, v) = item.map_err(|e| self.storage(e))?;
            let id = |prefix: &str| DirectoryId(String::from_utf8_lossy(&k[prefix.len()..]).into());
            if k.starts_with(USER.as_bytes()) {
                let u = serde_json::from_slice(&v).map_err(|e| self.corrupt(&k, e))?;
                copy.users.insert(id(USER), u);
            } else if k.starts_with(GROUP.as_bytes()) {
                let g = serde_json::from_slice(&v).map_err(|e| self.corrupt(&k, e))?;
                copy.groups.insert(id(GROUP), g);
            } else if k.starts_with(DISABLED.as_bytes()) {
                copy.disabled.insert(id(DISABLED));
            } else if k.starts_with(SYNC.as_bytes()) {
                copy.sync.insert(
                    id(SYNC),
                    DirectoryId(String::from_utf8_lossy(&v).into_owned()),
                );
            }
        }
        Ok(copy)
    }

    /// Writes a delta and the new record in one batch.
    pub fn commit_delta(&self, writes: Writes, meta: &MirrorMeta) -> Result<(), SnapshotError> {
        let p = self.pointer()?.unwrap_or_default();
        let mut batch = sled::Batch::default();
        for (k, v) in writes.puts {
            batch.insert(k.as_bytes(), v);
        }
        for k in writes.removes {
            batch.remove(k.as_bytes());
        }
        batch.insert(META_KEY, encode(meta, &self.path)?);
        self.tree(p.generation)?
            .apply_batch(batch)
            .map_err(|e| self.storage(e))
    }

    /// Starts a new generation, to be filled by a full read; the current one stays in use
    /// until [`Rebuild::finish`].
    pub fn rebuild(&self) -> Result<Rebuild, SnapshotError> {
        let current = self.pointer()?;
        let generation = current.map_or(1, |p| p.generation + 1);
        // A generation a crash left half-filled is dropped first.
        let _ = self.db.drop_tree(format!("mirror/{generation}"));
        Ok(Rebuild {
            tree: self.tree(generation)?,
            generation,
            previous: current.map(|p| p.generation),
            mirror: Mirror {
                db: self.db.clone(),
                path: self.path.clone(),
            },
            failed: None,
            users: 0,
            groups: 0,
            vendor: String::new(),
        })
    }

    /// Forgets the mirror (a full read is needed next).
    pub fn forget(&self) -> Result<(), SnapshotError> {
        let meta = self.db.open_tree("meta").map_err(|e| self.storage(e))?;
        if let Some(p) = self.pointer()? {
            meta.remove(POINTER_KEY).map_err(|e| self.storage(e))?;
            let _ = self.db.drop_tree(format!("mirror/{}", p.generation));
        }
        Ok(())
    }
}

/// The kinds of entry the mirror holds.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    Users,
    Groups,
}

impl Kind {
    fn prefix(self) -> &'static str {
        match self {
            Kind::Users => USER,
            Kind::Groups => GROUP,
        }
    }
}

/// A new generation being filled by a full read.
pub struct Rebuild {
    tree: sled::Tree,
    generation: u64,
    previous: Option<u64>,
    mirror: Mirror,
    failed: Option<String>,
    pub users: usize,
    pub groups: usize,
    /// The server's `vendorName`, for the record ([`MirrorMeta::vendor`]).
    pub vendor: String,
}

impl Rebuild {
    fn put<T: Serialize>(&mut self, key: String, value: &T) {
        if self.failed.is_some() {
            return;
        }
        let done = serde_json::to_vec(value)
            .map_err(|e| e.to_string())
            .and_then(|b| self.tree.insert(key, b).map_err(|e| e.to_string()));
        if let Err(e) = done {
            self.failed = Some(e);
        }
    }

    /// A user of the full read, as final (attributes complete, disabled known).
    pub fn user(&mut self, user: &DirectoryUser) {
        #[derive(Serialize)]
        struct UserRef<'a> {
            dn: &'a str,
            attrs: &'a Attributes,
            #[serde(skip_serializing_if = "<[String]>::is_empty")]
            invalid_utf8: &'a [String],
        }
        let id = &user.id;
        let entry = UserRef {
            dn: &user.dn,
            attrs: &user.attrs,
            invalid_utf8: &user.invalid_utf8,
        };
        self.put(format!("{USER}{id}"), &entry);
        if user.disabled {
            self.put(format!("{DISABLED}{id}"), &());
        }
        self.users += 1;
    }

    /// The feed's id of an entry, where it is not the entry's own id.
    pub fn sync_id(&mut self, sync: &DirectoryId, id: &DirectoryId) {
        if sync != id && self.failed.is_none() {
            if let Err(e) = self.tree.insert(format!("{SYNC}{sync}"), id.0.as_bytes()) {
                self.failed = Some(e.to_string());
            }
        }
    }

    /// A group of the full read, its members still DNs.
    pub fn group(&mut self, id: &DirectoryId, dn: &str, attrs: &Attributes) {
        #[derive(Serialize)]
        struct GroupRef<'a> {
            dn: &'a str,
            attrs: &'a Attributes,
        }
        self.put(format!("{GROUP}{id}"), &GroupRef { dn, attrs });
        self.groups += 1;
    }

    /// Makes the new generation the mirror, with `meta` (its cookies and counts).
    pub fn finish(self, meta: &MirrorMeta) -> Result<(), SnapshotError> {
        let m = &self.mirror;
        if let Some(e) = self.failed {
            let _ = m.db.drop_tree(format!("mirror/{}", self.generation));
            return Err(SnapshotError::Storage {
                path: m.path.clone(),
                source: e.into(),
            });
        }
        self.tree
            .insert(META_KEY, encode(meta, &m.path)?)
            .map_err(|e| m.storage(e))?;
        // The new tree reaches the disk before the pointer names it.
        self.tree.flush().map_err(|e| m.storage(e))?;
        let pointer = Pointer {
            generation: self.generation,
        };
        m.db.open_tree("meta")
            .and_then(|t| t.insert(POINTER_KEY, encode(&pointer, &m.path).unwrap_or_default()))
            .map_err(|e| m.storage(e))?;
        if let Some(old) = self.previous {
            let _ = m.db.drop_tree(format!("mirror/{old}"));
        }
        Ok(())
    }

    /// Throws the new generation away (the read failed).
    pub fn abandon(self) {
        let _ = self
            .mirror
            .db
            .drop_tree(format!("mirror/{}", self.generation));
    }
}

fn encode<T: Serialize>(value: &T, path: &std::path::Path) -> Result<Vec<u8>, SnapshotError> {
    serde_json::to_vec(value).map_err(|e| SnapshotError::Encode {
        path: path.to_path_buf(),
        source: e,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(dn: &str) -> MirrorUser {
        MirrorUser {
            dn: dn.into(),
            attrs: Attributes::new(),
            invalid_utf8: vec![],
        }
    }

    #[test]
    fn a_present_phase_removes_what_it_does_not_name_and_resent_values_do_not_count() {
        let id = |s: &str| DirectoryId(s.into());
        let mut copy = MirrorCopy::default();
        copy.users.insert(id("a"), user("uid=a"));
        copy.users.insert(id("b"), user("uid=b"));
        copy.users.insert(id("c"), user("uid=c"));
        let delta = Delta {
            users: Changes {
                changed: vec![(id("a"), user("uid=a")), (id("d"), user("uid=d"))],
                present: Some([id("a"), id("b"), id("d")].into()),
                ..Changes::default()
            },
            ..Delta::default()
        };
        let w = copy.apply(delta).unwrap();
        assert_eq!(w.changed, 2, "c removed, d added; a unchanged");
        assert_eq!(
            copy.users.keys().cloned().collect::<Vec<_>>(),
            vec![id("a"), id("b"), id("d")]
        );
        assert_eq!(w.removes, vec!["u:c".to_string()]);
    }

    #[tokio::test]
    async fn a_rebuild_becomes_current_only_when_finished_and_a_delta_moves_entries_and_cookies_together(
    ) {
        let dir = tempfile::tempdir().unwrap();
        let snap = Snapshot::open(dir.path()).unwrap();
        let mirror = Mirror::of(&snap);
        assert!(mirror.meta().unwrap().is_none());
        let mut r = mirror.rebuild().unwrap();
        r.user(&DirectoryUser {
            id: DirectoryId("a".into()),
            dn: "uid=a".into(),
            attrs: Attributes::new(),
            disabled: true,
            invalid_utf8: vec![],
        });
        assert!(
            mirror.meta().unwrap().is_none(),
            "not current before finish"
        );
        let meta = MirrorMeta {
            kind: "syncrepl".into(),
            seq: 1,
            users: 1,
            ..MirrorMeta::default()
        };
        r.finish(&meta).unwrap();
        assert_eq!(mirror.meta().unwrap().unwrap().seq, 1);
        let mut copy = mirror.load().unwrap();
        assert!(copy.disabled.contains(&DirectoryId("a".into())));
        let w = copy
            .apply(Delta {
                users: Changes {
                    deleted: [DirectoryId("a".into())].into(),
                    ..Changes::default()
                },
                disabled: Changes {
                    deleted: [DirectoryId("a".into())].into(),
                    ..Changes::default()
                },
                ..Delta::default()
            })
            .unwrap();
        let next = MirrorMeta { seq: 2, ..meta };
        mirror.commit_delta(w, &next).unwrap();
        assert_eq!(mirror.meta().unwrap().unwrap().seq, 2);
        assert!(mirror.load().unwrap().users.is_empty());
        mirror.forget().unwrap();
        assert!(mirror.meta().unwrap().is_none());
    }
}
