//! Getting a pass ready: the snapshot opens and each target's rows load on the blocking pool
//! while the directory is read, and users are mapped for every target as they stream in
//! ([`StreamingMap`]), so the directory never has to hold every user's attributes and the
//! mapping never waits for the whole read. What comes out, per target, is [`Prepared`]: its
//! desired resources, snapshot tree and rows, with attributes loaded only where a diff needs
//! them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use tracing::debug;

use crate::config::{GroupScope, TargetConfig};
use crate::map::{self, Desired};
use crate::model::{Directory, DirectoryId, DirectoryUser};
use crate::outcome::TargetFailure;
use crate::snapshot::{Snapshot, SnapshotError, TargetSnapshot, TargetState};

/// A target's snapshot rows (and its tree, absent in a dry run without one), or why not.
type Loaded = Result<(Option<TargetSnapshot>, TargetState), TargetFailure>;

/// A user mapped while the directory was read, or why it cannot be mapped.
type Mapped = Result<map::DesiredUser, String>;

/// A target's desired resources, snapshot tree and rows, ready to plan; or why not.
pub type Prepared = Result<(Desired, Option<TargetSnapshot>, TargetState), TargetFailure>;

/// The snapshot opening in the background, and each target's rows as they load.
pub struct Opening {
    task: tokio::task::JoinHandle<Result<Option<Snapshot>, SnapshotError>>,
    cells: Vec<Arc<OnceLock<Loaded>>>,
    path: PathBuf,
}

impl Opening {
    /// Opens the snapshot (a dry run never creates one) and loads the rows of `targets`.
    pub fn start(state_dir: &Path, dry_run: bool, targets: &[&TargetConfig]) -> Opening {
        let cells: Vec<Arc<OnceLock<Loaded>>> = targets.iter().map(|_| Arc::default()).collect();
        let task = {
            let state_dir = state_dir.to_path_buf();
            let names: Vec<String> = targets.iter().map(|t| t.name.0.clone()).collect();
            let cells = cells.clone();
            tokio::task::spawn_blocking(move || {
                let snapshot = open(&state_dir, dry_run)?;
                load(snapshot, dry_run, &names, &cells, None)
            })
        };
        Opening {
            task,
            cells,
            path: state_dir.to_path_buf(),
        }
    }

    /// Loads the rows of `targets` from a snapshot opened already (with `narrow`, only those
    /// users' rows: a fast delta).
    pub fn with_snapshot(
        snapshot: Option<Snapshot>,
        dry_run: bool,
        targets: &[&TargetConfig],
        narrow: Option<BTreeSet<DirectoryId>>,
    ) -> Opening {
        let cells: Vec<Arc<OnceLock<Loaded>>> = targets.iter().map(|_| Arc::default()).collect();
        let path = snapshot
            .as_ref()
            .map(|s| s.path().to_path_buf())
            .unwrap_or_default();
        let task = {
            let names: Vec<String> = targets.iter().map(|t| t.name.0.clone()).collect();
            let cells = cells.clone();
            tokio::task::spawn_blocking(move || {
                load(snapshot, dry_run, &names, &cells, narrow.as_ref())
            })
        };
        Opening { task, cells, path }
    }

    /// Waits for the opening; each target's rows, or why they could not be loaded.
    pub async fn finish(self) -> Result<(Option<Snapshot>, Vec<Loaded>), SnapshotError> {
        let snapshot = match self.task.await {
            Ok(opened) => opened?,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => {
                return Err(SnapshotError::Open {
                    path: self.path,
                    reason: format!("opening was interrupted ({e})"),
                })
            }
        };
        let loaded = self
            .cells
            .into_iter()
            .map(|cell| {
                Arc::try_unwrap(cell)
                    .ok()
                    .and_then(OnceLock::into_inner)
                    .unwrap_or_else(|| {
                        Err(TargetFailure::Other("loading the snapshot failed".into()))
                    })
            })
            .collect();
        Ok((snapshot, loaded))
    }
}

