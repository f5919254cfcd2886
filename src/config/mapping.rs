//! The `[mapping]` of a target file: the dialect's default mapping merged with the file's
//! keys (a key overrides a default, `""` removes it, new keys follow in file order), each SCIM
//! path checked against the ones supported and each template parsed once (by `template`).
//!
//! It never renders a template and never reads a directory; that is `map`'s, with the
//! templates parsed here.

use super::template::Template;
use super::walk::{nearest, Section};
use super::Dialect;

fn default_mapping(dialect: Dialect) -> Vec<(String, Template)> {
    let user_name = match dialect {
        Dialect::OpenLdap => "{uid}",
        Dialect::ActiveDirectory => "{userPrincipalName}",
    };
    [
        ("userName", user_name),
        ("name.givenName", "{givenName}"),
        ("name.familyName", "{sn}"),
        ("displayName", "{cn}"),
        ("emails[type eq \"work\"].value", "{mail}"),
        ("title", "{title}"),
    ]
    .into_iter()
    .map(|(path, template)| {
        let template = Template::parse(template).expect("the default templates read");
        (path.to_owned(), template)
    })
    .collect()
}

const SIMPLE_PATHS: &[&str] = &[
    "userName",
    "displayName",
    "nickName",
    "title",
    "userType",
    "preferredLanguage",
    "locale",
    "timezone",
    "profileUrl",
];
const NAME_PARTS: &[&str] = &[
    "givenName",
    "familyName",
    "middleName",
    "formatted",
    "honorificPrefix",
    "honorificSuffix",
];
const ENTERPRISE_PREFIX: &str = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:";
const ENTERPRISE_PARTS: &[&str] = &[
    "employeeNumber",
    "costCenter",
    "organization",
    "division",
    "department",
];
const TYPED_MULTI_VALUED: &[&str] = &["emails", "phoneNumbers"];
/// The sub-attributes of an address (RFC 7643 §4.1.2).
const ADDRESS_PARTS: &[&str] = &[
    "formatted",
    "streetAddress",
    "locality",
    "region",
    "postalCode",
    "country",
];

/// Dialect defaults merged with the target's `[mapping]`: a key overrides a default, `""`
/// removes it, new keys follow the defaults in file order.
pub(super) fn mapping(
    t: &Section<'_>,
    dialect: Dialect,
    file_order: &[String],
) -> Vec<(String, Template)> {
    let mut merged = default_mapping(dialect);
    let Some(m) = t.open_table("mapping") else {
        return merged;
    };
    let mut keys: Vec<&str> = file_order
        .iter()
        .map(String::as_str)
        .filter(|key| m.has(key))
        .collect();
    for key in m.keys() {
        if !keys.contains(&key.as_str()) {
            keys.push(key);
        }
    }

    for path in keys {
        let Some(template) = m.string(path) else {
            continue;
        };
        if let Err(message) = check_mapping_path(path) {
            m.error(path, message);
            continue;
        }
        if template.is_empty() {
            merged.retain(|(p, _)| p != path);
            continue;
        }
        let template = match Template::parse(template) {
            Ok(template) => template,
            Err(message) => {
                m.error(path, message);
                continue;
            }
        };
        match merged.iter_mut().find(|(p, _)| p == path) {
            Some(entry) => entry.1 = template,
            None => merged.push((path.to_owned(), template)),
        }
    }
    if !merged.iter().any(|(path, _)| path == "userName") {
        m.error("userName", "userName must be mapped; it cannot be removed");
    }
    merged
}

/// The keys of the `[mapping]` table in the order the file writes them (`toml::Table` sorts).
pub(super) fn mapping_keys_in_file_order(text: &str) -> Vec<String> {
    let Ok(document) = toml::de::DeTable::parse(text) else {
        return Vec::new();
    };
    let Some(toml::de::DeValue::Table(mapping)) = document
        .get_ref()
        .iter()
        .find(|(key, _)| key.get_ref() == "mapping")
        .map(|(_, value)| value.get_ref())
    else {
        return Vec::new();
    };
    let mut keys: Vec<(usize, String)> = mapping
        .iter()
        .map(|(key, _)| (key.span().start, key.get_ref().to_string()))
        .collect();
    keys.sort();
    keys.into_iter().map(|(_, key)| key).collect()
}

fn check_mapping_path(path: &str) -> Result<(), String> {
    match path {
        "externalId" => return Err("externalId is always the directory id".to_owned()),
        "active" => return Err("active follows the directory's disabled state".to_owned()),
        _ => {}
    }
    let supported = SIMPLE_PATHS.contains(&path)
        || path
            .strip_prefix("name.")
            .is_some_and(|part| NAME_PARTS.contains(&part))
        || path
            .strip_prefix(ENTERPRISE_PREFIX)
            .is_some_and(|part| ENTERPRISE_PARTS.contains(&part) || part == "manager")
        || path
            .strip_prefix("addresses[type eq \"")
            .and_then(|rest| rest.split_once("\"]."))
            .is_some_and(|(kind, sub)| {
                !kind.is_empty()
                    && kind.chars().all(|c| c.is_ascii_alphabetic())
                    && ADDRESS_PARTS.contains(&sub)
            })
        || TYPED_MULTI_VALUED.iter().any(|attribute| {
            path.strip_prefix(attribute)
                .and_then(|rest| rest.strip_prefix("[type eq \""))
                .and_then(|rest| rest.strip_suffix("\"].value"))
                .is_some_and(|kind| {
                    !kind.is_empty() && kind.chars().all(|c| c.is_ascii_alphabetic())
                })
        });
    if supported {
        return Ok(());
    }
    let candidates: Vec<String> = SIMPLE_PATHS
        .iter()
        .map(|path| path.to_string())
        .chain(NAME_PARTS.iter().map(|part| format!("name.{part}")))
        .chain(
            ENTERPRISE_PARTS
                .iter()
                .chain(&["manager"])
                .map(|part| format!("{ENTERPRISE_PREFIX}{part}")),
        )
        .collect();
    let candidates: Vec<&str> = candidates.iter().map(String::as_str).collect();
    Err(match nearest(path, &candidates) {
        Some(near) => format!("unsupported SCIM attribute path \"{path}\"; did you mean \"{near}\"?"),
        None => format!(
            "unsupported SCIM attribute path \"{path}\"; supported: {}, name.<{}>, emails[type eq \"work\"].value, phoneNumbers[type eq \"work\"].value, addresses[type eq \"work\"].<{}>, {ENTERPRISE_PREFIX}<{}|manager>",
            SIMPLE_PATHS.join(", "),
            NAME_PARTS.join("|"),
            ADDRESS_PARTS.join("|"),
            ENTERPRISE_PARTS.join("|"),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        for good in [
            "userName",
            "name.honorificSuffix",
            "emails[type eq \"home\"].value",
            "phoneNumbers[type eq \"work\"].value",
            "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:costCenter",
            "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:manager",
            "addresses[type eq \"work\"].streetAddress",
            "addresses[type eq \"home\"].postalCode",
        ] {
            assert_eq!(check_mapping_path(good), Ok(()), "{good}");
        }
        for bad in [
            "emails[type eq \"\"].value",
            "emails[type eq \"work 2\"].value",
            "addresses[type eq \"work\"].value",
            "addresses[type eq \"\"].locality",
            "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:managr",
            "name",
        ] {
            assert!(check_mapping_path(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            check_mapping_path("displayname"),
            Err(
                "unsupported SCIM attribute path \"displayname\"; did you mean \"displayName\"?"
                    .into()
            )
        );
    }
}
