//! The per-node document registry: which Yjs documents are loaded here, and for each a
//! `yrs::Doc`, the last log entry applied to it, its local connections and their awareness.
//!
//! # Loading (subscribe → snapshot → log tail)
//!
//! A document is loaded on its first local connection: the node **subscribes** to its
//! announcements first, then reads the snapshot (when a [`SnapshotStore`] is given) and the log
//! after the entry the snapshot covers, in pages. Announcements that arrive meanwhile are
//! buffered and applied afterwards when above the last applied id, so nothing falls between
//! the read and the subscription.
//!
//! # Staying current
//!
//! Every announcement carries the id of the entry before it (`prev`). When `prev` is above the
//! document's last applied id an entry was missed (pub/sub dropped it): the document re-reads
//! the log after its last id ([`LoadedDoc::catch_up`]), buffering announcements meanwhile. A
//! lagging announcement receiver re-reads every loaded document the same way.
//!
//! # Writing
//!
//! A client's update is decoded and applied to the document first (a malformed one is refused
//! and never stored), then queued; a flusher task per document waits [`BATCH_WINDOW`], merges
//! the queued updates (`yrs::merge_updates_v1`) and appends the result to the log, retrying
//! while the log is unavailable. Only after the append are local connections sent the merged
//! update, so an update any client has seen is in the log. The node's own announcement comes
//! back and only advances the last applied id.
//!
//! # Unloading
//!
//! A document with no connections for `unload_grace` is dropped and unsubscribed. Nothing is
//! flushed: the log already holds every acknowledged update.
//!
//! # Reporting
//!
//! Each load is reported once to the hook set with [`Registry::on_load`] (the node audits it
//! as `document_loaded`), and [`Registry::sizes`] adds up the loaded documents for metrics.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{Notify, OnceCell, broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use yrs::block::ClientID;
use yrs::sync::awareness::{AwarenessUpdate, AwarenessUpdateEntry};
use yrs::sync::{Message, SyncMessage};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{Doc, ReadTxn, Transact, Update};

mod awareness;
mod loaded;

use super::store::{Announcement, AwarenessState, DocLog, EntryId, LogEntry, SnapshotStore};

/// How long the flusher collects updates before merging and appending them.
pub const BATCH_WINDOW: Duration = Duration::from_millis(5);
/// Entries read per `read_after` call while loading or catching up.
const PAGE: usize = 512;
/// How long another node keeps showing an awareness state after its last update: the
/// y-protocols timeout (clients renew every 15 s and drop states older than 30 s).
pub const AWARENESS_TTL_MS: u64 = 30_000;
/// Awareness updates waiting to be shared with other nodes; more are dropped (counted): the
/// clients renew their states, so a lost one is corrected by the next.
const AWARENESS_QUEUE: usize = 1024;
/// Backoff between failed appends (the updates stay queued and applied locally meanwhile).
const APPEND_RETRY: Duration = Duration::from_millis(200);

/// The limits of the document layer (`LOCKSTEP_YJS_*`, docs/configuration.md).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest update (a WebSocket message) accepted from a client.
    pub max_update_bytes: usize,
    /// Largest document, measured as the bytes of the updates it was built from.
    pub max_doc_bytes: usize,
    /// Documents loaded on one node at once.
    pub max_docs: usize,
    /// Connections to one document on one node.
    pub max_clients: usize,
    /// How long a document with no local connection stays loaded.
    pub unload_grace: Duration,
    /// Frames queued for one connection before it is closed as a slow consumer.
    pub queue_frames: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_update_bytes: 1024 * 1024,
            max_doc_bytes: 32 * 1024 * 1024,
            max_docs: 2000,
            max_clients: 200,
            unload_grace: Duration::from_secs(30),
            queue_frames: 1024,
        }
    }
}

/// Why a connection to a document is refused or closed; each maps to a close code
/// ([`Refusal::close_code`]).
#[derive(Debug, Clone, thiserror::Error)]
pub enum Refusal {
    #[error("this node holds its maximum of {0} documents")]
    TooManyDocs(usize),
    #[error("the document has its maximum of {0} clients on this node")]
    TooManyClients(usize),
    #[error("the document would exceed {0} bytes")]
    DocTooLarge(usize),
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("document storage unavailable: {0}")]
    Unavailable(String),
}

