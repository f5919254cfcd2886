//! A throwaway PostgreSQL server per test (Debian's packages, no cluster tooling), in its own
//! temporary directory.
//!
//! The binaries come from `/usr/lib/postgresql/<major>/bin` (the highest major installed, see
//! `scripts/install-deps.sh`). `initdb` and `postgres` refuse to run as root, so when the tests
//! are root they run as the `postgres` system user through `setpriv`, which execs: the child we
//! hold is the postmaster itself. The data and socket directories belong to that user; the
//! temporary directory is made traversable for it. The server listens on 127.0.0.1 only, with
//! `trust` authentication for the `postgres` superuser, and without fsync (throwaway data).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, temp_dir, Process, TempDir, START_ATTEMPTS};

/// How long the server may take to accept connections after it was spawned (crash recovery
/// included, on a busy machine).
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a fast shutdown (SIGINT) may take before the postmaster is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// The superuser `initdb` creates, and the system user the server runs as when we are root.
const SUPERUSER: &str = "postgres";

/// A running PostgreSQL server on 127.0.0.1; stopped (fast shutdown) and removed when dropped.
///
/// One superuser, `postgres`, with `trust` authentication (no password) on loopback; the
/// default databases only (`postgres`, `template0`, `template1`), see
/// [`Postgres::create_database`].
pub struct Postgres {
    // Field order matters: the process stops before its directory is removed.
    process: Process,
    port: u16,
    bin: PathBuf,
    as_postgres: bool,
    dir: TempDir,
}

impl Postgres {
    /// Initialises a fresh cluster and starts it on a random loopback port.
    ///
    /// Panics, with the log, if PostgreSQL is not installed or does not start.
    pub fn start() -> Postgres {
        let bin = postgres_bin_dir();
        let as_postgres = is_root();
        let dir = temp_dir("postgres");
        let data = dir.path().join("data");
        let socket = dir.path().join("socket");
        for sub in [&data, &socket] {
            std::fs::create_dir(sub).unwrap_or_else(|e| panic!("create {}: {e}", sub.display()));
        }
        if as_postgres {
            // The postgres user must reach its directories inside our (0700) temporary one.
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))
                .expect("make the temporary directory traversable");
            let (uid, gid) = postgres_ids();
            for sub in [&data, &socket] {
                std::os::unix::fs::chown(sub, Some(uid), Some(gid))
                    .unwrap_or_else(|e| panic!("chown {} to postgres: {e}", sub.display()));
            }
        }
        let out = pg_command(&bin, "initdb", as_postgres, dir.path())
            .args(["-A", "trust", "-U", SUPERUSER])
            .args(["-E", "UTF8", "--no-locale", "--no-sync"])
            .arg("-D")
            .arg(&data)
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        let mut dir = dir;
        for _ in 0..START_ATTEMPTS {
            let port = free_port();
            let process = spawn_postgres(&bin, as_postgres, dir.path(), port);
            let mut pg = Postgres {
                process,
                port,
                bin: bin.clone(),
                as_postgres,
                dir,
            };
            if pg.wait_ready() {
                return pg;
            }
            // The postmaster exits when its port is taken ("could not bind IPv4 address"):
            // try another one, with the same data directory.
            pg.stop();
            dir = std::mem::replace(&mut pg.dir, TempDir(None));
        }
        let log = std::fs::read_to_string(dir.path().join("postgres.log")).unwrap_or_default();
        panic!("postgres did not start after {START_ATTEMPTS} attempts; its log:\n{log}");
    }

    /// Polls until the server accepts connections on its own Unix socket and on its TCP port;
    /// false if it exited or did not answer in time.
    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + READY_TIMEOUT;
        let socket = self.socket_dir();
        while Instant::now() < deadline {
            if !self.process.is_running() {
                return false;
            }
            // The socket directory is ours alone, and the postmaster binds its TCP listener
            // (or exits) before it creates the socket, so an answer here means the port is ours.
            if self.pg_isready(&socket.to_string_lossy()) {
                return self.pg_isready("127.0.0.1");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    fn pg_isready(&self, host: &str) -> bool {
        Command::new(self.bin.join("pg_isready"))
            .args(["-q", "-t", "2", "-h", host, "-p", &self.port.to_string()])
            .args(["-U", SUPERUSER, "-d", "postgres"])
            .envs_cleared_of_pg()
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A libpq key=value connection string for database `db` as the superuser (no password:
    /// `trust`): `host=127.0.0.1 port=N user=postgres dbname=DB connect_timeout=5`.
    pub fn dsn(&self, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={SUPERUSER} dbname={} connect_timeout=5",
            self.port,
            conninfo_value(db)
        )
    }

    /// Creates database `name` (owned by the superuser). Panics if it cannot.
    pub fn create_database(&self, name: &str) {
        self.psql(
            "postgres",
            &format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\"")),
        );
    }

    /// Runs `sql` in database `db` with `psql -X -A -t -c` over TCP as the superuser and
    /// returns its stdout as is: unaligned, tuples only, one row a line, `|` between columns.
    /// Panics with psql's stderr if it fails (a statement error included).
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"])
            .args(["-d", &self.dsn(db)])
            .args(["-c", sql])
            .envs_cleared_of_pg()
            .stdin(Stdio::null())
            .output()
            .expect("run psql");
        if !out.status.success() {
            panic!(
                "psql failed ({}) in database {db}: {}\nsql:\n{sql}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The postmaster's process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Its temporary directory (`data/`, `socket/`, `postgres.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// What the server logged so far (every start appends to the same log).
    pub fn log(&self) -> String {
        self.process.log()
    }

    /// Whether the postmaster is still running.
    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// Fast shutdown (SIGINT to the postmaster: clients are disconnected, the data is
    /// checkpointed) and waits for it, with SIGKILL after 30 s; the directory stays until drop.
    pub fn stop(&mut self) {
        self.process.signal("INT");
        if self.process.wait_timeout(STOP_TIMEOUT).is_none() {
            self.process.kill();
        }
    }

    /// Starts the server again, after [`Postgres::stop`], on the same port and with the same
    /// data. Panics if it does not come back (e.g. another process took the port).
    pub fn start_again(&mut self) {
        self.stop();
        self.process = spawn_postgres(&self.bin, self.as_postgres, self.dir.path(), self.port);
        if !self.wait_ready() {
            panic!("postgres did not start again; its log:\n{}", self.log());
        }
    }

    fn socket_dir(&self) -> PathBuf {
        self.dir.path().join("socket")
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // SIGTERM (what `Process` sends) would wait for clients to disconnect.
        self.stop();
    }
}

fn spawn_postgres(bin: &Path, as_postgres: bool, dir: &Path, port: u16) -> Process {
    let mut cmd = pg_command(bin, "postgres", as_postgres, dir);
    cmd.arg("-D")
        .arg(dir.join("data"))
        .args(["-p", &port.to_string()])
        .args(["-c", "listen_addresses=127.0.0.1"])
        .arg("-c")
        .arg(format!(
            "unix_socket_directories={}",
            dir.join("socket").display()
        ))
        .args(["-c", "fsync=off"])
        .args(["-c", "synchronous_commit=off"])
        .args(["-c", "full_page_writes=off"]);
    Process::spawn("postgres", &mut cmd, &dir.join("postgres.log"))
}

/// `bin/tool`, run as the postgres user through `setpriv` (which execs, so the child is the
/// tool itself) when `as_postgres`, in `dir` (readable by that user), without `PG*` variables.
fn pg_command(bin: &Path, tool: &str, as_postgres: bool, dir: &Path) -> Command {
    let mut cmd = if as_postgres {
        let mut cmd = Command::new("setpriv");
        cmd.args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--",
        ])
        .arg(bin.join(tool));
        cmd
    } else {
        Command::new(bin.join(tool))
    };
    cmd.current_dir(dir).envs_cleared_of_pg();
    cmd
}

