//! Observe: what one target holds that concerns ldap2scim, as typed views ([`RemoteUser`],
//! [`RemoteGroup`]) read through the client. Candidate lookups (is there already an account
//! for this new entry?) and full listings (a rebuilt snapshot's orphans) live here; what to
//! make of what was found is decided in `plan::adopt`, never here.
//!
//! Everything a view carries that reaches a plan or a report is redacted of the target's
//! secrets; the raw names are kept beside for policy checks (`protect` patterns).

use std::collections::HashMap;

use serde_json::Value;

use super::resource::{flatten_user, members_of, scim_id_of};
use super::{Capabilities, ScimClient, TargetError};
use crate::config::MatchRule;
use crate::map::FlatAttrs;
use crate::model::{DirectoryId, ScimId};
use crate::snapshot::ScimIndex;

/// Past this many candidates the target is listed once instead of asked one by one.
const LIST_THRESHOLD: usize = 50;

/// An account on the target, as far as ldap2scim cares.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteUser {
    /// `None`: it has no usable id (a problem, never a second account).
    pub scim_id: Option<ScimId>,
    /// As the target has it (for `protect` patterns), if it is a string;
    /// [`RemoteUser::name`] is redacted.
    pub user_name: Option<String>,
    pub name: String,
    pub external_id: Option<String>,
    /// `true` unless the target says `active: false`.
    pub active: bool,
    /// Its flat attributes, redacted (what an adoption would change).
    pub attrs: FlatAttrs,
}

/// A group on the target, as far as ldap2scim cares.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteGroup {
    pub scim_id: Option<ScimId>,
    /// As the target has it; [`RemoteGroup::name`] is redacted.
    pub display_name: String,
    pub name: String,
    pub external_id: Option<String>,
    /// `displayName` and `externalId` as the target has them, redacted.
    pub attrs: FlatAttrs,
}

/// What a lookup found for one candidate, and by which rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Found<R> {
    pub matched_by: MatchRule,
    pub found: Vec<R>,
}

impl RemoteUser {
    pub fn from_resource(client: &ScimClient, r: &Value) -> RemoteUser {
        let user_name = r["userName"].as_str().map(str::to_string);
        RemoteUser {
            scim_id: scim_id_of(r),
            name: client.redact(user_name.as_deref().unwrap_or_default()),
            user_name,
            external_id: r["externalId"].as_str().map(str::to_string),
            active: r["active"].as_bool().unwrap_or(true),
            attrs: redacted(client, flatten_user(r)),
        }
    }
}

impl RemoteGroup {
    pub fn from_resource(client: &ScimClient, r: &Value) -> RemoteGroup {
        let display_name = r["displayName"].as_str().unwrap_or_default().to_string();
        let mut attrs = FlatAttrs::new();
        for k in ["displayName", "externalId"] {
            attrs.insert(k.into(), r[k].clone());
        }
        RemoteGroup {
            scim_id: scim_id_of(r),
            name: client.redact(&display_name),
            display_name,
            external_id: r["externalId"].as_str().map(str::to_string),
            attrs: redacted(client, attrs),
        }
    }
}

/// A candidate to look up: its directory id and its `userName` or `displayName`.
pub type Candidate<'a> = (&'a DirectoryId, &'a str);

