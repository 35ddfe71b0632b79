//! Compaction: folds a document's update log into its stored snapshot, one node at a time.
//!
//! One round for document `d` (a room name such as `scene:42`):
//! 1. take the lockstep lock `yjs_compaction:<id of d>` in room `d` for the node's compactor
//!    (an HTTP-style holder whose `holder_key` is the node id, so a retried acquire on the same
//!    node is the same grant, and two nodes exclude each other); its fencing token is `t`;
//! 2. load the snapshot `s` (covers entry `c`) and read the log after `c` in pages;
//! 3. merge `s.state` and the entries into one Yjs v1 update ([`merge`]: applied to a Doc
//!    and encoded whole, lossless also for updates whose dependencies are missing);
//! 4. store it with `fence = t` and `covers` = the last entry merged; the store refuses it
//!    if a newer holder (higher token) or a snapshot covering more has been written meanwhile;
//! 5. only after the store succeeded, trim the log through the new `covers`; then release.
//!
//! Between 3 and 4 the snapshot is read again: if another writer stored one meanwhile (it
//! may have trimmed entries this round's later pages then skipped), the round is abandoned.
//!
//! Why nothing is lost: the log is trimmed only through an entry that a committed snapshot
//! covers, and the snapshot store never goes back (token and coverage only rise). A crash
//! between 4 and 5 leaves entries already in the snapshot in the log; loading applies them
//! twice, which Yjs ignores, and the next round trims them. A stale writer (its lock expired
//! and was granted to another node) is refused at 4 and trims nothing.
//!
//! When: [`Compactor::run`] looks at the documents loaded on this node every
//! [`CompactorConfig::check_every`] and compacts one whose log holds at least
//! [`CompactorConfig::max_entries`] entries, or any entries at all and was last compacted
//! (by this node's loop) more than [`CompactorConfig::max_age`] ago (`LOCKSTEP_YJS_COMPACT_*`).
//!
//! # What it reports
//!
//! Every round counts its outcome (`lockstep_yjs_compactions_total{outcome}`) and its time.
//! The loop's checks already read each loaded document's log length; they keep it, with the
//! id of the log's oldest entry (ids are `<ms>-<seq>`, so its age is the compaction lag), in a
//! [`LogWatch`] that the metrics read at scrape time: no Redis call per scrape. The oldest id
//! costs one extra read, only when it is unknown (after a round, or a first entry), when the
//! log got shorter (another node trimmed it), or when it is older than `max_age` (so a lag
//! alert is never raised on a stale value).
//!
//! [`audit_loads`] makes the node's document registry audit each load (`document_loaded`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::audit::AuditKind;
use crate::auth::Principal;
use crate::engine::{EngineError, LockKey};
use crate::names::Entity;
use crate::node::locks::{AcquireParams, Caller};
use crate::node::{Node, OpError};
use crate::telemetry::Metrics;
use crate::yjs::docs::LoadReport;
use crate::yjs::store::{DocLog, EntryId, Snapshot, SnapshotError, SnapshotStore};

mod watch;
pub use watch::{LogStats, LogWatch};

/// The entity type of compaction locks: `yjs_compaction:<document id>` in the document's room.
pub const LOCK_TYPE: &str = "yjs_compaction";

/// Label values of `lockstep_yjs_compactions_total{outcome}`: a snapshot written
/// (`compacted`); nothing after the snapshot, a left-over trim at most (`nothing_new`);
/// another node holds the lock (`skipped_held`); refused or abandoned as a stale writer
/// (`stale`); an error (`failed`: log, snapshot store, lock, or an update that does not decode).
pub const OUTCOMES: &[&str] = &[
    "compacted",
    "nothing_new",
    "skipped_held",
    "stale",
    "failed",
];

/// Buckets of `lockstep_yjs_compaction_seconds`: a small document's round (a few ms) up to a
/// large merge (y-redis reports ~0.8 s for 20 MB) and a slow Postgres.
const ROUND_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// `document_loaded` records waiting for the audit outbox. Past this many (the outbox is slow
/// or down) a load's record is dropped with a warning: a load is never held up by its audit,
/// and waiting records are not queued without bound.
const LOAD_RECORDS_IN_FLIGHT: usize = 64;