/// Maps users for every target as the directory streams in (targets with `scope_groups`
/// wait for the groups). A user whose snapshot row (if already loaded) has the same hash
/// keeps no attributes in its desired form; when every target mapped it, the directory
/// keeps none of its attributes either.
pub struct StreamingMap {
    /// With a fast delta: the users it touches, the only ones each target plans.
    pub narrow: Option<BTreeSet<DirectoryId>>,
    /// Keep every user's attributes after mapping (`--only` finds its entries by name).
    pub keep_attributes: bool,
    /// Users by DN, when some target maps the manager (see [`map::Managers`]).
    pub managers: Option<map::Managers>,
    mappers: Vec<Option<map::UserMapper>>,
    mapped: Vec<Vec<Mapped>>,
    cells: Vec<Arc<OnceLock<Loaded>>>,
}

impl StreamingMap {
    pub fn new(targets: &[&TargetConfig], opening: &Opening) -> StreamingMap {
        StreamingMap {
            narrow: None,
            keep_attributes: false,
            managers: targets
                .iter()
                .any(|t| t.maps_manager())
                .then(map::Managers::default),
            mappers: targets
                .iter()
                .map(|t| t.scope_groups.is_empty().then(|| map::UserMapper::new(t)))
                .collect(),
            mapped: targets.iter().map(|_| Vec::new()).collect(),
            cells: opening.cells.clone(),
        }
    }

    /// Called by the directory read for each user as it arrives.
    pub fn on_user(&mut self, user: &mut DirectoryUser) {
        if let Some(managers) = &mut self.managers {
            managers.insert(&user.dn, &user.id);
        }
        for ((mapper, out), cell) in self.mappers.iter().zip(&mut self.mapped).zip(&self.cells) {
            let Some(mapper) = mapper else { continue };
            let mut mapped = mapper.map(user);
            // With the rows loaded, an unchanged user drops its attributes now; otherwise they
            // wait (packed, a few hundred bytes) until `map::desired_premapped` can tell.
            if let (Ok(u), Some(Ok((_, state)))) = (&mut mapped, cell.get()) {
                if state.users.get(&u.id).is_some_and(|row| row.hash == u.hash)
                    && !map::keeps_attributes(mapper.maps_manager(), u)
                {
                    u.attrs = map::no_attrs();
                }
            }
            out.push(mapped);
        }
        if self.mappers.iter().all(Option::is_some) && !self.keep_attributes {
            user.attrs = Default::default();
        }
    }

    /// Waits for the snapshot, maps every target now (from what streamed in, or from the
    /// whole read where a target has `scope_groups`), then lets go of the directory: from
    /// here on only the desired resources count, so the apply phase does not hold the read
    /// as well.
    pub async fn finish(
        self,
        targets: &[&TargetConfig],
        mut directory: Directory,
        opening: Opening,
    ) -> Result<(Option<Snapshot>, Vec<Prepared>), SnapshotError> {
        let StreamingMap {
            narrow,
            keep_attributes: _,
            managers: _,
            mappers,
            mapped,
            cells,
        } = self;
        // The rows are the opening's to hand over now.
        drop(cells);
        let (snapshot, loaded) = opening.finish().await?;
        let started = std::time::Instant::now();
        // The last target takes the groups' member sets instead of copying them, when nothing
        // reads the directory after it: it must be the last one of all, and mapped on the fly
        // (a target with scope_groups reads the member sets to find its scope).
        let taker = targets
            .len()
            .checked_sub(1)
            .filter(|&last| mappers[last].is_some() && targets[last].groups != GroupScope::None);
        let mut prepared = Vec::with_capacity(targets.len());
        for (i, ((t, rows), (mapped, mapper))) in targets
            .iter()
            .zip(loaded)
            .zip(mapped.into_iter().zip(&mappers))
            .enumerate()
        {
            let members = (taker == Some(i)).then(|| {
                directory
                    .groups
                    .iter_mut()
                    .map(|g| std::mem::take(&mut g.members))
                    .collect()
            });
            prepared.push(prepare(
                t,
                &directory,
                rows,
                mapper.is_some().then_some(mapped),
                members,
                narrow.as_ref(),
            ));
        }
        drop_in_background(directory);
        debug!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            rss_mib = crate::memory::rss_mib(),
            "mapped and snapshot loaded"
        );
        Ok((snapshot, prepared))
    }
}

