//! The words of a change: what it does ([`Action`]), to which kind of resource
//! ([`ResourceKind`]), and the identity of a held one ([`HeldKey`], what `approve` releases).
//! Shared by the plan, the apply, the reports, the audit trail, the metrics and the snapshot.

use super::DirectoryId;

/// What a change does, as reports, the audit trail and `approve` name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    Create,
    Adopt,
    Update,
    Deactivate,
    Rebind,
    Delete,
    RemoveMembers,
    AddMembers,
    Orphan,
}

impl Action {
    pub const ALL: [Action; 9] = [
        Action::Create,
        Action::Adopt,
        Action::Update,
        Action::Deactivate,
        Action::Rebind,
        Action::Delete,
        Action::RemoveMembers,
        Action::AddMembers,
        Action::Orphan,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Adopt => "adopt",
            Action::Update => "update",
            Action::Deactivate => "deactivate",
            Action::Rebind => "rebind",
            Action::Delete => "delete",
            Action::RemoveMembers => "remove-members",
            Action::AddMembers => "add-members",
            Action::Orphan => "orphan",
        }
    }

    pub fn parse(word: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.as_str() == word)
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for Action {
    fn eq(&self, word: &&str) -> bool {
        self.as_str() == *word
    }
}

/// The kind of SCIM resource a change is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum ResourceKind {
    User,
    Group,
}

impl ResourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ResourceKind::User => "User",
            ResourceKind::Group => "Group",
        }
    }

    /// The SCIM endpoint of the kind (`Users`, `Groups`).
    pub fn endpoint(self) -> &'static str {
        match self {
            ResourceKind::User => "Users",
            ResourceKind::Group => "Groups",
        }
    }
}

impl std::fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for ResourceKind {
    fn eq(&self, word: &&str) -> bool {
        self.as_str() == *word
    }
}

/// The identity of a held change, as stored for `approve`: its action and directory id. A
/// rebind names the account's old directory id too (stored as `rebind:<from>`), so
/// approving one rebind never releases a later one of the same entry that takes another
/// entry's account. Kept as the stored pair (word, id), whose word always names an action.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct HeldKey((String, DirectoryId));

impl HeldKey {
    pub fn new(action: Action, from: Option<&DirectoryId>, id: DirectoryId) -> HeldKey {
        let word = match from {
            Some(from) => format!("{action}:{from}"),
            None => action.to_string(),
        };
        HeldKey((word, id))
    }

    /// A stored pair, if its word names an action.
    pub fn parse(word: &str, id: DirectoryId) -> Option<HeldKey> {
        let action = word.split_once(':').map_or(word, |(a, _)| a);
        Action::parse(action).map(|_| HeldKey((word.to_string(), id)))
    }

    pub fn action(&self) -> Action {
        let word = &self.0 .0;
        Action::parse(word.split_once(':').map_or(word.as_str(), |(a, _)| a))
            .expect("a held key's word names an action (checked when it was made)")
    }

    /// For a rebind: the directory id that held the account.
    pub fn from(&self) -> Option<DirectoryId> {
        self.0
             .0
            .split_once(':')
            .map(|(_, f)| DirectoryId(f.to_string()))
    }

    /// The stored word: the action, with `:<from>` for a rebind.
    pub fn word(&self) -> &str {
        &self.0 .0
    }

    pub fn id(&self) -> &DirectoryId {
        &self.0 .1
    }
}

impl std::borrow::Borrow<(String, DirectoryId)> for HeldKey {
    fn borrow(&self) -> &(String, DirectoryId) {
        &self.0
    }
}

impl<'de> serde::Deserialize<'de> for HeldKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (word, id): (String, DirectoryId) = serde::Deserialize::deserialize(d)?;
        HeldKey::parse(&word, id).ok_or_else(|| {
            serde::de::Error::custom(format!("unknown action {word:?} in a held change"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_key_is_stored_as_the_pair_it_always_was() {
        let old = DirectoryId::new("old");
        let rebind = HeldKey::new(Action::Rebind, Some(&old), DirectoryId::new("new"));
        let text = serde_json::to_string(&rebind).unwrap();
        assert_eq!(text, r#"["rebind:old","new"]"#);
        assert_eq!(serde_json::from_str::<HeldKey>(&text).unwrap(), rebind);
        assert_eq!(rebind.action(), Action::Rebind);
        assert_eq!(rebind.from(), Some(old));
        let plain = HeldKey::new(Action::RemoveMembers, None, DirectoryId::new("g"));
        assert_eq!(
            serde_json::to_string(&plain).unwrap(),
            r#"["remove-members","g"]"#
        );
        assert_eq!(plain.from(), None);
        assert!(serde_json::from_str::<HeldKey>(r#"["explode","g"]"#).is_err());
        // Ordered by the stored word, as the pairs were.
        assert!(HeldKey::new(Action::Delete, None, DirectoryId::new("z")) < plain);
    }
}