#[derive(Debug, Clone)]
pub struct CompactorConfig {
    /// Compact a document whose log holds at least this many entries.
    pub max_entries: u64,
    /// Compact a document with any entries once this long has passed since its last round.
    pub max_age: Duration,
    /// How often the loop looks at the loaded documents.
    pub check_every: Duration,
    /// Log entries read per `read_after` call.
    pub page: usize,
    /// At most this many entries merged per round (bounds the memory of one round; the rest
    /// is the next round's).
    pub max_entries_per_round: usize,
    /// Hold limit of the compaction lock: a compactor that dies holding it blocks others at
    /// most this long.
    pub lock_ttl: Duration,
    /// Names this compactor as the lock holder (`holder_key`); from the node id by default.
    /// Must be unique per `Compactor` instance: two instances with one key would share a
    /// reentrant grant and its token.
    pub holder_key: String,
}

impl CompactorConfig {
    /// The defaults (the node's own thresholds come from `Config::yjs_compactor`).
    pub fn for_node(node_id: &str) -> CompactorConfig {
        CompactorConfig {
            max_entries: 500,
            max_age: Duration::from_secs(30),
            check_every: Duration::from_secs(1),
            page: 256,
            max_entries_per_round: 10_000,
            lock_ttl: Duration::from_secs(60),
            holder_key: format!("yjs-compactor:{node_id}"),
        }
    }
}

/// What one round did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The snapshot now covers `covers`; `trimmed` log entries were dropped.
    Compacted {
        fence: u64,
        covers: EntryId,
        merged: usize,
        trimmed: u64,
        bytes: usize,
    },
    /// The log had nothing after the snapshot (a left-over trim was still done).
    NothingNew { trimmed: u64 },
    /// Another compactor holds the lock: skipped this round.
    Busy { holder: String },
    /// The store refused this writer (a newer token or coverage is stored); nothing trimmed.
    Stale(String),
}

