//! The daemon's control socket: while `run` holds the state directory, `plan`, `explain`,
//! `status`, `approve` and `sync` run by hand are answered by the daemon, with the same output
//! and exit code as when run alone.
//!
//! The daemon listens on a Unix socket in its runtime directory (`$RUNTIME_DIRECTORY`, which
//! systemd makes for `RuntimeDirectory=`; else the state directory), owner-only, and writes the
//! socket's path to `control` in the state directory, where a command finds it. A request is
//! one JSON line (the command's arguments, and the content of a `--plan` file); the daemon runs
//! the command as its own child process between cycles, never beside one, with the daemon's
//! configuration and environment (so the command run by hand needs no secret at all), and
//! answers one JSON line (exit code, stdout, stderr).
//!
//! Only the daemon's own children skip the state directory lock, and only while the daemon
//! holds it: [`inside_daemon`] checks that the lock's holder is the parent process.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tracing::{info, warn};

/// The file in the state directory that names the socket.
const POINTER: &str = "control";
/// Set in the environment of the daemon's children, to the daemon's PID.
const CHILD_ENV: &str = "LDAP2SCIM_CONTROL_CHILD";
/// A request line larger than this is refused (a saved plan of 100,000 changes is ~40 MB).
const MAX_REQUEST: usize = 256 << 20;

#[derive(Debug, Serialize, Deserialize)]
pub struct Request {
    /// The command line after the program name, without `--config`.
    pub args: Vec<String>,
    /// The content of `sync --plan FILE` (the daemon may not read the caller's files).
    #[serde(default)]
    pub plan_file: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Reply {
    pub code: u8,
    pub stdout: String,
    pub stderr: String,
}

/// A request and where its answer goes.
pub type Job = (Request, tokio::sync::oneshot::Sender<Reply>);

/// Where the daemon's socket goes: the runtime directory systemd made, else the state
/// directory.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    match std::env::var_os("RUNTIME_DIRECTORY") {
        // systemd may list several, separated by ':'. Two instances sharing one runtime
        // directory get a socket each (named after their state directory).
        Some(dirs) if !dirs.is_empty() => {
            let first = dirs
                .to_string_lossy()
                .split(':')
                .next()
                .unwrap_or("")
                .to_owned();
            let tag = crate::model::bytes_hash(state_dir.to_string_lossy().as_bytes());
            PathBuf::from(first).join(format!("control-{}.sock", &tag[..8]))
        }
        _ => state_dir.join("control.sock"),
    }
}

/// Binds the socket (owner-only) and records its path in the state directory.
pub fn bind(state_dir: &Path) -> std::io::Result<(tokio::net::UnixListener, PathBuf)> {
    let path = socket_path(state_dir);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // A socket left by a daemon that died: the lock (held by this daemon now) says it is not
    // anyone's any more.
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)?;
    crate::lock::restrict(&path, 0o600)?;
    let pointer = state_dir.join(POINTER);
    std::fs::write(&pointer, format!("{}\n", path.display()))?;
    crate::lock::restrict(&pointer, 0o600)?;
    Ok((listener, path))
}

/// Accepts connections, hands each request to the daemon's loop, writes its answer.
pub async fn serve(listener: tokio::net::UnixListener, jobs: tokio::sync::mpsc::Sender<Job>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let jobs = jobs.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            let mut reader = tokio::io::BufReader::new(read).take(MAX_REQUEST as u64);
            let reply = match reader.read_line(&mut line).await {
                Ok(_) => match serde_json::from_str::<Request>(&line) {
                    Ok(request) => {
                        let (tx, rx) = tokio::sync::oneshot::channel();
                        if jobs.send((request, tx)).await.is_err() {
                            refusal("the daemon is stopping")
                        } else {
                            rx.await
                                .unwrap_or_else(|_| refusal("the daemon is stopping"))
                        }
                    }
                    Err(e) => refusal(&format!("a malformed request ({e})")),
                },
                Err(e) => refusal(&format!("the request could not be read ({e})")),
            };
            let mut text = serde_json::to_string(&reply).expect("a reply serializes");
            text.push('\n');
            let _ = write.write_all(text.as_bytes()).await;
        });
    }
}