impl Refusal {
    pub fn close_code(&self) -> u16 {
        use crate::error::close;
        match self {
            Refusal::TooManyDocs(_) | Refusal::Unavailable(_) => close::TRY_AGAIN_LATER,
            Refusal::TooManyClients(_) => close::DOC_FULL,
            Refusal::DocTooLarge(_) => close::DOC_TOO_LARGE,
            Refusal::Malformed(_) => close::INVALID_PAYLOAD,
        }
    }
}

/// Counters exported as metrics (`crate::node` registers them).
#[derive(Default)]
pub struct Counters {
    pub updates: AtomicU64,
    pub appends: AtomicU64,
    pub appended_bytes: AtomicU64,
    pub refused_readonly: AtomicU64,
    pub awareness_dropped: AtomicU64,
    pub rereads: AtomicU64,
    /// Client messages that waited for their connection's (or user's) budget.
    pub throttled: AtomicU64,
}

/// Awareness states of a document, queued for the other nodes.
type SharedAwareness = (String, Vec<AwarenessState>);

/// What loading a document read (the `document_loaded` audit record's detail).
#[derive(Debug, Clone)]
pub struct LoadReport {
    pub doc: String,
    /// The last log entry the snapshot covers (none: no snapshot, or one of a fresh document).
    pub covers: Option<EntryId>,
    /// Size of the stored snapshot (0 without one).
    pub snapshot_bytes: usize,
    /// Log entries read after the snapshot.
    pub tail_entries: usize,
    /// From the subscription to the document being ready.
    pub took: Duration,
}

/// Called once per load, on the loading task: it must not block (it spawns what it needs).
type LoadHook = Box<dyn Fn(LoadReport) + Send + Sync>;

/// Every document loaded on this node.
pub struct Registry {
    node_id: Arc<str>,
    log: Arc<dyn DocLog>,
    snapshots: Option<Arc<dyn SnapshotStore>>,
    pub limits: Limits,
    docs: Mutex<HashMap<String, Arc<LoadedDoc>>>,
    /// Serializes subscribe (load) against unsubscribe (unload) so a document unloaded and
    /// loaded again at once is never left unsubscribed.
    subs: tokio::sync::Mutex<()>,
    next_conn: AtomicU64,
    pub counters: Counters,
    /// Awareness states to share with other nodes (document, states).
    aw_queue: mpsc::Sender<SharedAwareness>,
    aw_rx: Mutex<Option<mpsc::Receiver<SharedAwareness>>>,
    on_load: OnceLock<LoadHook>,
}

/// One loaded document.
pub struct LoadedDoc {
    pub name: String,
    ready: OnceCell<()>,
    state: Mutex<DocState>,
    flush: Notify,
    stop: CancellationToken,
}

struct DocState {
    doc: Doc,
    last: Option<EntryId>,
    /// Loading or re-reading the log: announcements wait in `buffered`.
    catching_up: bool,
    buffered: Vec<Announcement>,
    conns: HashMap<u64, mpsc::Sender<Bytes>>,
    awareness: HashMap<ClientID, Aware>,
    pending: Vec<Vec<u8>>,
    /// Connections owed [`LoadedDoc::ACK_FRAME`] once `pending` is in the log (Hocuspocus).
    acks: Vec<u64>,
    flushing: bool,
    /// Bytes of the updates the document was built from (the document size limit's measure).
    size: usize,
    unloading: bool,
}

struct Aware {
    clock: u32,
    json: Arc<str>,
    /// The local connection that set this state (its ids go null when it closes).
    conn: Option<u64>,
}

