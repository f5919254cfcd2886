//! The SCIM 2.0 messages as typed structs (RFC 7643, RFC 7644): User, Group, ListResponse,
//! PatchOp, Error and ServiceProviderConfig, with serde. It owns the shape of what travels,
//! nothing else: no I/O, no redaction, no decision about what a message means for a sync.
//!
//! Targets are not trusted, so everything read is lenient: a field of the wrong type is
//! [`Field::Invalid`], never a failed parse of the whole message (one odd resource must not
//! make a listing fail, one odd flag must not lose a `/ServiceProviderConfig`). What is
//! written is strict: only these types build a request body.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

pub const PATCH_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:PatchOp";
pub const ERROR_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:Error";

/// A field read from a target: absent, present with a value of the wrong type, or usable.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Field<T> {
    #[default]
    Missing,
    /// Present, but not a `T` (`null` included).
    Invalid,
    Value(T),
}

impl<T> Field<T> {
    /// The value, when it is usable.
    pub fn get(&self) -> Option<&T> {
        match self {
            Field::Value(v) => Some(v),
            _ => None,
        }
    }

    pub fn into_option(self) -> Option<T> {
        match self {
            Field::Value(v) => Some(v),
            _ => None,
        }
    }

    /// Whether the message has the field at all, usable or not.
    pub fn is_present(&self) -> bool {
        !matches!(self, Field::Missing)
    }
}

impl<'de, T: serde::de::DeserializeOwned> Deserialize<'de> for Field<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = Value::deserialize(d)?;
        Ok(T::deserialize(ObjectsOnly(raw)).map_or(Field::Invalid, Field::Value))
    }
}

/// A JSON value as a deserializer that gives a struct only an object: serde_json would also
/// fill a struct from an array, field by field in order, which no SCIM message means.
struct ObjectsOnly(Value);

impl<'de> Deserializer<'de> for ObjectsOnly {
    type Error = serde_json::Error;

    fn deserialize_any<V: serde::de::Visitor<'de>>(self, v: V) -> Result<V::Value, Self::Error> {
        self.0.deserialize_any(v)
    }

    fn deserialize_struct<V: serde::de::Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, Self::Error> {
        if self.0.is_object() {
            self.0.deserialize_struct(name, fields, v)
        } else {
            Err(serde::de::Error::custom("not an object"))
        }
    }

    fn deserialize_option<V: serde::de::Visitor<'de>>(self, v: V) -> Result<V::Value, Self::Error> {
        self.0.deserialize_option(v)
    }

    fn deserialize_enum<V: serde::de::Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.deserialize_enum(name, variants, v)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct newtype_struct seq tuple
        tuple_struct map identifier ignored_any
    }
}

/// Deserialises `T` from `value` only when it is a JSON object: a struct would otherwise
/// also accept an array (field by field, in order), which no SCIM message is.
fn from_object<T: serde::de::DeserializeOwned>(value: Value) -> Option<T> {
    if value.is_object() {
        serde_json::from_value(value).ok()
    } else {
        None
    }
}

/// A resource's `meta` (RFC 7643 §3.1); `version` is its ETag.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Meta {
    #[serde(rename = "resourceType")]
    pub resource_type: Field<String>,
    pub version: Field<String>,
    pub location: Field<String>,
}

/// A typed view of a User resource as a target returned it (the `Value` stays the
/// resource; this only reads the attributes the client decides on).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct User {
    pub id: Field<String>,
    #[serde(rename = "externalId")]
    pub external_id: Field<String>,
    #[serde(rename = "userName")]
    pub user_name: Field<String>,
    pub active: Field<bool>,
    pub meta: Field<Meta>,
}

/// One `members` value of a Group.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Member {
    pub value: Field<String>,
}

/// A typed view of a Group resource as a target returned it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Group {
    pub id: Field<String>,
    #[serde(rename = "externalId")]
    pub external_id: Field<String>,
    #[serde(rename = "displayName")]
    pub display_name: Field<String>,
    pub members: Field<Vec<Field<Member>>>,
    pub meta: Field<Meta>,
}

