//! Entity names (`type:id`) as the contract defines them, validated once at the edge.
//!
//! An [`Entity`] is cheap to clone (`Arc<str>`) because room and resource names travel
//! with every fan-out event.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A validated `type:id` name: type `[a-z][a-z0-9_]{0,31}`, id `[A-Za-z0-9._~-]{1,128}`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Entity(Arc<str>);

/// Why a string is not an entity name; the text is shown to clients in `bad_request` errors.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EntityError {
    #[error("entity must be 'type:id', got {0:?}")]
    MissingColon(String),
    #[error("entity type must match [a-z][a-z0-9_]{{0,31}}, got {0:?}")]
    BadType(String),
    #[error("entity id must match [A-Za-z0-9._~-]{{1,128}}, got {0:?}")]
    BadId(String),
}

impl Entity {
    pub fn parse(s: &str) -> Result<Self, EntityError> {
        let (ty, id) = s
            .split_once(':')
            .ok_or_else(|| EntityError::MissingColon(truncate(s)))?;
        if !valid_type(ty) {
            return Err(EntityError::BadType(truncate(ty)));
        }
        if !valid_id(id) {
            return Err(EntityError::BadId(truncate(id)));
        }
        Ok(Entity(Arc::from(s)))
    }

    /// Builds an entity from its two parts (the HTTP presence path carries them separately).
    pub fn from_parts(ty: &str, id: &str) -> Result<Self, EntityError> {
        Self::parse(&format!("{ty}:{id}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn entity_type(&self) -> &str {
        self.0.split_once(':').map(|(t, _)| t).unwrap_or_default()
    }
}

fn valid_type(ty: &str) -> bool {
    let b = ty.as_bytes();
    !b.is_empty()
        && b.len() <= 32
        && b[0].is_ascii_lowercase()
        && b[1..]
            .iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_')
}

fn valid_id(id: &str) -> bool {
    let b = id.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'~' | b'-'))
}

/// Keeps error messages short when a client sends a megabyte of garbage as a name.
fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

impl fmt::Display for Entity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Entity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Entity({})", self.0)
    }
}

impl Serialize for Entity {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Entity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
        Entity::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A lock action (`approve`, `trim`, …): `[a-z][a-z0-9_.-]{0,31}`.
pub fn valid_action(action: &str) -> bool {
    let b = action.as_bytes();
    !b.is_empty()
        && b.len() <= 32
        && b[0].is_ascii_lowercase()
        && b[1..].iter().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'.' | b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_contract_examples() {
        for ok in ["scene:42", "segment:42-7", "a:b", "story_beat9:x.y~z_-"] {
            assert!(Entity::parse(ok).is_ok(), "{ok}");
        }
        let max_type = format!("{}:1", "a".repeat(32));
        assert!(Entity::parse(&max_type).is_ok());
        let max_id = format!("a:{}", "Z".repeat(128));
        assert!(Entity::parse(&max_id).is_ok());
    }

    #[test]
    fn refuses_bad_names() {
        for bad in [
            "",
            "scene",
            "Scene:1",
            "1scene:1",
            "scene:",
            ":1",
            "scene:a b",
            "scene:ä",
            "sc-ene:1",
            "scene:1:2",
        ] {
            assert!(Entity::parse(bad).is_err(), "{bad:?} should be refused");
        }
        assert!(Entity::parse(&format!("{}:1", "a".repeat(33))).is_err());
        assert!(Entity::parse(&format!("a:{}", "Z".repeat(129))).is_err());
    }

    #[test]
    fn entity_type_is_the_prefix() {
        assert_eq!(
            Entity::parse("segment:42-7").unwrap().entity_type(),
            "segment"
        );
    }

    #[test]
    fn actions() {
        assert!(valid_action("approve"));
        assert!(valid_action("re.generate-2"));
        assert!(!valid_action(""));
        assert!(!valid_action("Approve"));
        assert!(!valid_action(&"a".repeat(33)));
    }
}