/// A connection's handle on its document.
pub struct Attached {
    pub doc: Arc<LoadedDoc>,
    pub conn: u64,
    pub rx: mpsc::Receiver<Bytes>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn frame(msg: Message) -> Bytes {
    Bytes::from(msg.encode_v1())
}

/// Decodes a v1 update, turning a panic inside the decoder into an error.
fn decode_update(bytes: &[u8]) -> Result<Update, String> {
    match std::panic::catch_unwind(|| Update::decode_v1(bytes)) {
        Ok(Ok(u)) => Ok(u),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("undecodable update".into()),
    }
}

impl Registry {
    pub fn new(
        node_id: Arc<str>,
        log: Arc<dyn DocLog>,
        snapshots: Option<Arc<dyn SnapshotStore>>,
        limits: Limits,
    ) -> Arc<Registry> {
        let (aw_queue, aw_rx) = mpsc::channel(AWARENESS_QUEUE);
        Arc::new(Registry {
            aw_queue,
            aw_rx: Mutex::new(Some(aw_rx)),
            node_id,
            log,
            snapshots,
            limits,
            docs: Mutex::new(HashMap::new()),
            subs: tokio::sync::Mutex::new(()),
            next_conn: AtomicU64::new(1),
            counters: Counters::default(),
            on_load: OnceLock::new(),
        })
    }

    /// Sets the hook told about every load (once; a second call is ignored).
    pub fn on_load(&self, hook: impl Fn(LoadReport) + Send + Sync + 'static) {
        let _ = self.on_load.set(Box::new(hook));
    }

