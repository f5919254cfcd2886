//! An HTTP/1.1 reverse proxy in front of a SCIM server: it records every request and can
//! inject scripted faults.
//!
//! One request per client connection: the request is forwarded to the upstream with
//! `Connection: close`, the whole upstream response is read, and the client gets it back with
//! `Connection: close` and a `Content-Length` (chunked upstream bodies are decoded). Absolute
//! upstream URLs in the response (`Location`, `meta.location`) are rewritten to the proxy's, so a
//! client that follows them stays behind the proxy. Only 127.0.0.1 is ever contacted.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use super::{free_port, START_ATTEMPTS};

const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// What the proxy does with one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Answer this status with a SCIM error body (`detail` "injected fault") without forwarding;
    /// the option is an extra header, e.g. `Some(("Retry-After".into(), "1".into()))`.
    Status(u16, Option<(String, String)>),
    /// Read the request, then close the connection without answering (not forwarded).
    Reset,
    /// Forward the request, then close the connection without answering: the upstream did the
    /// work but the client never learns it (a lost response).
    DropResponse,
    /// Wait, then forward.
    Delay(Duration),
    /// Answer 200 with a malformed JSON body, without forwarding.
    Garbage,
    /// Forward normally.
    Pass,
}

/// One request the proxy handled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedRequest {
    /// `GET`, `POST`, `PATCH`, …
    pub method: String,
    /// The request target below the SCIM base, with the query: `/Users?filter=…`, `/Groups/ID`.
    pub path: String,
    /// The status the client got; 0 when the connection was closed without an answer.
    pub status: u16,
    /// The fault injected into this request, if any (never [`Fault::Pass`]).
    pub fault: Option<Fault>,
}

/// Short name for [`RecordedRequest`].
pub type Recorded = RecordedRequest;

struct Shared {
    upstream_port: u16,
    /// `http://127.0.0.1:UPSTREAM_PORT`, rewritten to the proxy's origin in responses.
    upstream_origin: String,
    origin: String,
    prefix: String,
    /// Queued faults, each for any method (`None`) or one method only.
    faults: Mutex<VecDeque<(Option<String>, Fault)>>,
    records: Mutex<Vec<RecordedRequest>>,
    /// When each request was read in full, with its method: a write's arrival.
    arrivals: Mutex<Vec<(std::time::Instant, String)>>,
    stopping: AtomicBool,
}

/// A recording, fault-injecting reverse proxy on a loopback port; stopped when dropped.
pub struct RecordingProxy {
    shared: Arc<Shared>,
    addr: SocketAddr,
    acceptor: Option<JoinHandle<()>>,
}

impl RecordingProxy {
    /// Starts a proxy for `upstream_base_url` (`http://127.0.0.1:PORT/some/prefix`).
    /// [`RecordingProxy::url`] is the same base URL on the proxy's port.
    pub fn start(upstream_base_url: &str) -> RecordingProxy {
        let rest = upstream_base_url
            .strip_prefix("http://127.0.0.1:")
            .or_else(|| upstream_base_url.strip_prefix("http://localhost:"))
            .unwrap_or_else(|| {
                panic!("the proxy only forwards to http://127.0.0.1, not {upstream_base_url}")
            });
        let (port, prefix) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let upstream_port: u16 = port.parse().expect("upstream port");
        let listener = (0..START_ATTEMPTS * 4)
            .find_map(|_| TcpListener::bind(("127.0.0.1", free_port())).ok())
            .expect("bind a loopback port for the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let shared = Arc::new(Shared {
            upstream_port,
            upstream_origin: format!("http://127.0.0.1:{upstream_port}"),
            origin: format!("http://127.0.0.1:{}", addr.port()),
            prefix: prefix.trim_end_matches('/').to_string(),
            faults: Mutex::new(VecDeque::new()),
            records: Mutex::new(Vec::new()),
            arrivals: Mutex::new(Vec::new()),
            stopping: AtomicBool::new(false),
        });
        let accept_shared = Arc::clone(&shared);
        let acceptor = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if accept_shared.stopping.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(stream) = stream {
                    let shared = Arc::clone(&accept_shared);
                    std::thread::spawn(move || handle(stream, &shared));
                }
            }
        });
        RecordingProxy {
            shared,
            addr,
            acceptor: Some(acceptor),
        }
    }

    /// The proxied SCIM base URL, e.g. `http://127.0.0.1:PROXY/api/auth/scim/v2`.
    pub fn url(&self) -> String {
        format!("{}{}", self.shared.origin, self.shared.prefix)
    }

    /// The proxy's port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// When each write (not `GET`/`HEAD`) arrived, whether or not it was answered.
    pub fn write_arrivals(&self) -> Vec<std::time::Instant> {
        lock(&self.shared.arrivals)
            .iter()
            .filter(|(_, m)| m != "GET" && m != "HEAD")
            .map(|(t, _)| *t)
            .collect()
    }

    /// Every request handled so far, in the order they were answered.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.records).clone()
    }

    /// How many requests were not `GET` (nor `HEAD`): the writes.
    pub fn writes(&self) -> usize {
        lock(&self.shared.records)
            .iter()
            .filter(|r| r.method != "GET" && r.method != "HEAD")
            .count()
    }

    /// Forgets the recorded requests (queued faults stay).
    pub fn clear(&self) {
        lock(&self.shared.records).clear();
    }

    /// Queues faults for the next requests of any method, one per request, in order; requests
    /// after the queue is empty pass through.
    pub fn push_faults(&self, faults: Vec<Fault>) {
        lock(&self.shared.faults).extend(faults.into_iter().map(|f| (None, f)));
    }

    /// Queues faults for requests with this method only (e.g. `"POST"`). While the fault at the
    /// front of the queue is for another method, requests pass through without consuming it.
    pub fn push_faults_for(&self, method: &str, faults: Vec<Fault>) {
        let method = method.to_ascii_uppercase();
        lock(&self.shared.faults).extend(faults.into_iter().map(|f| (Some(method.clone()), f)));
    }

    /// How many queued faults are not consumed yet.
    pub fn pending_faults(&self) -> usize {
        lock(&self.shared.faults).len()
    }

    /// Drops the queued faults.
    pub fn clear_faults(&self) {
        lock(&self.shared.faults).clear();
    }
}

