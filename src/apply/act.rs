//! Act: one change against one target, through the SCIM client, and what the target
//! acknowledged ([`Ack`]). Nothing here writes the snapshot or decides what a row becomes:
//! [`super::advance`] does, from the acknowledgement.

use std::collections::BTreeSet;

use serde_json::{json, Value};
use tracing::{info, warn};

use super::advance::Ack;
use super::outcome::ApplyError;
use super::{Applier, Rows};
use crate::config::{MatchRule, TargetConfig, MANAGER_PATH};
use crate::map::FlatAttrs;
use crate::model::{DirectoryId, ScimId};
use crate::plan::{AttrChange, Change};
use crate::scim::resource::{self, group_put_body, members_of, patch_ops, scim_id_of};
use crate::scim::{profile, PatchOp, ScimClient, TargetError};
use crate::snapshot::{Ownership, TargetState};

/// What an answer to a write showed the target kept of what was sent (for `not_kept`).
#[derive(Debug, Default)]
pub struct Answered {
    pub dropped: BTreeSet<String>,
    pub kept: BTreeSet<String>,
}

/// How one change went: what the target acknowledged (maybe only part of it, for member
/// batches), what its answers showed it keeps, and the error, if any.
#[derive(Debug, Default)]
pub struct Acted {
    pub ack: Option<Ack>,
    pub answered: Option<Answered>,
    pub error: Option<ApplyError>,
}

impl Acted {
    fn done(ack: Ack) -> Acted {
        Acted {
            ack: Some(ack),
            ..Acted::default()
        }
    }

    fn failed(error: ApplyError) -> Acted {
        Acted {
            error: Some(error),
            ..Acted::default()
        }
    }
}

impl From<Result<Ack, ApplyError>> for Acted {
    fn from(result: Result<Ack, ApplyError>) -> Acted {
        match result {
            Ok(ack) => Acted::done(ack),
            Err(e) => Acted::failed(e),
        }
    }
}

