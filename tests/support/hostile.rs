//! A small, scriptable, hostile HTTP server on a loopback port, for what no real SCIM server
//! does: redirects to another origin, echoed credentials, endless or oversized bodies, lying
//! paging, malicious ids, 501s, TLS with a private CA, an OAuth2 token endpoint.
//!
//! Each request is offered to the test's script first (a closure returning `Some(answer)`);
//! what it leaves (`None`) is answered by a minimal in-memory SCIM service provider below
//! [`HostileServer::url`], enough for a sync to succeed. Every request is recorded. One request
//! per connection (`Connection: close`). It listens on 127.0.0.1 only, and stops when dropped.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{json, Value};

use super::{random_u64, repo_dir};

/// The SCIM base path of every hostile server.
pub const SCIM_PREFIX: &str = "/scim/v2";
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// One request the server received.
#[derive(Clone, Debug)]
pub struct HttpRequest {
    pub method: String,
    /// The request target as sent: path and query, still percent-encoded.
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The path below [`SCIM_PREFIX`] (still encoded, without the query), or the whole
    /// path when it is not below it.
    pub fn scim_path(&self) -> &str {
        let path = self.target.split('?').next().unwrap_or("");
        path.strip_prefix(SCIM_PREFIX).unwrap_or(path)
    }

    /// The decoded query parameter `name`.
    pub fn query(&self, name: &str) -> Option<String> {
        let url = url::Url::parse(&format!("http://x{}", self.target)).ok()?;
        let found = url
            .query_pairs()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned());
        found
    }

    /// The decoded form field `name` of an `application/x-www-form-urlencoded` body.
    pub fn form(&self, name: &str) -> Option<String> {
        url::form_urlencoded::parse(&self.body)
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// Everything the client sent, as text (request line, headers, body).
    pub fn dump(&self) -> String {
        let mut out = format!("{} {}\n", self.method, self.target);
        for (n, v) in &self.headers {
            out.push_str(&format!("{n}: {v}\n"));
        }
        out.push('\n');
        out.push_str(&String::from_utf8_lossy(&self.body));
        out
    }
}

/// How a response body is sent.
#[derive(Clone, Debug)]
pub enum Body {
    Bytes(Vec<u8>),
    /// Chunked, never ending (until the client goes away or the server stops).
    Endless,
    /// Announces this Content-Length, sends a little, and closes.
    Declared(u64),
}

#[derive(Clone, Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Body,
}

impl HttpResponse {
    pub fn json(status: u16, body: &Value) -> HttpResponse {
        HttpResponse {
            status,
            headers: vec![("Content-Type".into(), "application/scim+json".into())],
            body: Body::Bytes(body.to_string().into_bytes()),
        }
    }

    pub fn text(status: u16, body: &str) -> HttpResponse {
        HttpResponse {
            status,
            headers: vec![("Content-Type".into(), "text/plain".into())],
            body: Body::Bytes(body.as_bytes().to_vec()),
        }
    }

    pub fn empty(status: u16) -> HttpResponse {
        HttpResponse {
            status,
            headers: Vec::new(),
            body: Body::Bytes(Vec::new()),
        }
    }

    /// A redirect (`status` 301/302/303/307/308) to `location`.
    pub fn redirect(status: u16, location: &str) -> HttpResponse {
        let mut r = HttpResponse::empty(status);
        r.headers.push(("Location".into(), location.into()));
        r
    }

    pub fn endless() -> HttpResponse {
        HttpResponse {
            status: 200,
            headers: vec![("Content-Type".into(), "application/scim+json".into())],
            body: Body::Endless,
        }
    }

    pub fn declared(length: u64) -> HttpResponse {
        HttpResponse {
            status: 200,
            headers: vec![("Content-Type".into(), "application/scim+json".into())],
            body: Body::Declared(length),
        }
    }

    /// A SCIM error with `detail`.
    pub fn scim_error(status: u16, detail: &str) -> HttpResponse {
        HttpResponse::json(
            status,
            &json!({
                "schemas": ["urn:ietf:params:scim:api:messages:2.0:Error"],
                "status": status.to_string(),
                "detail": detail,
            }),
        )
    }
}

type Script = dyn Fn(&HttpRequest) -> Option<HttpResponse> + Send + Sync;

struct Shared {
    script: Box<Script>,
    records: Mutex<Vec<HttpRequest>>,
    /// The built-in provider's resources: (resource type, resource).
    store: Mutex<Vec<(String, Value)>>,
    stopping: AtomicBool,
    /// Body bytes sent for `Body::Endless` answers.
    endless_bytes: AtomicU64,
    tls: Option<Arc<rustls::ServerConfig>>,
}

/// The hostile server; see the module documentation.
pub struct HostileServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    acceptor: Option<JoinHandle<()>>,
}

impl HostileServer {
    /// Plain HTTP on a random loopback port.
    pub fn start(
        script: impl Fn(&HttpRequest) -> Option<HttpResponse> + Send + Sync + 'static,
    ) -> HostileServer {
        HostileServer::launch(Box::new(script), None)
    }

