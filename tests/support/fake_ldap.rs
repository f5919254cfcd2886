//! A small fake LDAP server over a real TCP socket on 127.0.0.1, for what no real server in
//! CI does on demand: Active Directory's range retrieval (`member;range=0-1499`, then
//! `member;range=1500-*` on the group's DN …), broken ranges, continuation references, and
//! `objectGUID` values whose bytes happen to be valid UTF-8.
//!
//! It speaks just enough LDAPv3 (hand-written BER) for ldap2scim: simple bind (any
//! credentials), subtree searches with the paged-results control (RFC 2696, served properly,
//! with a cookie), base-scope searches with an attribute list, unbind. Search filters are not
//! evaluated: a subtree search returns every entry under its base (plus the references
//! configured for that base). Each connection is served by its own thread; the listener stops
//! when the handle is dropped.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// OID of the paged-results control.
const PAGED_RESULTS: &str = "1.2.840.113556.1.4.319";

/// One directory entry: DN and attributes with raw values.
#[derive(Clone, Debug)]
pub struct FakeEntry {
    pub dn: String,
    pub attrs: Vec<(String, Vec<Vec<u8>>)>,
    /// Served by range retrieval (see [`FakeLdap::start`]) instead of as a plain `member`.
    pub ranged_members: Option<Vec<String>>,
    /// Sent as the entry's DN instead of `dn` (e.g. bytes that are not UTF-8).
    pub raw_dn: Option<Vec<u8>>,
}

impl FakeEntry {
    /// An entry with text attributes.
    pub fn new(dn: &str, attrs: &[(&str, &[&str])]) -> FakeEntry {
        FakeEntry {
            dn: dn.to_string(),
            attrs: attrs
                .iter()
                .map(|(k, vs)| {
                    (
                        k.to_string(),
                        vs.iter().map(|v| v.as_bytes().to_vec()).collect(),
                    )
                })
                .collect(),
            ranged_members: None,
            raw_dn: None,
        }
    }

    /// Adds an attribute with one raw (possibly binary) value.
    pub fn with_bytes(mut self, attr: &str, value: &[u8]) -> FakeEntry {
        self.attrs.push((attr.to_string(), vec![value.to_vec()]));
        self
    }

    /// Sends `dn` as the entry's DN in search results (`self.dn` still finds it).
    pub fn with_dn_bytes(mut self, dn: &[u8]) -> FakeEntry {
        self.raw_dn = Some(dn.to_vec());
        self
    }

    /// Makes `members` the group's `member` values, handed out in ranges.
    pub fn with_ranged_members(mut self, members: Vec<String>) -> FakeEntry {
        self.ranged_members = Some(members);
        self
    }
}

/// How the server misbehaves on a range request whose range starts at `at`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RangeFault {
    /// Answers with an LDAP error (busy, result code 51).
    Error { at: usize },
    /// Answers with the range after the one asked for: the values in between are skipped.
    Skip { at: usize },
    /// Answers with the entry but without any `member;range=…` attribute.
    Missing { at: usize },
    /// Answers with a bounded range that holds one value fewer than its bounds say.
    Short { at: usize },
}

/// What the server saw.
#[derive(Clone, Debug, Default)]
pub struct FakeLog {
    /// Every range request as (entry DN, attribute description asked for).
    pub range_requests: Vec<(String, String)>,
    /// How many subtree searches (pages included) it answered.
    pub subtree_searches: usize,
}

struct Shared {
    entries: Vec<FakeEntry>,
    /// Search base (lowercase) → continuation reference URLs returned by subtree searches there.
    references: Vec<(String, Vec<String>)>,
    range_step: usize,
    fault: Mutex<Option<RangeFault>>,
    log: Mutex<FakeLog>,
    connections: AtomicUsize,
    stop: AtomicBool,
}