#[derive(Debug, thiserror::Error)]
pub enum CompactError {
    #[error("not a document name (expected type:id): {0}")]
    BadName(String),
    #[error("compaction lock: {0}")]
    Lock(String),
    #[error("update log: {0}")]
    Log(#[from] EngineError),
    #[error("snapshot store: {0}")]
    Snapshot(String),
    /// A stored update or snapshot does not decode: the round stops, nothing is trimmed.
    #[error("cannot merge {doc}: {message}")]
    Corrupt { doc: String, message: String },
}

pub struct Compactor {
    node: Arc<Node>,
    log: Arc<dyn DocLog>,
    snapshots: Arc<dyn SnapshotStore>,
    config: CompactorConfig,
    /// The lock holder: the reserved admin identity (no JWT can name it, so no user can
    /// impersonate the compactor's holder key), under a recognisable name.
    principal: Principal,
    /// One round at a time per compactor (the loop, `flush`, callers): rounds of one holder
    /// share a reentrant grant, so the fence cannot order them.
    round: tokio::sync::Mutex<()>,
    /// What the loop saw of each loaded document's log (and when it last had a round).
    watch: LogWatch,
    outcomes: Counter<u64>,
    round_seconds: Histogram<f64>,
}

/// The compaction lock of `doc`.
pub fn lock_key(doc: &str) -> Result<LockKey, CompactError> {
    let room = Entity::parse(doc).map_err(|_| CompactError::BadName(doc.to_owned()))?;
    let id = doc.split_once(':').map(|(_, id)| id).unwrap_or_default();
    let resource = Entity::parse(&format!("{LOCK_TYPE}:{id}"))
        .map_err(|_| CompactError::BadName(doc.to_owned()))?;
    Ok(LockKey::new(room, resource))
}

/// Records `document_loaded` (a node built the document from its snapshot and log tail).
pub async fn record_loaded(node: &Node, load: &LoadReport) {
    let mut r = node.audit_record(AuditKind::DocumentLoaded);
    r.room = Some(Arc::from(load.doc.as_str()));
    r.detail = serde_json::json!({
        "covers": load.covers.map(|c| c.to_string()),
        "snapshot_bytes": load.snapshot_bytes,
        "tail_entries": load.tail_entries,
        "load_ms": load.took.as_millis() as u64,
    });
    node.record(vec![r]).await;
}

/// Makes `node`'s document registry record `document_loaded` once per load, on a task of its
/// own so a slow or unavailable audit outbox never holds a load up (at most
/// [`LOAD_RECORDS_IN_FLIGHT`] wait; see there).
pub fn audit_loads(node: &Arc<Node>) {
    // Weak: the registry (inside the node) keeps the hook.
    let weak = Arc::downgrade(node);
    let permits = Arc::new(tokio::sync::Semaphore::new(LOAD_RECORDS_IN_FLIGHT));
    node.yjs.on_load(move |load| {
        let Some(node) = weak.upgrade() else {
            return;
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(
                doc = %load.doc,
                "document_loaded not audited: {LOAD_RECORDS_IN_FLIGHT} records already wait for the audit outbox"
            );
            return;
        };
        let span = node.span();
        tokio::spawn(
            async move {
                record_loaded(&node, &load).await;
                drop(permit);
            }
            .instrument(span),
        );
    });
}

/// Merges a snapshot's state and log updates into one Yjs v1 update: applied to a `Doc` and
/// encoded whole (`encode_state_as_update_v1`, which keeps pending structs whose dependencies
/// are missing, so nothing is dropped). `yrs::merge_updates_v1` gives a snapshot of the same size but
/// was ~200× slower on 50,000 updates from 50 clients (16 s against 67 ms, release build).
pub fn merge(doc: &str, base: Option<&[u8]>, updates: &[&[u8]]) -> Result<Vec<u8>, CompactError> {
    use yrs::updates::decoder::Decode;
    use yrs::{ReadTxn, Transact};
    let corrupt = |message: String| CompactError::Corrupt {
        doc: doc.to_owned(),
        message,
    };
    let merged = yrs::Doc::new();
    let mut txn = merged.transact_mut();
    for update in base.into_iter().chain(updates.iter().copied()) {
        let update = yrs::Update::decode_v1(update).map_err(|e| corrupt(e.to_string()))?;
        txn.apply_update(update)
            .map_err(|e| corrupt(e.to_string()))?;
    }
    Ok(txn.encode_state_as_update_v1(&yrs::StateVector::default()))
}

impl Compactor {
    pub fn new(
        node: Arc<Node>,
        log: Arc<dyn DocLog>,
        snapshots: Arc<dyn SnapshotStore>,
        config: CompactorConfig,
    ) -> Arc<Compactor> {
        let mut principal = Principal::admin();
        principal.name = Arc::from("yjs compactor");
        let (outcomes, round_seconds) = instruments(&node.metrics);
        Arc::new(Compactor {
            node,
            log,
            snapshots,
            config,
            principal,
            round: tokio::sync::Mutex::new(()),
            watch: LogWatch::default(),
            outcomes,
            round_seconds,
        })
    }

    /// The loop's view of the loaded documents' logs (for the metrics).
    pub fn watch(&self) -> LogWatch {
        self.watch.clone()
    }

    fn caller(&self) -> Caller<'_> {
        Caller::Http {
            principal: &self.principal,
            holder_key: Some(&self.config.holder_key),
        }
    }

    /// One round for `doc` under its compaction lock (see the module doc), counted and timed.
    pub async fn compact(&self, doc: &str) -> Result<Outcome, CompactError> {
        let started = Instant::now();
        let result = self.compact_round(doc).await;
        let outcome = match &result {
            Ok(Outcome::Compacted { .. }) => "compacted",
            Ok(Outcome::NothingNew { .. }) => "nothing_new",
            Ok(Outcome::Busy { .. }) => "skipped_held",
            Ok(Outcome::Stale(_)) => "stale",
            Err(_) => "failed",
        };
        self.outcomes.add(1, &[KeyValue::new("outcome", outcome)]);
        // A skipped round did no work: timing it would only pull the histogram down.
        if outcome != "skipped_held" {
            self.round_seconds
                .record(started.elapsed().as_secs_f64(), &[]);
        }
        self.watch.round_ended(doc, outcome != "skipped_held");
        result
    }

