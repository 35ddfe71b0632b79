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

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{Notify, OnceCell, broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use yrs::block::ClientID;
use yrs::encoding::read::Cursor;
use yrs::sync::awareness::{AwarenessUpdate, AwarenessUpdateEntry};
use yrs::sync::{Message, SyncMessage};
use yrs::updates::decoder::{Decode, DecoderV1};
use yrs::updates::encoder::Encode;
use yrs::{Doc, ReadTxn, StateVector, Transact, Update};

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
}

/// Awareness states of a document, queued for the other nodes.
type SharedAwareness = (String, Vec<AwarenessState>);

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
        })
    }

    /// Queues awareness states for the other nodes (dropped, counted, when the queue is full).
    fn share_awareness(&self, doc: &str, states: Vec<AwarenessState>) {
        if states.is_empty() {
            return;
        }
        if self.aw_queue.try_send((doc.to_owned(), states)).is_err() {
            self.counters
                .awareness_dropped
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Starts the tasks that share awareness with other nodes and apply theirs here.
    fn spawn_awareness(self: &Arc<Self>, stop: CancellationToken) {
        if let Some(mut rx) = lock(&self.aw_rx).take() {
            let me = self.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                loop {
                    let (doc, states) = tokio::select! {
                        _ = stop.cancelled() => return,
                        got = rx.recv() => match got { Some(x) => x, None => return },
                    };
                    let r = me
                        .log
                        .publish_awareness(&doc, &states, &me.node_id, AWARENESS_TTL_MS)
                        .await;
                    if let Err(e) = r {
                        tracing::debug!(%doc, error = %e, "yjs: awareness not shared");
                    }
                }
            });
        }
        let Some(mut rx) = self.log.awareness_updates() else {
            return;
        };
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let got = tokio::select! {
                    _ = stop.cancelled() => return,
                    got = rx.recv() => got,
                };
                let a = match got {
                    Ok(a) => a,
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if a.origin_node == *me.node_id {
                    continue;
                }
                let Some(doc) = lock(&me.docs).get(&a.doc).cloned() else {
                    continue;
                };
                let mut s = lock(&doc.state);
                let taken = s.take_awareness(&a.states, None);
                if let Some(f) = awareness_frame(&taken) {
                    s.relay(f);
                }
            }
        });
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

    /// Whether `doc` is loaded here (tests, metrics).
    pub fn is_loaded(&self, doc: &str) -> bool {
        lock(&self.docs).contains_key(doc)
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
            }
        }
        doc.catch_up(self).await.map_err(|e| unavailable(&e))?;
        match self.log.awareness_states(&doc.name).await {
            Ok(states) => {
                lock(&doc.state).take_awareness(&states, None);
            }
            // Awareness is ephemeral: the clients' next renewals bring it back.
            Err(e) => tracing::debug!(doc = %doc.name, error = %e, "yjs: no awareness states"),
        }
        tokio::spawn(flusher(self.clone(), doc.clone()));
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

/// An awareness message of `states` (`None` when empty).
fn awareness_frame(states: &[AwarenessState]) -> Option<Bytes> {
    if states.is_empty() {
        return None;
    }
    let clients = states
        .iter()
        .map(|s| {
            (
                ClientID::new(s.client),
                AwarenessUpdateEntry {
                    clock: s.clock,
                    json: Arc::from(s.json.as_str()),
                },
            )
        })
        .collect();
    Some(frame(Message::Awareness(AwarenessUpdate { clients })))
}

impl DocState {
    /// Applies awareness states newer than the ones known (y-protocols' rule: a higher clock,
    /// or the same clock going null); returns those taken. `conn`: the local connection they
    /// came from (its states go null when it closes), `None` for another node's.
    fn take_awareness(
        &mut self,
        states: &[AwarenessState],
        conn: Option<u64>,
    ) -> Vec<AwarenessState> {
        let mut taken = Vec::new();
        for st in states {
            let id = ClientID::new(st.client);
            let newer = match self.awareness.get(&id) {
                None => st.json != "null",
                Some(a) => st.clock > a.clock || (st.clock == a.clock && st.json == "null"),
            };
            if !newer {
                continue;
            }
            if st.json == "null" {
                self.awareness.remove(&id);
            } else {
                self.awareness.insert(
                    id,
                    Aware {
                        clock: st.clock,
                        json: Arc::from(st.json.as_str()),
                        conn,
                    },
                );
            }
            taken.push(st.clone());
        }
        taken
    }

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

impl LoadedDoc {
    fn start_catch_up(self: &Arc<Self>, reg: &Arc<Registry>) {
        {
            let mut s = lock(&self.state);
            if s.catching_up {
                return;
            }
            s.catching_up = true;
        }
        reg.counters.rereads.fetch_add(1, Ordering::Relaxed);
        let me = self.clone();
        let reg = reg.clone();
        tokio::spawn(async move {
            while let Err(e) = me.catch_up(&reg).await {
                tracing::warn!(doc = %me.name, error = %e, "yjs: re-reading the log failed");
                if me.stop.is_cancelled() {
                    return;
                }
                tokio::time::sleep(APPEND_RETRY).await;
            }
        });
    }

    /// Reads the log after the last applied id until its end, then applies the buffered
    /// announcements and leaves the catching-up state.
    async fn catch_up(&self, reg: &Registry) -> crate::engine::EngineResult<()> {
        loop {
            let after = lock(&self.state).last;
            let page = reg.log.read_after(&self.name, after, PAGE).await?;
            let full = page.len() == PAGE;
            let mut s = lock(&self.state);
            for e in &page {
                s.apply_entry(e, true);
            }
            if full {
                continue;
            }
            let buffered = std::mem::take(&mut s.buffered);
            let mut gap = false;
            for a in buffered {
                if gap {
                    s.buffered.push(a);
                } else if !s.take(a, &reg.node_id, reg) {
                    gap = true;
                }
            }
            if !gap {
                s.catching_up = false;
                return Ok(());
            }
        }
    }

