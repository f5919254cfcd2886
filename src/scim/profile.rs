//! Every per-profile behaviour in one place: what a `profile` changes about how ldap2scim
//! talks to a target (member batches, the shape of member removals, whether groups list
//! their members, the default pace). A profile that changes nothing has no entry here, and
//! nothing outside this file may look at a [`Profile`] variant to decide anything: it asks
//! one of these functions.
//!
//! No profile changes PATCH support (that comes from `/ServiceProviderConfig`) or the
//! request headers today; either would be a function here.
//!
//! A leaf: it uses only `scim::wire`, `scim::headers` and `model`, none of which imports
//! anything of ours. That is why the configuration may ask it for a profile's names, member
//! cap and pace while it resolves a target file, without depending on the client.

use std::time::Duration;

use reqwest::header::HeaderMap;
use reqwest::StatusCode;
use serde_json::{json, Value};

use super::headers::{retry_after, MAX_RETRY_AFTER};
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
/// functions below. `GithubEmu` (`github-emu`, part of the configuration contract) differs
/// from `Generic` in one documented way: GitHub's REST API, SCIM endpoints included, says
/// "slow down" with a 403 as well as a 429 ([`throttled`]). Everything else it documents
/// (a bearer token, `application/scim+json`, RFC 7644 PATCH, an optional API version header
/// that defaults) the generic client already does.
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

/// Whether an answer that is otherwise final is this profile's way of saying "slow down",
/// and how long to wait (`None` inside: the backoff's next delay). GitHub answers a rate
/// limit with 403 or 429, with `Retry-After`, or with `x-ratelimit-remaining: 0` and
/// `x-ratelimit-reset` (UTC epoch seconds). A 403 without either is a refusal of the
/// credentials, as everywhere else. Waits are capped at [`MAX_RETRY_AFTER`].
pub fn throttled(
    profile: Profile,
    status: StatusCode,
    headers: &HeaderMap,
    now: chrono::DateTime<chrono::Utc>,
) -> Option<Option<Duration>> {
    if profile != Profile::GithubEmu || status != StatusCode::FORBIDDEN {
        return None;
    }
    if let Some(wait) = retry_after(headers, now) {
        return Some(Some(wait));
    }
    let header = |name: &str| headers.get(name)?.to_str().ok().map(str::trim);
    if header("x-ratelimit-remaining") != Some("0") {
        return None;
    }
    let reset = header("x-ratelimit-reset").and_then(|r| r.parse::<i64>().ok());
    Some(reset.map(|at| {
        let secs = at.saturating_sub(now.timestamp()).max(0);
        Duration::from_secs(secs.unsigned_abs()).min(MAX_RETRY_AFTER)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The code of a file before its test module.
    fn code(source: &str) -> &str {
        source
            .split("#[cfg(test)]\nmod tests")
            .next()
            .unwrap_or(source)
    }

    #[test]
    fn the_profile_and_what_it_uses_import_nothing_but_the_model() {
        // The configuration imports this file; were it to reach the client or the config,
        // that would be an arrow upwards (or a circle).
        for (file, source) in [
            ("profile.rs", include_str!("profile.rs")),
            ("wire.rs", include_str!("wire.rs")),
            ("headers.rs", include_str!("headers.rs")),
        ] {
            for line in code(source).lines() {
                let line = line.trim_start();
                // A path into our code, in a `use` or inline (`super::client::…`).
                let ours = line.contains("crate::") || line.contains("super::");
                if !ours || line.starts_with("//") {
                    continue;
                }
                let allowed = ["crate::model", "super::headers", "super::wire"]
                    .iter()
                    .any(|leaf| line.contains(leaf));
                assert!(allowed, "{file} imports more than a leaf: {line}");
            }
        }
    }

    #[test]
    fn every_profile_has_its_contract_name() {
        let named = |n: &str| NAMES.iter().find(|(k, _)| *k == n).map(|(_, p)| *p);
        assert_eq!(named("github-emu"), Some(Profile::GithubEmu));
        assert_eq!(named("generic"), Some(Profile::Generic));
        assert_eq!(NAMES.len(), 5);
    }

    #[test]
    fn github_rate_limits_with_a_403_are_throttling_not_refusals() {
        use reqwest::header::HeaderValue;
        let headers = |pairs: &[(&'static str, String)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, HeaderValue::from_str(v).unwrap());
            }
            h
        };
        let forbidden = StatusCode::FORBIDDEN;
        let after = headers(&[("retry-after", "30".into())]);
        assert_eq!(
            throttled(Profile::GithubEmu, forbidden, &after, chrono::Utc::now()),
            Some(Some(Duration::from_secs(30)))
        );
        let soon = chrono::Utc::now().timestamp() + 20;
        let spent = headers(&[
            ("x-ratelimit-remaining", "0".into()),
            ("x-ratelimit-reset", soon.to_string()),
        ]);
        let wait = throttled(Profile::GithubEmu, forbidden, &spent, chrono::Utc::now())
            .unwrap()
            .unwrap();
        assert!(
            wait <= Duration::from_secs(20) && wait >= Duration::from_secs(18),
            "{wait:?}"
        );
        let far = headers(&[
            ("x-ratelimit-remaining", "0".into()),
            ("x-ratelimit-reset", i64::MAX.to_string()),
        ]);
        assert_eq!(
            throttled(Profile::GithubEmu, forbidden, &far, chrono::Utc::now()),
            Some(Some(MAX_RETRY_AFTER))
        );
        let unknown = headers(&[("x-ratelimit-remaining", "0".into())]);
        assert_eq!(
            throttled(Profile::GithubEmu, forbidden, &unknown, chrono::Utc::now()),
            Some(None)
        );
        // A plain 403 is a refusal; other profiles and statuses are untouched.
        let plain = headers(&[("x-ratelimit-remaining", "4999".into())]);
        assert_eq!(
            throttled(Profile::GithubEmu, forbidden, &plain, chrono::Utc::now()),
            None
        );
        assert_eq!(
            throttled(Profile::Generic, forbidden, &after, chrono::Utc::now()),
            None
        );
        assert_eq!(
            throttled(
                Profile::GithubEmu,
                StatusCode::NOT_FOUND,
                &after,
                chrono::Utc::now()
            ),
            None
        );
        // Through the one retry policy.
        use crate::scim::retry::{classify, may_have_acted, Decision, Outcome};
        let answer = Outcome::Response {
            status: forbidden,
            headers: &after,
        };
        assert_eq!(
            classify(&answer, Profile::GithubEmu, chrono::Utc::now()),
            Decision::Retry(Some(Duration::from_secs(30)))
        );
        assert!(!may_have_acted(
            &answer,
            Profile::GithubEmu,
            chrono::Utc::now()
        ));
        assert_eq!(
            classify(&answer, Profile::Generic, chrono::Utc::now()),
            Decision::GiveUp
        );
        assert_eq!(
            classify(
                &Outcome::BodyUnreadable { status: forbidden },
                Profile::GithubEmu,
                chrono::Utc::now()
            ),
            Decision::GiveUp
        );
    }

    #[test]
    fn github_emu_is_generic_in_everything_else() {
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