fn refusal(why: &str) -> Reply {
    Reply {
        code: 1,
        stdout: String::new(),
        stderr: format!("ldap2scim: error: the running daemon could not answer: {why}\n"),
    }
}

/// Runs one request as the daemon's child: the same binary, the daemon's configuration.
pub async fn run_child(config: &Path, socket: &Path, request: Request) -> Reply {
    let mut args = request.args;
    let mut plan_copy = None;
    if let Some(content) = request.plan_file {
        // Beside the socket: owner-only, removed when the command is done.
        let dir = socket.parent().unwrap_or(Path::new("/tmp"));
        let path = dir.join(format!("plan-{}.json", crate::reconcile::new_run_id()));
        if let Err(e) =
            std::fs::write(&path, content).and_then(|()| crate::lock::restrict(&path, 0o600))
        {
            return refusal(&format!("cannot keep the plan file ({e})"));
        }
        replace_value(&mut args, "--plan", &path.to_string_lossy());
        plan_copy = Some(path);
    }
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => return refusal(&format!("cannot find its own program ({e})")),
    };
    info!(command = ?args.first(), "control socket: answering a command");
    let output = tokio::process::Command::new(exe)
        .arg("--config")
        .arg(config)
        .args(&args)
        .env(CHILD_ENV, std::process::id().to_string())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await;
    if let Some(path) = plan_copy {
        let _ = std::fs::remove_file(path);
    }
    match output {
        Ok(out) => {
            use std::os::unix::process::ExitStatusExt;
            let mut stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            let code = match (out.status.code(), out.status.signal()) {
                (Some(c), _) => c as u8,
                (None, Some(sig)) => {
                    stderr.push_str(&format!(
                        "ldap2scim: error: the command was ended by signal {sig} (the daemon is stopping?)\n"
                    ));
                    128u8.saturating_add(sig as u8)
                }
                (None, None) => 1,
            };
            Reply {
                code,
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr,
            }
        }
        Err(e) => refusal(&format!("cannot start the command ({e})")),
    }
}

/// Whether this process is a command the daemon runs for the control socket, while the
/// daemon holds `state_dir`: it then works under the daemon's lock.
pub fn inside_daemon(state_dir: &Path) -> bool {
    let Ok(pid) = std::env::var(CHILD_ENV) else {
        return false;
    };
    let parent = std::os::unix::process::parent_id().to_string();
    pid == parent
        && crate::lock::holder(state_dir).is_some_and(|h| h.starts_with(&format!("pid {parent},")))
}

/// The state directory a main file names, read without the rest of the configuration (a
/// command that the daemon answers needs none of its secrets).
pub fn state_dir_of(config: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(config).ok()?;
    let table: toml::Table = text.parse().ok()?;
    let dir = config
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let dir = std::path::absolute(dir).ok()?;
    Some(
        match table
            .get("daemon")
            .and_then(|d| d.get("state_dir"))
            .and_then(|s| s.as_str())
        {
            Some(s) => dir.join(s),
            None => PathBuf::from(crate::config::DEFAULT_STATE_DIR),
        },
    )
}

