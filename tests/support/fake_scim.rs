//! A tiny SCIM 2.0 Users endpoint on a loopback port, for behaviour the real servers do not
//! show: listing resources without `id`, storing values in its own shape (emails without
//! `type`), or dropping attributes it has no place for. It records every request with its
//! body.
//!
//! Users only (configure the target with `groups = "none"`); no filtering (its
//! `/ServiceProviderConfig` says so, so the client lists); one request per connection.
//! Stopped when dropped.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{json, Map, Value};

/// How the fake stores and shows what it is sent.
#[derive(Clone, Debug, Default)]
pub struct FakeScimOptions {
    /// List (and GET) resources without their `id`.
    pub omit_ids: bool,
    /// Top-level attributes the fake does not store.
    pub drop: Vec<String>,
    /// Store email and phone items without their `type`.
    pub strip_item_type: bool,
    /// Answer 409 to a create whose userName is taken (without it, a second create makes a
    /// duplicate, as on a target that enforces no uniqueness).
    pub unique_user_names: bool,
    /// Top-level attributes a PATCH may not replace: such a PATCH is answered 501.
    pub refuse_patch_of: Vec<String>,
}

/// One request the fake handled.
#[derive(Clone, Debug)]
pub struct FakeRequest {
    pub method: String,
    /// Below the base, with the query.
    pub path: String,
    /// The JSON body (`Null` when none).
    pub body: Value,
}

#[derive(Default)]
struct State {
    options: FakeScimOptions,
    users: Vec<Value>,
    next_id: u64,
    requests: Vec<FakeRequest>,
}

pub struct FakeScim {
    state: Arc<Mutex<State>>,
    addr: SocketAddr,
    stopping: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl FakeScim {
    pub fn start(options: FakeScimOptions) -> FakeScim {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            options,
            ..State::default()
        }));
        let stopping = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let (state, stopping) = (state.clone(), stopping.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stopping.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let state = state.clone();
                    std::thread::spawn(move || serve(stream, &state));
                }
            })
        };
        FakeScim {
            state,
            addr,
            stopping,
            acceptor: Some(acceptor),
        }
    }

    /// The SCIM base URL (`http://127.0.0.1:PORT/scim/v2`).
    pub fn url(&self) -> String {
        format!("http://{}/scim/v2", self.addr)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_options(&self, options: FakeScimOptions) {
        self.lock().options = options;
    }

    /// Adds a user as if made by hand on the target (stored as given, with a fresh id).
    pub fn seed_user(&self, mut user: Value) -> String {
        let mut st = self.lock();
        st.next_id += 1;
        let id = format!("fake-{}", st.next_id);
        user["id"] = json!(id);
        st.users.push(user);
        id
    }

    /// Removes a user as if deleted on the target by hand.
    pub fn remove_user(&self, id: &str) {
        self.lock().users.retain(|u| u["id"] != id);
    }

    /// The stored users (with their ids).
    pub fn users(&self) -> Vec<Value> {
        self.lock().users.clone()
    }

    pub fn requests(&self) -> Vec<FakeRequest> {
        self.lock().requests.clone()
    }

    pub fn clear(&self) {
        self.lock().requests.clear();
    }

    /// Requests with `method` (e.g. `POST`).
    pub fn count(&self, method: &str) -> usize {
        self.lock()
            .requests
            .iter()
            .filter(|r| r.method == method)
            .count()
    }
}

impl Drop for FakeScim {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Wake the acceptor.
        let _ = TcpStream::connect(self.addr);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
    }
}

fn serve(stream: TcpStream, state: &Mutex<State>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut parts = line.split_whitespace();
    let (method, target) = (
        parts.next().unwrap_or("").to_string(),
        parts.next().unwrap_or("").to_string(),
    );
    let mut length = 0usize;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0u8; length];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let path = target
        .strip_prefix("/scim/v2")
        .unwrap_or(&target)
        .to_string();
    let (status, answer) = {
        let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
        st.requests.push(FakeRequest {
            method: method.clone(),
            path: path.clone(),
            body: body.clone(),
        });
        handle(&mut st, &method, &path, body)
    };
    let text = if answer.is_null() {
        String::new()
    } else {
        answer.to_string()
    };
    let reason = match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        404 => "Not Found",
        409 => "Conflict",
        501 => "Not Implemented",
        _ => "Other",
    };
    let mut out = stream;
    let _ = write!(
        out,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/scim+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    );
    let _ = out.flush();
    let _ = out.shutdown(Shutdown::Both);
}

fn error(status: u16, detail: &str) -> (u16, Value) {
    (
        status,
        json!({"schemas": ["urn:ietf:params:scim:api:messages:2.0:Error"], "status": status.to_string(), "detail": detail}),
    )
}

/// The resource as the fake shows it.
fn shown(options: &FakeScimOptions, user: &Value) -> Value {
    let mut u = user.clone();
    if options.omit_ids {
        if let Some(o) = u.as_object_mut() {
            o.remove("id");
        }
    }
    u
}