/// Looks up accounts for new entries: by `externalId` always (it can only be ours), then by
/// `userName` when `by_name`. Many candidates (a first run, a lost snapshot), or a target
/// that cannot filter, list the target once; a few are looked up one by one. One result per
/// candidate, in order.
pub async fn find_users(
    client: &ScimClient,
    caps: Capabilities,
    candidates: &[Candidate<'_>],
    by_name: bool,
) -> Result<Vec<Found<RemoteUser>>, TargetError> {
    find(client, caps, candidates, by_name).await
}

/// [`find_users`] for groups, by `externalId`, then `displayName` when `by_name`.
pub async fn find_groups(
    client: &ScimClient,
    caps: Capabilities,
    candidates: &[Candidate<'_>],
    by_name: bool,
) -> Result<Vec<Found<RemoteGroup>>, TargetError> {
    find(client, caps, candidates, by_name).await
}

/// A view read from a resource of one endpoint.
trait View: Sized {
    const ENDPOINT: &'static str;
    /// The rule that matches by name on this endpoint.
    const BY_NAME: MatchRule;
    fn read(client: &ScimClient, r: &Value) -> Self;
}

impl View for RemoteUser {
    const ENDPOINT: &'static str = "Users";
    const BY_NAME: MatchRule = MatchRule::UserName;
    fn read(client: &ScimClient, r: &Value) -> Self {
        RemoteUser::from_resource(client, r)
    }
}

impl View for RemoteGroup {
    const ENDPOINT: &'static str = "Groups";
    const BY_NAME: MatchRule = MatchRule::DisplayName;
    fn read(client: &ScimClient, r: &Value) -> Self {
        RemoteGroup::from_resource(client, r)
    }
}

/// Every account on the target.
pub async fn list_users(client: &ScimClient) -> Result<Vec<RemoteUser>, TargetError> {
    let listed = client.list_all("Users").await?;
    Ok(listed
        .iter()
        .map(|r| RemoteUser::from_resource(client, r))
        .collect())
}

/// A group's current members, as directory ids of users `known` holds (lists may leave
/// members out; the resource itself has them).
pub async fn group_members(
    client: &ScimClient,
    scim_id: &ScimId,
    known: &ScimIndex<'_>,
) -> Result<std::collections::BTreeSet<DirectoryId>, TargetError> {
    Ok(members_of(&client.get("Groups", scim_id).await?, known))
}

async fn find<V: View>(
    client: &ScimClient,
    caps: Capabilities,
    candidates: &[Candidate<'_>],
    by_name: bool,
) -> Result<Vec<Found<V>>, TargetError> {
    if candidates.is_empty() {
        return Ok(Vec::new());
    }
    let resource_type = V::ENDPOINT;
    let name_rule = V::BY_NAME;
    let listed = if candidates.len() > LIST_THRESHOLD || !caps.filter {
        Some(client.list_all(resource_type).await?)
    } else {
        None
    };
    // userNames compare case-insensitively; displayNames exactly.
    let fold = name_rule == MatchRule::UserName;
    // Indexed once: 100,000 candidates against a listing of 100,000 must not be a scan each.
    let by_id = listed
        .as_deref()
        .map(|all| index_by(all, "externalId", false));
    let by_names = listed
        .as_deref()
        .map(|all| index_by(all, name_rule.as_str(), fold));
    let mut out = Vec::with_capacity(candidates.len());
    for (id, name) in candidates {
        let mut found = match &by_id {
            Some(ix) => lookup(ix, &id.0),
            None => client.find_eq(resource_type, "externalId", &id.0).await?,
        };
        let mut matched_by = MatchRule::ExternalId;
        if found.is_empty() && by_name {
            matched_by = name_rule;
            found = match &by_names {
                Some(ix) if fold => lookup(ix, &name.to_ascii_lowercase()),
                Some(ix) => lookup(ix, name),
                None => {
                    client
                        .find_eq(resource_type, name_rule.as_str(), name)
                        .await?
                }
            };
        }
        let found = found.iter().map(|r| V::read(client, r)).collect();
        out.push(Found { matched_by, found });
    }
    Ok(out)
}

/// A listing by the string value of `attr` (ASCII-lowercased when `fold_case`), in listing
/// order.
fn index_by<'a>(all: &'a [Value], attr: &str, fold_case: bool) -> HashMap<String, Vec<&'a Value>> {
    let mut ix: HashMap<String, Vec<&Value>> = HashMap::new();
    for r in all {
        if let Some(v) = r[attr].as_str() {
            let key = if fold_case {
                v.to_ascii_lowercase()
            } else {
                v.to_string()
            };
            ix.entry(key).or_default().push(r);
        }
    }
    ix
}

fn lookup(ix: &HashMap<String, Vec<&Value>>, key: &str) -> Vec<Value> {
    ix.get(key).map_or_else(Vec::new, |found| {
        found.iter().map(|r| (*r).clone()).collect()
    })
}

/// `attrs` with the target's secrets cut out of every string value: what a target lists
/// reaches plans, reports and the audit log.
fn redacted(client: &ScimClient, mut attrs: FlatAttrs) -> FlatAttrs {
    for v in attrs.values_mut() {
        if let Value::String(s) = v {
            *s = client.redact(s);
        }
    }
    attrs
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_listing_is_indexed_by_exact_ids_and_folded_user_names() {
        let all = vec![
            json!({"id": "1", "userName": "Ann", "externalId": "A"}),
            json!({"id": "2", "userName": "ann", "externalId": "b"}),
            json!({"id": "3", "userName": 7}),
        ];
        let ids = index_by(&all, "externalId", false);
        assert_eq!(lookup(&ids, "A").len(), 1);
        assert!(lookup(&ids, "a").is_empty(), "externalIds compare exactly");
        let names = index_by(&all, "userName", true);
        assert_eq!(
            lookup(&names, "ann").len(),
            2,
            "in listing order, both kept"
        );
        assert_eq!(lookup(&names, "ann")[0]["id"], "1");
    }

    #[test]
    fn a_remote_user_is_read_leniently_and_redacted() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut target = crate::plan::tests::target();
        target.auth =
            crate::config::Auth::Bearer(crate::config::Secret::new("s3cret-token".into()));
        let client = ScimClient::new(&target).unwrap();
        let r = json!({"id": "a/b", "userName": "x s3cret-token", "active": "yes",
                       "title": "s3cret-token"});
        let u = RemoteUser::from_resource(&client, &r);
        assert_eq!(u.scim_id, None, "an id that is a path is not usable");
        assert_eq!(u.user_name.as_deref(), Some("x s3cret-token"));
        assert!(!u.name.contains("s3cret"), "{}", u.name);
        assert!(u.active, "a non-boolean active reads as active");
        assert!(!u.attrs["title"].as_str().unwrap().contains("s3cret"));
    }
}