impl Applier<'_> {
    /// Sends one change and says what the target acknowledged.
    pub(super) async fn act(&self, rows: Rows<'_>, change: &Change) -> Acted {
        match change {
            Change::RemoveMembers { group, members, .. } => {
                let (ack, error) = self.members(rows.state, group, members, false).await;
                Acted {
                    ack,
                    answered: None,
                    error,
                }
            }
            Change::AddMembers { group, members, .. } => {
                let (ack, error) = self.members(rows.state, group, members, true).await;
                Acted {
                    ack,
                    answered: None,
                    error,
                }
            }
            other => match self.act_single(rows, other).await {
                Ok((ack, answered)) => Acted {
                    ack: Some(ack),
                    answered,
                    error: None,
                },
                Err(e) => Acted::failed(e),
            },
        }
    }

    async fn act_single(
        &self,
        rows: Rows<'_>,
        change: &Change,
    ) -> Result<(Ack, Option<Answered>), ApplyError> {
        let c = self.client;
        let state = rows.state;
        match change {
            Change::CreateUser {
                id,
                user_name,
                attrs,
            } => {
                let flat = self.outgoing(attrs, state);
                let (scim_id, etag, owned, answered) =
                    self.create_user(rows, id, user_name, &flat).await?;
                let ack = Ack::User {
                    scim_id,
                    etag,
                    owned: Some(owned),
                    recreated: false,
                };
                Ok((ack, Some(answered)))
            }
            Change::AdoptUser {
                scim_id,
                attrs,
                changes,
                ..
            }
            | Change::Rebind {
                scim_id,
                attrs,
                changes,
                ..
            } => {
                // Exactly the plan's attribute changes are sent (none: no write at all).
                let flat = self.outgoing(attrs, state);
                let (etag, answered) = self.send_changes(scim_id, changes, &flat).await?;
                let ack = Ack::User {
                    scim_id: scim_id.clone(),
                    etag,
                    owned: None,
                    recreated: false,
                };
                Ok((ack, Some(answered)))
            }
            Change::UpdateUser {
                id,
                scim_id,
                user_name,
                changes,
                attrs,
            }
            | Change::DeactivateUser {
                id,
                scim_id,
                user_name,
                changes,
                attrs,
                ..
            } => {
                let prev = state.users.get(id);
                let flat = self.outgoing(attrs, state);
                match self
                    .write_user(
                        scim_id,
                        patch_ops(changes, &flat),
                        &flat,
                        prev.and_then(|r| r.etag.as_deref()),
                    )
                    .await
                {
                    Ok((etag, _)) => {
                        let ack = Ack::User {
                            scim_id: scim_id.clone(),
                            etag,
                            owned: None,
                            recreated: false,
                        };
                        Ok((ack, None))
                    }
                    Err(e)
                        if e.status() == Some(404)
                            && matches!(change, Change::DeactivateUser { .. }) =>
                    {
                        warn!(target = %self.target.name, user = %user_name, "user to deactivate is already gone from the target");
                        Ok((Ack::UserGone, None))
                    }
                    Err(e) if e.status() == Some(404) => {
                        warn!(target = %self.target.name, user = %user_name, "user was deleted on the target by hand; creating it again");
                        let (sid, etag, owned, answered) =
                            self.create_user(rows, id, user_name, &flat).await?;
                        let ack = Ack::User {
                            scim_id: sid,
                            etag,
                            owned: Some(owned),
                            recreated: true,
                        };
                        Ok((ack, Some(answered)))
                    }
                    Err(e) => Err(e.into()),
                }
            }
            Change::DeleteUser { scim_id, .. } => {
                c.delete("Users", scim_id).await?;
                Ok((Ack::UserGone, None))
            }
            Change::CreateGroup { id, display_name } => {
                let body = resource::group_resource(id, display_name);
                let ack = match c.create("Groups", &body).await {
                    Ok((scim_id, etag)) => Ack::Group {
                        scim_id,
                        etag,
                        members: None,
                    },
                    Err(e) if e.status() == Some(409) => {
                        let found = c.find_eq("Groups", "externalId", &id.0).await?;
                        let Some(g) = found.into_iter().next() else {
                            return Err(e.into());
                        };
                        let scim_id = scim_id_of(&g).ok_or_else(|| {
                            no_usable_id(self.target, "Groups", "the group", display_name)
                        })?;
                        Ack::Group {
                            scim_id,
                            etag: None,
                            members: Some(members_of(&g, rows.index())),
                        }
                    }
                    Err(e) => return Err(e.into()),
                };
                Ok((ack, None))
            }
            Change::AdoptGroup {
                id,
                scim_id,
                display_name,
                members,
                changes,
                ..
            } => {
                // Exactly what the plan shows differs; nothing differs: no write.
                let ops: Vec<PatchOp> = changes
                    .iter()
                    .filter_map(|c| Some(PatchOp::replace(c.path.as_str(), c.to.clone()?)))
                    .collect();
                let etag = if ops.is_empty() {
                    None
                } else {
                    self.write_group(scim_id, ops, || {
                        group_put_body(id, display_name, members, &state.users)
                    })
                    .await?
                };
                let ack = Ack::Group {
                    scim_id: scim_id.clone(),
                    etag,
                    members: None,
                };
                Ok((ack, None))
            }
            Change::UpdateGroup {
                id,
                scim_id,
                display_name,
                ..
            } => {
                let row = state.groups.get(id).ok_or_else(|| missing_row(id))?;
                let ops = vec![PatchOp::replace("displayName", json!(display_name))];
                let etag = self
                    .write_group(scim_id, ops, || {
                        group_put_body(id, display_name, &row.members, &state.users)
                    })
                    .await?;
                Ok((Ack::GroupRenamed { etag }, None))
            }
            Change::DeleteGroup { scim_id, .. } => {
                c.delete("Groups", scim_id).await?;
                Ok((Ack::GroupGone, None))
            }
            Change::RemoveMembers { .. } | Change::AddMembers { .. } => {
                unreachable!("handled by members()")
            }
            Change::Orphan {
                id,
                scim_id,
                user_name,
                delete,
            } => {
                let ack = self
                    .deprovision_orphan(id, scim_id, user_name, *delete)
                    .await?;
                Ok((ack, None))
            }
        }
    }

    /// An approved orphan: deleted, or deactivated and from then on managed like any leaver
    /// (its row, in the deactivated state, lets `deactivate-then-delete` run its course and a
    /// returner with the same directory id be reactivated).
    ///
    /// The SCIM id was found when the snapshot was rebuilt, maybe days ago: the account is
    /// read again first, and deprovisioned only if it is still that orphan ([`recheck_orphan`]).
    /// One that is not is never touched ([`ApplyError::Stale`]: dropped from the orphans).
    async fn deprovision_orphan(
        &self,
        id: &DirectoryId,
        scim_id: &ScimId,
        user_name: &str,
        delete: bool,
    ) -> Result<Ack, ApplyError> {
        let mut current = match self.client.get("Users", scim_id).await {
            Ok(current) => current,
            Err(e) if e.status() == Some(404) => {
                warn!(target = %self.target.name, user = %user_name, "orphan to deprovision is already gone from the target");
                return Ok(Ack::Nothing);
            }
            Err(e) => return Err(e.into()),
        };
        if let Some(e) = recheck_orphan(
            self.target,
            self.client,
            id,
            scim_id,
            user_name,
            delete,
            &current,
        ) {
            return Err(e);
        }
        if delete {
            self.client.delete("Users", scim_id).await?;
            return Ok(Ack::Nothing);
        }
        let mut inactive = FlatAttrs::new();
        inactive.insert("active".into(), Value::Bool(false));
        let written = if self.caps.patch {
            let change = AttrChange {
                path: "active".into(),
                from: Some(Value::Bool(true)),
                to: Some(Value::Bool(false)),
            };
            self.client
                .patch("Users", scim_id, patch_ops(&[change], &inactive))
                .await
        } else {
            // Without PATCH the whole resource goes back as the target has it, inactive: we
            // know nothing else of it. (`recheck_orphan` made sure it is an object.)
            let Some(obj) = current.as_object_mut() else {
                return Err(not_a_resource(self.target, scim_id));
            };
            obj.insert("active".into(), Value::Bool(false));
            obj.remove("meta");
            self.client.put("Users", scim_id, &current).await
        };
        let etag = match written {
            Ok(etag) => etag,
            Err(e) if e.status() == Some(404) => {
                warn!(target = %self.target.name, user = %user_name, "orphan to deactivate is already gone from the target");
                return Ok(Ack::Nothing);
            }
            Err(e) => return Err(e.into()),
        };
        Ok(Ack::OrphanDeactivated { etag })
    }

    /// Member deltas, in batches the target accepts; the row advances after each batch.
    async fn members(
        &self,
        state: &TargetState,
        group: &DirectoryId,
        members: &[DirectoryId],
        add: bool,
    ) -> (Option<Ack>, Option<ApplyError>) {
        let Some(row) = state.groups.get(group) else {
            return (
                None,
                Some(ApplyError::Skipped(
                    "the group does not exist on the target (its creation failed)".into(),
                )),
            );
        };
        let mut resolved: Vec<(&DirectoryId, &ScimId)> = Vec::new();
        let mut unresolved = 0usize;
        let mut absent = Vec::new();
        for m in members {
            match state.users.get(m) {
                Some(u) => resolved.push((m, &u.scim_id)),
                // A removal of someone already gone needs nothing; an addition of someone whose
                // creation failed is reported.
                None if !add => absent.push(m.clone()),
                None => unresolved += 1,
            }
        }
        let mut confirmed: Vec<DirectoryId> = Vec::new();
        let mut etag = None;
        let mut error = None;
        if !self.caps.patch {
            // No PATCH on this target: the whole member list in one PUT is the only way.
            let mut next = row.members.clone();
            for m in &absent {
                next.remove(m);
            }
            for (m, _) in &resolved {
                if add {
                    next.insert((*m).clone());
                } else {
                    next.remove(*m);
                }
            }
            let body = group_put_body(group, &row.display_name, &next, &state.users);
            match self.client.put("Groups", &row.scim_id, &body).await {
                Ok(written) => {
                    confirmed.extend(resolved.iter().map(|(m, _)| (*m).clone()));
                    etag = Some(written);
                }
                Err(e) => error = Some(e.into()),
            }
            resolved.clear();
        }
        // The loaded configuration is capped to the profile's limit already.
        let batch = self.target.members_per_request.max(1);
        for chunk in resolved.chunks(batch) {
            if self.should_stop() {
                error = Some(ApplyError::Skipped(
                    "stop requested; the remaining member changes wait for the next cycle".into(),
                ));
                break;
            }
            let ids: Vec<&ScimId> = chunk.iter().map(|(_, s)| *s).collect();
            let ops = profile::member_ops(self.target.profile, add, &ids);
            match self.client.patch("Groups", &row.scim_id, ops).await {
                Ok(written) => {
                    // The row is written once, after the last batch: rewriting a large
                    // group's row per batch made a big push quadratic. A crash in between
                    // only means some acknowledged batches are sent again (they are idempotent).
                    confirmed.extend(chunk.iter().map(|(m, _)| (*m).clone()));
                    etag = Some(written);
                }
                Err(e) => {
                    error = Some(e.into());
                    break;
                }
            }
        }
        if error.is_none() && unresolved > 0 {
            error = Some(ApplyError::Skipped(format!(
                "{unresolved} member(s) were not added because they do not exist on the target (their creation failed)"
            )));
        }
        let ack = Ack::Members {
            confirmed,
            absent,
            etag,
        };
        (Some(ack), error)
    }

    /// Changes a user: PATCH where the target supports it, else PUT of the full resource.
    async fn write_user(
        &self,
        scim_id: &ScimId,
        ops: Vec<PatchOp>,
        attrs: &FlatAttrs,
        etag: Option<&str>,
    ) -> Result<(Option<String>, Value), TargetError> {
        if self.caps.patch {
            let etag = etag.filter(|_| self.caps.etag);
            return self
                .client
                .patch_returning("Users", scim_id, ops, etag)
                .await;
        }
        let mut body = resource::user_resource(attrs);
        if let Some(obj) = body.as_object_mut() {
            obj.insert("id".into(), json!(scim_id.0));
        }
        Ok((self.client.put("Users", scim_id, &body).await?, Value::Null))
    }

    /// A user's attributes as sent: the manager's DN becomes `{"value": <its SCIM id>}` on
    /// this target, or is left out while the target has no account for it (a manager made
    /// later in this apply is linked: creates run manager first).
    fn outgoing(&self, attrs: &crate::map::SharedAttrs, state: &TargetState) -> FlatAttrs {
        let mut flat = attrs.unpack();
        if let Some(scim_id) = self.manager_link(&flat, state) {
            let value = scim_id.map(|id| json!({ "value": id.0 }));
            match value {
                Some(v) => {
                    flat.insert(MANAGER_PATH.to_owned(), v);
                }
                None => {
                    flat.remove(MANAGER_PATH);
                }
            }
        }
        flat
    }

    /// `None` without a manager; `Some(None)` when the manager has no account here (yet).
    pub(super) fn manager_link(
        &self,
        flat: &FlatAttrs,
        state: &TargetState,
    ) -> Option<Option<ScimId>> {
        let manager = flat.get(MANAGER_PATH)?.as_str()?;
        let scim_id = self
            .managers
            .and_then(|m| m.id_of(manager))
            .and_then(|id| state.users.get(id))
            .map(|row| row.scim_id.clone());
        Some(scim_id)
    }

    /// Sends `changes` to a user (nothing when there are none) and reads what the answer
    /// shows the target kept of them.
    async fn send_changes(
        &self,
        scim_id: &ScimId,
        changes: &[AttrChange],
        flat: &FlatAttrs,
    ) -> Result<(Option<String>, Answered), TargetError> {
        if changes.is_empty() {
            return Ok((None, answered(&FlatAttrs::new(), &Value::Null)));
        }
        let ops = patch_ops(changes, flat);
        let (etag, body) = self.write_user(scim_id, ops, flat, None).await?;
        // What was sent: a manager without an account here was left out.
        let sent: FlatAttrs = changes
            .iter()
            .filter(|c| c.path != MANAGER_PATH || flat.contains_key(&c.path))
            .filter_map(|c| c.to.clone().map(|v| (c.path.clone(), v)))
            .collect();
        Ok((etag, answered(&sent, &body)))
    }

    /// Changes a group's own attributes: PATCH, else PUT of the full group (members included).
    async fn write_group(
        &self,
        scim_id: &ScimId,
        ops: Vec<PatchOp>,
        full: impl FnOnce() -> Value,
    ) -> Result<Option<String>, TargetError> {
        if self.caps.patch {
            self.client.patch("Groups", scim_id, ops).await
        } else {
            self.client.put("Groups", scim_id, &full()).await
        }
    }

    /// Creates a user. On 409 (already there: a create whose answer was lost, or an account
    /// someone made by hand under the same name) it takes the resource that holds the place,
    /// if the match rules allow, and brings it in line; otherwise the 409 is the error.
    async fn create_user(
        &self,
        rows: Rows<'_>,
        id: &DirectoryId,
        user_name: &str,
        flat: &FlatAttrs,
    ) -> Result<(ScimId, Option<String>, Ownership, Answered), ApplyError> {
        match self
            .client
            .create_returning("Users", &resource::user_resource(flat))
            .await
        {
            Ok((sid, etag, body)) => Ok((sid, etag, Ownership::Created, answered(flat, &body))),
            Err(e) if e.status() == Some(409) => {
                let Some((sid, owned)) = self.find_after_conflict(id, user_name).await? else {
                    return Err(e.into());
                };
                // An account another entry's row holds moves only through a planned rebind.
                if let Some(holder) = rows.index().get(sid.0.as_str()).filter(|h| **h != id) {
                    return Err(ApplyError::Skipped(format!(
                        "the create answered 409 and the account {user_name} on the target belongs to directory entry {holder}; not taking it over here (the next plan shows it as a rebind)"
                    )));
                }
                // Brought in line like an adoption: only what differs is sent.
                let found = self.client.get("Users", &sid).await?;
                let changes = crate::plan::adopt::adoption_diff(
                    &resource::flatten_user(&found),
                    flat,
                    &BTreeSet::new(),
                );
                let (etag, answered) = self.send_changes(&sid, &changes, flat).await?;
                info!(target = %self.target.name, user = %user_name, changed = changes.len(), "create answered 409; found and adopted the existing resource");
                Ok((sid, etag, owned, answered))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// After a 409 on create: the resource with our externalId (ours, its create answer was
    /// lost), else one with the same userName if the target's match rules allow adoption.
    /// A found resource without a usable id is an error: never a reason to create another.
    async fn find_after_conflict(
        &self,
        id: &DirectoryId,
        user_name: &str,
    ) -> Result<Option<(ScimId, Ownership)>, ApplyError> {
        if let Some(r) = self
            .client
            .find_eq("Users", "externalId", &id.0)
            .await?
            .first()
        {
            let sid = scim_id_of(r)
                .ok_or_else(|| no_usable_id(self.target, "Users", "the account", user_name))?;
            return Ok(Some((sid, Ownership::Created)));
        }
        if self.target.match_existing.contains(&MatchRule::UserName)
            && !crate::plan::is_protected(self.target, user_name)
        {
            let found = self.client.find_eq("Users", "userName", user_name).await?;
            if found.len() == 1 {
                // Another directory entry's account (by its externalId, whether or not a row
                // says so): it moves only through a planned, counted rebind. Any dialect's id
                // form counts here (the OpenLDAP form includes AD's).
                if let Some(other) = found[0]["externalId"]
                    .as_str()
                    .filter(|e| {
                        crate::model::is_directory_style(crate::config::Dialect::OpenLdap, e)
                    })
                    .map(DirectoryId::new)
                    .filter(|e| e != id)
                {
                    return Err(ApplyError::Skipped(format!(
                        "the create answered 409 and the account {} on the target is held by directory id {other}; not taking it over here (the next plan shows it as a rebind)",
                        self.client.redact(user_name)
                    )));
                }
                let sid = scim_id_of(&found[0])
                    .ok_or_else(|| no_usable_id(self.target, "Users", "the account", user_name))?;
                return Ok(Some((sid, Ownership::Adopted)));
            }
        }
        Ok(None)
    }
}

/// What an answer to a write shows the target kept of `sent` (nothing learnt when the
/// answer is not a resource).
fn answered(sent: &FlatAttrs, body: &Value) -> Answered {
    let (dropped, kept) = if crate::plan::adopt::is_resource(body) {
        crate::plan::adopt::not_kept_paths(sent, &resource::flatten_user(body))
    } else {
        Default::default()
    };
    Answered { dropped, kept }
}

/// A resource found after a 409 that cannot be addressed: the entry fails, nothing is created.
fn no_usable_id(target: &TargetConfig, resource_type: &str, what: &str, name: &str) -> ApplyError {
    ApplyError::Target(TargetError::Malformed {
        target: target.name.0.clone(),
        method: "GET".into(),
        path: format!("/{resource_type}"),
        reason: format!(
            "{what} {name} that holds the place on the target has no usable id; not creating another one"
        ),
    })
}

/// Whether the account an approved orphan names, as the target has it now (`current`), is
/// still that orphan: its `externalId` is still the orphan's directory id, its `userName` is
/// not protected, and (to be deactivated) it is still active. `None` if it is; `Stale` if it
/// is not (it is dropped from the orphans), `Malformed` if the answer is not a resource.
#[allow(clippy::too_many_arguments)]
fn recheck_orphan(
    target: &TargetConfig,
    client: &ScimClient,
    id: &DirectoryId,
    scim_id: &ScimId,
    user_name: &str,
    delete: bool,
    current: &Value,
) -> Option<ApplyError> {
    let Some(obj) = current.as_object() else {
        return Some(not_a_resource(target, scim_id));
    };
    let stale = |why: String| {
        let why = client.redact(&format!(
            "orphan {user_name} ({id}) not deprovisioned: {why}; it is no longer an orphan of this directory and is dropped from the orphans"
        ));
        warn!(target = %target.name, user = %user_name, "{why}");
        Some(ApplyError::Stale(why))
    };
    match obj.get("externalId") {
        Some(Value::String(ext)) if DirectoryId::new(ext) == *id => {}
        Some(Value::String(ext)) => {
            return stale(format!("its externalId on the target is now {ext:?}"));
        }
        _ => return stale("its externalId on the target was cleared".into()),
    }
    let now_named = obj.get("userName").and_then(Value::as_str);
    if let Some(name) = [Some(user_name), now_named]
        .into_iter()
        .flatten()
        .find(|n| crate::plan::is_protected(target, n))
    {
        return stale(format!("its userName {name} matches a protect pattern"));
    }
    if !delete && obj.get("active").and_then(Value::as_bool) == Some(false) {
        return stale("it is inactive on the target already".into());
    }
    None
}

/// A target answered a GET of one account with something other than a resource.
fn not_a_resource(target: &TargetConfig, scim_id: &ScimId) -> ApplyError {
    ApplyError::Target(TargetError::Malformed {
        target: target.name.0.clone(),
        method: "GET".into(),
        path: format!("/Users/{scim_id}", scim_id = scim_id.0),
        reason: "the answer is not a SCIM resource (a JSON object); nothing was changed".into(),
    })
}

fn missing_row(id: &DirectoryId) -> ApplyError {
    ApplyError::Skipped(format!("no snapshot row for {id}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scim::ScimClient;

    /// An approved orphan is deprovisioned only while the account is still that orphan; a
    /// hostile answer (not an object) is an error, never a panic.
    #[tokio::test]
    async fn an_approved_orphan_is_rechecked_against_the_account_as_it_is_now() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut target = crate::plan::tests::target();
        target.protect = vec!["admin*".into()];
        let client = ScimClient::new(&target).unwrap();
        let id = DirectoryId::new("8f1c2f6e-0000-4000-8000-000000000001");
        let sid = ScimId("s1".into());
        let check = |current: Value, delete: bool| {
            recheck_orphan(
                &target,
                &client,
                &id,
                &sid,
                "left@example.org",
                delete,
                &current,
            )
        };
        let ok = json!({"id": "s1", "userName": "left@example.org", "active": true,
                        "externalId": "8F1C2F6E-0000-4000-8000-000000000001"});
        assert!(check(ok.clone(), false).is_none(), "still the orphan");
        let mut no_active = ok.clone();
        no_active.as_object_mut().unwrap().remove("active");
        assert!(check(no_active, false).is_none(), "active by default");
        let stale = |current: Value, delete: bool| match check(current, delete) {
            Some(ApplyError::Stale(why)) => why,
            other => panic!("{other:?}"),
        };
        let mut moved = ok.clone();
        moved["externalId"] = json!("HR-4711");
        assert!(stale(moved, true).contains("HR-4711"));
        let mut cleared = ok.clone();
        cleared["externalId"] = Value::Null;
        assert!(stale(cleared, false).contains("cleared"));
        let mut protected = ok.clone();
        protected["userName"] = json!("admin-left@example.org");
        assert!(stale(protected, true).contains("protect"));
        let mut inactive = ok.clone();
        inactive["active"] = json!(false);
        assert!(stale(inactive.clone(), false).contains("inactive"));
        assert!(check(inactive, true).is_none(), "deleted under delete");
        for hostile in [json!([ok.clone()]), json!("s1"), json!(7), Value::Null] {
            match check(hostile.clone(), false) {
                Some(e @ ApplyError::Target(TargetError::Malformed { .. })) => {
                    assert_eq!(e.class(), "malformed", "{hostile}")
                }
                other => panic!("{hostile}: {other:?}"),
            }
        }
    }
}