    /// Handles one frame from connection `conn`. An `Err` closes that connection.
    pub fn handle(
        &self,
        reg: &Registry,
        conn: u64,
        writable: bool,
        data: &[u8],
    ) -> Result<(), Refusal> {
        let mut decoder = DecoderV1::new(Cursor::new(data));
        let msg = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            <Message as Decode>::decode(&mut decoder)
        }))
        .map_err(|_| Refusal::Malformed("undecodable message".into()))?
        .map_err(|e| Refusal::Malformed(e.to_string()))?;
        match msg {
            Message::Sync(SyncMessage::SyncStep1(sv)) => {
                let mut s = lock(&self.state);
                let diff = s.doc.transact().encode_diff_v1(&sv);
                s.send_to(conn, frame(Message::Sync(SyncMessage::SyncStep2(diff))));
            }
            Message::Sync(SyncMessage::SyncStep2(u)) | Message::Sync(SyncMessage::Update(u)) => {
                if !writable {
                    // y-websocket has no error message: the update is dropped, the client
                    // keeps its connection and receives everyone else's edits.
                    reg.counters
                        .refused_readonly
                        .fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                self.write(reg, u)?;
            }
            Message::Awareness(update) => {
                let states: Vec<AwarenessState> = update
                    .clients
                    .iter()
                    .map(|(id, e)| AwarenessState {
                        client: id.get(),
                        clock: e.clock,
                        json: e.json.to_string(),
                    })
                    .collect();
                let mut s = lock(&self.state);
                let taken = s.take_awareness(&states, Some(conn));
                // To everyone, the sender included: that echo is also what keeps the
                // y-websocket client's 30 s silence timer from firing (it renews its own
                // awareness every 15 s).
                s.relay(frame(Message::Awareness(update)));
                drop(s);
                reg.share_awareness(&self.name, taken);
            }
            Message::AwarenessQuery => {
                let mut s = lock(&self.state);
                if let Some(aw) = s.awareness_all() {
                    s.send_to(conn, aw);
                }
            }
            // Auth is the server's message; custom types are not ours: ignored.
            Message::Auth(_) | Message::Custom(..) => {}
        }
        Ok(())
    }

    /// Validates and applies an editor's update, then queues it for the log.
    fn write(&self, reg: &Registry, u: Vec<u8>) -> Result<(), Refusal> {
        if u.len() > reg.limits.max_update_bytes {
            return Err(Refusal::Malformed(format!(
                "update over {} bytes",
                reg.limits.max_update_bytes
            )));
        }
        let update = decode_update(&u).map_err(Refusal::Malformed)?;
        let mut s = lock(&self.state);
        if s.size + u.len() > reg.limits.max_doc_bytes {
            return Err(Refusal::DocTooLarge(reg.limits.max_doc_bytes));
        }
        s.doc
            .transact_mut()
            .apply_update(update)
            .map_err(|e| Refusal::Malformed(e.to_string()))?;
        s.size += u.len();
        s.pending.push(u);
        reg.counters.updates.fetch_add(1, Ordering::Relaxed);
        drop(s);
        self.flush.notify_one();
        Ok(())
    }

    /// The document's whole state as one v1 update (tests, snapshots).
    pub fn encode_state(&self) -> Vec<u8> {
        lock(&self.state)
            .doc
            .transact()
            .encode_state_as_update_v1(&StateVector::default())
    }

    /// The last log entry applied here.
    pub fn last_applied(&self) -> Option<EntryId> {
        lock(&self.state).last
    }
}

/// Merges and appends a document's queued updates, one batch at a time.
async fn flusher(reg: Arc<Registry>, doc: Arc<LoadedDoc>) {
    loop {
        tokio::select! {
            _ = doc.stop.cancelled() => return,
            _ = doc.flush.notified() => {}
        }
        tokio::time::sleep(BATCH_WINDOW).await;
        let batch = {
            let mut s = lock(&doc.state);
            s.flushing = true;
            std::mem::take(&mut s.pending)
        };
        if batch.is_empty() {
            lock(&doc.state).flushing = false;
            continue;
        }
        let merged = if batch.len() == 1 {
            batch.into_iter().next().unwrap_or_default()
        } else {
            match yrs::merge_updates_v1(&batch) {
                Ok(m) => m,
                Err(e) => {
                    // Each was decoded on receipt, so this is not expected; append them one
                    // by one rather than lose them.
                    tracing::error!(doc = %doc.name, error = %e, "yjs: merge failed");
                    for u in batch.iter().skip(1) {
                        lock(&doc.state).pending.push(u.clone());
                    }
                    doc.flush.notify_one();
                    batch[0].clone()
                }
            }
        };
        loop {
            match reg.log.append(&doc.name, &merged, &reg.node_id).await {
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(doc = %doc.name, error = %e, "yjs: append failed, retrying");
                    tokio::time::sleep(APPEND_RETRY).await;
                }
            }
        }
        reg.counters.appends.fetch_add(1, Ordering::Relaxed);
        reg.counters
            .appended_bytes
            .fetch_add(merged.len() as u64, Ordering::Relaxed);
        let mut s = lock(&doc.state);
        s.relay(frame(Message::Sync(SyncMessage::Update(merged))));
        s.flushing = false;
    }
}
