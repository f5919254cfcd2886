//! One instance per state directory: `run`, `sync` and `approve` hold an exclusive advisory
//! lock (`flock`) on `<state_dir>/ldap2scim.lock` for as long as they live. The file names the
//! holder (PID and command) so a second instance can say who is in the way. The kernel drops
//! the lock when the holder exits, however it exits, so a stale file never blocks anyone.
//!
//! This module never waits for a lock and never removes another process's lock file.
//!
//! It also owns how private the state directory is: the directory 0700, what lives in it
//! 0600, whatever the umask (systemd's `UMask=0077` and `StateDirectoryMode=0700` say the
//! same; outside systemd nothing else would).

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::clock::Clock;

pub const LOCK_FILE: &str = "ldap2scim.lock";

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("state directory {dir} is in use by ldap2scim ({holder}); wait for it to finish or stop it, or give this one another daemon.state_dir")]
    Busy { dir: PathBuf, holder: String },
    #[error("cannot lock the state directory {dir} (daemon.state_dir): {reason}")]
    Io { dir: PathBuf, reason: String },
}

/// The held lock; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct StateLock {
    _file: File,
    path: PathBuf,
}

impl StateLock {
    /// Transitional: [`acquire_at`](Self::acquire_at) with the environment's clock, for the
    /// callers that have no clock handed to them yet.
    pub fn acquire(state_dir: &Path, command: &str) -> Result<StateLock, LockError> {
        Self::acquire_at(state_dir, command, &Clock::from_env())
    }

    /// Takes the lock of `state_dir` (created if missing) for `command` (`run`, `sync`, …),
    /// stamped with `clock`'s time.
    pub fn acquire_at(
        state_dir: &Path,
        command: &str,
        clock: &Clock,
    ) -> Result<StateLock, LockError> {
        let io = |e: std::io::Error| LockError::Io {
            dir: state_dir.to_path_buf(),
            reason: e.to_string(),
        };
        private_dir(state_dir).map_err(io)?;
        let path = state_dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        restrict(&path, 0o600).map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(LockError::Busy {
                    dir: state_dir.to_path_buf(),
                    holder: describe_holder(&mut file),
                })
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        let record = format!(
            "pid {}\ncommand {command}\nsince {}\n",
            std::process::id(),
            clock.now().to_rfc3339()
        );
        file.set_len(0).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        file.write_all(record.as_bytes()).map_err(io)?;
        file.flush().map_err(io)?;
        Ok(StateLock { _file: file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Creates `dir` (and missing parents) as 0700, or makes an existing one 0700. A directory
/// this user may write but not chmod (an operator's choice) is used as it is, with a warning.
/// Writes `content` to `path` (0600) through a temporary file beside it, synced before the
/// rename: a crash leaves the old file or the new one, never half of one.
pub fn write_private_file(path: &Path, content: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    std::io::Write::write_all(&mut f, content)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    if let Err(e) = restrict(dir, 0o700) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot make the state directory private (0700)");
    }
    Ok(())
}

/// Makes `root` and everything under it private: directories 0700, files 0600.
pub fn private_tree(root: &Path) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(root)?;
    if meta.is_dir() {
        restrict(root, 0o700)?;
        for entry in std::fs::read_dir(root)? {
            private_tree(&entry?.path())?;
        }
        Ok(())
    } else if meta.is_file() {
        restrict(root, 0o600)
    } else {
        Ok(())
    }
}

/// Sets `path`'s permission bits to `mode` unless they already are (a chmod only when needed,
/// so a state directory someone else created but we may use is left alone when it is private).
pub fn restrict(path: &Path, mode: u32) -> std::io::Result<()> {
    let current = std::fs::metadata(path)?.permissions().mode() & 0o7777;
    if current == mode {
        return Ok(());
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// Who holds the lock of `state_dir` right now, if anyone (for `status`).
pub fn holder(state_dir: &Path) -> Option<String> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(state_dir.join(LOCK_FILE))
        .ok()?;
    match file.try_lock() {
        // Nobody holds it; ours is released when `file` is dropped.
        Ok(()) => None,
        Err(TryLockError::WouldBlock) => Some(describe_holder(&mut file)),
        Err(TryLockError::Error(_)) => None,
    }
}

/// "pid N, `command`" from the lock file's text.
fn describe_holder(file: &mut File) -> String {
    let mut text = String::new();
    let _ = file.seek(SeekFrom::Start(0));
    let _ = file.read_to_string(&mut text);
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
    };
    match (field("pid "), field("command ")) {
        (Some(pid), Some(cmd)) => format!("pid {pid}, `{cmd}`"),
        (Some(pid), None) => format!("pid {pid}"),
        _ => "another process".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clock() -> Clock {
        Clock::fixed(
            chrono::DateTime::parse_from_rfc3339("2100-06-01T00:00:00Z")
                .unwrap()
                .to_utc(),
        )
    }

    #[test]
    fn a_second_holder_is_told_who_holds_it_and_the_lock_frees_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let first = StateLock::acquire_at(dir.path(), "sync", &clock()).unwrap();
        let err = StateLock::acquire_at(dir.path(), "run", &clock())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!(
                "is in use by ldap2scim (pid {}, `sync`)",
                std::process::id()
            )),
            "{err}"
        );
        assert!(holder(dir.path()).unwrap().contains("`sync`"));
        let record = std::fs::read_to_string(dir.path().join(LOCK_FILE)).unwrap();
        assert!(
            record.contains("since 2100-06-01T00:00:00+00:00"),
            "{record}"
        );
        drop(first);
        assert_eq!(holder(dir.path()), None);
        let again = StateLock::acquire_at(dir.path(), "run", &clock()).unwrap();
        assert!(again.path().ends_with(LOCK_FILE));
    }

    #[test]
    fn the_state_directory_and_the_lock_file_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        let state = dir.path().join("a/state");
        let lock = StateLock::acquire_at(&state, "sync", &clock()).unwrap();
        assert_eq!(mode(&state), 0o700);
        assert_eq!(mode(lock.path()), 0o600);
        drop(lock);
        // An existing, open one is closed down.
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
        std::fs::set_permissions(
            state.join(LOCK_FILE),
            std::fs::Permissions::from_mode(0o666),
        )
        .unwrap();
        let lock = StateLock::acquire_at(&state, "sync", &clock()).unwrap();
        assert_eq!(mode(&state), 0o700);
        assert_eq!(mode(lock.path()), 0o600);
        std::fs::write(state.join("f"), "x").unwrap();
        std::fs::create_dir(state.join("d")).unwrap();
        private_tree(&state).unwrap();
        assert_eq!(mode(&state.join("f")), 0o600);
        assert_eq!(mode(&state.join("d")), 0o700);
    }
}