impl User {
    /// The view of `resource`; everything [`Field::Missing`] when it is not an object.
    pub fn view(resource: &Value) -> User {
        view(resource)
    }
}

impl Group {
    /// The view of `resource`; everything [`Field::Missing`] when it is not an object.
    pub fn view(resource: &Value) -> Group {
        view(resource)
    }

    /// The members' values that are strings, in order.
    pub fn member_values(&self) -> impl Iterator<Item = &str> {
        self.members
            .get()
            .into_iter()
            .flatten()
            .filter_map(|m| m.get()?.value.get().map(String::as_str))
    }
}

/// Only the attributes a view names are read (the others are skipped, not copied).
fn view<T: Default + serde::de::DeserializeOwned>(resource: &Value) -> T {
    match resource {
        Value::Object(_) => T::deserialize(resource).unwrap_or_default(),
        _ => T::default(),
    }
}

/// A SCIM ListResponse (RFC 7644 §3.4.2). `Resources` stays JSON: callers flatten it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct ListResponse {
    #[serde(rename = "totalResults")]
    pub total_results: Field<u64>,
    #[serde(rename = "startIndex")]
    pub start_index: Field<u64>,
    #[serde(rename = "itemsPerPage")]
    pub items_per_page: Field<u64>,
    #[serde(rename = "Resources")]
    pub resources: Field<Vec<Value>>,
}

impl ListResponse {
    /// The ListResponse a body is, or `None` when it is not one: not an object, or without
    /// `Resources` as an array (a missing `Resources` is an empty page when `totalResults` is
    /// there, as RFC 7644 allows for zero results).
    pub fn parse(body: Value) -> Option<ListResponse> {
        let list: ListResponse = from_object(body)?;
        match (&list.resources, list.total_results.is_present()) {
            (Field::Value(_), _) | (Field::Missing, true) => Some(list),
            _ => None,
        }
    }

    /// The resources, however many (none when `Resources` was absent).
    pub fn into_resources(self) -> Vec<Value> {
        self.resources.into_option().unwrap_or_default()
    }
}

/// The `op` of one PATCH operation (RFC 7644 §3.5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PatchKind {
    Add,
    Remove,
    Replace,
}

/// One PATCH operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PatchOp {
    pub op: PatchKind,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub value: Option<Value>,
}

impl PatchOp {
    pub fn add(path: impl Into<String>, value: Value) -> PatchOp {
        PatchOp {
            op: PatchKind::Add,
            path: Some(path.into()),
            value: Some(value),
        }
    }

    pub fn replace(path: impl Into<String>, value: Value) -> PatchOp {
        PatchOp {
            op: PatchKind::Replace,
            path: Some(path.into()),
            value: Some(value),
        }
    }

    /// A removal of everything `path` selects.
    pub fn remove(path: impl Into<String>) -> PatchOp {
        PatchOp {
            op: PatchKind::Remove,
            path: Some(path.into()),
            value: None,
        }
    }

    /// A removal of the given values from the multi-valued attribute at `path`.
    pub fn remove_values(path: impl Into<String>, value: Value) -> PatchOp {
        PatchOp {
            op: PatchKind::Remove,
            path: Some(path.into()),
            value: Some(value),
        }
    }
}

/// The body of a PATCH request.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PatchRequest {
    pub schemas: [&'static str; 1],
    #[serde(rename = "Operations")]
    pub operations: Vec<PatchOp>,
}

impl PatchRequest {
    pub fn new(operations: Vec<PatchOp>) -> PatchRequest {
        PatchRequest {
            schemas: [PATCH_SCHEMA],
            operations,
        }
    }

    /// The request as JSON (what is sent, and what a 501's hint reads back).
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).expect("a PATCH request serializes")
    }
}

/// A SCIM Error (RFC 7644 §3.12), as lenient as the rest: `status` may be a string or a
/// number, anything may be missing. `message` is not SCIM, but what some targets send.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Error {
    pub schemas: Field<Vec<Value>>,
    #[serde(rename = "scimType")]
    pub scim_type: Field<String>,
    pub detail: Field<String>,
    pub message: Field<String>,
    pub status: Field<Value>,
}