trait ClearPgEnv {
    /// Removes the `PG*` variables (PGHOST, PGDATA, PGOPTIONS…) a developer's shell may set.
    fn envs_cleared_of_pg(&mut self) -> &mut Self;
}

impl ClearPgEnv for Command {
    fn envs_cleared_of_pg(&mut self) -> &mut Self {
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PG") {
                self.env_remove(key);
            }
        }
        self
    }
}

/// `/usr/lib/postgresql/<major>/bin` of the highest major installed.
fn postgres_bin_dir() -> PathBuf {
    let root = Path::new("/usr/lib/postgresql");
    let best = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let major: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("postgres").is_file().then_some((major, bin))
        })
        .max_by_key(|(major, _)| *major);
    match best {
        Some((_, bin)) => bin,
        None => panic!(
            "PostgreSQL is not installed (no /usr/lib/postgresql/<major>/bin/postgres): \
             run scripts/install-deps.sh"
        ),
    }
}

/// Whether this process runs as root (the owner of `/proc/self` is our effective uid).
fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The uid and gid of the `postgres` system user.
fn postgres_ids() -> (u32, u32) {
    let id = |flag: &str| -> u32 {
        let out = Command::new("id")
            .args([flag, SUPERUSER])
            .output()
            .expect("run id");
        assert!(
            out.status.success(),
            "no postgres system user ({}): run scripts/install-deps.sh",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("numeric id")
    };
    (id("-u"), id("-g"))
}

/// `value` for a libpq key=value string: single-quoted (with `\` escapes) when it must be.
fn conninfo_value(value: &str) -> String {
    let plain = !value.is_empty()
        && !value
            .chars()
            .any(|c| c.is_whitespace() || c == '\'' || c == '\\');
    if plain {
        value.to_string()
    } else {
        format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
    }
}
