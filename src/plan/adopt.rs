//! Pure rules for taking over a resource found on a target: which new directory entries look
//! for one ([`user_candidates`], [`group_candidates`]), what a lookup's result means
//! ([`match_users`], [`match_groups`]: protect patterns, ambiguity, a rebind, an account
//! already held by someone else), how its attributes compare with what we would send (the
//! adoption diff), and which attributes a target does not keep.
//!
//! A found account is never taken from another directory entry silently: one a row of an
//! entry still in the directory holds, or whose directory-style `externalId` names such an
//! entry, is a problem; one whose directory-style `externalId` names an entry that is gone
//! (no row: a lost snapshot) is marked [`Existing::claimed_by`], and planned as a rebind.
//! Likewise a group another group's row holds, or that carries another directory-style
//! `externalId`, is a problem, never adopted (groups have no rebind).
//!
//! A target may store a value in its own shape (an email without `type`, a type in another
//! case) or drop an attribute it has no place for. Neither is a difference: planning it would
//! send the same write on every adoption, and a target that refuses the write would fail
//! every adoption forever.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::{diff_attrs, is_protected, AttrChange, Existing, Problem};
use crate::config::{Dialect, MatchRule, TargetConfig};
use crate::map::{Desired, DesiredGroup, DesiredUser, FlatAttrs};
use crate::model::{is_directory_style, DirectoryId, ScimId};
use crate::scim::observe::{Found, RemoteGroup, RemoteUser};
use crate::scim::resource::split_typed;
use crate::snapshot::TargetState;

/// The multi-valued attributes whose items carry a `type` (flattened as
/// `emails[type eq "work"].value`).
pub const TYPED_MULTI_VALUED: [&str; 2] = ["emails", "phoneNumbers"];

/// Renames the found resource's typed items to the paths we use where they are the same item
/// in the target's shape: a type in another case, or (when the target has exactly one item of
/// that attribute and we send exactly one) an untyped item with the same value.
pub fn align_typed_items(found: &FlatAttrs, want: &FlatAttrs) -> FlatAttrs {
    let mut out = FlatAttrs::new();
    for (path, value) in found {
        let renamed = split_typed(path).and_then(|(attr, ty)| {
            if want.contains_key(path) {
                return None;
            }
            // The same sub-attribute (an address's locality is not its country).
            let sub = crate::scim::resource::typed_sub(path);
            let wanted: Vec<&String> = want
                .keys()
                .filter(|p| {
                    split_typed(p).is_some_and(|(a, _)| a == attr)
                        && crate::scim::resource::typed_sub(p) == sub
                })
                .collect();
            if let Some(same) = wanted.iter().find(|p| {
                split_typed(p).is_some_and(|(_, t)| !ty.is_empty() && t.eq_ignore_ascii_case(ty))
            }) {
                return Some((*same).clone());
            }
            let items_found = found
                .keys()
                .filter(|p| {
                    split_typed(p).is_some_and(|(a, _)| a == attr)
                        && crate::scim::resource::typed_sub(p) == sub
                })
                .count();
            (ty.is_empty()
                && items_found == 1
                && wanted.len() == 1
                && want.get(wanted[0]) == Some(value))
            .then(|| wanted[0].clone())
        });
        out.insert(renamed.unwrap_or_else(|| path.clone()), value.clone());
    }
    out
}

/// What an adoption must change on the found resource: only attributes we manage (the
/// target's others stay as they are), the target's own shape of a value is no difference,
/// and an attribute the target does not keep (`not_kept`) that it does not have is none either.
pub fn adoption_diff(
    found: &FlatAttrs,
    want: &FlatAttrs,
    not_kept: &BTreeSet<String>,
) -> Vec<AttrChange> {
    let found = align_typed_items(found, want);
    let managed: FlatAttrs = found
        .into_iter()
        .filter(|(k, _)| want.contains_key(k))
        .collect();
    diff_attrs(&managed, want)
        .into_iter()
        .filter(|c| !(c.from.is_none() && not_kept.contains(&c.path)))
        .collect()
}

