//! Pure mapping: the directory, seen through one target's configuration, becomes the set of
//! SCIM users and groups that target should have (its scope, its mapping templates).
//!
//! A user is represented as a flat map of SCIM attribute paths to JSON values, so the planner
//! can diff attribute by attribute and the client can build both full resources and PATCHes.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use serde_json::Value;

use crate::config::template::Entry;
use crate::config::{GroupScope, GroupsFilter, TargetConfig, Template};
use crate::model::dn;
use crate::model::{Directory, DirectoryGroup, DirectoryId, DirectoryUser};

/// Flat SCIM attributes: path (as in the mapping, plus `externalId` and `active`) → value.
pub type FlatAttrs = BTreeMap<String, Value>;

/// A user's flat attributes as they are kept between mapping and the request that uses them:
/// packed as the compact JSON of the [`FlatAttrs`] (keys in order, so equal maps pack to
/// equal text), and shared, not copied, between the desired user, the change that creates or
/// updates it and the snapshot row written afterwards.
///
/// A map of seven attributes costs about 2 KB on the heap (nodes, key and value strings); its
/// JSON about 250 bytes. At 100,000 users that is the difference between fitting in 300 MB
/// or not. Code that needs the map [`unpack`](Self::unpack)s it for the moment it needs it.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SharedAttrs(Option<std::sync::Arc<str>>);

impl SharedAttrs {
    pub fn pack(attrs: &FlatAttrs) -> Self {
        if attrs.is_empty() {
            return Self::default();
        }
        let json = serde_json::to_string(attrs).expect("a map of JSON values always serializes");
        Self(Some(json.into()))
    }

    /// The attributes as a map (empty when there are none).
    pub fn unpack(&self) -> FlatAttrs {
        match &self.0 {
            // Only `pack` and `from_written` make the text: it always reads back.
            Some(json) => serde_json::from_str(json).expect("packed attributes are valid JSON"),
            None => FlatAttrs::new(),
        }
    }

    /// Packed JSON written by [`map_compiled`], byte for byte what `pack` would write.
    fn from_written(json: Vec<u8>) -> Self {
        let json = String::from_utf8(json).expect("serde_json writes UTF-8");
        debug_assert_eq!(
            Self::pack(&serde_json::from_str(&json).unwrap()).json(),
            json
        );
        Self(Some(json.into()))
    }

    /// The compact JSON (`{}` when empty): what [`packed_hash`] hashes and the snapshot stores.
    pub fn json(&self) -> &str {
        self.0.as_deref().unwrap_or("{}")
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    /// The attribute paths present, in order.
    pub fn paths(&self) -> Vec<String> {
        self.unpack().into_keys().collect()
    }
}

impl From<FlatAttrs> for SharedAttrs {
    fn from(attrs: FlatAttrs) -> Self {
        Self::pack(&attrs)
    }
}

impl std::fmt::Debug for SharedAttrs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.json())
    }
}

impl serde::Serialize for SharedAttrs {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.unpack().serialize(s)
    }
}

impl<'de> serde::Deserialize<'de> for SharedAttrs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        FlatAttrs::deserialize(d).map(|attrs| Self::pack(&attrs))
    }
}

/// The empty attributes: an unchanged user or a row whose attributes were not loaded costs
/// no allocation (100,000 of them add up).
pub fn no_attrs() -> SharedAttrs {
    SharedAttrs::default()
}

