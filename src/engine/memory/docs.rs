//! [`MemoryDocLog`]: the in-process Yjs update log (embedded mode, one node).
//!
//! Each document is a `VecDeque` of entries; ids are `<ms>-<seq>` like Redis stream ids
//! (strictly increasing even when the clock stalls or steps back). Announcements go to one
//! bounded broadcast channel for the node; a receiver that falls behind gets `Lagged` and
//! re-reads the log, as with Redis. Nothing survives a restart: the embedded node's documents
//! are as durable as its process (snapshots, when a store is given, are what persists).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;

use async_trait::async_trait;
use tokio::sync::broadcast;

use super::lock_state;
use crate::engine::{EngineResult, now_ms};
use crate::yjs::store::{Announcement, DocLog, EntryId, LogEntry};

/// Announcements buffered for a slow receiver before it lags (and re-reads the log).
pub const ANNOUNCE_CAPACITY: usize = 4096;

#[derive(Default)]
struct State {
    docs: HashMap<String, VecDeque<LogEntry>>,
    /// The last id handed out, across documents (so ids stay increasing after a trim).
    last: Option<EntryId>,
    subscribed: HashSet<String>,
}

/// The in-process [`DocLog`].
pub struct MemoryDocLog {
    state: Mutex<State>,
    tx: broadcast::Sender<Announcement>,
}

impl Default for MemoryDocLog {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryDocLog {
    pub fn new() -> MemoryDocLog {
        MemoryDocLog {
            state: Mutex::new(State::default()),
            tx: broadcast::channel(ANNOUNCE_CAPACITY).0,
        }
    }

    fn next_id(last: Option<EntryId>) -> EntryId {
        let ms = now_ms();
        match last {
            Some(l) if l.ms >= ms => EntryId {
                ms: l.ms,
                seq: l.seq + 1,
            },
            _ => EntryId { ms, seq: 0 },
        }
    }

    /// [`DocLog::append`] without a runtime: gives the entry the next id, stores it and
    /// announces it to the document's subscribers, in one step under the state lock. Tests
    /// that stage a log (in a synchronous loop, or behind hooks of their own) use it too.
    pub fn push(&self, doc: &str, update: &[u8], origin_node: &str) -> EngineResult<EntryId> {
        let mut s = lock_state(&self.state, "doc log")?;
        let id = Self::next_id(s.last);
        s.last = Some(id);
        let subscribed = s.subscribed.contains(doc);
        let log = s.docs.entry(doc.to_owned()).or_default();
        let prev = log.back().map(|e| e.id);
        let entry = LogEntry {
            id,
            update: update.to_vec(),
        };
        log.push_back(entry.clone());
        // Sent under the state lock, so announcements leave in id order.
        if subscribed {
            let _ = self.tx.send(Announcement {
                doc: doc.to_owned(),
                entry,
                prev,
                origin_node: origin_node.to_owned(),
            });
        }
        Ok(id)
    }
}

#[async_trait]
impl DocLog for MemoryDocLog {
    async fn append(&self, doc: &str, update: &[u8], origin_node: &str) -> EngineResult<EntryId> {
        self.push(doc, update, origin_node)
    }

    async fn read_after(
        &self,
        doc: &str,
        after: Option<EntryId>,
        limit: usize,
    ) -> EngineResult<Vec<LogEntry>> {
        let s = lock_state(&self.state, "doc log")?;
        let Some(log) = s.docs.get(doc) else {
            return Ok(Vec::new());
        };
        let start = match after {
            Some(a) => log.partition_point(|e| e.id <= a),
            None => 0,
        };
        Ok(log.iter().skip(start).take(limit).cloned().collect())
    }

    async fn trim_through(&self, doc: &str, through: EntryId) -> EngineResult<u64> {
        let mut s = lock_state(&self.state, "doc log")?;
        let Some(log) = s.docs.get_mut(doc) else {
            return Ok(0);
        };
        let n = log.partition_point(|e| e.id <= through);
        log.drain(..n);
        Ok(n as u64)
    }

    async fn len(&self, doc: &str) -> EngineResult<u64> {
        let s = lock_state(&self.state, "doc log")?;
        Ok(s.docs.get(doc).map_or(0, |l| l.len() as u64))
    }

    async fn subscribe(&self, doc: &str) -> EngineResult<()> {
        lock_state(&self.state, "doc log")?
            .subscribed
            .insert(doc.to_owned());
        Ok(())
    }

    async fn unsubscribe(&self, doc: &str) -> EngineResult<()> {
        lock_state(&self.state, "doc log")?.subscribed.remove(doc);
        Ok(())
    }

    fn announcements(&self) -> broadcast::Receiver<Announcement> {
        self.tx.subscribe()
    }
}