    /// Starts the task that applies announcements to loaded documents; it ends with `stop`.
    pub fn spawn_listener(self: &Arc<Self>, stop: CancellationToken) {
        self.spawn_awareness(stop.clone());
        let mut rx = self.log.announcements();
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let got = tokio::select! {
                    _ = stop.cancelled() => return,
                    got = rx.recv() => got,
                };
                match got {
                    Ok(a) => me.on_announcement(a),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(lost = n, "yjs: announcements lagged, re-reading logs");
                        let docs: Vec<_> = lock(&me.docs).values().cloned().collect();
                        for d in docs {
                            d.start_catch_up(&me);
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
    }

    /// How many documents are loaded here.
    pub fn loaded(&self) -> usize {
        lock(&self.docs).len()
    }

    /// The names of the documents loaded here (the compactor's round list).
    pub fn loaded_docs(&self) -> Vec<String> {
        lock(&self.docs).keys().cloned().collect()
    }

    /// Whether `doc` is loaded here (tests, metrics).
    pub fn is_loaded(&self, doc: &str) -> bool {
        lock(&self.docs).contains_key(doc)
    }

    /// The total and the largest size of the documents loaded here, in the measure of
    /// `max_doc_bytes`: bytes of the snapshot and updates each was built from. An upper bound
    /// of the encoded size (repeats and deleted content count), and free to read: encoding a
    /// large document at every scrape would cost a full pass over it.
    pub fn sizes(&self) -> (u64, u64) {
        let docs: Vec<Arc<LoadedDoc>> = lock(&self.docs).values().cloned().collect();
        docs.iter().fold((0, 0), |(total, max), d| {
            let size = lock(&d.state).size as u64;
            (total + size, max.max(size))
        })
    }

    fn on_announcement(self: &Arc<Self>, a: Announcement) {
        let Some(doc) = lock(&self.docs).get(&a.doc).cloned() else {
            return;
        };
        let gap = {
            let mut s = lock(&doc.state);
            if s.catching_up {
                s.buffered.push(a);
                false
            } else {
                !s.take(a, &self.node_id, self)
            }
        };
        if gap {
            doc.start_catch_up(self);
        }
    }

    /// Connects to `name`, loading it first if needed.
    pub async fn attach(self: &Arc<Self>, name: &str) -> Result<Attached, Refusal> {
        loop {
            let doc = {
                let mut docs = lock(&self.docs);
                match docs.get(name) {
                    Some(d) => d.clone(),
                    None => {
                        if docs.len() >= self.limits.max_docs {
                            return Err(Refusal::TooManyDocs(self.limits.max_docs));
                        }
                        let d = Arc::new(LoadedDoc {
                            name: name.to_owned(),
                            ready: OnceCell::new(),
                            state: Mutex::new(DocState {
                                doc: Doc::new(),
                                last: None,
                                catching_up: true,
                                buffered: Vec::new(),
                                conns: HashMap::new(),
                                awareness: HashMap::new(),
                                pending: Vec::new(),
                                acks: Vec::new(),
                                flushing: false,
                                size: 0,
                                unloading: false,
                            }),
                            flush: Notify::new(),
                            stop: CancellationToken::new(),
                        });
                        docs.insert(name.to_owned(), d.clone());
                        d
                    }
                }
            };
            if let Err(e) = doc.ready.get_or_try_init(|| self.load(&doc)).await {
                let mut docs = lock(&self.docs);
                if docs.get(name).is_some_and(|d| Arc::ptr_eq(d, &doc)) {
                    docs.remove(name);
                }
                return Err(e);
            }
            let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = mpsc::channel(self.limits.queue_frames);
            let unloading = {
                let mut s = lock(&doc.state);
                if s.unloading {
                    true
                } else {
                    if s.conns.len() >= self.limits.max_clients {
                        return Err(Refusal::TooManyClients(self.limits.max_clients));
                    }
                    // First frames, queued under the lock so no relayed update overtakes them.
                    let sv = s.doc.transact().state_vector();
                    let _ = tx.try_send(frame(Message::Sync(SyncMessage::SyncStep1(sv))));
                    if let Some(aw) = s.awareness_all() {
                        let _ = tx.try_send(aw);
                    }
                    s.conns.insert(conn, tx);
                    false
                }
            };
            if unloading {
                tokio::task::yield_now().await;
                continue;
            }
            return Ok(Attached { doc, conn, rx });
        }
    }

    /// Subscribe, snapshot, log tail; then start the flusher.
    async fn load(self: &Arc<Self>, doc: &Arc<LoadedDoc>) -> Result<(), Refusal> {
        let unavailable = |e: &dyn std::fmt::Display| Refusal::Unavailable(e.to_string());
        let started = Instant::now();
        let mut report = LoadReport {
            doc: doc.name.clone(),
            covers: None,
            snapshot_bytes: 0,
            tail_entries: 0,
            took: Duration::ZERO,
        };
        {
            let _g = self.subs.lock().await;
            self.log
                .subscribe(&doc.name)
                .await
                .map_err(|e| unavailable(&e))?;
        }
        if let Some(store) = &self.snapshots {
            let snap = store.load(&doc.name).await.map_err(|e| unavailable(&e))?;
            if let Some(snap) = snap {
                let update = decode_update(&snap.state)
                    .map_err(|e| Refusal::Unavailable(format!("stored snapshot: {e}")))?;
                let mut s = lock(&doc.state);
                s.doc
                    .transact_mut()
                    .apply_update(update)
                    .map_err(|e| Refusal::Unavailable(format!("stored snapshot: {e}")))?;
                s.last = snap.covers;
                s.size = snap.state.len();
                report.covers = snap.covers;
                report.snapshot_bytes = snap.state.len();
            }
        }
        report.tail_entries = doc.catch_up(self).await.map_err(|e| unavailable(&e))?;
        match self.log.awareness_states(&doc.name).await {
            Ok(states) => {
                lock(&doc.state).take_awareness(&states, None);
            }
            // Awareness is ephemeral: the clients' next renewals bring it back.
            Err(e) => tracing::debug!(doc = %doc.name, error = %e, "yjs: no awareness states"),
        }
        tokio::spawn(loaded::flusher(self.clone(), doc.clone()));
        if let Some(hook) = self.on_load.get() {
            report.took = started.elapsed();
            hook(report);
        }
        Ok(())
    }

    /// Drops `conn` from its document: nulls its awareness states for the others, and
    /// schedules the unload when it was the last.
    pub fn detach(self: &Arc<Self>, doc: &Arc<LoadedDoc>, conn: u64) {
        let mut nulls = Vec::new();
        let empty = {
            let mut s = lock(&doc.state);
            s.conns.remove(&conn);
            let gone: Vec<ClientID> = s
                .awareness
                .iter()
                .filter(|(_, a)| a.conn == Some(conn))
                .map(|(id, _)| *id)
                .collect();
            if !gone.is_empty() {
                let mut clients = HashMap::new();
                for id in gone {
                    if let Some(a) = s.awareness.remove(&id) {
                        nulls.push(AwarenessState {
                            client: id.get(),
                            clock: a.clock + 1,
                            json: "null".into(),
                        });
                        clients.insert(
                            id,
                            AwarenessUpdateEntry {
                                clock: a.clock + 1,
                                json: Arc::from("null"),
                            },
                        );
                    }
                }
                s.relay(frame(Message::Awareness(AwarenessUpdate { clients })));
            }
            s.conns.is_empty()
        };
        self.share_awareness(&doc.name, nulls);
        if empty {
            let me = self.clone();
            let doc = doc.clone();
            tokio::spawn(async move {
                tokio::time::sleep(me.limits.unload_grace).await;
                me.try_unload(&doc).await;
            });
        }
    }

    async fn try_unload(self: &Arc<Self>, doc: &Arc<LoadedDoc>) {
        let _g = self.subs.lock().await;
        {
            let mut docs = lock(&self.docs);
            if !docs.get(&doc.name).is_some_and(|d| Arc::ptr_eq(d, doc)) {
                return;
            }
            let mut s = lock(&doc.state);
            if !s.conns.is_empty() || !s.pending.is_empty() || s.flushing || s.catching_up {
                return;
            }
            s.unloading = true;
            docs.remove(&doc.name);
        }
        doc.stop.cancel();
        if let Err(e) = self.log.unsubscribe(&doc.name).await {
            tracing::warn!(doc = %doc.name, error = %e, "yjs: unsubscribe failed");
        }
        tracing::debug!(doc = %doc.name, "yjs: document unloaded");
    }
}

impl DocState {
    /// Sends `frame` to every local connection; a full queue drops that connection (its task
    /// sees its queue closed and closes the socket as a slow consumer).
    fn relay(&mut self, frame: Bytes) {
        self.conns
            .retain(|_, tx| tx.try_send(frame.clone()).is_ok());
    }

    fn send_to(&mut self, conn: u64, frame: Bytes) {
        if let Some(tx) = self.conns.get(&conn)
            && tx.try_send(frame).is_err()
        {
            self.conns.remove(&conn);
        }
    }

    fn awareness_all(&self) -> Option<Bytes> {
        if self.awareness.is_empty() {
            return None;
        }
        let clients = self
            .awareness
            .iter()
            .map(|(id, a)| {
                (
                    *id,
                    AwarenessUpdateEntry {
                        clock: a.clock,
                        json: a.json.clone(),
                    },
                )
            })
            .collect();
        Some(frame(Message::Awareness(AwarenessUpdate { clients })))
    }

    /// Applies a log entry (skipped when at or below `last`) and relays it when `relay`.
    fn apply_entry(&mut self, entry: &LogEntry, relay: bool) {
        if self.last.is_some_and(|l| entry.id <= l) {
            return;
        }
        match decode_update(&entry.update) {
            Ok(u) => {
                if let Err(e) = self.doc.transact_mut().apply_update(u) {
                    tracing::error!(id = %entry.id, error = %e, "yjs: log entry not applicable");
                }
                self.size += entry.update.len();
                if relay {
                    self.relay(frame(Message::Sync(SyncMessage::Update(
                        entry.update.clone(),
                    ))));
                }
            }
            Err(e) => tracing::error!(id = %entry.id, error = %e, "yjs: undecodable log entry"),
        }
        self.last = Some(entry.id);
    }

    /// Takes an announcement; false when it shows a gap (the caller re-reads the log).
    fn take(&mut self, a: Announcement, node_id: &str, reg: &Registry) -> bool {
        if self.last.is_some_and(|l| a.entry.id <= l) {
            return true;
        }
        if a.prev.is_some_and(|p| self.last.is_none_or(|l| p > l)) {
            return false;
        }
        if a.origin_node == node_id {
            // Applied and relayed when it was received; only the position moves.
            self.last = Some(a.entry.id);
        } else {
            reg.counters.updates.fetch_add(1, Ordering::Relaxed);
            self.apply_entry(&a.entry, true);
        }
        true
    }
}