#[derive(Debug, Clone, PartialEq)]
pub struct DesiredUser {
    pub id: DirectoryId,
    pub dn: String,
    pub user_name: String,
    pub active: bool,
    pub attrs: SharedAttrs,
    /// [`packed_hash`] of `attrs`: equal to the snapshot row's hash when nothing changed.
    pub hash: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DesiredGroup {
    pub id: DirectoryId,
    pub dn: String,
    pub display_name: String,
    /// In-scope users only.
    pub members: BTreeSet<DirectoryId>,
}

#[derive(Debug, Clone, Default)]
pub struct Desired {
    pub users: BTreeMap<DirectoryId, DesiredUser>,
    pub groups: BTreeMap<DirectoryId, DesiredGroup>,
    /// Users that cannot be represented (e.g. an empty userName), with the reason.
    pub problems: Vec<(DirectoryId, String, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum MapError {
    #[error("scope group {dn} (target {target}, key scope_groups) is not in the directory read; without it every user would be out of scope, so nothing is planned for this target. Check the DN and ldap.groups.base")]
    ScopeGroupMissing { target: String, dn: String },
}

/// What `target` should contain, given `dir`.
pub fn desired(dir: &Directory, target: &TargetConfig) -> Result<Desired, MapError> {
    desired_with(dir, target, |_, _| false)
}

/// Like [`desired`]; a user for which `unchanged(id, hash)` holds (its snapshot row has the
/// same hash) keeps no attributes: nothing will be diffed or sent for it, and a cycle over
/// 100,000 unchanged users need not hold their attributes at all.
pub fn desired_with(
    dir: &Directory,
    target: &TargetConfig,
    unchanged: impl Fn(&DirectoryId, &str) -> bool,
) -> Result<Desired, MapError> {
    let in_scope = scope(dir, target)?;
    let mapping = UserMapper::new(target);
    let mapped = dir
        .users
        .iter()
        .map(|user| {
            let in_scope = in_scope.as_ref().is_none_or(|s| s.contains(&user.id));
            in_scope.then(|| mapping.map(user))
        })
        .collect();
    Ok(assemble(dir, target, mapped, unchanged, None))
}

/// Like [`desired_with`], for users already mapped while the directory was read (`mapped[i]`
/// belongs to `dir.users[i]`; see [`UserMapper`]). Only for targets without `scope_groups`:
/// scope is known only once the groups are read.
///
/// `members`, when given, are the groups' member sets taken out of `dir` (`members[i]` of
/// `dir.groups[i]`), for the last target to use them: filtered in place, not copied.
pub fn desired_premapped(
    dir: &Directory,
    target: &TargetConfig,
    mapped: Vec<Result<DesiredUser, String>>,
    unchanged: impl Fn(&DirectoryId, &str) -> bool,
    members: Option<Vec<BTreeSet<DirectoryId>>>,
) -> Desired {
    debug_assert!(target.scope_groups.is_empty() && mapped.len() == dir.users.len());
    debug_assert!(members.as_ref().is_none_or(|m| m.len() == dir.groups.len()));
    assemble(
        dir,
        target,
        mapped.into_iter().map(Some).collect(),
        unchanged,
        members,
    )
}

/// The users of `scope_groups` (expanded), or `None` when the target has no scope.
fn scope<'d>(
    dir: &'d Directory,
    target: &TargetConfig,
) -> Result<Option<HashSet<&'d DirectoryId>>, MapError> {
    if target.scope_groups.is_empty() {
        return Ok(None);
    }
    let mut set = HashSet::new();
    // The configuration holds scope groups normalized.
    for scope_dn in &target.scope_groups {
        let group = dir
            .groups
            .iter()
            .find(|g| dn::normalize_lossy(&g.dn) == *scope_dn)
            .ok_or_else(|| MapError::ScopeGroupMissing {
                target: target.name.0.clone(),
                dn: scope_dn.clone(),
            })?;
        set.extend(group.members.iter());
    }
    Ok(Some(set))
}

/// One target's mapping, compiled once, applied user by user.
pub struct UserMapper {
    mapping: Compiled,
    /// The target's `max_value_length`, in bytes.
    max_value_length: usize,
    maps_manager: bool,
}

impl UserMapper {
    pub fn new(target: &TargetConfig) -> Self {
        UserMapper {
            mapping: compile_mapping(target),
            max_value_length: target.max_value_length,
            maps_manager: target.maps_manager(),
        }
    }

    /// Whether the target maps managers.
    pub fn maps_manager(&self) -> bool {
        self.maps_manager
    }