    async fn compact_round(&self, doc: &str) -> Result<Outcome, CompactError> {
        let key = lock_key(doc)?;
        let _round = self.round.lock().await;
        let params = AcquireParams {
            room: key.room.clone(),
            resource: key.resource.clone(),
            action: Arc::from("compact"),
            ttl_ms: Some(self.config.lock_ttl.as_millis() as u64),
            wait: false,
            wait_timeout_ms: None,
            request_id: None,
        };
        let token = match self.node.acquire(self.caller(), params).await {
            Ok((lock, _)) => lock.token,
            Err(OpError::LockHeld(denied)) => {
                return Ok(Outcome::Busy {
                    holder: denied.current.holder.session_id.to_string(),
                });
            }
            Err(e) => return Err(CompactError::Lock(e.to_string())),
        };
        let outcome = self.compact_under(doc, token).await;
        if let Err(e) = self
            .node
            .release(self.caller(), &key, Some(token), false)
            .await
        {
            // Expired meanwhile (a slow round): the store's fence check already decided.
            tracing::warn!(doc, token, error = %e, "compaction lock not released");
        }
        outcome
    }

    /// Steps 2–5 of a round with fencing token `token`, assuming its lock is (or was) held.
    /// Public so tests can play a writer whose lock has since been granted to someone else.
    pub async fn compact_under(&self, doc: &str, token: u64) -> Result<Outcome, CompactError> {
        let base = self
            .snapshots
            .load(doc)
            .await
            .map_err(|e| CompactError::Snapshot(e.to_string()))?;
        let covered = base.as_ref().and_then(|s| s.covers);
        let mut entries = Vec::new();
        let mut after = covered;
        while entries.len() < self.config.max_entries_per_round {
            let want = self
                .config
                .page
                .min(self.config.max_entries_per_round - entries.len());
            let page = self.log.read_after(doc, after, want).await?;
            let n = page.len();
            if let Some(last) = page.last() {
                after = Some(last.id);
            }
            entries.extend(page);
            if n < want {
                break;
            }
        }
        let Some(last) = entries.last().map(|e| e.id) else {
            // A crash between store and trim left covered entries behind: trim them now.
            let trimmed = match covered {
                Some(c) => self.log.trim_through(doc, c).await?,
                None => 0,
            };
            return Ok(Outcome::NothingNew { trimmed });
        };
        // The log was read in pages, not atomically. If another writer stored a snapshot and
        // trimmed meanwhile (a slow holder whose lock expired, its token still above the
        // stored one), a later page may have skipped trimmed entries: merging would lose
        // them under a higher `covers`. Trims only follow stores, so an unchanged snapshot
        // now means every page saw an untrimmed log. Cheap (one read), and needed: the lock
        // alone cannot stop a writer that outlived its lease.
        let now = self
            .snapshots
            .load(doc)
            .await
            .map_err(|e| CompactError::Snapshot(e.to_string()))?;
        let unchanged = match (&now, &base) {
            (None, None) => true,
            (Some(n), Some(b)) => n.covers == b.covers && n.fence == b.fence,
            _ => false,
        };
        if !unchanged {
            let why = "another writer stored a snapshot during this round's read".to_owned();
            tracing::info!(doc, token, why, "compaction abandoned");
            return Ok(Outcome::Stale(why));
        }
        let merged = entries.len();
        // Merging a large document takes a while (y-redis reports ~0.8 s for 20 MB): off the
        // async workers, so sessions on this node are not stalled by it.
        let name = doc.to_owned();
        let base_state = base.map(|s| s.state);
        let state = tokio::task::spawn_blocking(move || {
            let updates: Vec<&[u8]> = entries.iter().map(|e| e.update.as_slice()).collect();
            merge(&name, base_state.as_deref(), &updates)
        })
        .await
        .map_err(|e| CompactError::Corrupt {
            doc: doc.to_owned(),
            message: format!("merge task: {e}"),
        })??;
        let bytes = state.len();
        let snapshot = Snapshot {
            state,
            covers: Some(last),
            fence: token,
        };
        match self.snapshots.store(doc, &snapshot).await {
            Ok(()) => {}
            Err(SnapshotError::Stale(why)) => {
                tracing::info!(doc, token, why, "compaction refused: stale writer");
                return Ok(Outcome::Stale(why));
            }
            Err(e) => return Err(CompactError::Snapshot(e.to_string())),
        }
        let trimmed = self.log.trim_through(doc, last).await?;
        let mut r = self.node.audit_record(AuditKind::DocumentCompacted);
        r.room = Some(Arc::from(doc));
        r.resource = lock_key(doc).ok().map(|k| Arc::from(k.resource.as_str()));
        r.token = Some(token);
        r.detail = serde_json::json!({
            "covers": last.to_string(),
            "previous": covered.map(|c| c.to_string()),
            "merged": merged,
            "trimmed": trimmed,
            "bytes": bytes,
        });
        self.node.record(vec![r]).await;
        Ok(Outcome::Compacted {
            fence: token,
            covers: last,
            merged,
            trimmed,
            bytes,
        })
    }

