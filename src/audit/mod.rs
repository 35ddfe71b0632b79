//! Audit records: what happened to which lock or session, by whom, and where it is kept.
//!
//! Lock stores append the records of their own transitions (in the same step as the change);
//! the node appends session and auth records. Where they go depends on the deployment:
//!
//! | engines | database | outbox (`append`) | drained by | `GET /v1/audit` reads |
//! |---|---|---|---|---|
//! | embedded | none | [`jsonl::JsonlSink`] | — | the file |
//! | embedded | Postgres | [`jsonl::JsonlSink`] | [`drain::FileDrainer`] | Postgres ([`postgres::PgBackedSink`]) |
//! | Redis | none | shard streams ([`RedisAuditSink`](crate::engine::redis::audit::RedisAuditSink)), a bounded ring | — | the streams |
//! | Redis | Postgres | shard streams | [`outbox::RedisOutboxWriter`] on every node | Postgres ([`postgres::PgBackedSink`]) |
//!
//! With a database every record becomes exactly one `lockstep.audit_events` row: the outbox is
//! durable before the operation returns, the drainers acknowledge only after their transaction
//! committed, and a record's id is fixed in the outbox so a re-sent batch inserts nothing twice
//! (`ON CONFLICT (id) DO NOTHING`). See [`outbox`] and [`drain`] for the arguments.

pub mod drain;
pub mod instrumented;
pub mod jsonl;
pub mod outbox;
pub mod postgres;

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// What an audit record is about. Serialized in snake_case (`lock_acquired`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditKind {
    LockAcquired,
    LockDenied,
    LockReleased,
    LockExpired,
    LockDisconnected,
    LockForced,
    LockRevoked,
    LockExtended,
    LockWaiting,
    LockWaitCancelled,
    LockWaitExpired,
    /// A grant taken back before anyone was told its token: strict fencing could not register
    /// it (`detail.reason`). The token was never valid; see `docs/fencing.md`.
    LockWithdrawn,
    SessionOpened,
    SessionClosed,
    SessionRefreshed,
    SessionRevoked,
    AuthFailed,
    Forbidden,
    /// A node loaded a Yjs document (snapshot plus log tail); `detail` has the sizes.
    DocumentLoaded,
    /// A document's update log was merged into its stored snapshot and trimmed; `token` is
    /// the compaction lock's fencing token, `detail` the entries, coverage and sizes.
    DocumentCompacted,
}

impl AuditKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditKind::LockAcquired => "lock_acquired",
            AuditKind::LockDenied => "lock_denied",
            AuditKind::LockReleased => "lock_released",
            AuditKind::LockExpired => "lock_expired",
            AuditKind::LockDisconnected => "lock_disconnected",
            AuditKind::LockForced => "lock_forced",
            AuditKind::LockRevoked => "lock_revoked",
            AuditKind::LockExtended => "lock_extended",
            AuditKind::LockWaiting => "lock_waiting",
            AuditKind::LockWaitCancelled => "lock_wait_cancelled",
            AuditKind::LockWaitExpired => "lock_wait_expired",
            AuditKind::LockWithdrawn => "lock_withdrawn",
            AuditKind::SessionOpened => "session_opened",
            AuditKind::SessionClosed => "session_closed",
            AuditKind::SessionRefreshed => "session_refreshed",
            AuditKind::SessionRevoked => "session_revoked",
            AuditKind::AuthFailed => "auth_failed",
            AuditKind::Forbidden => "forbidden",
            AuditKind::DocumentLoaded => "document_loaded",
            AuditKind::DocumentCompacted => "document_compacted",
        }
    }

    pub fn parse(s: &str) -> Option<AuditKind> {
        serde_json::from_value(serde_json::Value::String(s.to_owned())).ok()
    }
}

/// One audit record; the shape of a `lockstep.audit_events` row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// UUIDv7: unique and time-ordered, so it doubles as a pagination cursor.
    pub id: Uuid,
    /// When it happened, ms since the epoch; written as RFC 3339 text.
    #[serde(with = "rfc3339_ms")]
    pub at: u64,
    pub kind: AuditKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room: Option<Arc<str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<Arc<str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<Arc<str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<Arc<str>>,
    pub node_id: Arc<str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<u64>,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub detail: serde_json::Value,
    /// Who acted on somebody else's lock (a forced release): `user_id`/`session_id` above stay
    /// the lock's holder (the one it happened to), the forcer is here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<crate::engine::Actor>,
}

impl AuditRecord {
    /// A record stamped now with a fresh id; fill the optional fields with struct update syntax.
    pub fn new(kind: AuditKind, node_id: Arc<str>) -> AuditRecord {
        AuditRecord {
            id: Uuid::now_v7(),
            at: crate::engine::now_ms(),
            kind,
            room: None,
            resource: None,
            user_id: None,
            session_id: None,
            node_id,
            token: None,
            detail: serde_json::Value::Null,
            actor: None,
        }
    }
}

/// Filters of `GET /v1/audit`; all optional. Results are newest first.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct AuditQuery {
    pub resource: Option<String>,
    pub room: Option<String>,
    pub user_id: Option<String>,
    /// Only records whose `actor.user_id` is this (who forced a release).
    pub actor: Option<String>,
    pub kind: Option<String>,
    /// Only records at or after this instant (RFC 3339 or ms since the epoch).
    pub since: Option<String>,
    /// Only records before this instant (RFC 3339 or ms since the epoch).
    pub until: Option<String>,
    /// Keyset cursor: only records older than this record id (the `next` of a previous page).
    pub before: Option<Uuid>,
    /// Page size, default 100, at most 1000.
    pub limit: Option<usize>,
}

/// One page of audit records and the cursor for the next (older) page.
#[derive(Debug, Clone, Serialize)]
pub struct AuditPage {
    pub records: Vec<AuditRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<Uuid>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit storage unavailable: {0}")]
    Unavailable(String),
    #[error("bad audit query: {0}")]
    BadQuery(String),
}

/// Where audit records go. `append` returns once the records are accepted by the sink's
/// durable path (written to the file, or `XADD`ed); it waits rather than drop when the sink is
/// behind, so nothing is lost.
#[async_trait]
pub trait AuditSink: Send + Sync + 'static {
    async fn append(&self, records: Vec<AuditRecord>) -> Result<(), AuditError>;
    async fn query(&self, q: &AuditQuery) -> Result<AuditPage, AuditError>;
    /// Writes out everything accepted so far (called on shutdown).
    async fn flush(&self) -> Result<(), AuditError>;
}

/// RFC 3339 with milliseconds, UTC (`2026-11-21T23:40:00.123Z`).
pub mod rfc3339_ms {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::{Duration, UNIX_EPOCH};

    pub fn format(ms: u64) -> String {
        humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
    }

    pub fn parse(s: &str) -> Option<u64> {
        if let Ok(ms) = s.parse::<u64>() {
            return Some(ms);
        }
        humantime::parse_rfc3339_weak(s)
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_millis() as u64)
    }

    pub fn serialize<S: Serializer>(ms: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*ms))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
        parse(&s).ok_or_else(|| serde::de::Error::custom("bad RFC 3339 timestamp"))
    }
}
