//! A TCP relay on 127.0.0.1 in front of a real server, which can cut a connection after a
//! number of bytes from the server: a connection lost in the middle of an answer, which no
//! real server does on demand. Everything else passes through untouched (TLS included).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// Relays 127.0.0.1:port() to 127.0.0.1:upstream; stops accepting when dropped.
pub struct TcpRelay {
    port: u16,
    cut_after: Arc<AtomicUsize>,
    cuts: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl TcpRelay {
    pub fn start(upstream: u16) -> TcpRelay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind relay");
        let port = listener.local_addr().unwrap().port();
        let cut_after = Arc::new(AtomicUsize::new(usize::MAX));
        let cuts = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (cut, n, halt) = (cut_after.clone(), cuts.clone(), stop.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if halt.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let limit = cut.load(Ordering::SeqCst);
                let n = n.clone();
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || pump(c2, s2, usize::MAX, None));
                std::thread::spawn(move || pump(server, client, limit, Some(n)));
            }
        });
        TcpRelay {
            port,
            cut_after,
            cuts,
            stop,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connections opened from now on are cut after `bytes` from the server (`None`: never).
    pub fn cut_after(&self, bytes: Option<usize>) {
        self.cut_after
            .store(bytes.unwrap_or(usize::MAX), Ordering::SeqCst);
    }

    /// How many connections were cut so far.
    pub fn cuts(&self) -> usize {
        self.cuts.load(Ordering::SeqCst)
    }
}

impl Drop for TcpRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, limit: usize, cuts: Option<Arc<AtomicUsize>>) {
    let mut buf = [0u8; 4096];
    let mut sent = 0usize;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let allowed = n.min(limit.saturating_sub(sent));
        if to.write_all(&buf[..allowed]).is_err() {
            break;
        }
        sent += allowed;
        if allowed < n {
            if let Some(c) = &cuts {
                c.fetch_add(1, Ordering::SeqCst);
            }
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}