    /// Whether `doc` is due for a round (see the module doc); keeps what it read in the
    /// [`LogWatch`].
    pub async fn is_due(&self, doc: &str) -> Result<bool, CompactError> {
        let len = self.log.len(doc).await?;
        if self.watch.saw_len(doc, len, self.config.max_age) {
            let first = self.log.read_after(doc, None, 1).await?;
            self.watch.saw_oldest(doc, first.first().map(|e| e.id));
        }
        if len == 0 {
            return Ok(false);
        }
        if len >= self.config.max_entries {
            return Ok(true);
        }
        Ok(self.watch.since_round(doc) >= self.config.max_age)
    }

    /// The background loop: every `check_every`, compacts the due documents among
    /// `loaded_docs()`, one at a time (one round in flight per node bounds its memory and
    /// Postgres load), until `cancel`. Errors are logged and retried at the next check.
    pub async fn run(
        self: Arc<Self>,
        loaded_docs: impl Fn() -> Vec<String> + Send + 'static,
        cancel: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(self.config.check_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let docs = loaded_docs();
            self.watch.keep_only(&docs);
            for doc in docs {
                if cancel.is_cancelled() {
                    return;
                }
                match self.is_due(&doc).await {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(e) => {
                        tracing::warn!(doc, error = %e, "compaction check failed");
                        continue;
                    }
                }
                match self.compact(&doc).await {
                    Ok(outcome) => tracing::debug!(doc, ?outcome, "compaction round"),
                    Err(e) => tracing::warn!(doc, error = %e, "compaction failed"),
                }
            }
        }
    }

    /// Compacts every document of `docs` that has log entries, due or not; returns how many
    /// rounds wrote a snapshot. For the embedded mode, whose in-process log dies with the
    /// process: call it on drain (SIGTERM) and when a document is unloaded, so a clean stop
    /// loses nothing (a crash still loses what was not compacted; see `docs/yjs.md`). With
    /// Redis the log is durable and this is not needed.
    pub async fn flush(&self, docs: &[String]) -> usize {
        let mut wrote = 0;
        for doc in docs {
            match self.log.len(doc).await {
                Ok(0) => continue,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(doc, error = %e, "compaction flush: log unavailable");
                    continue;
                }
            }
            match self.compact(doc).await {
                Ok(Outcome::Compacted { .. }) => wrote += 1,
                Ok(outcome) => tracing::info!(doc, ?outcome, "compaction flush did not write"),
                Err(e) => tracing::warn!(doc, error = %e, "compaction flush failed"),
            }
        }
        wrote
    }
}

/// The round counter (every outcome at zero from the start) and the round histogram. Several
/// compactors on one node (tests) share them: one name is one series.
fn instruments(metrics: &Metrics) -> (Counter<u64>, Histogram<f64>) {
    let outcomes = metrics.counter(
        "lockstep.yjs.compactions",
        "Yjs compaction rounds on this node, by outcome (compacted, nothing_new, skipped_held, stale, failed)",
    );
    for outcome in OUTCOMES {
        outcomes.add(0, &[KeyValue::new("outcome", *outcome)]);
    }
    let seconds = metrics.seconds_histogram(
        "lockstep.yjs.compaction",
        "Time of one Yjs compaction round that took the lock (read, merge, store, trim)",
        ROUND_BUCKETS,
    );
    (outcomes, seconds)
}