/// A running fake LDAP server on 127.0.0.1; stopped when dropped.
pub struct FakeLdap {
    port: u16,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl FakeLdap {
    /// Serves `entries`; group members given by [`FakeEntry::with_ranged_members`] go out in
    /// ranges of `range_step` values (`member;range=0-{step-1}` in the subtree search) when
    /// there are more than `range_step` of them, as a plain `member` otherwise.
    pub fn start(entries: Vec<FakeEntry>, range_step: usize) -> FakeLdap {
        FakeLdap::start_with_references(entries, range_step, Vec::new())
    }

    /// Like [`FakeLdap::start`]; a subtree search based at one of the `references` keys also
    /// returns its continuation reference URLs (SearchResultReference).
    pub fn start_with_references(
        entries: Vec<FakeEntry>,
        range_step: usize,
        references: Vec<(String, Vec<String>)>,
    ) -> FakeLdap {
        // Port 0: the kernel picks a free port, so parallel tests cannot clash.
        let listener = TcpListener::bind(("127.0.0.1", 0)).expect("bind the fake LDAP server");
        let port = listener.local_addr().expect("local address").port();
        let shared = Arc::new(Shared {
            entries,
            references: references
                .into_iter()
                .map(|(base, urls)| (base.to_ascii_lowercase(), urls))
                .collect(),
            range_step: range_step.max(1),
            fault: Mutex::new(None),
            log: Mutex::new(FakeLog::default()),
            connections: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        });
        let acceptor = {
            let shared = shared.clone();
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if shared.stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    shared.connections.fetch_add(1, Ordering::SeqCst);
                    let shared = shared.clone();
                    std::thread::spawn(move || {
                        let _ = serve(stream, &shared);
                    });
                }
            })
        };
        FakeLdap {
            port,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// `ldap://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("ldap://127.0.0.1:{}", self.port)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// From now on, misbehave as `fault` says (`None`: behave).
    pub fn set_fault(&self, fault: Option<RangeFault>) {
        *self.shared.fault.lock().unwrap_or_else(|e| e.into_inner()) = fault;
    }

    /// What it saw so far.
    pub fn log(&self) -> FakeLog {
        self.shared
            .log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How many TCP connections it accepted.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }
}

impl Drop for FakeLdap {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the acceptor, which then sees the flag (so this connection is not counted).
        if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            if let Some(acceptor) = self.acceptor.take() {
                let _ = acceptor.join();
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The protocol

fn serve(mut stream: TcpStream, shared: &Shared) -> io::Result<()> {
    while let Some(message) = read_message(&mut stream)? {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let (tag, body, _) = tlv(&message).ok_or_else(bad)?;
        if tag != 0x30 {
            return Err(bad());
        }
        let (_, id, rest) = tlv(body).ok_or_else(bad)?;
        let id = decode_int(id);
        let (op, op_body, rest) = tlv(rest).ok_or_else(bad)?;
        let controls = match tlv(rest) {
            Some((0xa0, controls, _)) => controls,
            _ => &[][..],
        };
        match op {
            // BindRequest → BindResponse success.
            0x60 => stream.write_all(&message_out(id, &result(0x61, 0, "")))?,
            // UnbindRequest.
            0x42 => break,
            // SearchRequest.
            0x63 => {
                for response in search(shared, op_body, controls).ok_or_else(bad)? {
                    stream.write_all(&message_with_controls(id, &response.0, &response.1))?;
                }
            }
            // AbandonRequest: nothing to answer.
            0x50 => {}
            // Anything else: unwillingToPerform, as an ExtendedResponse.
            _ => stream.write_all(&message_out(id, &result(0x78, 53, "not supported")))?,
        }
    }
    let _ = stream.shutdown(Shutdown::Both);
    Ok(())
}

/// One protocol op to send, with its controls (already encoded, may be empty).
type Response = (Vec<u8>, Vec<u8>);

fn search(shared: &Shared, body: &[u8], controls: &[u8]) -> Option<Vec<Response>> {
    let (_, base, rest) = tlv(body)?;
    let base = String::from_utf8_lossy(base).to_string();
    let (_, scope, rest) = tlv(rest)?;
    let scope = decode_int(scope);
    let (_, _deref, rest) = tlv(rest)?;
    let (_, _size, rest) = tlv(rest)?;
    let (_, _time, rest) = tlv(rest)?;
    let (_, _types_only, rest) = tlv(rest)?;
    let (_, _filter, rest) = tlv(rest)?;
    let (_, attr_list, _) = tlv(rest)?;
    let mut attrs = Vec::new();
    let mut list = attr_list;
    while let Some((_, a, more)) = tlv(list) {
        attrs.push(String::from_utf8_lossy(a).to_string());
        list = more;
    }
    if scope == 0 {
        Some(base_search(shared, &base, &attrs))
    } else {
        Some(subtree_search(shared, &base, controls))
    }
}

fn find_entry<'a>(shared: &'a Shared, dn: &str) -> Option<&'a FakeEntry> {
    shared
        .entries
        .iter()
        .find(|e| e.dn.eq_ignore_ascii_case(dn))
}