impl Drop for RecordingProxy {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Wake the acceptor up so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

struct Request {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

struct Response {
    status: u16,
    reason: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn handle(client: TcpStream, shared: &Shared) {
    let _ = client.set_read_timeout(Some(IO_TIMEOUT));
    let _ = client.set_write_timeout(Some(IO_TIMEOUT));
    let mut reader = BufReader::new(match client.try_clone() {
        Ok(stream) => stream,
        Err(_) => return,
    });
    let request = match read_request(&mut reader) {
        Ok(Some(request)) => request,
        _ => return,
    };
    lock(&shared.arrivals).push((std::time::Instant::now(), request.method.clone()));
    let fault = next_fault(shared, &request.method);
    let record = |status: u16| {
        let path = request
            .target
            .strip_prefix(&shared.prefix)
            .unwrap_or(&request.target)
            .to_string();
        lock(&shared.records).push(RecordedRequest {
            method: request.method.clone(),
            path,
            status,
            fault: fault.clone().filter(|f| *f != Fault::Pass),
        });
    };
    let response = match &fault {
        Some(Fault::Status(status, header)) => scim_error(*status, header.clone()),
        Some(Fault::Garbage) => Response {
            status: 200,
            reason: "OK".into(),
            headers: vec![("Content-Type".into(), "application/scim+json".into())],
            body: br#"{"schemas": ["urn:ietf:params:scim:api:messages:2.0:ListRe"#.to_vec(),
        },
        Some(Fault::Reset) => {
            record(0);
            let _ = client.shutdown(Shutdown::Both);
            return;
        }
        Some(Fault::Delay(delay)) => {
            std::thread::sleep(*delay);
            forward(shared, &request)
        }
        Some(Fault::DropResponse) => {
            let _ = forward(shared, &request);
            record(0);
            let _ = client.shutdown(Shutdown::Both);
            return;
        }
        Some(Fault::Pass) | None => forward(shared, &request),
    };
    // Record before answering: once the client has its answer, the record is visible.
    record(response.status);
    let _ = write_response(&client, response);
    let _ = client.shutdown(Shutdown::Both);
}

fn next_fault(shared: &Shared, method: &str) -> Option<Fault> {
    let mut faults = lock(&shared.faults);
    match faults.front() {
        Some((Some(only), _)) if only != method => None,
        Some(_) => faults.pop_front().map(|(_, fault)| fault),
        None => None,
    }
}

fn scim_error(status: u16, header: Option<(String, String)>) -> Response {
    let body = serde_json::json!({
        "schemas": ["urn:ietf:params:scim:api:messages:2.0:Error"],
        "status": status.to_string(),
        "detail": "injected fault",
    });
    let mut headers = vec![(
        "Content-Type".to_string(),
        "application/scim+json".to_string(),
    )];
    headers.extend(header);
    Response {
        status,
        reason: "Injected".into(),
        headers,
        body: body.to_string().into_bytes(),
    }
}

/// Sends the request to the upstream and reads its whole answer; 502 if that fails.
fn forward(shared: &Shared, request: &Request) -> Response {
    match try_forward(shared, request) {
        Ok(response) => response,
        Err(e) => {
            let mut response = scim_error(502, None);
            response.reason = "Bad Gateway".into();
            response.body = serde_json::json!({
                "schemas": ["urn:ietf:params:scim:api:messages:2.0:Error"],
                "status": "502",
                "detail": format!("proxy: upstream unreachable: {e}"),
            })
            .to_string()
            .into_bytes();
            response
        }
    }
}

fn try_forward(shared: &Shared, request: &Request) -> std::io::Result<Response> {
    let addr = SocketAddr::from(([127, 0, 0, 1], shared.upstream_port));
    let mut upstream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    upstream.set_read_timeout(Some(IO_TIMEOUT))?;
    upstream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut head = format!("{} {} HTTP/1.1\r\n", request.method, request.target);
    for (name, value) in &request.headers {
        if !is_hop_header(name) && !name.eq_ignore_ascii_case("content-length") {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
    }
    if !request.body.is_empty() || matches!(request.method.as_str(), "POST" | "PUT" | "PATCH") {
        head.push_str(&format!("Content-Length: {}\r\n", request.body.len()));
    }
    head.push_str("Connection: close\r\n\r\n");
    upstream.write_all(head.as_bytes())?;
    upstream.write_all(&request.body)?;
    upstream.flush()?;
    let mut reader = BufReader::new(upstream);
    let (status, reason, headers) = read_head(&mut reader)?
        .and_then(|(line, headers)| {
            let mut parts = line.splitn(3, ' ');
            let _version = parts.next()?;
            let status = parts.next()?.parse().ok()?;
            Some((status, parts.next().unwrap_or("").to_string(), headers))
        })
        .ok_or_else(|| invalid("malformed upstream response head"))?;
    let body = if request.method == "HEAD" || status == 204 || status == 304 || status < 200 {
        Vec::new()
    } else {
        read_body(&mut reader, &headers, true)?
    };
    let headers = headers
        .into_iter()
        .map(|(name, value)| {
            let value = value.replace(&shared.upstream_origin, &shared.origin);
            (name, value)
        })
        .collect();
    let body = replace_bytes(
        &body,
        shared.upstream_origin.as_bytes(),
        shared.origin.as_bytes(),
    );
    Ok(Response {
        status,
        reason,
        headers,
        body,
    })
}

fn write_response(mut client: &TcpStream, response: Response) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {} {}\r\n", response.status, response.reason);
    for (name, value) in &response.headers {
        if !is_hop_header(name) && !name.eq_ignore_ascii_case("content-length") {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        response.body.len()
    ));
    client.write_all(head.as_bytes())?;
    client.write_all(&response.body)?;
    client.flush()
}

fn is_hop_header(name: &str) -> bool {
    [
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "te",
        "upgrade",
    ]
    .iter()
    .any(|h| name.eq_ignore_ascii_case(h))
}

fn read_request(reader: &mut impl BufRead) -> std::io::Result<Option<Request>> {
    let Some((line, headers)) = read_head(reader)? else {
        return Ok(None);
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Err(invalid("malformed request line"));
    };
    let body = read_body(reader, &headers, false)?;
    Ok(Some(Request {
        method: method.to_ascii_uppercase(),
        target: target.to_string(),
        headers,
        body,
    }))
}

/// An HTTP message's start line and its headers.
type Head = (String, Vec<(String, String)>);

/// The start line and headers, or `None` at EOF before anything was read.
fn read_head(reader: &mut impl BufRead) -> std::io::Result<Option<Head>> {
    let mut start = String::new();
    if reader.read_line(&mut start)? == 0 {
        return Ok(None);
    }
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(invalid("connection closed inside the headers"));
        }
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.push((name.trim().to_string(), value.trim().to_string()));
        }
    }
    Ok(Some((start.trim_end().to_string(), headers)))
}