/// What the fake keeps of a value sent for top-level attribute `attr`: `None` = not stored.
fn stored(options: &FakeScimOptions, attr: &str, value: &Value) -> Option<Value> {
    if options.drop.iter().any(|d| d == attr) {
        return None;
    }
    if options.strip_item_type && matches!(attr, "emails" | "phoneNumbers") {
        if let Value::Array(items) = value {
            return Some(Value::Array(
                items
                    .iter()
                    .map(|i| {
                        let mut i = i.clone();
                        if let Some(o) = i.as_object_mut() {
                            o.remove("type");
                        }
                        i
                    })
                    .collect(),
            ));
        }
    }
    Some(value.clone())
}

fn store_all(options: &FakeScimOptions, resource: &Map<String, Value>) -> Map<String, Value> {
    resource
        .iter()
        .filter_map(|(k, v)| stored(options, k, v).map(|v| (k.clone(), v)))
        .collect()
}

fn handle(st: &mut State, method: &str, path: &str, body: Value) -> (u16, Value) {
    let (route, _query) = path.split_once('?').unwrap_or((path, ""));
    let segments: Vec<&str> = route.trim_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        ("GET", ["ServiceProviderConfig"]) => (
            200,
            json!({
                "schemas": ["urn:ietf:params:scim:schemas:core:2.0:ServiceProviderConfig"],
                "patch": {"supported": true},
                "filter": {"supported": false, "maxResults": 200},
                "etag": {"supported": false},
                "bulk": {"supported": false},
                "changePassword": {"supported": false},
                "sort": {"supported": false},
            }),
        ),
        ("GET", ["Users"]) => {
            let items: Vec<Value> = st.users.iter().map(|u| shown(&st.options, u)).collect();
            (
                200,
                json!({
                    "schemas": ["urn:ietf:params:scim:api:messages:2.0:ListResponse"],
                    "totalResults": items.len(),
                    "startIndex": 1,
                    "itemsPerPage": items.len(),
                    "Resources": items,
                }),
            )
        }
        ("GET", ["Users", id]) => match st.users.iter().find(|u| u["id"] == *id) {
            Some(u) => (200, shown(&st.options, u)),
            None => error(404, "no such user"),
        },
        ("POST", ["Users"]) => {
            let Some(obj) = body.as_object() else {
                return error(400, "not an object");
            };
            let name = obj.get("userName").and_then(Value::as_str).unwrap_or("");
            if st.options.unique_user_names
                && st.users.iter().any(|u| {
                    u["userName"]
                        .as_str()
                        .is_some_and(|n| n.eq_ignore_ascii_case(name))
                })
            {
                return error(409, "userName taken");
            }
            let mut user = store_all(&st.options, obj);
            st.next_id += 1;
            user.insert("id".into(), json!(format!("fake-{}", st.next_id)));
            let user = Value::Object(user);
            st.users.push(user.clone());
            (201, shown(&st.options, &user))
        }
        ("PATCH", ["Users", id]) => {
            let options = st.options.clone();
            let Some(user) = st.users.iter_mut().find(|u| u["id"] == *id) else {
                return error(404, "no such user");
            };
            let refused = body["Operations"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|op| op["path"].as_str())
                .any(|p| {
                    options
                        .refuse_patch_of
                        .iter()
                        .any(|r| p.starts_with(r.as_str()))
                });
            if refused {
                return error(501, "this attribute cannot be changed");
            }
            let obj = user.as_object_mut().unwrap();
            for op in body["Operations"].as_array().into_iter().flatten() {
                let kind = op["op"].as_str().unwrap_or("").to_ascii_lowercase();
                let path = op["path"].as_str();
                match (kind.as_str(), path) {
                    ("remove", Some(p)) => {
                        let top = p.split(['.', '[']).next().unwrap_or(p);
                        if p.contains('.') && !p.contains('[') {
                            let sub = &p[top.len() + 1..];
                            if let Some(Value::Object(o)) = obj.get_mut(top) {
                                o.remove(sub);
                            }
                        } else {
                            obj.remove(top);
                        }
                    }
                    (_, Some(p)) => {
                        if let Some(v) = stored(&options, p, &op["value"]) {
                            obj.insert(p.to_string(), v);
                        }
                    }
                    (_, None) => {
                        if let Some(values) = op["value"].as_object() {
                            for (k, v) in store_all(&options, values) {
                                obj.insert(k, v);
                            }
                        }
                    }
                }
            }
            let user = user.clone();
            (200, shown(&options, &user))
        }
        ("PUT", ["Users", id]) => {
            let options = st.options.clone();
            let Some(user) = st.users.iter_mut().find(|u| u["id"] == *id) else {
                return error(404, "no such user");
            };
            let mut next = store_all(&options, &body.as_object().cloned().unwrap_or_default());
            next.insert("id".into(), json!(id));
            *user = Value::Object(next);
            let user = user.clone();
            (200, shown(&options, &user))
        }
        ("DELETE", ["Users", id]) => {
            let before = st.users.len();
            st.users.retain(|u| u["id"] != *id);
            if st.users.len() < before {
                (204, Value::Null)
            } else {
                error(404, "no such user")
            }
        }
        _ => error(404, "not here"),
    }
}