impl Error {
    /// The error a body is, if it is a JSON object.
    pub fn parse(bytes: &[u8]) -> Option<Error> {
        from_object(serde_json::from_slice(bytes).ok()?)
    }

    /// Whether it names the SCIM Error schema.
    pub fn is_scim(&self) -> bool {
        self.schemas
            .get()
            .is_some_and(|s| s.iter().any(|x| x == ERROR_SCHEMA))
    }

    /// `detail`, else `message`.
    pub fn detail(&self) -> Option<&str> {
        self.detail
            .get()
            .or_else(|| self.message.get())
            .map(String::as_str)
    }
}

/// One `{"supported": …}` feature of a ServiceProviderConfig.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Feature {
    pub supported: Field<bool>,
}

/// The `filter` feature, which also says how many resources a page may hold.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct FilterFeature {
    pub supported: Field<bool>,
    #[serde(rename = "maxResults")]
    pub max_results: Field<u64>,
}

/// A `/ServiceProviderConfig` (RFC 7643 §5), only the features the client adapts to.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct ServiceProviderConfig {
    pub patch: Field<Feature>,
    pub filter: Field<FilterFeature>,
    pub etag: Field<Feature>,
    pub bulk: Field<Feature>,
}

impl ServiceProviderConfig {
    /// What a body says; a body that is not an object says nothing (every default).
    pub fn parse(body: Value) -> ServiceProviderConfig {
        from_object(body).unwrap_or_default()
    }

    fn flag(feature: &Field<Feature>) -> Option<bool> {
        feature.get().and_then(|f| f.supported.get().copied())
    }

    pub fn patch(&self) -> Option<bool> {
        Self::flag(&self.patch)
    }

    pub fn filter(&self) -> Option<bool> {
        self.filter.get().and_then(|f| f.supported.get().copied())
    }

    pub fn etag(&self) -> Option<bool> {
        Self::flag(&self.etag)
    }

    pub fn bulk(&self) -> Option<bool> {
        Self::flag(&self.bulk)
    }

