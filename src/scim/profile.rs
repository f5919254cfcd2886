//! Every per-profile behaviour in one place: what a `profile` changes about how ldap2scim
//! talks to a target. A profile that changes nothing has no entry here.

use serde_json::{json, Value};

use crate::model::ScimId;

/// The PATCH operations for one batch of member changes: one `add` with every value;
/// removals as one filter path per member, or (entra-style) one `remove` with a value array.
pub fn member_ops(profile: Profile, add: bool, members: &[&ScimId]) -> Vec<Value> {
    let values = || {
        members
            .iter()
            .map(|s| json!({"value": s.0}))
            .collect::<Vec<_>>()
    };
    match (add, profile) {
        (true, _) => vec![json!({"op": "add", "path": "members", "value": values()})],
        (false, Profile::EntraStyle) => {
            vec![json!({"op": "remove", "path": "members", "value": values()})]
        }
        (false, _) => members
            .iter()
            .map(|s| json!({"op": "remove", "path": format!("members[value eq \"{}\"]", s.0)}))
            .collect(),
    }
}

/// A target's dialect (`profile` in its file). Each variant's behaviour is one of the
/// functions below; `GithubEmu` behaves as `Generic` (GitHub's SCIM API for Enterprise
/// Managed Users needs nothing the generic client does not already do), and is kept as a
/// name so that a configuration can say what it talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    Generic,
    AwsIdentityCenter,
    Slack,
    GithubEmu,
    EntraStyle,
}

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
    fn member_batches_follow_the_profile() {
        let (a, b) = (ScimId("a".into()), ScimId("b".into()));
        let ids = [&a, &b];
        assert_eq!(
            member_ops(Profile::Generic, true, &ids),
            vec![
                json!({"op": "add", "path": "members", "value": [{"value": "a"}, {"value": "b"}]})
            ]
        );
        assert_eq!(
            member_ops(Profile::Generic, false, &ids),
            vec![
                json!({"op": "remove", "path": "members[value eq \"a\"]"}),
                json!({"op": "remove", "path": "members[value eq \"b\"]"}),
            ]
        );
        assert_eq!(
            member_ops(Profile::EntraStyle, false, &ids),
            vec![
                json!({"op": "remove", "path": "members", "value": [{"value": "a"}, {"value": "b"}]})
            ]
        );
    }
}