/// A base-scope search: what ldap2scim sends for `member;range=LOW-*`.
fn base_search(shared: &Shared, dn: &str, attrs: &[String]) -> Vec<Response> {
    let Some(entry) = find_entry(shared, dn) else {
        return vec![(result(0x65, 32, "no such object"), Vec::new())];
    };
    let mut out_attrs: Vec<(String, Vec<Vec<u8>>)> = Vec::new();
    for wanted in attrs {
        let Some((name, range)) = wanted.split_once(";range=") else {
            if let Some(a) = entry
                .attrs
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(wanted))
            {
                out_attrs.push(a.clone());
            }
            continue;
        };
        let Some(members) = entry
            .ranged_members
            .as_ref()
            .filter(|_| name.eq_ignore_ascii_case("member"))
        else {
            continue;
        };
        let low: usize = range
            .split_once('-')
            .and_then(|(l, _)| l.parse().ok())
            .unwrap_or(0);
        shared
            .log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .range_requests
            .push((entry.dn.clone(), wanted.clone()));
        let fault = shared
            .fault
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut start = low;
        let mut short = false;
        match fault {
            Some(RangeFault::Error { at }) if at == low => {
                return vec![(result(0x65, 51, "busy: try again later"), Vec::new())];
            }
            Some(RangeFault::Missing { at }) if at == low => continue,
            Some(RangeFault::Skip { at }) if at == low => start = low + shared.range_step,
            Some(RangeFault::Short { at }) if at == low => short = true,
            _ => {}
        }
        let (key, values) = member_range(members, start, shared.range_step);
        let mut values = values;
        if short && values.len() > 1 && !key.ends_with('*') {
            values.pop();
        }
        out_attrs.push((key, values));
    }
    vec![
        (encode_entry(entry.dn.as_bytes(), &out_attrs), Vec::new()),
        (result(0x65, 0, ""), Vec::new()),
    ]
}

/// `member;range=START-END` (or `START-*` for the last one) and its values.
fn member_range(members: &[String], start: usize, step: usize) -> (String, Vec<Vec<u8>>) {
    let start = start.min(members.len());
    let end = (start + step).min(members.len());
    let key = if end >= members.len() {
        format!("member;range={start}-*")
    } else {
        format!("member;range={start}-{}", end - 1)
    };
    let values = members[start..end]
        .iter()
        .map(|m| m.as_bytes().to_vec())
        .collect();
    (key, values)
}

/// A subtree search, paged when the request carries the paged-results control.
fn subtree_search(shared: &Shared, base: &str, controls: &[u8]) -> Vec<Response> {
    shared
        .log
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .subtree_searches += 1;
    let suffix = base.to_ascii_lowercase();
    let matching: Vec<&FakeEntry> = shared
        .entries
        .iter()
        .filter(|e| {
            let dn = e.dn.to_ascii_lowercase();
            dn == suffix || dn.ends_with(&format!(",{suffix}"))
        })
        .collect();
    let paging = paged_request(controls);
    let (offset, size) = match &paging {
        Some((size, cookie)) => (
            std::str::from_utf8(cookie)
                .ok()
                .and_then(|c| c.parse::<usize>().ok())
                .unwrap_or(0),
            if *size == 0 { usize::MAX } else { *size },
        ),
        None => (0, usize::MAX),
    };
    let end = offset.saturating_add(size).min(matching.len());
    let mut out = Vec::new();
    if offset == 0 {
        for (b, urls) in &shared.references {
            if *b == suffix {
                let refs: Vec<u8> = urls.iter().flat_map(|u| octets(u.as_bytes())).collect();
                out.push((tlv_out(0x73, &refs), Vec::new()));
            }
        }
    }
    for entry in &matching[offset.min(end)..end] {
        let mut attrs = entry.attrs.clone();
        if let Some(members) = &entry.ranged_members {
            if members.len() > shared.range_step {
                attrs.push(member_range(members, 0, shared.range_step));
            } else {
                attrs.push((
                    "member".into(),
                    members.iter().map(|m| m.as_bytes().to_vec()).collect(),
                ));
            }
        }
        let dn = entry.raw_dn.as_deref().unwrap_or(entry.dn.as_bytes());
        out.push((encode_entry(dn, &attrs), Vec::new()));
    }
    let controls = match paging {
        Some(_) => {
            let cookie = if end < matching.len() {
                end.to_string()
            } else {
                String::new()
            };
            let value = tlv_out(
                0x30,
                &[int(0x02, matching.len() as i64), octets(cookie.as_bytes())].concat(),
            );
            let control = tlv_out(
                0x30,
                &[octets(PAGED_RESULTS.as_bytes()), octets(&value)].concat(),
            );
            tlv_out(0xa0, &control)
        }
        None => Vec::new(),
    };
    out.push((result(0x65, 0, ""), controls));
    out
}