/// A message body: chunked, by Content-Length, or (responses only) up to EOF.
fn read_body(
    reader: &mut impl BufRead,
    headers: &[(String, String)],
    until_eof: bool,
) -> std::io::Result<Vec<u8>> {
    let header = |wanted: &str| {
        headers
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(wanted))
            .map(|(_, value)| value.as_str())
    };
    let mut body = Vec::new();
    if header("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        loop {
            let mut size_line = String::new();
            reader.read_line(&mut size_line)?;
            let size_hex = size_line.trim().split(';').next().unwrap_or("");
            let size =
                usize::from_str_radix(size_hex, 16).map_err(|_| invalid("malformed chunk size"))?;
            if size == 0 {
                // Trailers, up to the blank line.
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
                        return Ok(body);
                    }
                }
            }
            let start = body.len();
            body.resize(start + size, 0);
            reader.read_exact(&mut body[start..])?;
            let mut crlf = String::new();
            reader.read_line(&mut crlf)?;
        }
    } else if let Some(length) = header("content-length") {
        let length: usize = length.parse().map_err(|_| invalid("bad Content-Length"))?;
        body.resize(length, 0);
        reader.read_exact(&mut body)?;
    } else if until_eof {
        reader.read_to_end(&mut body)?;
    }
    Ok(body)
}

fn replace_bytes(haystack: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(haystack.len());
    let mut i = 0;
    while i < haystack.len() {
        if haystack[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(haystack[i]);
            i += 1;
        }
    }
    out
}

fn invalid(message: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, message.to_string())
}