/// Hands the command to the daemon holding the state directory, if one is there and
/// answers: prints what it printed and returns its exit code. `None`: no daemon to ask.
pub fn forward(config: &Path, args: &[String]) -> Option<u8> {
    if std::env::var_os(CHILD_ENV).is_some() {
        return None;
    }
    let state_dir = state_dir_of(config)?;
    crate::lock::holder(&state_dir)?;
    let socket = std::fs::read_to_string(state_dir.join(POINTER)).ok()?;
    let mut stream = std::os::unix::net::UnixStream::connect(socket.trim()).ok()?;
    let mut args: Vec<String> = strip_config(args);
    // Files are the caller's: a plan to apply travels with the request, a report to write
    // comes back as the command's output.
    let plan_file = match value_of(&args, "--plan") {
        Some(path) => match std::fs::read_to_string(&path) {
            Ok(text) => Some(text),
            Err(e) => {
                eprintln!("ldap2scim: error: cannot read the plan file {path} (--plan): {e}");
                return Some(1);
            }
        },
        None => None,
    };
    let out = value_of(&args, "--out");
    if out.is_some() {
        replace_value(&mut args, "--out", "/dev/stdout");
    }
    let mut line = serde_json::to_string(&Request { args, plan_file }).ok()?;
    line.push('\n');
    if stream.write_all(line.as_bytes()).is_err() {
        return None;
    }
    let mut answer = String::new();
    if BufReader::new(&stream).read_line(&mut answer).is_err() || answer.is_empty() {
        eprintln!("ldap2scim: error: the running daemon closed the control socket without an answer; see its log (journalctl -u ldap2scim)");
        return Some(1);
    }
    let reply: Reply = match serde_json::from_str(&answer) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ldap2scim: error: the running daemon's answer is unreadable ({e})");
            return Some(1);
        }
    };
    eprint!("{}", reply.stderr);
    match out {
        Some(path) if reply.code != 1 || !reply.stdout.is_empty() => {
            if let Err(e) = std::fs::write(&path, &reply.stdout) {
                eprintln!("ldap2scim: error: cannot write the report to {path} (--out): {e}");
                return Some(1);
            }
        }
        _ => {
            print!("{}", reply.stdout);
            let _ = std::io::stdout().flush();
        }
    }
    Some(reply.code)
}

/// The arguments without `--config PATH` / `--config=PATH` (the daemon uses its own).
fn strip_config(args: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len());
    let mut skip = false;
    for a in args {
        if skip {
            skip = false;
        } else if a == "--config" {
            skip = true;
        } else if !a.starts_with("--config=") {
            out.push(a.clone());
        }
    }
    out
}

/// The value of `--flag VALUE` or `--flag=VALUE`.
fn value_of(args: &[String], flag: &str) -> Option<String> {
    let eq = format!("{flag}=");
    args.iter().enumerate().find_map(|(i, a)| {
        if a == flag {
            args.get(i + 1).cloned()
        } else {
            a.strip_prefix(&eq).map(str::to_owned)
        }
    })
}

fn replace_value(args: &mut [String], flag: &str, value: &str) {
    let eq = format!("{flag}=");
    for i in 0..args.len() {
        if args[i] == flag && i + 1 < args.len() {
            args[i + 1] = value.to_owned();
        } else if args[i].starts_with(&eq) {
            args[i] = format!("{eq}{value}");
        }
    }
}

/// Removes the pointer when the daemon stops (a later command then finds no daemon).
pub fn unbind(state_dir: &Path, socket: &Path) {
    let _ = std::fs::remove_file(state_dir.join(POINTER));
    if let Err(e) = std::fs::remove_file(socket) {
        warn!(socket = %socket.display(), error = %e, "cannot remove the control socket");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn arguments_travel_without_the_config_and_with_files_replaced() {
        let args = v(&[
            "--config",
            "/etc/x.toml",
            "plan",
            "--out=a.json",
            "--format",
            "json",
        ]);
        let mut stripped = strip_config(&args);
        assert_eq!(stripped, v(&["plan", "--out=a.json", "--format", "json"]));
        assert_eq!(value_of(&stripped, "--out").as_deref(), Some("a.json"));
        replace_value(&mut stripped, "--out", "/dev/stdout");
        assert_eq!(
            stripped,
            v(&["plan", "--out=/dev/stdout", "--format", "json"])
        );
        let mut args = v(&["--config=/etc/x.toml", "sync", "--plan", "p.json"]);
        args = strip_config(&args);
        assert_eq!(value_of(&args, "--plan").as_deref(), Some("p.json"));
        replace_value(&mut args, "--plan", "/run/x/plan-1.json");
        assert_eq!(args, v(&["sync", "--plan", "/run/x/plan-1.json"]));
    }
}