/// The paths we sent that the target's answer does not have at all: it does not keep them.
/// (A value it changed is not counted: only an attribute that is absent.) `answer` is the
/// answer flattened and aligned; paths it has are returned as `kept`.
pub fn not_kept_paths(
    sent: &FlatAttrs,
    answer: &FlatAttrs,
) -> (BTreeSet<String>, BTreeSet<String>) {
    let answer = align_typed_items(answer, sent);
    let (mut dropped, mut kept) = (BTreeSet::new(), BTreeSet::new());
    for (path, value) in sent {
        // What the target may legitimately leave out of an answer, or always has.
        if matches!(
            path.as_str(),
            "externalId" | "userName" | "active" | "password"
        ) || value.is_null()
        {
            continue;
        }
        if answer.contains_key(path) {
            kept.insert(path.clone());
        } else {
            dropped.insert(path.clone());
        }
    }
    (dropped, kept)
}

/// Entries whose found account another entry found too: (entry, its userName, how many
/// entries found that account), in id order.
pub fn claimed_twice(
    found: &BTreeMap<DirectoryId, Existing>,
    desired: &BTreeMap<DirectoryId, DesiredUser>,
) -> Vec<(DirectoryId, String, usize)> {
    let mut claims: BTreeMap<&ScimId, usize> = BTreeMap::new();
    for e in found.values() {
        *claims.entry(&e.scim_id).or_default() += 1;
    }
    found
        .iter()
        .filter_map(|(id, e)| {
            let n = claims[&e.scim_id];
            (n > 1).then(|| {
                let name = desired
                    .get(id)
                    .map_or_else(|| id.0.clone(), |u| u.user_name.clone());
                (id.clone(), name, n)
            })
        })
        .collect()
}

/// Desired users without a snapshot row that would be provisioned (so they look for an
/// account to take over first), in id order. Protected names never look: the planner
/// reports them.
pub fn user_candidates<'d>(
    target: &TargetConfig,
    desired: &'d Desired,
    state: &TargetState,
) -> Vec<&'d DesiredUser> {
    // Both maps are in id order: one merge.
    let mut rows = state.users.keys().peekable();
    desired
        .users
        .values()
        .filter(|u| {
            while rows.next_if(|k| *k < &u.id).is_some() {}
            rows.next_if(|k| *k == &u.id).is_none()
                && (u.active || target.provision_disabled)
                && !is_protected(target, &u.user_name)
        })
        .collect()
}

/// Desired groups without a snapshot row (and not protected), in id order.
pub fn group_candidates<'d>(
    target: &TargetConfig,
    desired: &'d Desired,
    state: &TargetState,
) -> Vec<&'d DesiredGroup> {
    desired
        .groups
        .values()
        .filter(|g| !state.groups.contains_key(&g.id) && !is_protected(target, &g.display_name))
        .collect()
}