    /// HTTPS with the certificate and key of `tls` (see [`ThrowawayCa`]).
    pub fn start_tls(
        tls: &ThrowawayCa,
        script: impl Fn(&HttpRequest) -> Option<HttpResponse> + Send + Sync + 'static,
    ) -> HostileServer {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(tls.server_cert())
            .expect("read server.pem")
            .collect::<Result<_, _>>()
            .expect("parse server.pem");
        let key = PrivateKeyDer::from_pem_file(tls.server_key()).expect("read server.key");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server certificate");
        HostileServer::launch(Box::new(script), Some(Arc::new(config)))
    }

    fn launch(script: Box<Script>, tls: Option<Arc<rustls::ServerConfig>>) -> HostileServer {
        let listener = TcpListener::bind(("127.0.0.1", 0)).expect("bind a loopback port");
        let addr = listener.local_addr().expect("local address");
        let shared = Arc::new(Shared {
            script,
            records: Mutex::new(Vec::new()),
            store: Mutex::new(Vec::new()),
            stopping: AtomicBool::new(false),
            endless_bytes: AtomicU64::new(0),
            tls,
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
        HostileServer {
            shared,
            addr,
            acceptor: Some(acceptor),
        }
    }

    /// `http://127.0.0.1:PORT` (or `https://`).
    pub fn origin(&self) -> String {
        let scheme = if self.shared.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://127.0.0.1:{}", self.addr.port())
    }

    /// The SCIM base URL: [`origin`](Self::origin) + [`SCIM_PREFIX`].
    pub fn url(&self) -> String {
        format!("{}{SCIM_PREFIX}", self.origin())
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<HttpRequest> {
        lock(&self.shared.records).clone()
    }

    /// The resources of the built-in provider of type `kind` (`"Users"`, `"Groups"`).
    pub fn resources(&self, kind: &str) -> Vec<Value> {
        lock(&self.shared.store)
            .iter()
            .filter(|(k, _)| k == kind)
            .map(|(_, r)| r.clone())
            .collect()
    }

    /// Body bytes written into endless answers so far.
    pub fn endless_bytes(&self) -> u64 {
        self.shared.endless_bytes.load(Ordering::Relaxed)
    }
}

impl Drop for HostileServer {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

/// A fresh CA and a localhost / 127.0.0.1 leaf certificate it signed (`scripts/gen-tls.sh`),
/// in a temporary directory.
pub struct ThrowawayCa {
    dir: super::TempDir,
}

impl ThrowawayCa {
    pub fn new() -> ThrowawayCa {
        let dir = super::temp_dir("ca");
        let status = std::process::Command::new("bash")
            .arg(repo_dir().join("scripts/gen-tls.sh"))
            .arg(dir.path())
            .status()
            .expect("run scripts/gen-tls.sh");
        assert!(status.success(), "gen-tls.sh failed");
        ThrowawayCa { dir }
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn server_cert(&self) -> PathBuf {
        self.dir.path().join("server.pem")
    }

    pub fn server_key(&self) -> PathBuf {
        self.dir.path().join("server.key")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Default for ThrowawayCa {
    fn default() -> Self {
        ThrowawayCa::new()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn handle(stream: TcpStream, shared: &Shared) {
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    match &shared.tls {
        Some(config) => {
            let Ok(conn) = rustls::ServerConnection::new(Arc::clone(config)) else {
                return;
            };
            let tcp = match stream.try_clone() {
                Ok(s) => s,
                Err(_) => return,
            };
            let mut tls = rustls::StreamOwned::new(conn, stream);
            serve(&mut tls, shared);
            tls.conn.send_close_notify();
            let _ = tls.flush();
            let _ = tcp.shutdown(Shutdown::Both);
        }
        None => {
            let mut stream = stream;
            serve(&mut stream, shared);
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

fn serve<S: Read + Write>(stream: &mut S, shared: &Shared) {
    let request = {
        let mut reader = BufReader::new(&mut *stream);
        match read_request(&mut reader) {
            Ok(Some(r)) => r,
            _ => return,
        }
    };
    lock(&shared.records).push(request.clone());
    let response = (shared.script)(&request).unwrap_or_else(|| provider(shared, &request));
    let _ = write_response(stream, &response, shared);
}

fn read_request(reader: &mut impl BufRead) -> std::io::Result<Option<HttpRequest>> {
    let mut start = String::new();
    if reader.read_line(&mut start)? == 0 {
        return Ok(None);
    }
    let mut parts = start.trim_end().split(' ');
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Ok(None);
    };
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() {
            break;
        }
        if let Some((n, v)) = line.split_once(':') {
            headers.push((n.trim().to_string(), v.trim().to_string()));
        }
    }
    let length = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    Ok(Some(HttpRequest {
        method: method.to_ascii_uppercase(),
        target: target.to_string(),
        headers,
        body,
    }))
}

fn write_response<S: Write>(
    stream: &mut S,
    response: &HttpResponse,
    shared: &Shared,
) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {} Hostile\r\n", response.status);
    for (n, v) in &response.headers {
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    head.push_str("Connection: close\r\n");
    match &response.body {
        Body::Bytes(bytes) => {
            head.push_str(&format!("Content-Length: {}\r\n\r\n", bytes.len()));
            stream.write_all(head.as_bytes())?;
            stream.write_all(bytes)?;
        }
        Body::Declared(length) => {
            head.push_str(&format!("Content-Length: {length}\r\n\r\n"));
            stream.write_all(head.as_bytes())?;
            stream.write_all(b"{\"Resources\": [")?;
        }
        Body::Endless => {
            head.push_str("Transfer-Encoding: chunked\r\n\r\n");
            stream.write_all(head.as_bytes())?;
            let chunk = vec![b' '; 16 * 1024];
            stream.write_all(format!("1\r\n[\r\n{:x}\r\n", chunk.len()).as_bytes())?;
            stream.write_all(&chunk)?;
            stream.write_all(b"\r\n")?;
            while !shared.stopping.load(Ordering::SeqCst) {
                stream.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())?;
                stream.write_all(&chunk)?;
                stream.write_all(b"\r\n")?;
                stream.flush()?;
                shared
                    .endless_bytes
                    .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
        }
    }
    stream.flush()
}

/// The built-in SCIM provider: `/ServiceProviderConfig` is 404 (defaults), listings with an
/// optional `attr eq "value"` filter and honest paging, create, read, PATCH / PUT (answered
/// with the stored resource), DELETE.
fn provider(shared: &Shared, req: &HttpRequest) -> HttpResponse {
    let path = req.scim_path().trim_end_matches('/').to_string();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let mut store = lock(&shared.store);
    match (req.method.as_str(), segments.as_slice()) {
        ("GET", [kind @ ("Users" | "Groups")]) => {
            let filter = req.query("filter");
            let matching: Vec<Value> = store
                .iter()
                .filter(|(k, _)| k == kind)
                .map(|(_, r)| r)
                .filter(|r| filter.as_deref().is_none_or(|f| filter_matches(f, r)))
                .cloned()
                .collect();
            let start: usize = req
                .query("startIndex")
                .and_then(|s| s.parse().ok())
                .unwrap_or(1)
                .max(1);
            let count: usize = req
                .query("count")
                .and_then(|s| s.parse().ok())
                .unwrap_or(100);
            let page: Vec<Value> = matching
                .iter()
                .skip(start - 1)
                .take(count)
                .cloned()
                .collect();
            HttpResponse::json(200, &list_response(matching.len(), start, page))
        }
        ("POST", [kind @ ("Users" | "Groups")]) => {
            let mut r = req.json();
            let id = format!("{:016x}", random_u64());
            r["id"] = json!(id);
            r["meta"] = json!({ "resourceType": kind.trim_end_matches('s'), "version": "W/\"1\"" });
            store.push((kind.to_string(), r.clone()));
            HttpResponse::json(201, &r)
        }
        (method, [kind @ ("Users" | "Groups"), id]) => {
            let pos = store
                .iter()
                .position(|(k, r)| k == kind && r["id"].as_str() == Some(id));
            let Some(pos) = pos else {
                return HttpResponse::scim_error(404, "not found");
            };
            match method {
                "GET" | "PATCH" => HttpResponse::json(200, &store[pos].1),
                "PUT" => {
                    let mut r = req.json();
                    r["id"] = json!(id);
                    store[pos].1 = r.clone();
                    HttpResponse::json(200, &r)
                }
                "DELETE" => {
                    store.remove(pos);
                    HttpResponse::empty(204)
                }
                _ => HttpResponse::scim_error(405, "method not allowed"),
            }
        }
        _ => HttpResponse::scim_error(404, "not found"),
    }
}

/// A SCIM ListResponse.
pub fn list_response(total: usize, start: usize, resources: Vec<Value>) -> Value {
    json!({
        "schemas": ["urn:ietf:params:scim:api:messages:2.0:ListResponse"],
        "totalResults": total,
        "startIndex": start,
        "itemsPerPage": resources.len(),
        "Resources": resources,
    })
}

/// `attr eq "value"` (the only filter ldap2scim sends), case-insensitive but for externalId.
fn filter_matches(filter: &str, r: &Value) -> bool {
    let Some((attr, rest)) = filter.split_once(" eq ") else {
        return false;
    };
    let value = rest
        .trim()
        .trim_matches('"')
        .replace("\\\"", "\"")
        .replace("\\\\", "\\");
    match r.get(attr.trim()).and_then(Value::as_str) {
        Some(v) if attr.trim() == "externalId" => v == value,
        Some(v) => v.eq_ignore_ascii_case(&value),
        None => false,
    }
}
