//! The results of the lock scripts (`scripts/*.lua`, see each file's header) and the only place
//! they are parsed: one JSON item per array entry, tagged by `"t"`, turned into the engine's
//! types ([`LockInfo`], [`LockTransition`], …) for [`super::locks`].

use std::sync::Arc;

use serde::{Deserialize, Deserializer};

use crate::engine::{
    EngineError, EngineResult, Grant, Holder, LockInfo, LockTransition, ReleaseReason, SessionId,
};
use crate::names::Entity;

/// One JSON item of a script's result array (`"t"` tags the kind; see the scripts' headers).
#[derive(Debug, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub(super) enum Item {
    Granted {
        lock: WireLock,
        reentrant: bool,
    },
    Held {
        lock: WireLock,
        #[serde(default)]
        position: Option<Num>,
        wait: Num,
    },
    Released {
        lock: WireLock,
        reason: ReleaseReason,
        #[serde(default)]
        granted: Option<WireGrant>,
    },
    WaitExpired {
        room: Entity,
        resource: Entity,
        session_id: SessionId,
        #[serde(default)]
        request_id: Option<Num>,
    },
    NotHeld {
        #[serde(default)]
        current: Option<WireLock>,
    },
    Extended {
        lock: WireLock,
    },
    Reissued {
        lock: WireLock,
    },
    Cancelled {
        ok: bool,
    },
    Lost {
        key: String,
        token: Num,
    },
    Validated {
        valid: bool,
        lock: WireLock,
    },
    Lock {
        lock: WireLock,
    },
    /// The reap script hit its batch limit: call again.
    More,
}

/// An unsigned integer sent as a decimal string (exact beyond cjson's 14 digits) or a number.
#[derive(Debug, Clone, Copy)]
pub(super) struct Num(pub(super) u64);

impl<'de> Deserialize<'de> for Num {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Num, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(Num(n)),
            Raw::Text(s) => s.parse().map(Num).map_err(serde::de::Error::custom),
        }
    }
}

impl Num {
    pub(super) fn u32(self) -> u32 {
        u32::try_from(self.0).unwrap_or(u32::MAX)
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct WireLock {
    room: Entity,
    resource: Entity,
    pub(super) token: Num,
    user_id: Arc<str>,
    name: Arc<str>,
    session_id: Arc<str>,
    node_id: Arc<str>,
    action: Arc<str>,
    since: Num,
    expires_at: Num,
}

impl From<WireLock> for LockInfo {
    fn from(w: WireLock) -> LockInfo {
        LockInfo {
            room: w.room,
            resource: w.resource,
            token: w.token.0,
            holder: Holder {
                user_id: w.user_id,
                name: w.name,
                session_id: w.session_id,
                node_id: w.node_id,
            },
            action: w.action,
            since: w.since.0,
            expires_at: w.expires_at.0,
        }
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct WireGrant {
    lock: WireLock,
    #[serde(default)]
    request_id: Option<Num>,
}

pub(super) fn parse_items(raw: &[String]) -> EngineResult<Vec<Item>> {
    raw.iter()
        .map(|s| {
            serde_json::from_str(s).map_err(|e| {
                EngineError::Internal(format!("unexpected lock script result {s:?}: {e}"))
            })
        })
        .collect()
}

pub(super) fn unexpected(what: &str, item: &Item) -> EngineError {
    EngineError::Internal(format!("unexpected {what} script result: {item:?}"))
}

/// Exactly one item, as the single-resource scripts return.
pub(super) fn single(what: &str, mut items: Vec<Item>) -> EngineResult<Item> {
    match (items.pop(), items.is_empty()) {
        (Some(item), true) => Ok(item),
        _ => Err(EngineError::Internal(format!(
            "{what} script returned {} items, expected one",
            items.len() + 1
        ))),
    }
}

impl Item {
    pub(super) fn into_transition(self) -> EngineResult<LockTransition> {
        match self {
            Item::Released {
                lock,
                reason,
                granted,
            } => Ok(LockTransition::Released {
                lock: lock.into(),
                reason,
                granted: granted.map(|g| Grant {
                    lock: g.lock.into(),
                    request_id: g.request_id.map(Num::u32),
                }),
            }),
            Item::WaitExpired {
                room,
                resource,
                session_id,
                request_id,
            } => Ok(LockTransition::WaitExpired {
                room,
                resource,
                session_id,
                request_id: request_id.map(Num::u32),
            }),
            other => Err(unexpected("transition", &other)),
        }
    }
}

/// Results of one script per shard: what succeeded, or the error when every shard failed (see
/// the module doc, "Multi-shard operations").
pub(super) fn merge_shards<T>(
    what: &str,
    results: Vec<EngineResult<Vec<T>>>,
) -> EngineResult<Vec<T>> {
    let total = results.len();
    let mut out = Vec::new();
    let mut first_err = None;
    let mut failed = 0;
    for r in results {
        match r {
            Ok(v) => out.extend(v),
            Err(e) => {
                failed += 1;
                if first_err.is_none() {
                    first_err = Some(e);
                }
            }
        }
    }
    match first_err {
        Some(e) if failed == total => Err(e),
        Some(e) => {
            tracing::warn!(error = %e, failed, total, "lock {what}: some shards failed");
            Ok(out)
        }
        None => Ok(out),
    }
}
