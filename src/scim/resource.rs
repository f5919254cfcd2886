//! SCIM resources as JSON: built from a user's flat attributes (full resources and PATCH
//! operations) and read back (flattened for diffs, ids, member lists). The one place that
//! knows how a flat attribute path like `emails[type eq "work"].value` becomes SCIM JSON.
//! It must never do I/O, nor decide what is sent when (that is the plan's and apply's).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Map, Value};

use super::wire::PatchOp;
use crate::map::FlatAttrs;
use crate::model::{AttrChange, DirectoryId, ScimId};
use crate::snapshot::{ScimIndex, UserRow};

pub const USER_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:User";
pub const GROUP_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:Group";
pub const ENTERPRISE_SCHEMA: &str = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User";

/// The flat path of a typed item; `type` is empty for an item the target stored untyped.
pub fn typed_path(attr: &str, ty: &str) -> String {
    format!("{attr}[type eq \"{ty}\"].value")
}

/// A multi-valued attribute path like `emails[type eq "work"].value` → ("emails", "work").
pub fn split_typed(path: &str) -> Option<(&str, &str)> {
    let (attr, rest) = path.split_once('[')?;
    let ty = rest.strip_prefix("type eq \"")?.split_once('"')?.0;
    Some((attr, ty))
}

/// The sub-attribute of a typed path: `value` of `emails[type eq "work"].value`, `locality`
/// of `addresses[type eq "work"].locality`.
pub fn typed_sub(path: &str) -> &str {
    path.rsplit_once("].").map_or("value", |(_, sub)| sub)
}

/// The top-level SCIM attribute a flat path belongs to (the unit a PATCH replaces).
pub fn top_level(path: &str) -> &str {
    if let Some((attr, _)) = split_typed(path) {
        return attr;
    }
    if path.starts_with("urn:") {
        return path;
    }
    path.split('.').next().unwrap_or(path)
}

/// The value of one top-level attribute, built from every flat path under it (`None` when
/// no path under it has a value).
pub fn top_level_value(attrs: &FlatAttrs, top: &str) -> Option<Value> {
    let mut complex = Map::new();
    // One item per type, its sub-attributes together (an address's street and locality).
    let mut multi: Vec<(String, Map<String, Value>)> = Vec::new();
    let mut scalar = None;
    for (path, value) in attrs {
        if let Some((attr, ty)) = split_typed(path) {
            if attr == top {
                let item = match multi.iter_mut().position(|(t, _)| t == ty) {
                    Some(i) => &mut multi[i].1,
                    None => {
                        let mut item = Map::new();
                        item.insert("type".into(), json!(ty));
                        item.insert("primary".into(), json!(multi.is_empty()));
                        multi.push((ty.to_owned(), item));
                        &mut multi.last_mut().expect("just pushed").1
                    }
                };
                item.insert(typed_sub(path).to_owned(), value.clone());
            }
        } else if path == top {
            scalar = Some(value.clone());
        } else if let Some(sub) = path.strip_prefix(top).and_then(|s| s.strip_prefix('.')) {
            if !top.starts_with("urn:") {
                complex.insert(sub.to_string(), value.clone());
            }
        }
    }
    if !multi.is_empty() {
        Some(Value::Array(
            multi
                .into_iter()
                .map(|(_, item)| Value::Object(item))
                .collect(),
        ))
    } else if !complex.is_empty() {
        Some(Value::Object(complex))
    } else {
        scalar
    }
}

/// The full SCIM User resource for a set of flat attributes.
pub fn user_resource(attrs: &FlatAttrs) -> Value {
    let mut obj = Map::new();
    let mut schemas = vec![Value::String(USER_SCHEMA.into())];
    let mut enterprise = Map::new();
    let tops: BTreeSet<&str> = attrs.keys().map(|p| top_level(p)).collect();
    for top in tops {
        if let Some(sub) = top
            .strip_prefix(ENTERPRISE_SCHEMA)
            .and_then(|s| s.strip_prefix(':'))
        {
            if let Some(v) = attrs.get(top) {
                enterprise.insert(sub.to_string(), v.clone());
            }
        } else if let Some(v) = top_level_value(attrs, top) {
            obj.insert(top.to_string(), v);
        }
    }
    if !enterprise.is_empty() {
        schemas.push(Value::String(ENTERPRISE_SCHEMA.into()));
        obj.insert(ENTERPRISE_SCHEMA.into(), Value::Object(enterprise));
    }
    obj.insert("schemas".into(), Value::Array(schemas));
    Value::Object(obj)
}

