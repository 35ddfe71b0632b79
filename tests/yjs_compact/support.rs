//! Support for `tests/yjs_compact.rs`: a small in-test `DocLog` (the memory/Redis engines
//! are another branch's) with hooks to stage races, and Yjs editors made with `yrs`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use lockstep::engine::EngineResult;
use lockstep::yjs::store::{Announcement, DocLog, EntryId, LogEntry, SnapshotStore};
use tokio::sync::{Notify, broadcast};
use yrs::types::ToJson;
use yrs::updates::decoder::Decode;
use yrs::{Any, Doc, GetString, Map, Text, Transact, Update};

// ---- an in-test update log ------------------------------------------------------------

#[derive(Default)]
pub struct VecLog {
    pub docs: Mutex<HashMap<String, Vec<LogEntry>>>,
    pub next: AtomicU64,
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
        let n = self.next.fetch_add(1, Ordering::SeqCst) + 1;
        // Some ids share a millisecond, so (ms, seq) ordering is exercised.
        self.history
            .lock()
            .unwrap()
            .push((doc.to_owned(), update.to_vec()));
        let id = EntryId {
            ms: 1_000 + n / 3,
            seq: n % 3,
        };
        self.docs
            .lock()
            .unwrap()
            .entry(doc.to_owned())
            .or_default()
            .push(LogEntry {
                id,
                update: update.to_vec(),
            });
        id
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
        let docs = self.docs.lock().unwrap();
        Ok(docs
            .get(doc)
            .map(|v| {
                v.iter()
                    .filter(|e| after.is_none_or(|a| e.id > a))
                    .take(limit)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default())
    }
    async fn trim_through(&self, doc: &str, through: EntryId) -> EngineResult<u64> {
        if let Some(update) = self.late.lock().unwrap().take() {
            self.push(doc, &update);
        }
        self.trims.lock().unwrap().push((doc.to_owned(), through));
        let mut docs = self.docs.lock().unwrap();
        let v = docs.entry(doc.to_owned()).or_default();
        let before = v.len();
        v.retain(|e| e.id > through);
        Ok((before - v.len()) as u64)
    }
    async fn len(&self, doc: &str) -> EngineResult<u64> {
        Ok(self.docs.lock().unwrap().get(doc).map_or(0, |v| v.len()) as u64)
    }
    async fn subscribe(&self, _doc: &str) -> EngineResult<()> {
        Ok(())
    }
    async fn unsubscribe(&self, _doc: &str) -> EngineResult<()> {
        Ok(())
    }
    fn announcements(&self) -> broadcast::Receiver<Announcement> {
        broadcast::channel(1).1
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
