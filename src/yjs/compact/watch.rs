//! [`LogWatch`]: what the compactor's loop last saw of each loaded document's update log (its
//! length, its oldest entry, this node's last round), shared with the metrics so a scrape
//! reads memory, not Redis. See the parent module, "What it reports".

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::yjs::store::EntryId;

/// The loop's view of the logs of the documents loaded here, shared with the metrics.
#[derive(Clone, Default)]
pub struct LogWatch(Arc<Mutex<HashMap<String, Watched>>>);

struct Watched {
    /// When this node's loop last finished a round (or first saw the document).
    last_round: Instant,
    /// Log entries at the last check.
    entries: u64,
    /// The log's oldest entry at the last check that read it (none: unknown or empty).
    oldest: Option<EntryId>,
}

/// The logs of the loaded documents, added up (see [`LogWatch::stats`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogStats {
    /// Log entries not compacted yet, summed over the loaded documents.
    pub entries: u64,
    /// The longest of those logs.
    pub entries_max: u64,
    /// The id time (ms since the epoch) of the oldest entry among them.
    pub oldest_ms: Option<u64>,
}

impl LogStats {
    /// Age of the oldest uncompacted entry at `now_ms` (0 when there is none). Ids carry the
    /// log's clock (Redis' with Redis): a skew between it and this node's shifts the lag.
    pub fn lag_seconds(&self, now_ms: u64) -> f64 {
        self.oldest_ms
            .map_or(0.0, |ms| now_ms.saturating_sub(ms) as f64 / 1000.0)
    }
}

impl LogWatch {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Watched>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a check's log length; true when the oldest id must be (re)read (module doc).
    pub(super) fn saw_len(&self, doc: &str, len: u64, max_age: Duration) -> bool {
        let mut docs = self.lock();
        let w = docs.entry(doc.to_owned()).or_insert_with(|| Watched {
            last_round: Instant::now(),
            entries: 0,
            oldest: None,
        });
        let shrank = len < w.entries;
        w.entries = len;
        if len == 0 {
            w.oldest = None;
            return false;
        }
        let too_old = w.oldest.is_some_and(|o| {
            crate::engine::now_ms().saturating_sub(o.ms) >= max_age.as_millis() as u64
        });
        w.oldest.is_none() || shrank || too_old
    }

    pub(super) fn saw_oldest(&self, doc: &str, oldest: Option<EntryId>) {
        if let Some(w) = self.lock().get_mut(doc) {
            w.oldest = oldest;
        }
    }

    /// A round on `doc` ended: its oldest entry is unknown until the next check reads it;
    /// `finished` (not skipped for another holder) restarts its age timer.
    pub(super) fn round_ended(&self, doc: &str, finished: bool) {
        if let Some(w) = self.lock().get_mut(doc) {
            w.oldest = None;
            if finished {
                w.last_round = Instant::now();
            }
        }
    }

    /// Time since this node's last round on `doc` (starting now if it was not watched).
    pub(super) fn since_round(&self, doc: &str) -> Duration {
        let mut docs = self.lock();
        let w = docs.entry(doc.to_owned()).or_insert_with(|| Watched {
            last_round: Instant::now(),
            entries: 0,
            oldest: None,
        });
        w.last_round.elapsed()
    }

    /// Forgets the documents no longer loaded here (bounds the map; their logs stop counting).
    pub(super) fn keep_only(&self, docs: &[String]) {
        let keep: HashSet<&str> = docs.iter().map(String::as_str).collect();
        self.lock().retain(|d, _| keep.contains(d.as_str()));
    }

    /// The watched logs added up, as of the loop's last checks.
    pub fn stats(&self) -> LogStats {
        let docs = self.lock();
        let mut stats = LogStats::default();
        for w in docs.values() {
            stats.entries += w.entries;
            stats.entries_max = stats.entries_max.max(w.entries);
            if let Some(o) = w.oldest {
                stats.oldest_ms = Some(stats.oldest_ms.map_or(o.ms, |m| m.min(o.ms)));
            }
        }
        stats
    }
}