/// The SCIM Group resource (without members: those always travel as PATCH deltas).
pub fn group_resource(id: &DirectoryId, display_name: &str) -> Value {
    json!({
        "schemas": [GROUP_SCHEMA],
        "displayName": display_name,
        "externalId": id.0,
    })
}

/// The flat attributes of a SCIM User as the target has it (for reporting what adoption
/// changes).
pub fn flatten_user(r: &Value) -> FlatAttrs {
    let mut out = FlatAttrs::new();
    let Some(obj) = r.as_object() else { return out };
    for (k, v) in obj {
        match (k.as_str(), v) {
            ("id" | "meta" | "schemas" | "groups", _) => {}
            ("emails" | "phoneNumbers", Value::Array(items)) => {
                // An item without a type is kept under an empty type (matched to ours by
                // `plan::adopt`), unless there are several: which one is which is unknown.
                let untyped = items
                    .iter()
                    .filter(|i| i["type"].as_str().is_none())
                    .count();
                for item in items {
                    let Some(val) = item.get("value") else {
                        continue;
                    };
                    match item["type"].as_str() {
                        Some(t) => {
                            out.insert(typed_path(k, t), val.clone());
                        }
                        None if untyped == 1 => {
                            out.insert(typed_path(k, ""), val.clone());
                        }
                        None => {}
                    }
                }
            }
            ("addresses", Value::Array(items)) => {
                let untyped = items
                    .iter()
                    .filter(|i| i["type"].as_str().is_none())
                    .count();
                for item in items {
                    let Some(fields) = item.as_object() else {
                        continue;
                    };
                    let ty = match item["type"].as_str() {
                        Some(t) => t,
                        None if untyped == 1 => "",
                        None => continue,
                    };
                    for (sub, val) in fields {
                        if sub != "type" && sub != "primary" {
                            out.insert(format!("addresses[type eq \"{ty}\"].{sub}"), val.clone());
                        }
                    }
                }
            }
            (_, Value::Object(sub)) if !k.starts_with("urn:") => {
                for (sk, sv) in sub {
                    out.insert(format!("{k}.{sk}"), sv.clone());
                }
            }
            (_, Value::Object(sub)) => {
                for (sk, sv) in sub {
                    out.insert(format!("{k}:{sk}"), sv.clone());
                }
            }
            _ => {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    out
}

/// The resource's id, if it has a valid one ([`crate::scim::resource_id`] says why not).
pub fn scim_id_of(resource: &Value) -> Option<ScimId> {
    crate::scim::resource_id(resource).ok()
}

/// A target group's current members, as directory ids of users the snapshot knows
/// (`by_scim`: [`crate::snapshot::TargetState::user_index`], built once by the caller).
pub fn members_of(group: &Value, by_scim: &ScimIndex<'_>) -> BTreeSet<DirectoryId> {
    group["members"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["value"].as_str())
        .filter_map(|v| by_scim.get(v).map(|id| (*id).clone()))
        .collect()
}

/// PATCH operations for a set of attribute changes: one replace (or remove) per top-level
/// attribute touched, plus removes of sub-attributes that disappeared from a complex one.
pub fn patch_ops(changes: &[AttrChange], attrs: &FlatAttrs) -> Vec<PatchOp> {
    let mut tops: Vec<&str> = Vec::new();
    for c in changes {
        let top = top_level(&c.path);
        if !tops.contains(&top) {
            tops.push(top);
        }
    }
    let mut ops = Vec::new();
    for top in tops {
        match top_level_value(attrs, top) {
            Some(value) => {
                ops.push(PatchOp::replace(top, value));
                for c in changes {
                    let is_sub = c.path.contains('.')
                        && !c.path.contains('[')
                        && !c.path.starts_with("urn:");
                    if c.to.is_none() && is_sub && top_level(&c.path) == top {
                        ops.push(PatchOp::remove(c.path.as_str()));
                    }
                }
            }
            None => ops.push(PatchOp::remove(top)),
        }
    }
    ops
}

/// A full Group resource for PUT (targets without PATCH): members as SCIM ids.
pub fn group_put_body(
    id: &DirectoryId,
    display_name: &str,
    members: &BTreeSet<DirectoryId>,
    users: &BTreeMap<DirectoryId, UserRow>,
) -> Value {
    let values: Vec<Value> = members
        .iter()
        .filter_map(|m| users.get(m))
        .map(|u| json!({"value": u.scim_id.0}))
        .collect();
    json!({
        "schemas": [GROUP_SCHEMA],
        "displayName": display_name,
        "externalId": id.0,
        "members": values,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_one_item_of_its_sub_attributes_and_flattens_back() {
        let mut attrs = FlatAttrs::new();
        attrs.insert("userName".into(), json!("jdoe"));
        attrs.insert(
            "addresses[type eq \"work\"].locality".into(),
            json!("Springfield"),
        );
        attrs.insert(
            "addresses[type eq \"work\"].postalCode".into(),
            json!("12345"),
        );
        attrs.insert("addresses[type eq \"home\"].country".into(), json!("DE"));
        let r = user_resource(&attrs);
        assert_eq!(
            r["addresses"],
            json!([
                {"type": "home", "primary": true, "country": "DE"},
                {"type": "work", "primary": false, "locality": "Springfield", "postalCode": "12345"},
            ])
        );
        let back = flatten_user(&r);
        for (path, value) in &attrs {
            assert_eq!(back.get(path), Some(value), "{path}");
        }
        assert_eq!(
            top_level("addresses[type eq \"work\"].locality"),
            "addresses"
        );
    }

    #[test]
    fn flat_attributes_build_a_scim_user() {
        let mut attrs = FlatAttrs::new();
        attrs.insert("userName".into(), json!("jdoe"));
        attrs.insert("name.givenName".into(), json!("Jane"));
        attrs.insert("name.familyName".into(), json!("Doe"));
        attrs.insert("emails[type eq \"work\"].value".into(), json!("j@x.org"));
        attrs.insert(format!("{ENTERPRISE_SCHEMA}:department"), json!("R&D"));
        attrs.insert("active".into(), json!(true));
        let r = user_resource(&attrs);
        assert_eq!(r["name"], json!({"givenName": "Jane", "familyName": "Doe"}));
        assert_eq!(
            r["emails"],
            json!([{"type": "work", "value": "j@x.org", "primary": true}])
        );
        assert_eq!(r[ENTERPRISE_SCHEMA]["department"], json!("R&D"));
        assert_eq!(r["schemas"].as_array().unwrap().len(), 2);
        assert_eq!(top_level("emails[type eq \"work\"].value"), "emails");
        assert_eq!(top_level("name.givenName"), "name");
    }

    #[test]
    fn only_an_id_that_fits_a_url_path_is_usable() {
        assert_eq!(
            scim_id_of(&json!({"id": "a-1"})),
            Some(ScimId("a-1".into()))
        );
        for bad in [
            json!({}),
            json!({"id": null}),
            json!({"id": 7}),
            json!({"id": ""}),
            json!({"id": "a/b"}),
            json!({"id": "a?x"}),
            json!({"id": ".."}),
            json!({"id": "a\u{1}"}),
        ] {
            assert_eq!(scim_id_of(&bad), None, "{bad}");
        }
    }

    #[test]
    fn flattened_items_keep_their_type_and_a_single_untyped_one() {
        let r = serde_json::json!({
            "id": "x",
            "userName": "a",
            "emails": [{"value": "a@x.org"}],
            "phoneNumbers": [{"value": "1"}, {"value": "2"}],
            "name": {"givenName": "A"},
        });
        let flat = flatten_user(&r);
        assert_eq!(flat["emails[type eq \"\"].value"], "a@x.org");
        assert!(
            flat.keys().all(|k| !k.starts_with("phoneNumbers")),
            "{flat:?}"
        );
        assert_eq!(flat["name.givenName"], "A");
        assert!(!flat.contains_key("id"));
    }

    #[test]
    fn patch_ops_replace_whole_top_level_attributes() {
        let mut attrs = FlatAttrs::new();
        attrs.insert("name.familyName".into(), json!("Doe"));
        attrs.insert("title".into(), json!("Boss"));
        let changes = vec![
            AttrChange {
                path: "name.givenName".into(),
                from: Some(json!("Jane")),
                to: None,
            },
            AttrChange {
                path: "title".into(),
                from: None,
                to: Some(json!("Boss")),
            },
            AttrChange {
                path: "displayName".into(),
                from: Some(json!("J")),
                to: None,
            },
        ];
        let ops = serde_json::to_value(patch_ops(&changes, &attrs)).unwrap();
        assert_eq!(
            ops,
            json!([
                {"op": "replace", "path": "name", "value": {"familyName": "Doe"}},
                {"op": "remove", "path": "name.givenName"},
                {"op": "replace", "path": "title", "value": "Boss"},
                {"op": "remove", "path": "displayName"},
            ])
        );
    }
}
