//! Pure rules for taking over a resource found on a target: how its attributes compare with
//! what we would send (the adoption diff), and which attributes a target does not keep.
//!
//! A target may store a value in its own shape (an email without `type`, a type in another
//! case) or drop an attribute it has no place for. Neither is a difference: planning it would
//! send the same write on every adoption, and a target that refuses the write would fail
//! every adoption forever.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::{diff_attrs, AttrChange, Existing};
use crate::map::{DesiredUser, FlatAttrs};
use crate::model::{DirectoryId, ScimId};
use crate::scim::resource::split_typed;

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
            let wanted: Vec<&String> = want
                .keys()
                .filter(|p| split_typed(p).is_some_and(|(a, _)| a == attr))
                .collect();
            if let Some(same) = wanted.iter().find(|p| {
                split_typed(p).is_some_and(|(_, t)| !ty.is_empty() && t.eq_ignore_ascii_case(ty))
            }) {
                return Some((*same).clone());
            }
            let items_found = found
                .keys()
                .filter(|p| split_typed(p).is_some_and(|(a, _)| a == attr))
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
            matched_by: "userName",
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
}
