//! Support for `tests/yjs_compact.rs`: the engine's memory `DocLog` behind hooks that stage
//! races, and Yjs editors made with `yrs`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use lockstep::engine::EngineResult;
use lockstep::engine::memory::MemoryDocLog;
use lockstep::yjs::store::{Announcement, DocLog, EntryId, LogEntry, SnapshotStore};
use tokio::sync::{Notify, broadcast};
use yrs::types::ToJson;
use yrs::updates::decoder::Decode;
use yrs::{Any, Doc, GetString, Map, Text, Transact, Update};

// ---- an in-test update log ------------------------------------------------------------

/// The engine's in-process log (ids, order, trims and announcements are its own code) with
/// hooks to stage races around it.
#[derive(Default)]
pub struct VecLog {
    pub inner: MemoryDocLog,
    /// Every `trim_through` argument, in order.
    pub trims: Mutex<Vec<(String, EntryId)>>,
    /// Appended right before a trim runs: an edit arriving while a round is in flight.
    pub late: Mutex<Option<Vec<u8>>>,
    /// When set, the next read of a later page (`after` given) waits here: (entered, gate).
    pub pause: Mutex<Option<Arc<(Notify, Notify)>>>,
    /// Every update ever appended, trimmed or not: what a lossless store must still hold.
    pub history: Mutex<Vec<(String, Vec<u8>)>>,
}

impl VecLog {
    pub fn push(&self, doc: &str, update: &[u8]) -> EntryId {
        self.history
            .lock()
            .unwrap()
            .push((doc.to_owned(), update.to_vec()));
        self.inner.push(doc, update, "n").expect("the memory log")
    }
}

#[async_trait]
impl DocLog for VecLog {
    async fn append(&self, doc: &str, update: &[u8], _origin: &str) -> EngineResult<EntryId> {
        Ok(self.push(doc, update))
    }
    async fn read_after(
        &self,
        doc: &str,
        after: Option<EntryId>,
        limit: usize,
    ) -> EngineResult<Vec<LogEntry>> {
        if after.is_some() {
            let pause = self.pause.lock().unwrap().take();
            if let Some(p) = pause {
                p.0.notify_one();
                p.1.notified().await;
            }
        }
        self.inner.read_after(doc, after, limit).await
    }
    async fn trim_through(&self, doc: &str, through: EntryId) -> EngineResult<u64> {
        if let Some(update) = self.late.lock().unwrap().take() {
            self.push(doc, &update);
        }
        self.trims.lock().unwrap().push((doc.to_owned(), through));
        self.inner.trim_through(doc, through).await
    }
    async fn len(&self, doc: &str) -> EngineResult<u64> {
        self.inner.len(doc).await
    }
    async fn subscribe(&self, doc: &str) -> EngineResult<()> {
        self.inner.subscribe(doc).await
    }
    async fn unsubscribe(&self, doc: &str) -> EngineResult<()> {
        self.inner.unsubscribe(doc).await
    }
    fn announcements(&self) -> broadcast::Receiver<Announcement> {
        self.inner.announcements()
    }
}

// ---- Yjs helpers ----------------------------------------------------------------------

/// An editor: a Yjs doc whose every edit is one update, appended to the log.
pub struct Editor {
    pub doc: Doc,
}

impl Editor {
    pub fn new(client: u64) -> Editor {
        Editor {
            doc: Doc::with_client_id(client),
        }
    }

    /// An editor with a client id no other editor in this test binary has.
    pub fn fresh() -> Editor {
        static NEXT: AtomicU64 = AtomicU64::new(1_000);
        Editor::new(NEXT.fetch_add(1, Ordering::SeqCst))
    }

    pub fn type_text(&self, at_end: &str) -> Vec<u8> {
        let text = self.doc.get_or_insert_text("text");
        let mut txn = self.doc.transact_mut();
        let len = text.len(&txn);
        text.insert(&mut txn, len, at_end);
        txn.encode_update_v1()
    }

    pub fn delete_first(&self, n: u32) -> Vec<u8> {
        let text = self.doc.get_or_insert_text("text");
        let mut txn = self.doc.transact_mut();
        text.remove_range(&mut txn, 0, n);
        txn.encode_update_v1()
    }

    pub fn set(&self, key: &str, value: i64) -> Vec<u8> {
        let map = self.doc.get_or_insert_map("map");
        let mut txn = self.doc.transact_mut();
        map.insert(&mut txn, key, value);
        txn.encode_update_v1()
    }

    pub fn apply(&self, update: &[u8]) {
        let mut txn = self.doc.transact_mut();
        txn.apply_update(Update::decode_v1(update).expect("a valid update"))
            .expect("applies");
    }
}

/// What a reader sees: the text and the map.
pub fn contents(doc: &Doc) -> (String, Any) {
    let text = doc.get_or_insert_text("text");
    let map = doc.get_or_insert_map("map");
    let txn = doc.transact();
    (text.get_string(&txn), map.to_json(&txn))
}

/// A cold load, the way a node does it: the snapshot, then the log after what it covers.
pub async fn rebuild(snapshots: &dyn SnapshotStore, log: &dyn DocLog, doc: &str) -> (String, Any) {
    let rebuilt = Editor::new(999_999);
    let snapshot = snapshots.load(doc).await.unwrap();
    if let Some(s) = &snapshot {
        rebuilt.apply(&s.state);
    }
    let tail = log
        .read_after(doc, snapshot.and_then(|s| s.covers), usize::MAX)
        .await
        .unwrap();
    for e in tail {
        rebuilt.apply(&e.update);
    }
    contents(&rebuilt.doc)
}

/// The contents of every update ever appended to `doc`.
pub fn everything(log: &VecLog, doc: &str) -> (String, Any) {
    let all = Editor::new(999_998);
    for (d, u) in log.history.lock().unwrap().iter() {
        if d == doc {
            all.apply(u);
        }
    }
    contents(&all.doc)
}

/// Two editors converging through `log`; returns the reference contents.
pub async fn edit_burst(log: &VecLog, doc: &str, rounds: usize) -> (String, Any) {
    let (a, b) = (Editor::fresh(), Editor::fresh());
    for i in 0..rounds {
        let ua = a.type_text(&format!("a{i} "));
        let ub = b.set(&format!("k{}", i % 5), i as i64);
        log.append(doc, &ua, "n").await.unwrap();
        log.append(doc, &ub, "n").await.unwrap();
        b.apply(&ua);
        a.apply(&ub);
    }
    let ud = a.delete_first(3);
    log.append(doc, &ud, "n").await.unwrap();
    b.apply(&ud);
    assert_eq!(contents(&a.doc), contents(&b.doc));
    contents(&a.doc)
}
