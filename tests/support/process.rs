//! A child process owned by a test: stopped by its PID when dropped, and always reaped.
//!
//! Signals are sent only while the child is not yet reaped, so its PID cannot have been reused
//! by another process: the harness never signals anything it did not start.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use super::wait_until;

/// How long a process gets to exit after SIGTERM before it is sent SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(2);

/// A running child process whose stdout and stderr go to a log file.
pub struct Process {
    name: String,
    child: Child,
    log: PathBuf,
    status: Option<ExitStatus>,
}

impl Process {
    /// Spawns `command` with stdin closed and stdout + stderr appended to `log`.
    ///
    /// Panics when it cannot be spawned.
    pub fn spawn(name: &str, command: &mut Command, log: &Path) -> Process {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("open {}: {e}", log.display()));
        let err = out.try_clone().expect("clone log file handle");
        command.stdout(out).stderr(err);
        Process::spawn_configured(name, command, log)
    }

    /// Spawns `command` with stdin closed, keeping the stdout and stderr it was configured with;
    /// `log` is the file [`Process::log`] reads.
    pub fn spawn_configured(name: &str, command: &mut Command, log: &Path) -> Process {
        let child = command
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name} ({command:?}): {e}"));
        Process {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
            status: None,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the process wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log file's path.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Its exit status if it has exited (reaping it), `None` while it runs.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .unwrap_or_else(|e| panic!("wait for {}: {e}", self.name));
        }
        self.status
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        self.exit_status().is_none()
    }

    /// Sends a signal by name (`"TERM"`, `"HUP"`, …) if it is still running.
    pub fn signal(&mut self, signal: &str) {
        if !self.is_running() {
            return;
        }
        // `kill` from procps: no unsafe code and no extra dependency.
        let _ = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    /// Waits up to `timeout` for it to exit; returns its status if it did.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_until(timeout, || !self.is_running());
        self.exit_status()
    }

    /// SIGTERM, then SIGKILL if it is still running after 2 s; waits for it and returns its status.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal("TERM");
        if let Some(status) = self.wait_timeout(TERM_GRACE) {
            return status;
        }
        self.kill()
    }

    /// SIGKILL, then waits for it and returns its status.
    pub fn kill(&mut self) -> ExitStatus {
        if let Some(status) = self.exit_status() {
            return status;
        }
        let _ = self.child.kill();
        let status = self
            .child
            .wait()
            .unwrap_or_else(|e| panic!("wait for {}: {e}", self.name));
        self.status = Some(status);
        status
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// Whether no process with this PID exists any more (it exited and was reaped).
pub fn is_reaped(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}