/// The (size, cookie) of a paged-results request control, if there is one.
fn paged_request(mut controls: &[u8]) -> Option<(usize, Vec<u8>)> {
    while let Some((_, control, rest)) = tlv(controls) {
        controls = rest;
        let (_, oid, mut fields) = tlv(control)?;
        if oid != PAGED_RESULTS.as_bytes() {
            continue;
        }
        while let Some((tag, value, more)) = tlv(fields) {
            fields = more;
            if tag == 0x04 {
                let (_, seq, _) = tlv(value)?;
                let (_, size, rest) = tlv(seq)?;
                let (_, cookie, _) = tlv(rest)?;
                return Some((decode_int(size).max(0) as usize, cookie.to_vec()));
            }
        }
    }
    None
}

// ---------------------------------------------------------------------------------------------
// BER, just what LDAP needs: single-byte tags, definite lengths

fn bad() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "malformed LDAP message")
}

/// Reads one whole LDAPMessage (tag, length, contents); `None` at a clean end of stream.
fn read_message(stream: &mut TcpStream) -> io::Result<Option<Vec<u8>>> {
    let mut head = [0u8; 2];
    match stream.read_exact(&mut head[..1]) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    stream.read_exact(&mut head[1..])?;
    let mut message = head.to_vec();
    let len = if head[1] & 0x80 == 0 {
        usize::from(head[1])
    } else {
        let n = usize::from(head[1] & 0x7f);
        if n == 0 || n > 4 {
            return Err(bad());
        }
        let mut bytes = vec![0u8; n];
        stream.read_exact(&mut bytes)?;
        message.extend_from_slice(&bytes);
        bytes
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b))
    };
    let start = message.len();
    message.resize(start + len, 0);
    stream.read_exact(&mut message[start..])?;
    Ok(Some(message))
}

/// Splits the first TLV off `buf`: (tag, contents, rest).
fn tlv(buf: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = buf.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first & 0x80 == 0 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

fn decode_int(bytes: &[u8]) -> i64 {
    let mut v: i64 = if bytes.first().is_some_and(|b| b & 0x80 != 0) {
        -1
    } else {
        0
    };
    for &b in bytes {
        v = (v << 8) | i64::from(b);
    }
    v
}

fn tlv_out(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|&&b| b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
    out
}

fn int(tag: u8, v: i64) -> Vec<u8> {
    let bytes = v.to_be_bytes();
    let mut i = 0;
    // Minimal two's complement: drop leading bytes that only repeat the sign.
    while i < 7
        && ((bytes[i] == 0 && bytes[i + 1] & 0x80 == 0)
            || (bytes[i] == 0xff && bytes[i + 1] & 0x80 != 0))
    {
        i += 1;
    }
    tlv_out(tag, &bytes[i..])
}

fn octets(bytes: &[u8]) -> Vec<u8> {
    tlv_out(0x04, bytes)
}

/// An LDAPResult-shaped op (`tag` = BindResponse 0x61, SearchResultDone 0x65, …).
fn result(tag: u8, code: i64, message: &str) -> Vec<u8> {
    tlv_out(
        tag,
        &[int(0x0a, code), octets(b""), octets(message.as_bytes())].concat(),
    )
}

fn encode_entry(dn: &[u8], attrs: &[(String, Vec<Vec<u8>>)]) -> Vec<u8> {
    let mut list = Vec::new();
    for (name, values) in attrs {
        let vals: Vec<u8> = values.iter().flat_map(|v| octets(v)).collect();
        list.extend(tlv_out(
            0x30,
            &[octets(name.as_bytes()), tlv_out(0x31, &vals)].concat(),
        ));
    }
    tlv_out(0x64, &[octets(dn), tlv_out(0x30, &list)].concat())
}

fn message_out(id: i64, op: &[u8]) -> Vec<u8> {
    message_with_controls(id, op, &[])
}

fn message_with_controls(id: i64, op: &[u8], controls: &[u8]) -> Vec<u8> {
    tlv_out(
        0x30,
        &[int(0x02, id), op.to_vec(), controls.to_vec()].concat(),
    )
}