/// What the lookups for `candidates` (one [`Found`] each, in order) mean: the accounts to
/// take over, and the problems (never guessed: ambiguous, protected, without a usable id,
/// held by another entry still in the directory). An account found for two entries is
/// taken by neither.
pub fn match_users(
    target: &TargetConfig,
    dialect: Dialect,
    desired: &Desired,
    state: &TargetState,
    candidates: &[&DesiredUser],
    found: Vec<Found<RemoteUser>>,
) -> (BTreeMap<DirectoryId, Existing>, Vec<Problem>) {
    // Indexed once: rows by SCIM id, and the entries present but unmapped.
    let rows_by_scim = state.user_index();
    let unmapped: std::collections::HashSet<&DirectoryId> =
        desired.problems.iter().map(|(id, _, _)| id).collect();
    let in_directory = |id: &DirectoryId| desired.users.contains_key(id) || unmapped.contains(id);
    let entries = candidates.iter().map(|u| (&u.id, u.user_name.as_str()));
    let (mut users, mut problems) = adopt_each(target, entries, found, |id, r, scim_id, _| {
        let name = &r.name;
        let row_holder = rows_by_scim.get(scim_id.0.as_str()).copied();
        // Without a row, the account's own directory-style externalId names its holder (a
        // lost snapshot).
        let claimed_by = match row_holder {
            Some(_) => None,
            None => other_directory_id(dialect, r.external_id.as_deref(), id),
        };
        // Still in the directory (mapped or not): never re-bound away from it.
        match row_holder
            .filter(|h| in_directory(h))
            .or(claimed_by.as_ref().filter(|h| in_directory(h)))
        {
            Some(holder) => Err(format!("the account {name} on the target already belongs to directory entry {holder}; not adopting it for a second one")),
            None => Ok(claimed_by),
        }
    });
    // One account found for two entries (names that differ only in case): neither takes it.
    for (id, name, n) in claimed_twice(&users, &desired.users) {
        users.remove(&id);
        problems.push(problem(
            &id,
            &name,
            format!("the account matched on the target is matched by {n} directory entries; not adopting it for any (ambiguous)"),
        ));
    }
    (users, problems)
}

/// [`match_users`] for groups. The groups to adopt come back without members: the caller
/// reads them (where the profile lists members) into [`Existing::members`].
///
/// Another group's account is never adopted: a group replaced in the directory by another
/// with the same name would take the old one's account, and the old one's delete would then
/// remove it. The old group's row goes its own way (deleted, under the limits, once it
/// left), and this group is created afresh after that.
pub fn match_groups(
    target: &TargetConfig,
    dialect: Dialect,
    state: &TargetState,
    candidates: &[&DesiredGroup],
    found: Vec<Found<RemoteGroup>>,
) -> (BTreeMap<DirectoryId, Existing>, Vec<Problem>) {
    let groups_by_scim = state.group_index();
    let entries = candidates.iter().map(|g| (&g.id, g.display_name.as_str()));
    let (groups, problems) = adopt_each(target, entries, found, |id, r, scim_id, how| {
        let name = &r.name;
        let holder = groups_by_scim
            .get(scim_id.0.as_str())
            .copied()
            .filter(|h| *h != id)
            .cloned()
            .or_else(|| other_directory_id(dialect, r.external_id.as_deref(), id));
        match holder {
            Some(holder) => Err(format!("the group {name} on the target matches by {how} but belongs to directory group {holder}; not adopting it for a second one (once that group's account is gone, this one is created)")),
            None => Ok(None),
        }
    });
    (groups, problems)
}

/// For each entry (id, name) and what its lookup found: the one match (see [`the_one`]),
/// then `claim`'s verdict on it: `Err` the problem's text (it belongs to someone else), or
/// `Ok` with the other directory id its own externalId names, if any. What passes both is
/// an [`Existing`] to adopt.
fn adopt_each<'c, R: Remote>(
    target: &TargetConfig,
    entries: impl Iterator<Item = (&'c DirectoryId, &'c str)>,
    found: Vec<Found<R>>,
    mut claim: impl FnMut(&DirectoryId, &R, &ScimId, MatchRule) -> Result<Option<DirectoryId>, String>,
) -> (BTreeMap<DirectoryId, Existing>, Vec<Problem>) {
    let mut adopted = BTreeMap::new();
    let mut problems = Vec::new();
    for ((id, entry_name), Found { matched_by, found }) in entries.zip(found) {
        let Some((r, scim_id)) = the_one(target, id, entry_name, matched_by, &found, &mut problems)
        else {
            continue;
        };
        match claim(id, r, &scim_id, matched_by) {
            Err(reason) => problems.push(problem(id, entry_name, reason)),
            Ok(claimed_by) => {
                adopted.insert(
                    id.clone(),
                    Existing {
                        scim_id,
                        attrs: r.attrs().clone(),
                        matched_by,
                        members: BTreeSet::new(),
                        claimed_by,
                    },
                );
            }
        }
    }
    (adopted, problems)
}