    pub fn map(&self, user: &DirectoryUser) -> Result<DesiredUser, String> {
        map_compiled(user, &self.mapping, self.max_value_length)
    }
}

/// Desired users and groups from mapped users (`None`: out of scope), in directory order.
fn assemble(
    dir: &Directory,
    target: &TargetConfig,
    mapped: Vec<Option<Result<DesiredUser, String>>>,
    unchanged: impl Fn(&DirectoryId, &str) -> bool,
    mut taken: Option<Vec<BTreeSet<DirectoryId>>>,
) -> Desired {
    let mut out = Desired::default();
    let maps_manager = target.maps_manager();
    let mut users = Vec::with_capacity(mapped.len());
    for (user, result) in dir.users.iter().zip(mapped) {
        match result {
            None => {}
            Some(Ok(mut u)) => {
                if !u.attrs.is_empty()
                    && unchanged(&u.id, &u.hash)
                    && !keeps_attributes(maps_manager, &u)
                {
                    u.attrs = no_attrs();
                }
                users.push((u.id.clone(), u))
            }
            Some(Err(reason)) => out
                .problems
                .push((user.id.clone(), user.dn.clone(), reason)),
        }
    }
    out.users = users.into_iter().collect();
    // A user that could not be mapped is still in the directory: it keeps its place in its
    // groups (the planner keeps what the target already has, and never deprovisions it).
    let unmapped: HashSet<&DirectoryId> = out.problems.iter().map(|(id, _, _)| id).collect();
    let mut group_problems = Vec::new();
    if target.groups != GroupScope::None {
        for (i, group) in dir.groups.iter().enumerate() {
            // The directory's own set when it was handed over, else a copy; filtered in place.
            let mut members = match taken.as_mut() {
                Some(sets) => std::mem::take(&mut sets[i]),
                None => group.members.clone(),
            };
            if members.len() > 64 {
                // A large group: one merge with the (id-ordered) users; `retain` goes in order.
                let mut users = out.users.keys().peekable();
                members.retain(|m| {
                    while users.next_if(|k| *k < m).is_some() {}
                    users.next_if(|k| *k == m).is_some() || unmapped.contains(m)
                });
            } else {
                members.retain(|m| out.users.contains_key(m) || unmapped.contains(m));
            }
            if target.groups == GroupScope::Scoped && members.is_empty() {
                continue;
            }
            if let Some(attr) = unreadable_group_attribute(target, group) {
                // Which group it is, or whether it is chosen, cannot be told: kept as it is.
                group_problems.push((
                    group.id.clone(),
                    group.dn.clone(),
                    format!("its attribute {attr} (read by groups_filter or group_mapping) has a value that is not valid UTF-8; fix the value in the directory ({UNTIL_FIXED})"),
                ));
                continue;
            }
            if !group_selected(target, group) {
                continue;
            }
            let display_name = match mapped_group_name(target, group) {
                Ok(name) => name,
                Err(reason) => {
                    // Kept as it is on the target, never deleted for it.
                    group_problems.push((group.id.clone(), group.dn.clone(), reason));
                    continue;
                }
            };
            out.groups.insert(
                group.id.clone(),
                DesiredGroup {
                    id: group.id.clone(),
                    dn: group.dn.clone(),
                    display_name,
                    members,
                },
            );
        }
    }
    out.problems.append(&mut group_problems);
    out
}

/// An attribute the target's group name template or `groups_filter` reads whose value
/// in this group is not text.
fn unreadable_group_attribute(target: &TargetConfig, group: &DirectoryGroup) -> Option<String> {
    let unreadable = group.attrs.get(crate::model::UNREADABLE_ATTRIBUTES)?;
    let mut read: Vec<String> = match &target.groups_filter {
        Some(GroupsFilter::Ldap(filter)) => filter.attributes(),
        Some(GroupsFilter::Names(_)) => vec!["cn".to_owned()],
        None => Vec::new(),
    };
    match &target.group_display_name {
        Some(t) => read.extend(t.attributes().map(str::to_ascii_lowercase)),
        None => read.push("cn".to_owned()),
    }
    read.into_iter().find(|a| unreadable.contains(a))
}

/// Whether `groups_filter` lets the group go to the target (no filter: every group).
pub fn group_selected(target: &TargetConfig, group: &DirectoryGroup) -> bool {
    match &target.groups_filter {
        None => true,
        Some(GroupsFilter::Ldap(filter)) => filter.matches(&group.dn, &group.attrs),
        Some(GroupsFilter::Names(patterns)) => {
            let name = group_display_name(group).to_lowercase();
            patterns
                .iter()
                .any(|p| crate::plan::glob_match(&p.to_lowercase(), &name))
        }
    }
}

/// The group's SCIM displayName on the target: `[group_mapping] displayName` rendered over
/// the group entry, else its `cn`. A template that fails or renders empty is the group's
/// problem (the group is left as it is on the target).
pub fn mapped_group_name(target: &TargetConfig, group: &DirectoryGroup) -> Result<String, String> {
    let Some(template) = &target.group_display_name else {
        return Ok(group_display_name(group));
    };
    let name = template
        .render(&Entry::new(&group.dn, &group.attrs))
        .map_err(|why| {
            format!("the template of group_mapping.displayName ({template}) fails for it: {why} ({UNTIL_FIXED})")
        })?;
    if name.is_empty() {
        return Err(format!(
            "its group_mapping.displayName ({template}) renders empty ({UNTIL_FIXED})"
        ));
    }
    if name.len() > target.max_value_length {
        return Err(format!(
            "its displayName is {} bytes long, more than this target's max_value_length ({} bytes) ({UNTIL_FIXED})",
            name.len(),
            target.max_value_length
        ));
    }
    Ok(name)
}

fn group_display_name(g: &DirectoryGroup) -> String {
    g.attrs
        .get("cn")
        .and_then(|v| v.first())
        .cloned()
        .or_else(|| dn::first_rdn_value(&g.dn))
        .unwrap_or_else(|| g.dn.clone())
}

/// Maps one user through the target's templates.
pub fn map_user(user: &DirectoryUser, target: &TargetConfig) -> Result<DesiredUser, String> {
    UserMapper::new(target).map(user)
}

/// A target's mapping laid out for writing: one slot per SCIM path, in the order of the flat map's keys
/// (so a user's packed JSON is written straight, without building the map), each with its
/// key already written as JSON (`"name.givenName":`).
type Compiled = Vec<(String, String, Slot)>;

enum Slot {
    /// A template; `true` for the manager's, whose value (a DN) is kept normalized.
    Template(Template, bool),
    /// The directory id, whatever the mapping says.
    ExternalId,
    /// Enabled or not, whatever the mapping says.
    Active,
}

fn compile_mapping(target: &TargetConfig) -> Compiled {
    let mut slots: BTreeMap<&str, Slot> = BTreeMap::new();
    for (path, template) in &target.mapping {
        slots.insert(
            path,
            Slot::Template(template.clone(), path == crate::config::MANAGER_PATH),
        );
    }
    slots.insert("externalId", Slot::ExternalId);
    slots.insert("active", Slot::Active);
    slots
        .into_iter()
        .map(|(path, slot)| {
            let mut key = serde_json::to_string(path).expect("a string serializes");
            key.push(':');
            (path.to_string(), key, slot)
        })
        .collect()
}

/// How a problem of the entry's own values ends: the plan leaves its account as it is.
const UNTIL_FIXED: &str = "until then nothing is changed for this entry on the target";

fn map_compiled(
    user: &DirectoryUser,
    mapping: &Compiled,
    max_value_length: usize,
) -> Result<DesiredUser, String> {
    // Exactly what `SharedAttrs::pack` writes for the map {path: value} (unit-tested).
    let mut json = Vec::with_capacity(256);
    let mut user_name = None;
    let entry = Entry::new(&user.dn, &user.attrs);
    for (path, key, slot) in mapping {
        let rendered;
        let value: &str = match slot {
            Slot::Template(template, is_manager) => {
                // A value that is not text would render as if the attribute were absent, and
                // an absent attribute is pushed as a removal.
                if let Some(attr) = template.unreadable_attribute(&user.invalid_utf8) {
                    return Err(format!(
                        "its attribute {attr} (mapped to {path}) has a value that is not valid UTF-8; fix the value in the directory ({UNTIL_FIXED})"
                    ));
                }
                let mut text = template.render(&entry).map_err(|why| {
                    format!(
                        "the template of {path} ({template}) fails for it: {why} ({UNTIL_FIXED})"
                    )
                })?;
                if text.is_empty() {
                    continue;
                }
                if *is_manager {
                    // Compared by DN (case, spacing and escapes aside), resolved when sent.
                    text = dn::normalize_lossy(&text);
                }
                rendered = text;
                if rendered.len() > max_value_length {
                    return Err(format!(
                        "its {path} value is {} bytes long, more than this target's max_value_length ({max_value_length} bytes); shorten it in the directory or raise max_value_length ({UNTIL_FIXED})",
                        rendered.len()
                    ));
                }
                &rendered
            }
            Slot::ExternalId => &user.id.0,
            Slot::Active => {
                if user.disabled {
                    "false"
                } else {
                    "true"
                }
            }
        };
        json.push(if json.is_empty() { b'{' } else { b',' });
        json.extend_from_slice(key.as_bytes());
        if matches!(slot, Slot::Active) {
            json.extend_from_slice(value.as_bytes());
        } else {
            serde_json::to_writer(&mut json, value).expect("a string serializes");
        }
        if path == "userName" {
            user_name = Some(value.to_string());
        }
    }
    json.push(b'}');
    let Some(user_name) = user_name else {
        return Err("its userName template renders empty; check the mapping of userName".into());
    };
    let attrs = SharedAttrs::from_written(json);
    Ok(DesiredUser {
        hash: packed_hash(&attrs),
        id: user.id.clone(),
        dn: user.dn.clone(),
        user_name,
        active: !user.disabled,
        attrs,
    })
}

/// Users by DN (normalized), to resolve manager references: built from a whole read (or the
/// whole mirror) when some target maps the manager.
#[derive(Debug, Default)]
pub struct Managers(std::collections::HashMap<String, DirectoryId>);

impl Managers {
    pub fn insert(&mut self, user_dn: &str, id: &DirectoryId) {
        self.0.insert(dn::normalize_lossy(user_dn), id.clone());
    }

