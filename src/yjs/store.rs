//! The storage interfaces of Yjs documents: a per-document **update log** (Redis Stream with
//! Redis, in process when embedded) and **snapshots** (Postgres with a database, a file in the
//! data directory when embedded). Nodes keep no document state another node cannot rebuild:
//! a document is its latest snapshot plus the log entries after the entry the snapshot covers.
//!
//! Updates are opaque bytes here (Yjs v1 update encoding); validating and merging them is the
//! document layer's job, so the stores know nothing of yrs.
//!
//! The contract every implementation keeps (tested by one suite against each):
//! - entry ids of one document are strictly increasing, and `read_after` returns entries in
//!   that order;
//! - `append` makes the entry durable (as durable as the store is) and announces it to every
//!   node subscribed to the document in one step, so a subscriber that then reads the log
//!   never misses it and may see it twice (ids let it drop the repeat);
//! - `trim_through` never drops an entry above the id a stored snapshot covers (the caller
//!   checks; the store only trims what it is told);
//! - `SnapshotStore::store` refuses a writer whose fencing token is lower than the stored
//!   one, and a snapshot that covers less of the log than the stored one.

use async_trait::async_trait;

use crate::engine::EngineResult;

/// A log entry id. With Redis it is the stream id `"<ms>-<seq>"`; the memory log uses the
/// same shape, so ids compare the same way everywhere (`EntryId::cmp` orders by both parts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntryId {
    pub ms: u64,
    pub seq: u64,
}

impl EntryId {
    pub const ZERO: EntryId = EntryId { ms: 0, seq: 0 };

    /// Parses `"<ms>-<seq>"`.
    pub fn parse(s: &str) -> Option<EntryId> {
        let (ms, seq) = s.split_once('-')?;
        Some(EntryId {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

impl std::fmt::Display for EntryId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// One update in a document's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    pub id: EntryId,
    /// A Yjs v1 update (possibly several client updates merged).
    pub update: Vec<u8>,
}

/// What other nodes hear when an entry is appended (pub/sub with Redis).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    pub doc: String,
    pub entry: LogEntry,
    /// The id of the entry that was last in the log just before this one (`None`: the log was
    /// empty). A subscriber whose last applied id is below `prev` missed an entry (pub/sub
    /// lost it, or it was appended while the subscriber was not yet listening) and re-reads
    /// the log after its last id.
    pub prev: Option<EntryId>,
    /// The appending node (it applied the update already and ignores its own echo).
    pub origin_node: String,
}

/// The per-document update log.
#[async_trait]
pub trait DocLog: Send + Sync + 'static {
    /// Appends `update` to `doc`'s log and announces it, in one atomic step; returns its id.
    async fn append(&self, doc: &str, update: &[u8], origin_node: &str) -> EngineResult<EntryId>;
    /// Entries with an id above `after` (all when `None`), oldest first, at most `limit`.
    async fn read_after(
        &self,
        doc: &str,
        after: Option<EntryId>,
        limit: usize,
    ) -> EngineResult<Vec<LogEntry>>;
    /// Drops the entries with an id at or below `through`; returns how many were dropped.
    async fn trim_through(&self, doc: &str, through: EntryId) -> EngineResult<u64>;
    /// How many entries the log holds now.
    async fn len(&self, doc: &str) -> EngineResult<u64>;
    /// Starts receiving `doc`'s announcements on this node (idempotent). Subscribe **before**
    /// reading the log when loading a document, so nothing falls in between.
    async fn subscribe(&self, doc: &str) -> EngineResult<()>;
    /// Stops receiving `doc`'s announcements (when the document is unloaded here).
    async fn unsubscribe(&self, doc: &str) -> EngineResult<()>;
    /// Announcements of subscribed documents, from every node (own echoes included). A slow
    /// receiver lags (`RecvError::Lagged`): it must then re-read the log of its documents.
    fn announcements(&self) -> tokio::sync::broadcast::Receiver<Announcement>;

    /// Shares an awareness update (y-protocols encoding) of `doc` with the other nodes and
    /// records its states for joiners elsewhere, each kept `ttl_ms` past its last update (a
    /// dead node's clients go with it). Default: one node, nothing to share.
    async fn publish_awareness(
        &self,
        _doc: &str,
        _states: &[AwarenessState],
        _origin_node: &str,
        _ttl_ms: u64,
    ) -> EngineResult<()> {
        Ok(())
    }

    /// The recorded, unexpired awareness states of `doc` (for a node loading it). Default: none.
    async fn awareness_states(&self, _doc: &str) -> EngineResult<Vec<AwarenessState>> {
        Ok(Vec::new())
    }

    /// Awareness updates published by any node (own echoes included, `None` when the log
    /// shares nothing between nodes). The receiver may lag: awareness is ephemeral and the
    /// clients renew their states, so a lost update is corrected by the next.
    fn awareness_updates(&self) -> Option<tokio::sync::broadcast::Receiver<AwarenessAnnouncement>> {
        None
    }
}

/// One client's awareness state: `json` is `"null"` when the client left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwarenessState {
    pub client: u64,
    pub clock: u32,
    pub json: String,
}

/// Awareness states another node received from its clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwarenessAnnouncement {
    pub doc: String,
    pub states: Vec<AwarenessState>,
    pub origin_node: String,
}

/// A compacted document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The whole document as one Yjs v1 update (`encode_state_as_update_v1` of an empty state
    /// vector).
    pub state: Vec<u8>,
    /// The last log entry merged into `state` (`None`: no entry yet).
    pub covers: Option<EntryId>,
    /// The fencing token of the compaction lock its writer held.
    pub fence: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A writer with a lower fencing token than the stored snapshot's, or a snapshot covering
    /// less of the log than the stored one: refused, nothing changed.
    #[error("stale snapshot writer: {0}")]
    Stale(String),
    #[error("snapshot storage unavailable: {0}")]
    Unavailable(String),
}

/// Where compacted documents are kept.
#[async_trait]
pub trait SnapshotStore: Send + Sync + 'static {
    async fn load(&self, doc: &str) -> Result<Option<Snapshot>, SnapshotError>;
    /// Stores `snapshot` unless stale (see [`SnapshotError::Stale`]).
    async fn store(&self, doc: &str, snapshot: &Snapshot) -> Result<(), SnapshotError>;
}