/// What a user or a group found on the target shows for matching.
trait Remote {
    /// "account" or "group", in problems.
    const KIND: &'static str;
    /// As the target has it (for `protect` patterns).
    fn raw_name(&self) -> &str;
    /// Redacted, for problems.
    fn shown_name(&self) -> &str;
    fn usable_id(&self) -> Option<&ScimId>;
    /// Its flat attributes, redacted.
    fn attrs(&self) -> &FlatAttrs;
}

impl Remote for RemoteUser {
    const KIND: &'static str = "account";
    fn raw_name(&self) -> &str {
        self.user_name.as_deref().unwrap_or_default()
    }
    fn shown_name(&self) -> &str {
        &self.name
    }
    fn usable_id(&self) -> Option<&ScimId> {
        self.scim_id.as_ref()
    }
    fn attrs(&self) -> &FlatAttrs {
        &self.attrs
    }
}

impl Remote for RemoteGroup {
    const KIND: &'static str = "group";
    fn raw_name(&self) -> &str {
        &self.display_name
    }
    fn shown_name(&self) -> &str {
        &self.name
    }
    fn usable_id(&self) -> Option<&ScimId> {
        self.scim_id.as_ref()
    }
    fn attrs(&self) -> &FlatAttrs {
        &self.attrs
    }
}

/// The one resource a lookup for entry `id` found, with its id; or none, with the problem
/// (pushed to `problems`) when what it found is several (ambiguous), protected, or without
/// a usable id (a match we cannot address is not a reason to make a second one).
fn the_one<'r, R: Remote>(
    target: &TargetConfig,
    id: &DirectoryId,
    entry_name: &str,
    how: MatchRule,
    found: &'r [R],
    problems: &mut Vec<Problem>,
) -> Option<(&'r R, ScimId)> {
    match judge_one(target, id, entry_name, how, found) {
        Ok(one) => one,
        Err(p) => {
            problems.push(p);
            None
        }
    }
}

fn judge_one<'r, R: Remote>(
    target: &TargetConfig,
    id: &DirectoryId,
    entry_name: &str,
    how: MatchRule,
    found: &'r [R],
) -> Result<Option<(&'r R, ScimId)>, Problem> {
    let kind = R::KIND;
    let r = match found {
        [] => return Ok(None),
        [r] => r,
        more => {
            let n = more.len();
            return Err(problem(
                id,
                entry_name,
                format!("{n} {kind}s on the target match by {how}; not adopting any (ambiguous)"),
            ));
        }
    };
    let name = r.shown_name();
    if is_protected(target, r.raw_name()) {
        return Err(protected(id, entry_name, format!("an existing {kind} {name} on the target matches a protect pattern; it is neither adopted nor duplicated")));
    }
    match r.usable_id() {
        Some(scim_id) => Ok(Some((r, scim_id.clone()))),
        None => Err(problem(id, entry_name, format!("the {kind} {name} on the target matches by {how} but has no usable id; not adopting it, and not creating a second one"))),
    }
}

/// The other directory id a resource's directory-style externalId names, if any.
fn other_directory_id(
    dialect: Dialect,
    external_id: Option<&str>,
    own: &DirectoryId,
) -> Option<DirectoryId> {
    external_id
        .filter(|e| is_directory_style(dialect, e))
        .map(DirectoryId::new)
        .filter(|e| e != own)
}

fn problem(id: &DirectoryId, name: &str, reason: String) -> Problem {
    Problem {
        external_id: id.0.clone(),
        name: name.to_string(),
        reason,
        fails: true,
    }
}

fn protected(id: &DirectoryId, name: &str, reason: String) -> Problem {
    Problem {
        fails: false,
        ..problem(id, name, reason)
    }
}