    /// The directory id of the user with this (normalized) DN.
    pub fn id_of(&self, normalized_dn: &str) -> Option<&DirectoryId> {
        self.0.get(normalized_dn)
    }
}

/// A user whose manager is not on the target: the field is left empty, and the plan says so.
#[derive(Debug, Clone)]
pub struct ManagerNote {
    pub user: DirectoryId,
    pub manager_dn: String,
    /// The manager is not in the directory read at all (else: outside the target's scope).
    pub unknown: bool,
}

/// The manager DN a user's attributes carry (`None` without one).
pub fn manager_dn(attrs: &SharedAttrs) -> Option<String> {
    if !attrs.json().contains(":User:manager\"") {
        return None;
    }
    attrs
        .unpack()
        .get(crate::config::MANAGER_PATH)
        .and_then(Value::as_str)
        .map(str::to_owned)
}

/// Resolves every desired user's manager on this target (`state`: its snapshot rows): a
/// manager with an account there becomes `{"value": <its SCIM id>}`, so a manager whose
/// account changed (made again, re-bound) is an update of its reports; a manager that is
/// not a user of this target (not in the directory, outside its scope) is left out, so the
/// field is empty rather than pointing at an account the target does not have, and said in
/// the plan. A manager being created in this cycle keeps its DN: the apply sends its new id
/// once it is made.
///
/// Users with a manager keep their attributes through mapping for this (see
/// [`keeps_attributes`]); those that turn out unchanged give them up here.
pub fn resolve_managers(
    desired: &mut Desired,
    managers: &Managers,
    state: &crate::snapshot::TargetState,
) -> Vec<ManagerNote> {
    let mut notes = Vec::new();
    let mut resolved: Vec<(DirectoryId, Option<Value>)> = Vec::new();
    let problems: HashSet<&DirectoryId> = desired.problems.iter().map(|(p, _, _)| p).collect();
    for (id, user) in desired.users.iter() {
        let Some(manager) = manager_dn(&user.attrs) else {
            continue;
        };
        let found = managers.id_of(&manager);
        let present = found.filter(|m| desired.users.contains_key(*m) || problems.contains(m));
        match present {
            None => {
                notes.push(ManagerNote {
                    user: id.clone(),
                    manager_dn: manager,
                    unknown: found.is_none(),
                });
                resolved.push((id.clone(), None));
            }
            Some(m) => {
                if let Some(row) = state.users.get(m) {
                    resolved.push((
                        id.clone(),
                        Some(serde_json::json!({ "value": row.scim_id.0 })),
                    ));
                }
            }
        }
    }
    for (id, value) in resolved {
        let Some(user) = desired.users.get_mut(&id) else {
            continue;
        };
        let mut attrs = user.attrs.unpack();
        match value {
            Some(v) => attrs.insert(crate::config::MANAGER_PATH.to_owned(), v),
            None => attrs.remove(crate::config::MANAGER_PATH),
        };
        user.attrs = SharedAttrs::pack(&attrs);
        user.hash = packed_hash(&user.attrs);
        if state
            .users
            .get(&id)
            .is_some_and(|row| row.hash == user.hash)
        {
            user.attrs = no_attrs();
        }
    }
    notes
}

/// Whether a mapped user keeps its attributes although its hash matches its row: a user
/// with a manager, on a target that maps managers (the hash is of the manager's DN; whether
/// the manager's account is still the same is only known once every user is read).
pub fn keeps_attributes(target_maps_manager: bool, user: &DesiredUser) -> bool {
    target_maps_manager && user.attrs.json().contains(":User:manager\"")
}

/// Every directory attribute some target's mapping names, for the directory read.
pub fn needed_attributes<'a>(targets: impl IntoIterator<Item = &'a TargetConfig>) -> Vec<String> {
    let mut names: Vec<String> = targets
        .into_iter()
        .flat_map(|t| {
            let group_names = t
                .group_display_name
                .iter()
                .flat_map(|tpl| tpl.attributes().map(str::to_owned));
            let filter = match &t.groups_filter {
                Some(GroupsFilter::Ldap(filter)) => filter.attributes(),
                _ => Vec::new(),
            };
            t.mapping
                .iter()
                .flat_map(|(_, tpl)| tpl.attributes().map(str::to_owned))
                .chain(group_names)
                .chain(filter)
                .collect::<Vec<_>>()
        })
        .collect();
    names.sort_by_key(|n| n.to_ascii_lowercase());
    names.dedup_by(|a, b| a.eq_ignore_ascii_case(b));
    names
}