    pub fn max_results(&self) -> Option<u64> {
        self.filter.get().and_then(|f| f.max_results.get().copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn patch_ops_serialise_as_rfc_7644_says() {
        let ops = vec![
            PatchOp::replace("displayName", json!("Ops")),
            PatchOp::add("members", json!([{"value": "a"}])),
            PatchOp::remove("members[value eq \"b\"]"),
            PatchOp::remove_values("members", json!([{"value": "c"}])),
        ];
        let body = PatchRequest::new(ops.clone()).to_value();
        assert_eq!(
            body,
            json!({
                "schemas": [PATCH_SCHEMA],
                "Operations": [
                    {"op": "replace", "path": "displayName", "value": "Ops"},
                    {"op": "add", "path": "members", "value": [{"value": "a"}]},
                    {"op": "remove", "path": "members[value eq \"b\"]"},
                    {"op": "remove", "path": "members", "value": [{"value": "c"}]},
                ],
            })
        );
        // The order of keys on the wire is the one every target has seen so far.
        assert_eq!(
            serde_json::to_string(&body).unwrap(),
            format!(
                "{{\"schemas\":[\"{PATCH_SCHEMA}\"],\"Operations\":[{{\"op\":\"replace\",\"path\":\"displayName\",\"value\":\"Ops\"}},{{\"op\":\"add\",\"path\":\"members\",\"value\":[{{\"value\":\"a\"}}]}},{{\"op\":\"remove\",\"path\":\"members[value eq \\\"b\\\"]\"}},{{\"op\":\"remove\",\"path\":\"members\",\"value\":[{{\"value\":\"c\"}}]}}]}}"
            )
        );
        let back: Vec<PatchOp> = serde_json::from_value(body["Operations"].clone()).unwrap();
        assert_eq!(back, ops);
    }

    #[test]
    fn a_service_provider_config_with_odd_fields_keeps_the_good_ones() {
        let spc = ServiceProviderConfig::parse(json!({
            "patch": {"supported": "yes"},
            "filter": {"supported": true, "maxResults": "many"},
            "etag": true,
            "bulk": {"supported": true, "maxOperations": 10},
        }));
        assert_eq!(spc.patch(), None);
        assert_eq!(spc.filter(), Some(true));
        assert_eq!(spc.max_results(), None);
        assert_eq!(spc.etag(), None);
        assert_eq!(spc.bulk(), Some(true));
        // Missing fields, and bodies that are no object at all, say nothing.
        for body in [json!({}), Value::Null, json!([1, 2]), json!("spc")] {
            let spc = ServiceProviderConfig::parse(body);
            assert_eq!(
                (spc.patch(), spc.filter(), spc.etag(), spc.bulk()),
                (None, None, None, None)
            );
            assert_eq!(spc.max_results(), None);
        }
        let spc = ServiceProviderConfig::parse(json!({"filter": {"maxResults": 50}}));
        assert_eq!((spc.filter(), spc.max_results()), (None, Some(50)));
        // Negative and fractional counts are not counts.
        for n in [json!(-1), json!(2.5), json!(null)] {
            let spc = ServiceProviderConfig::parse(json!({"filter": {"maxResults": n}}));
            assert_eq!(spc.max_results(), None);
        }
    }

    #[test]
    fn a_list_response_is_lenient_in_its_numbers_and_strict_in_its_resources() {
        let list = ListResponse::parse(json!({
            "totalResults": "3",
            "startIndex": 1,
            "Resources": [{"id": "a"}, {"id": 7}, "junk"],
        }))
        .unwrap();
        assert_eq!(list.total_results, Field::Invalid);
        assert_eq!(list.start_index.get(), Some(&1));
        assert_eq!(
            list.into_resources().len(),
            3,
            "odd resources are passed on"
        );
        // Zero results may leave `Resources` out, if the count is there (of any type).
        for body in [json!({"totalResults": 0}), json!({"totalResults": null})] {
            assert!(ListResponse::parse(body)
                .unwrap()
                .into_resources()
                .is_empty());
        }
        for body in [
            json!({}),
            json!({"Resources": {"id": "a"}}),
            json!({"Resources": null, "totalResults": 1}),
            json!([{"id": "a"}]),
            Value::Null,
        ] {
            assert_eq!(ListResponse::parse(body.clone()), None, "{body}");
        }
    }

    #[test]
    fn resource_views_read_what_they_can() {
        let user = User::view(&json!({
            "id": "u1", "userName": 5, "active": true, "meta": {"version": "W/\"1\""}
        }));
        assert_eq!(user.id.get().map(String::as_str), Some("u1"));
        assert_eq!(user.user_name, Field::Invalid);
        assert_eq!(user.external_id, Field::Missing);
        assert_eq!(
            user.meta
                .get()
                .and_then(|m| m.version.get())
                .map(String::as_str),
            Some("W/\"1\"")
        );
        let group = Group::view(&json!({
            "id": "g", "members": [{"value": "a"}, {"value": 1}, "x", {"value": "b"}]
        }));
        assert_eq!(group.member_values().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(Group::view(&json!(["g"])), Group::default());
        assert_eq!(User::view(&json!({"id": null})).id, Field::Invalid);
    }

    #[test]
    fn error_bodies_decode_leniently() {
        let e = Error::parse(
            json!({"schemas": [7, ERROR_SCHEMA], "scimType": "uniqueness", "detail": "taken", "status": "409"})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
        assert!(e.is_scim());
        assert_eq!(e.scim_type.get().map(String::as_str), Some("uniqueness"));
        assert_eq!(e.detail(), Some("taken"));
        let e = Error::parse(br#"{"message": "nope", "detail": 5}"#).unwrap();
        assert!(!e.is_scim());
        assert_eq!(e.detail(), Some("nope"));
        for body in [&b"<html>"[..], b"[1]", b"\"text\"", b""] {
            assert_eq!(Error::parse(body), None);
        }
    }
}
