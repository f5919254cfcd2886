//! The canonical directory model: users, groups, their immutable ids and content hashes.
//! Knows nothing of LDAP wire types or SCIM; both sides translate into and out of this.

pub mod action;
pub mod dn;
pub mod filter;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The directory's immutable id of an entry (`entryUUID`, or `objectGUID` as a canonical GUID
/// string), lowercased. Sent to targets as SCIM `externalId`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DirectoryId(pub String);

impl DirectoryId {
    pub fn new(raw: &str) -> Self {
        DirectoryId(raw.trim().to_ascii_lowercase())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DirectoryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The id a SCIM service provider gave a resource.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ScimId(pub String);

/// The longest id accepted from a target.
pub const MAX_SCIM_ID_LEN: usize = 1024;

impl ScimId {
    /// The one way an id that came from a target becomes a `ScimId`. An id is one path
    /// segment of the resource's URL (it is percent-encoded there), so anything that could
    /// read as more than one segment, a query or a fragment is refused: `/`, `\`, `?`, `#`,
    /// `.`, `..` or any `..`, control characters, an empty or an overlong id.
    pub fn parse(raw: &str) -> Result<ScimId, String> {
        let shown = || {
            let mut s: String = raw.chars().take(64).collect();
            if s.len() < raw.len() {
                s.push('…');
            }
            format!("{s:?}")
        };
        if raw.is_empty() {
            return Err("the id is empty".into());
        }
        if raw.len() > MAX_SCIM_ID_LEN {
            return Err(format!(
                "the id {} is longer than {MAX_SCIM_ID_LEN} bytes",
                shown()
            ));
        }
        if raw == "." || raw.contains("..") {
            return Err(format!("the id {} is not a single path segment", shown()));
        }
        if let Some(c) = raw
            .chars()
            .find(|c| matches!(c, '/' | '\\' | '?' | '#') || c.is_control())
        {
            return Err(format!(
                "the id {} contains {c:?}, which cannot be part of a path segment",
                shown()
            ));
        }
        Ok(ScimId(raw.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ScimId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Directory attributes of one entry: lowercased attribute name → values, in directory order.
pub type Attributes = BTreeMap<String, Vec<String>>;

/// Where a group entry's attributes list those that came back with a value that is not
/// valid UTF-8 (lowercased; not otherwise in the map). No directory attribute has this name.
pub const UNREADABLE_ATTRIBUTES: &str = "ldap2scim;unreadable";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectoryUser {
    pub id: DirectoryId,
    pub dn: String,
    pub attrs: Attributes,
    /// Disabled in the directory (`disabled_filter`, or AD `userAccountControl` bit 2).
    pub disabled: bool,
    /// Attributes (lowercased) that came back with a value that is not valid UTF-8; they are
    /// not in `attrs`. A mapping that names one cannot tell what the value is: the entry is a
    /// problem, never an attribute pushed as empty. (AD's binary ids are text by then.)
    pub invalid_utf8: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectoryGroup {
    pub id: DirectoryId,
    pub dn: String,
    pub attrs: Attributes,
    /// The users that count as members: direct ones, plus those of nested groups when
    /// `nested = true`.
    pub members: BTreeSet<DirectoryId>,
}

/// One complete, consistent read of the directory. A read that was not complete is an error
/// of the source and never becomes a `Directory`.
#[derive(Debug, Clone, Default)]
pub struct Directory {
    pub users: Vec<DirectoryUser>,
    pub groups: Vec<DirectoryGroup>,
}

impl Directory {
    /// The entry a name (its id, DN, or one of [`LOOKUP_ATTRIBUTES`]; a group's `cn`) names.
    pub fn find(&self, needle: &str) -> Option<Entry<'_>> {
        let lower = needle.to_lowercase();
        let norm = dn::normalize(needle);
        let matches_user = |u: &&DirectoryUser| {
            u.id.0 == lower
                || norm.as_deref() == dn::normalize(&u.dn).as_deref()
                || u.attrs.iter().any(|(k, vs)| {
                    LOOKUP_ATTRIBUTES.iter().any(|a| a.eq_ignore_ascii_case(k))
                        && vs.iter().any(|v| v.to_lowercase() == lower)
                })
        };
        if let Some(u) = self.users.iter().find(matches_user) {
            return Some(Entry::User(u));
        }
        self.groups
            .iter()
            .find(|g| {
                g.id.0 == lower
                    || norm.as_deref() == dn::normalize(&g.dn).as_deref()
                    || g.attrs
                        .get("cn")
                        .is_some_and(|vs| vs.iter().any(|v| v.to_lowercase() == lower))
            })
            .map(Entry::Group)
    }
}

/// The user attributes [`Directory::find`] compares a name with.
pub const LOOKUP_ATTRIBUTES: [&str; 5] =
    ["uid", "mail", "cn", "userPrincipalName", "sAMAccountName"];

pub enum Entry<'a> {
    User(&'a DirectoryUser),
    Group(&'a DirectoryGroup),
}

/// A stable hash of a JSON representation (object keys are kept in a canonical order by the
/// callers, which build it from `BTreeMap`s).
pub fn content_hash<T: Serialize + ?Sized>(value: &T) -> String {
    // Serialized straight into the hasher: the same bytes as `serde_json::to_vec`, without
    // building them (or a `Value`) first.
    let mut hasher = HashWriter(Sha256::new());
    if serde_json::to_writer(&mut hasher, value).is_err() {
        hasher = HashWriter(Sha256::new());
    }
    hex_digest(hasher.0)
}

/// [`content_hash`] of bytes that already are a value's JSON serialization.
pub fn bytes_hash(json: &[u8]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(json);
    hex_digest(hasher)
}

fn hex_digest(hasher: Sha256) -> String {
    let digest = hasher.finalize();
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(32);
    for b in digest.iter().take(16) {
        out.push(HEX[usize::from(b >> 4)] as char);
        out.push(HEX[usize::from(b & 0xf)] as char);
    }
    out
}

struct HashWriter(Sha256);

impl std::io::Write for HashWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One attribute's change, for reports and PATCH bodies.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AttrChange {
    pub path: String,
    pub from: Option<serde_json::Value>,
    pub to: Option<serde_json::Value>,
}

/// Which kind of directory is read (`ldap.dialect`): its id attribute and id form, how
/// disabled accounts and large groups show.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    OpenLdap,
    ActiveDirectory,
}

/// Whether `external_id` has the form of the dialect's directory ids, as ldap2scim sends them
/// as `externalId`: an RFC 4122 UUID in text (OpenLDAP's `entryUUID`, any case on input) or
/// AD's `objectGUID` as the canonical lowercase GUID string. Only such accounts can be
/// orphans: an account without one was made by hand (or by another tool) and is never ours.
pub fn is_directory_style(dialect: Dialect, external_id: &str) -> bool {
    let b = external_id.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => match dialect {
                Dialect::OpenLdap => c.is_ascii_hexdigit(),
                Dialect::ActiveDirectory => c.is_ascii_digit() || (b'a'..=b'f').contains(c),
            },
        })
}

#[cfg(test)]
mod scim_id_tests {
    use super::ScimId;

    #[test]
    fn ids_are_single_path_segments() {
        for ok in [
            "2819c223-7f76-453a-919d-413861904646",
            "a b",
            "x%2Fy",
            "a.b",
            "é",
        ] {
            assert_eq!(ScimId::parse(ok).unwrap().as_str(), ok);
        }
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "a?b",
            "a#b",
            "a\\b",
            "a..b",
            "../../x?y=",
            "a\nb",
        ] {
            assert!(ScimId::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(ScimId::parse(&"x".repeat(2000)).is_err());
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A user with a few attributes, for the tests of what reads them.
    pub(crate) fn jdoe() -> DirectoryUser {
        let mut attrs = Attributes::new();
        attrs.insert("uid".into(), vec!["jdoe".into()]);
        attrs.insert("mail".into(), vec!["jdoe@example.org".into()]);
        attrs.insert("givenname".into(), vec!["Jane".into()]);
        attrs.insert("sn".into(), vec!["Doe".into()]);
        DirectoryUser {
            id: DirectoryId::new("ABC"),
            dn: "uid=jdoe,dc=x".into(),
            attrs,
            disabled: false,
            invalid_utf8: Vec::new(),
        }
    }

    #[test]
    fn only_the_dialects_id_form_is_directory_style() {
        let uuid = "107f0144-823a-1041-89a3-21734381405b";
        assert!(is_directory_style(Dialect::OpenLdap, uuid));
        assert!(is_directory_style(Dialect::ActiveDirectory, uuid));
        let upper = uuid.to_ascii_uppercase();
        assert!(is_directory_style(Dialect::OpenLdap, &upper));
        assert!(
            !is_directory_style(Dialect::ActiveDirectory, &upper),
            "objectGUID is written lowercase"
        );
        for other in [
            "",
            "HR-4711",
            "{107f0144-823a-1041-89a3-21734381405b}",
            "107f0144823a104189a321734381405b",
            "107f0144-823a-1041-89a3-21734381405g",
        ] {
            assert!(!is_directory_style(Dialect::OpenLdap, other), "{other}");
        }
    }
}
