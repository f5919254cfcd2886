//! A real egress proxy for the tests: Debian's tinyproxy (package tinyproxy-bin), on 127.0.0.1
//! only, accepting clients from 127.0.0.1 only, in the foreground, stopped by PID when the
//! handle drops. Its log names every request it forwarded.

use std::time::{Duration, Instant};

use super::{free_port, temp_dir, Process, TempDir, START_ATTEMPTS};

pub struct Tinyproxy {
    // Field order matters: the process stops before its directory is removed.
    process: Process,
    port: u16,
    dir: TempDir,
}

impl Tinyproxy {
    pub fn start() -> Tinyproxy {
        let dir = temp_dir("tinyproxy");
        for _ in 0..START_ATTEMPTS {
            let port = free_port();
            let conf = dir.path().join("tinyproxy.conf");
            std::fs::write(
                &conf,
                format!(
                    "Port {port}\nListen 127.0.0.1\nAllow 127.0.0.1\nTimeout 60\nMaxClients 50\n\
                     LogFile \"{}\"\nLogLevel Info\n",
                    dir.path().join("requests.log").display()
                ),
            )
            .expect("write tinyproxy.conf");
            let mut cmd = std::process::Command::new("tinyproxy");
            cmd.arg("-d").arg("-c").arg(&conf);
            let mut process =
                Process::spawn("tinyproxy", &mut cmd, &dir.path().join("tinyproxy.out"));
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && process.is_running() {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Tinyproxy { process, port, dir };
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            process.kill();
        }
        panic!("tinyproxy did not start (is tinyproxy-bin installed? scripts/install-deps.sh installs it)");
    }

    /// `http://127.0.0.1:PORT`, for a target's `proxy` or `HTTPS_PROXY`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// The requests tinyproxy forwarded (its `Request (file descriptor N): METHOD URL` lines).
    pub fn requests(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("requests.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_once("Request (file descriptor ").map(|(_, r)| r))
            .filter_map(|r| r.split_once("): ").map(|(_, what)| what.to_string()))
            .collect()
    }
}
