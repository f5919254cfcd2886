//! Runs the ldap2scim binary under test, as a command (`sync`, `plan`, …) or as the daemon.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use super::{temp_dir, Process, TempDir};

/// How long one ldap2scim command may run before the test fails.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);

/// The path of the ldap2scim binary cargo built for these tests.
pub fn ldap2scim_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ldap2scim"))
}

/// Runs `ldap2scim --config CONFIG ARGS…` and returns its exit code and output.
pub fn ldap2scim(config: &Path, args: &[&str]) -> Output {
    Ldap2scim::new(config).args(args).run()
}

/// What a finished ldap2scim command returned.
#[derive(Clone, Debug)]
pub struct Output {
    /// The exit code; -1 if it was killed by a signal.
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// Whether it exited with 0.
    pub fn success(&self) -> bool {
        self.code == 0
    }

    /// Parses stdout as JSON (e.g. `plan --format json`); panics with the output if it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{self}"))
    }

    /// Panics with the whole output unless the exit code is `code`; returns `self` for chaining.
    pub fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(self.code, code, "unexpected exit code:\n{self}");
        self
    }
}

impl fmt::Display for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "exit code {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// A builder for one ldap2scim invocation: `Ldap2scim::new(cfg).args(["sync"]).env("K", "V").run()`.
pub struct Ldap2scim {
    command: Command,
    timeout: Duration,
}

impl Ldap2scim {
    /// `ldap2scim --config CONFIG`, with no command yet.
    pub fn new(config: &Path) -> Ldap2scim {
        let mut command = Command::new(ldap2scim_binary());
        command.arg("--config").arg(config);
        Ldap2scim {
            command,
            timeout: COMMAND_TIMEOUT,
        }
    }

    /// Appends one argument.
    pub fn arg(mut self, arg: &str) -> Self {
        self.command.arg(arg);
        self
    }

    /// Appends arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        self.command.args(args);
        self
    }

    /// Sets an environment variable for the process.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.command.env(key, value);
        self
    }

    /// Fails the test if the command runs longer than this (default 300 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Runs it to completion and returns its exit code and output.
    /// Panics (after killing it) if it outlives the timeout.
    pub fn run(self) -> Output {
        let timeout = self.timeout;
        let mut daemon = self.spawn();
        if daemon.process.wait_timeout(timeout).is_none() {
            daemon.process.kill();
            panic!(
                "ldap2scim ran longer than {timeout:?}:\n{}",
                daemon.output(None)
            );
        }
        daemon.finish()
    }

    /// Starts it in the background (e.g. `run`, the daemon); stdout and stderr go to files.
    pub fn spawn(mut self) -> Daemon {
        let dir = temp_dir("run");
        let stdout = dir.path().join("stdout");
        let stderr = dir.path().join("stderr");
        let out = std::fs::File::create(&stdout).expect("create stdout file");
        let err = std::fs::File::create(&stderr).expect("create stderr file");
        self.command.stdout(out).stderr(err);
        let process = Process::spawn_configured("ldap2scim", &mut self.command, &stderr);
        Daemon {
            process,
            stdout,
            stderr,
            _dir: dir,
        }
    }
}

/// An ldap2scim process running in the background; SIGTERM (then SIGKILL) when dropped.
pub struct Daemon {
    process: Process,
    stdout: PathBuf,
    stderr: PathBuf,
    _dir: TempDir,
}

impl Daemon {
    /// Its process id.
    /// `run --now` with `config`, once it watches the directory live (after its first cycle).
    pub fn watching(config: &Path) -> Daemon {
        let daemon = Ldap2scim::new(config).args(["run", "--now"]).spawn();
        let watching = super::wait_until(Duration::from_secs(30), || {
            daemon.stderr().contains("live: watching the directory")
        });
        assert!(
            watching,
            "the daemon did not start watching:\n{}",
            daemon.stderr()
        );
        daemon
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// Sends a signal by name: `"HUP"` (reload), `"TERM"` (stop), …
    pub fn signal(&mut self, signal: &str) {
        self.process.signal(signal);
    }

    /// What it wrote to stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// What it wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits up to `timeout` for it to exit by itself; its output if it did.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<Output> {
        let status = self.process.wait_timeout(timeout)?;
        Some(self.output(Some(status)))
    }

    /// SIGTERM (SIGKILL after 2 s), then its exit code and output.
    pub fn stop(mut self) -> Output {
        let status = self.process.terminate();
        self.output(Some(status))
    }

    /// Waits for it to exit (it must not run forever) and returns its output.
    fn finish(mut self) -> Output {
        let status = self.process.terminate();
        self.output(Some(status))
    }

    fn output(&self, status: Option<ExitStatus>) -> Output {
        Output {
            code: status.and_then(|s| s.code()).unwrap_or(-1),
            stdout: self.stdout(),
            stderr: self.stderr(),
        }
    }
}
