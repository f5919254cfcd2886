//! Every per-profile behaviour in one place: what a `profile` changes about how ldap2scim
//! talks to a target (member batches, the shape of member removals, whether groups list
//! their members, the default pace). A profile that changes nothing has no entry here, and
//! nothing outside this file may look at a [`Profile`] variant to decide anything: it asks
//! one of these functions.
//!
//! No profile changes PATCH support (that comes from `/ServiceProviderConfig`) or the
//! request headers today; either would be a function here.

use serde_json::{json, Value};

use super::wire::PatchOp;
use crate::model::ScimId;

/// The PATCH operations for one batch of member changes: one `add` with every value;
/// removals as one filter path per member, or (entra-style) one `remove` with a value array.
pub fn member_ops(profile: Profile, add: bool, members: &[&ScimId]) -> Vec<PatchOp> {
    let values = || {
        Value::Array(
            members
                .iter()
                .map(|s| json!({"value": s.0}))
                .collect::<Vec<_>>(),
        )
    };
    match (add, profile) {
        (true, _) => vec![PatchOp::add("members", values())],
        (false, Profile::EntraStyle) => vec![PatchOp::remove_values("members", values())],
        (false, _) => members
            .iter()
            .map(|s| PatchOp::remove(format!("members[value eq \"{}\"]", s.0)))
            .collect(),
    }
}

/// A target's dialect (`profile` in its file). Each variant's behaviour is one of the
/// functions below. `GithubEmu` is an alias of `Generic`: GitHub's SCIM API for Enterprise
/// Managed Users documents nothing the generic client does not already do (a bearer token,
/// `application/scim+json`, RFC 7644 PATCH, 429 with `Retry-After`; its REST API version
/// header is optional and defaults), so no function below names it. The name stays
/// accepted (`github-emu` is part of the configuration contract) so that a configuration
/// can say what it talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    Generic,
    AwsIdentityCenter,
    Slack,
    GithubEmu,
    EntraStyle,
}

/// Every profile by the name a target file gives it (`profile = "…"`); these names are part
/// of the configuration contract.
pub const NAMES: &[(&str, Profile)] = &[
    ("generic", Profile::Generic),
    ("aws-identity-center", Profile::AwsIdentityCenter),
    ("slack", Profile::Slack),
    ("github-emu", Profile::GithubEmu),
    ("entra-style", Profile::EntraStyle),
];

/// AWS IAM Identity Center takes at most this many member values in one PATCH.
pub const AWS_MAX_MEMBERS_PER_REQUEST: usize = 100;

/// The most member values one PATCH may carry on this profile (`members_per_request` is
/// capped to it when the configuration is loaded).
pub fn max_members_per_request(profile: Profile) -> Option<usize> {
    match profile {
        Profile::AwsIdentityCenter => Some(AWS_MAX_MEMBERS_PER_REQUEST),
        _ => None,
    }
}

/// Whether the target's groups list their members when read. AWS Identity Center never
/// returns members: an adopted group starts from "unknown" (additions are idempotent, and
/// nothing unseen is removed).
pub fn reads_members(profile: Profile) -> bool {
    profile != Profile::AwsIdentityCenter
}

/// The pace a profile keeps when `rate_limit` is not set, in writes per second. Slack
/// documents about 180 SCIM writes a minute.
pub fn default_writes_per_second(profile: Profile) -> Option<f64> {
    match profile {
        Profile::Slack => Some(3.0),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_profile_has_its_contract_name() {
        let named = |n: &str| NAMES.iter().find(|(k, _)| *k == n).map(|(_, p)| *p);
        assert_eq!(named("github-emu"), Some(Profile::GithubEmu));
        assert_eq!(named("generic"), Some(Profile::Generic));
        assert_eq!(NAMES.len(), 5);
    }

    #[test]
    fn github_emu_is_an_alias_of_generic() {
        let (g, e) = (Profile::Generic, Profile::GithubEmu);
        assert_eq!(max_members_per_request(e), max_members_per_request(g));
        assert_eq!(reads_members(e), reads_members(g));
        assert_eq!(default_writes_per_second(e), default_writes_per_second(g));
    }

    #[test]
    fn profiles_differ_where_documented() {
        assert_eq!(
            max_members_per_request(Profile::AwsIdentityCenter),
            Some(AWS_MAX_MEMBERS_PER_REQUEST)
        );
        assert!(!reads_members(Profile::AwsIdentityCenter));
        assert_eq!(default_writes_per_second(Profile::Slack), Some(3.0));
        assert_eq!(default_writes_per_second(Profile::Generic), None);
    }

    #[test]
    fn member_batches_follow_the_profile() {
        let (a, b) = (ScimId("a".into()), ScimId("b".into()));
        let ids = [&a, &b];
        let ops = |profile, add| serde_json::to_value(member_ops(profile, add, &ids)).unwrap();
        assert_eq!(
            ops(Profile::Generic, true),
            json!([
                {"op": "add", "path": "members", "value": [{"value": "a"}, {"value": "b"}]}
            ])
        );
        assert_eq!(
            ops(Profile::Generic, false),
            json!([
                {"op": "remove", "path": "members[value eq \"a\"]"},
                {"op": "remove", "path": "members[value eq \"b\"]"},
            ])
        );
        assert_eq!(
            ops(Profile::EntraStyle, false),
            json!([
                {"op": "remove", "path": "members", "value": [{"value": "a"}, {"value": "b"}]}
            ])
        );
        // Every other profile removes as generic does, and adds alike.
        for p in [
            Profile::AwsIdentityCenter,
            Profile::Slack,
            Profile::GithubEmu,
        ] {
            assert_eq!(ops(p, false), ops(Profile::Generic, false), "{p:?}");
            assert_eq!(ops(p, true), ops(Profile::Generic, true), "{p:?}");
        }
    }
}
