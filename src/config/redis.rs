//! Settings of the node's Redis deployment that are more than a value: how many replicas must
//! acknowledge a lock grant (`LOCKSTEP_LOCK_REPLICAS`) and the TLS files for `rediss://`
//! (`LOCKSTEP_REDIS_TLS_*`). Resolved and validated by [`super::Config`].

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;

/// Default of `LOCKSTEP_LOCK_REPLICA_TIMEOUT`. A healthy replica on the same network acks in
/// about a millisecond; 500 ms rides out a replica's GC or fsync hiccup without failing grants,
/// yet stays well under a client's patience and under the lease (10 s) and command timeout
/// (5 s), and a stalled replica costs each grant at most this much.
pub const DEFAULT_LOCK_REPLICA_TIMEOUT: Duration = Duration::from_millis(500);

/// Most replicas `LOCKSTEP_LOCK_REPLICAS` may require.
pub const MAX_LOCK_REPLICAS: u32 = 16;

/// `LOCKSTEP_LOCK_REPLICAS`: `auto` or a count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockReplicas {
    /// 1 for Sentinel and Cluster URLs, 0 for a standalone one.
    Auto,
    Count(u32),
}

impl FromStr for LockReplicas {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("auto") {
            return Ok(LockReplicas::Auto);
        }
        s.parse()
            .map(LockReplicas::Count)
            .map_err(|_| format!("expected auto or a number of replicas, got {s:?}"))
    }
}

impl<'de> Deserialize<'de> for LockReplicas {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Count(u32),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Count(n) => Ok(LockReplicas::Count(n)),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// TLS settings for `rediss://` connections (applied by `engine::redis::tls`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedisTls {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub insecure: bool,
}

impl RedisTls {
    pub(super) fn is_set(&self) -> bool {
        *self != RedisTls::default()
    }

    /// A certificate needs its key; and TLS settings with a plaintext URL are a mistake that
    /// would silently send everything in the clear, so they are refused.
    pub(super) fn validate(&self, redis_url: Option<&str>) -> Result<(), ConfigError> {
        let invalid = |name, reason: &str| {
            Err(ConfigError::Invalid {
                name,
                reason: reason.to_owned(),
            })
        };
        if self.cert.is_some() != self.key.is_some() {
            return invalid(
                "redis_tls_cert",
                "redis_tls_cert and redis_tls_key must be set together",
            );
        }
        let tls_url =
            redis_url.is_some_and(|u| u.starts_with("rediss") || u.starts_with("valkeys"));
        if self.is_set() && !tls_url {
            return invalid(
                "redis_tls_ca",
                "Redis TLS settings are set but redis_url is not a rediss:// URL",
            );
        }
        Ok(())
    }
}