/// The hash of a user's representation, stored in the snapshot, from the map: what
/// [`packed_hash`] must equal (the tests' reference; the code hashes packed attributes).
#[cfg(test)]
pub fn user_hash(attrs: &FlatAttrs) -> String {
    // The map serializes in key order, exactly as the `Value` built from it used to.
    crate::model::content_hash(attrs)
}

/// The hash of a user's representation, stored in the snapshot: SHA-256 of the packed text,
/// which is the flat map's JSON serialization (so the same as hashing the map).
pub fn packed_hash(attrs: &SharedAttrs) -> String {
    crate::model::bytes_hash(attrs.json().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Attributes;
    use serde_json::json;
    use sha2::Digest;

    fn user() -> DirectoryUser {
        crate::model::tests::jdoe()
    }

    #[test]
    fn user_hash_is_the_hash_of_the_json_value() {
        // Snapshots written before the streaming hash must still match.
        let mut attrs = FlatAttrs::new();
        attrs.insert("userName".into(), json!("jdoe"));
        attrs.insert("name.givenName".into(), json!("Jöhn \"J\""));
        attrs.insert("active".into(), json!(true));
        let bytes = serde_json::to_vec(&serde_json::to_value(&attrs).unwrap()).unwrap();
        let digest = sha2::Sha256::digest(&bytes);
        let old: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
        assert_eq!(user_hash(&attrs), old);
    }

    #[test]
    fn packed_attributes_read_back_and_hash_like_the_map() {
        let mut attrs = FlatAttrs::new();
        attrs.insert("userName".into(), json!("jdoe"));
        attrs.insert("name.givenName".into(), json!("Jöhn \"J\" \u{1F600}"));
        attrs.insert("emails[type eq \"work\"].value".into(), json!("j@x.org"));
        attrs.insert("active".into(), json!(false));
        let packed = SharedAttrs::pack(&attrs);
        assert_eq!(packed.unpack(), attrs);
        assert_eq!(packed_hash(&packed), user_hash(&attrs));
        assert_eq!(packed.paths(), attrs.keys().cloned().collect::<Vec<_>>());
        // Empty: no allocation, and the same hash as an empty map.
        assert!(no_attrs().is_empty());
        assert_eq!(packed_hash(&no_attrs()), user_hash(&FlatAttrs::new()));
        assert_eq!(SharedAttrs::pack(&FlatAttrs::new()), no_attrs());
        // Serde sees the map (explain, reports).
        assert_eq!(
            serde_json::to_value(&packed).unwrap(),
            serde_json::to_value(&attrs).unwrap()
        );
    }

    /// Users mapped while the directory was read keep their attributes until the snapshot
    /// rows can tell: an unchanged one then drops them, a changed or new one must keep them
    /// (without them its plan would remove every attribute).
    #[test]
    fn premapped_users_keep_attributes_exactly_where_needed() {
        let dir_user = |id: &str| DirectoryUser {
            id: DirectoryId::new(id),
            dn: format!("uid={id},dc=x"),
            attrs: Attributes::new(),
            disabled: false,
            invalid_utf8: Vec::new(),
        };
        let desired = |id: &str, title: &str| {
            let mut attrs = FlatAttrs::new();
            attrs.insert("userName".into(), json!(id));
            attrs.insert("title".into(), json!(title));
            let attrs = SharedAttrs::pack(&attrs);
            DesiredUser {
                id: DirectoryId::new(id),
                dn: format!("uid={id},dc=x"),
                user_name: id.into(),
                active: true,
                hash: packed_hash(&attrs),
                attrs,
            }
        };
        let dir = Directory {
            users: ["same", "changed", "new", "broken"].map(dir_user).to_vec(),
            groups: vec![],
        };
        let (same, changed, new) = (
            desired("same", "Engineer"),
            desired("changed", "Manager"),
            desired("new", "Intern"),
        );
        let same_hash = same.hash.clone();
        let (changed_attrs, new_attrs) = (changed.attrs.unpack(), new.attrs.unpack());
        let out = desired_premapped(
            &dir,
            &crate::plan::tests::target(),
            vec![Ok(same), Ok(changed), Ok(new), Err("no userName".into())],
            |id, hash| id.0 == "same" && hash == same_hash,
            None,
        );
        let attrs = |id: &str| out.users[&DirectoryId::new(id)].attrs.unpack();
        assert!(attrs("same").is_empty());
        assert_eq!(attrs("changed"), changed_attrs);
        assert_eq!(attrs("new"), new_attrs);
        assert_eq!(out.problems.len(), 1);
    }

    #[test]
    fn mapped_users_are_packed_as_the_map_would_be() {
        let mut target = crate::plan::tests::target();
        target.mapping = [
            ("userName", "{uid}"),
            ("name.givenName", "{givenName} \"{sn}\""),
            ("title", "{missing}"),
            ("emails[type eq \"work\"].value", "{mail}"),
            ("externalId", "{mail}"),
            ("active", "no"),
            ("displayName", "Zoë\t{sn}"),
        ]
        .map(|(p, t)| (p.to_string(), t.into()))
        .to_vec();
        let mut u = user();
        u.disabled = true;
        let mapped = map_user(&u, &target).unwrap();
        let expected = FlatAttrs::from(
            [
                ("userName", json!("jdoe")),
                ("name.givenName", json!("Jane \"Doe\"")),
                ("emails[type eq \"work\"].value", json!("jdoe@example.org")),
                ("externalId", json!("abc")), // ids are kept lowercase
                ("active", json!(false)),
                ("displayName", json!("Zoë\tDoe")),
            ]
            .map(|(k, v)| (k.to_string(), v)),
        );
        assert_eq!(mapped.attrs.json(), SharedAttrs::pack(&expected).json());
        assert_eq!(mapped.hash, user_hash(&expected));
        assert_eq!(mapped.user_name, "jdoe");
        assert!(!mapped.active);
        target.mapping[0].1 = "{missing}".into();
        assert!(map_user(&u, &target).unwrap_err().contains("userName"));
    }

    #[test]
    fn a_mapped_attribute_that_is_not_utf8_is_a_problem_not_an_absent_value() {
        let mut target = crate::plan::tests::target();
        target.mapping = vec![
            ("userName".into(), "{uid}".into()),
            ("emails[type eq \"work\"].value".into(), "{mail}".into()),
        ];
        let mut u = user();
        u.attrs.remove("mail");
        u.invalid_utf8 = vec!["mail".into()];
        let err = map_user(&u, &target).unwrap_err();
        assert!(err.contains("mail") && err.contains("UTF-8"), "{err}");
        // An attribute no mapping names (a photo, a certificate) is no one's business.
        u.invalid_utf8 = vec!["jpegphoto".into()];
        u.attrs
            .insert("mail".into(), vec!["jdoe@example.org".into()]);
        assert!(map_user(&u, &target).is_ok());
    }

    #[test]
    fn a_group_whose_chosen_or_named_by_attribute_is_not_utf8_is_a_problem_kept() {
        let mut target = crate::plan::tests::target();
        target.groups = GroupScope::All;
        target.group_display_name = Some(Template::parse("{{ description }}").unwrap());
        let group = |unreadable: &[&str]| {
            let mut attrs = crate::model::Attributes::new();
            attrs.insert("cn".into(), vec!["eng".into()]);
            if !unreadable.is_empty() {
                attrs.insert(
                    crate::model::UNREADABLE_ATTRIBUTES.into(),
                    unreadable.iter().map(|a| a.to_string()).collect(),
                );
            } else {
                attrs.insert("description".into(), vec!["Engineering".into()]);
            }
            DirectoryGroup {
                id: DirectoryId::new("G1"),
                dn: "cn=eng,ou=groups,dc=x".into(),
                attrs,
                members: BTreeSet::new(),
            }
        };
        let dir = Directory {
            users: vec![],
            groups: vec![group(&["description"])],
        };
        let d = desired(&dir, &target).unwrap();
        assert!(d.groups.is_empty());
        assert!(
            d.problems.len() == 1 && d.problems[0].2.contains("description"),
            "{:?}",
            d.problems
        );
        // Unreadable, but read by nothing of this target: no one's business.
        let dir = Directory {
            users: vec![],
            groups: vec![group(&["jpegphoto"])],
        };
        target.group_display_name = None;
        let d = desired(&dir, &target).unwrap();
        assert!(d.problems.is_empty() && d.groups.len() == 1, "{d:?}");
        let dir = Directory {
            users: vec![],
            groups: vec![group(&[])],
        };
        target.group_display_name = Some(Template::parse("{{ description }}").unwrap());
        let d = desired(&dir, &target).unwrap();
        assert_eq!(
            d.groups[&DirectoryId::new("G1")].display_name,
            "Engineering"
        );
    }

    #[test]
    fn a_value_longer_than_max_value_length_is_a_problem_for_that_target() {
        let mut target = crate::plan::tests::target();
        target.mapping = vec![
            ("userName".into(), "{uid}".into()),
            ("title".into(), "{title}".into()),
        ];
        target.max_value_length = 10;
        let mut u = user();
        u.attrs.insert("title".into(), vec!["x".repeat(10)]);
        assert!(map_user(&u, &target).is_ok(), "exactly the limit is fine");
        u.attrs.insert("title".into(), vec!["é".repeat(6)]);
        let err = map_user(&u, &target).unwrap_err();
        assert!(
            err.contains("title") && err.contains("12 bytes") && err.contains("max_value_length"),
            "{err}"
        );
        target.max_value_length = 64 << 10;
        assert!(UserMapper::new(&target).map(&u).is_ok());
    }
}
