//! One instance per state directory: `run`, `sync` and `approve` hold an exclusive advisory
//! lock (`flock`) on `<state_dir>/ldap2scim.lock` for as long as they live. The file names the
//! holder (PID and command) so a second instance can say who is in the way. The kernel drops
//! the lock when the holder exits, however it exits, so a stale file never blocks anyone.
//!
//! This module never waits for a lock and never removes another process's lock file.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

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
    /// Takes the lock of `state_dir` (created if missing) for `command` (`run`, `sync`, …).
    pub fn acquire(state_dir: &Path, command: &str) -> Result<StateLock, LockError> {
        let io = |e: std::io::Error| LockError::Io {
            dir: state_dir.to_path_buf(),
            reason: e.to_string(),
        };
        std::fs::create_dir_all(state_dir).map_err(io)?;
        let path = state_dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
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
            chrono::Utc::now().to_rfc3339()
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

    #[test]
    fn a_second_holder_is_told_who_holds_it_and_the_lock_frees_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let first = StateLock::acquire(dir.path(), "sync").unwrap();
        let err = StateLock::acquire(dir.path(), "run")
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
        drop(first);
        assert_eq!(holder(dir.path()), None);
        let again = StateLock::acquire(dir.path(), "run").unwrap();
        assert!(again.path().ends_with(LOCK_FILE));
    }
}