/// Whether a JSON answer is a resource we can read back (a 204 or an empty body is not).
pub fn is_resource(answer: &Value) -> bool {
    answer.as_object().is_some_and(|o| o.contains_key("id"))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::scim::resource::typed_path;

    use super::*;

    fn flat(pairs: &[(&str, Value)]) -> FlatAttrs {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    #[test]
    fn an_untyped_or_other_case_item_with_our_value_is_no_difference() {
        let want = flat(&[
            (&typed_path("emails", "work"), json!("a@x.org")),
            ("title", json!("Boss")),
        ]);
        let untyped = flat(&[
            (&typed_path("emails", ""), json!("a@x.org")),
            ("title", json!("Boss")),
        ]);
        assert!(adoption_diff(&untyped, &want, &BTreeSet::new()).is_empty());
        let cased = flat(&[
            (&typed_path("emails", "Work"), json!("a@x.org")),
            ("title", json!("Boss")),
        ]);
        assert!(adoption_diff(&cased, &want, &BTreeSet::new()).is_empty());
        // Another value is a difference, on our path.
        let other = flat(&[
            (&typed_path("emails", ""), json!("b@x.org")),
            ("title", json!("Boss")),
        ]);
        let d = adoption_diff(&other, &want, &BTreeSet::new());
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].path, typed_path("emails", "work"));
        // Two items on the target: which one is ours cannot be told.
        let two = flat(&[
            (&typed_path("emails", ""), json!("a@x.org")),
            (&typed_path("emails", "home"), json!("h@x.org")),
            ("title", json!("Boss")),
        ]);
        assert_eq!(adoption_diff(&two, &want, &BTreeSet::new()).len(), 1);
    }

    #[test]
    fn an_attribute_the_target_does_not_keep_is_no_difference_while_absent() {
        let want = flat(&[("title", json!("Boss")), ("displayName", json!("A"))]);
        let found = flat(&[("displayName", json!("A"))]);
        let not_kept = BTreeSet::from(["title".to_string()]);
        assert!(adoption_diff(&found, &want, &not_kept).is_empty());
        assert_eq!(adoption_diff(&found, &want, &BTreeSet::new()).len(), 1);
        // Present with another value: a real difference.
        let found = flat(&[("displayName", json!("A")), ("title", json!("Clerk"))]);
        assert_eq!(adoption_diff(&found, &want, &not_kept).len(), 1);
    }

    #[test]
    fn an_account_found_for_two_entries_goes_to_neither() {
        let existing = |sid: &str| Existing {
            scim_id: ScimId(sid.into()),
            attrs: FlatAttrs::new(),
            matched_by: crate::config::MatchRule::UserName,
            members: BTreeSet::new(),
            claimed_by: None,
        };
        let found = BTreeMap::from([
            (DirectoryId::new("a"), existing("s1")),
            (DirectoryId::new("b"), existing("s1")),
            (DirectoryId::new("c"), existing("s2")),
        ]);
        let twice = claimed_twice(&found, &BTreeMap::new());
        let ids: Vec<&str> = twice.iter().map(|(id, _, _)| id.0.as_str()).collect();
        assert_eq!(ids, vec!["a", "b"]);
        assert!(twice.iter().all(|(_, _, n)| *n == 2));
    }

    #[test]
    fn not_kept_is_what_the_answer_lacks_at_all() {
        let sent = flat(&[
            ("userName", json!("a")),
            ("title", json!("Boss")),
            ("displayName", json!("A")),
            (&typed_path("emails", "work"), json!("a@x.org")),
        ]);
        let answer = flat(&[
            ("displayName", json!("A (changed)")),
            (&typed_path("emails", ""), json!("a@x.org")),
        ]);
        let (dropped, kept) = not_kept_paths(&sent, &answer);
        assert_eq!(dropped, BTreeSet::from(["title".to_string()]));
        assert_eq!(
            kept,
            BTreeSet::from(["displayName".to_string(), typed_path("emails", "work")])
        );
    }

    mod matching {
        use super::super::*;
        use crate::config::MatchRule;
        use crate::snapshot::{Ownership, UserRow, UserState};

        const OLD: &str = "107f0144-823a-1041-89a3-21734381405b";

        fn user(id: &str, name: &str) -> DesiredUser {
            DesiredUser {
                id: DirectoryId::new(id),
                dn: format!("uid={name},dc=x"),
                user_name: name.into(),
                active: true,
                hash: String::new(),
                attrs: crate::map::no_attrs(),
            }
        }

        fn remote(scim: Option<&str>, name: &str, ext: Option<&str>) -> RemoteUser {
            RemoteUser {
                scim_id: scim.map(|s| ScimId(s.into())),
                user_name: Some(name.into()),
                name: name.into(),
                external_id: ext.map(str::to_string),
                active: true,
                attrs: FlatAttrs::new(),
            }
        }

        fn found(rule: MatchRule, found: Vec<RemoteUser>) -> Found<RemoteUser> {
            Found {
                matched_by: rule,
                found,
            }
        }

        fn world(users: &[DesiredUser]) -> Desired {
            let mut d = Desired::default();
            for u in users {
                d.users.insert(u.id.clone(), u.clone());
            }
            d
        }

        fn matched(
            target: &TargetConfig,
            desired: &Desired,
            state: &TargetState,
            results: Vec<Found<RemoteUser>>,
        ) -> (BTreeMap<DirectoryId, Existing>, Vec<Problem>) {
            let candidates = user_candidates(target, desired, state);
            assert_eq!(candidates.len(), results.len());
            match_users(
                target,
                Dialect::OpenLdap,
                desired,
                state,
                &candidates,
                results,
            )
        }

        #[test]
        fn one_match_is_adopted_with_how_it_matched() {
            let target = crate::plan::tests::target();
            let d = world(&[user("n1", "ann")]);
            let state = TargetState::default();
            let r = remote(Some("s1"), "ann", Some("HR-1"));
            let (users, problems) = matched(
                &target,
                &d,
                &state,
                vec![found(MatchRule::UserName, vec![r])],
            );
            assert!(problems.is_empty(), "{problems:?}");
            let e = &users[&DirectoryId::new("n1")];
            assert_eq!(e.matched_by, MatchRule::UserName);
            assert_eq!(e.claimed_by, None, "HR-1 is not a directory id");
        }

        #[test]
        fn two_matches_protect_and_a_missing_id_are_problems_never_guesses() {
            let mut target = crate::plan::tests::target();
            target.protect = vec!["admin*".into()];
            let d = world(&[user("n1", "ann"), user("n2", "bob"), user("n3", "cid")]);
            let state = TargetState::default();
            let results = vec![
                found(
                    MatchRule::UserName,
                    vec![
                        remote(Some("a"), "ann", None),
                        remote(Some("b"), "ANN", None),
                    ],
                ),
                found(
                    MatchRule::UserName,
                    vec![remote(Some("c"), "admin-bob", None)],
                ),
                found(MatchRule::ExternalId, vec![remote(None, "cid", None)]),
            ];
            let (users, problems) = matched(&target, &d, &state, results);
            assert!(users.is_empty(), "{users:?}");
            let reasons: Vec<(&str, bool)> = problems
                .iter()
                .map(|p| (p.reason.as_str(), p.fails))
                .collect();
            assert!(reasons[0].0.contains("2 accounts") && reasons[0].0.contains("ambiguous"));
            assert!(
                reasons[1].0.contains("protect") && !reasons[1].1,
                "policy, not failure"
            );
            assert!(reasons[2].0.contains("no usable id"), "{reasons:?}");
        }

        #[test]
        fn an_account_of_someone_still_in_the_directory_is_never_taken() {
            let target = crate::plan::tests::target();
            let d = world(&[user("n1", "ann"), user(OLD, "ann-old")]);
            let mut state = TargetState::default();
            state.users.insert(
                DirectoryId::new(OLD),
                UserRow {
                    scim_id: ScimId("s1".into()),
                    user_name: "ann-old".into(),
                    hash: String::new(),
                    attrs: crate::map::no_attrs(),
                    etag: None,
                    state: UserState::Active,
                    owned: Ownership::Created,
                },
            );
            let r = remote(Some("s1"), "ann", Some(OLD));
            let (users, problems) = matched(
                &target,
                &d,
                &state,
                vec![found(MatchRule::UserName, vec![r])],
            );
            assert!(users.is_empty());
            assert!(problems[0]
                .reason
                .contains("already belongs to directory entry"));
        }

        #[test]
        fn without_a_row_an_account_of_someone_gone_is_claimed_for_a_rebind() {
            let target = crate::plan::tests::target();
            let d = world(&[user("n1", "ann")]);
            let state = TargetState::default();
            let r = remote(Some("s1"), "ann", Some(&OLD.to_uppercase()));
            let (users, problems) = matched(
                &target,
                &d,
                &state,
                vec![found(MatchRule::UserName, vec![r])],
            );
            assert!(problems.is_empty(), "{problems:?}");
            assert_eq!(
                users[&DirectoryId::new("n1")].claimed_by,
                Some(DirectoryId::new(OLD))
            );
        }

        #[test]
        fn one_account_found_for_two_entries_goes_to_neither() {
            let mut target = crate::plan::tests::target();
            target.match_existing = vec![MatchRule::ExternalId, MatchRule::UserName];
            let d = world(&[user("n1", "Ann"), user("n2", "ann")]);
            let state = TargetState::default();
            let same = || remote(Some("s1"), "ann", None);
            let results = vec![
                found(MatchRule::UserName, vec![same()]),
                found(MatchRule::UserName, vec![same()]),
            ];
            let (users, problems) = matched(&target, &d, &state, results);
            assert!(users.is_empty());
            assert_eq!(problems.len(), 2);
            assert!(problems
                .iter()
                .all(|p| p.reason.contains("2 directory entries")));
        }

        #[test]
        fn a_group_held_by_another_group_is_not_adopted() {
            let target = crate::plan::tests::target();
            let mut state = TargetState::default();
            state.groups.insert(
                DirectoryId::new("g-old"),
                crate::snapshot::GroupRow {
                    scim_id: ScimId("g1".into()),
                    display_name: "staff".into(),
                    members: Default::default(),
                    etag: None,
                    owned: Ownership::Created,
                },
            );
            let mut d = Desired::default();
            let g = DesiredGroup {
                id: DirectoryId::new("g-new"),
                dn: "cn=staff".into(),
                display_name: "staff".into(),
                members: Default::default(),
            };
            d.groups.insert(g.id.clone(), g);
            let candidates = group_candidates(&target, &d, &state);
            let remote = |scim: &str| RemoteGroup {
                scim_id: Some(ScimId(scim.into())),
                display_name: "staff".into(),
                name: "staff".into(),
                external_id: None,
                attrs: FlatAttrs::new(),
            };
            let taken = vec![Found {
                matched_by: MatchRule::DisplayName,
                found: vec![remote("g1")],
            }];
            let (groups, problems) =
                match_groups(&target, Dialect::OpenLdap, &state, &candidates, taken);
            assert!(groups.is_empty());
            assert!(problems[0]
                .reason
                .contains("belongs to directory group g-old"));
            let free = vec![Found {
                matched_by: MatchRule::DisplayName,
                found: vec![remote("g2")],
            }];
            let (groups, _) = match_groups(&target, Dialect::OpenLdap, &state, &candidates, free);
            assert_eq!(
                groups[&DirectoryId::new("g-new")].matched_by,
                MatchRule::DisplayName
            );
        }
    }
}