/// Opens the snapshot (`None`: a dry run before any sync).
fn open(state_dir: &Path, dry_run: bool) -> Result<Option<Snapshot>, SnapshotError> {
    let opened = std::time::Instant::now();
    let snapshot = if dry_run {
        Snapshot::open_existing(state_dir)?
    } else {
        Some(Snapshot::open(state_dir)?)
    };
    debug!(
        elapsed_ms = opened.elapsed().as_millis() as u64,
        "snapshot opened"
    );
    Ok(snapshot)
}

/// Opens the snapshot on the blocking pool, for a pass that needs it before the read.
pub async fn open_snapshot(
    state_dir: &Path,
    dry_run: bool,
) -> Result<Option<Snapshot>, SnapshotError> {
    let dir = state_dir.to_path_buf();
    match tokio::task::spawn_blocking(move || open(&dir, dry_run)).await {
        Ok(opened) => opened,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(SnapshotError::Open {
            path: state_dir.to_path_buf(),
            reason: format!("opening was interrupted ({e})"),
        }),
    }
}

/// Loads each target's rows into its cell, in the background of the directory read.
fn load(
    snapshot: Option<Snapshot>,
    dry_run: bool,
    names: &[String],
    cells: &[Arc<OnceLock<Loaded>>],
    narrow: Option<&BTreeSet<DirectoryId>>,
) -> Result<Option<Snapshot>, SnapshotError> {
    for (name, cell) in names.iter().zip(cells) {
        // A dry run never creates a target's tree: no tree means no rows.
        let snap = snapshot.as_ref().filter(|s| !dry_run || s.has_target(name));
        let loaded = match snap.map(|s| s.target(name)) {
            Some(Ok(ts)) => match narrow {
                Some(ids) => snap
                    .map_or(Ok(None), |s| s.row_counts(name))
                    .and_then(|recorded| ts.load_narrow(ids, recorded, !dry_run)),
                None => ts.load(),
            }
            .map(|st| (Some(ts), st))
            .map_err(Into::into),
            Some(Err(e)) => Err(e.into()),
            None => Ok((None, TargetState::default())),
        };
        let _ = cell.set(loaded);
    }
    Ok(snapshot)
}

/// Maps the directory for `target` and completes its snapshot rows: attribute-level diffs are
/// needed only where the hashes differ (and for leavers), so only those rows' attributes are
/// loaded, and a desired user whose hash matches its row keeps no attributes either.
fn prepare(
    target: &TargetConfig,
    directory: &Directory,
    rows: Loaded,
    premapped: Option<Vec<Mapped>>,
    members: Option<Vec<BTreeSet<DirectoryId>>>,
    narrow: Option<&BTreeSet<DirectoryId>>,
) -> Prepared {
    let (tsnap, mut state) = rows?;
    if let Some(ids) = narrow {
        if state.narrowed_from.is_none() {
            state.narrowed_from = Some(crate::snapshot::RowCounts {
                users: state.users.len(),
                groups: state.groups.len(),
            });
        }
        state.users.retain(|id, _| ids.contains(id));
    }
    let unchanged =
        |id: &DirectoryId, hash: &str| state.users.get(id).is_some_and(|row| row.hash == hash);
    let desired = match premapped {
        Some(mapped) => map::desired_premapped(directory, target, mapped, unchanged, members),
        None => map::desired_with(directory, target, unchanged)?,
    };
    // Both maps are in id order: one merge.
    let mut wanted = desired.users.iter().peekable();
    let stale: Vec<DirectoryId> = state
        .users
        .iter()
        .filter(|(id, row)| {
            while wanted.next_if(|(k, _)| k < id).is_some() {}
            wanted
                .next_if(|(k, _)| k == id)
                .is_none_or(|(_, want)| want.hash != row.hash)
        })
        .map(|(id, _)| id.clone())
        .collect();
    if let Some(ts) = &tsnap {
        ts.load_attrs(&mut state, &stale)?;
    }
    Ok((desired, tsnap, state))
}

/// Frees a large structure (100,000 entries take tens of milliseconds to free) on the
/// blocking pool, while the cycle goes on.
pub fn drop_in_background<T: Send + 'static>(value: T) {
    tokio::task::spawn_blocking(move || drop(value));
}
