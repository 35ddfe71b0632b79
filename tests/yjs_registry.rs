//! The per-node document registry without sockets: two registries over one log act as two
//! nodes. Gap recovery (a lost announcement), unloading, and the limits.
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use lockstep::engine::EngineResult;
use lockstep::engine::memory::MemoryDocLog;
use lockstep::yjs::docs::{Limits, Refusal, Registry};
use lockstep::yjs::store::{Announcement, DocLog, EntryId, LogEntry};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use yrs::sync::{Message, SyncMessage};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{Doc, GetString, ReadTxn, Text, Transact, Update};

const WAIT: Duration = Duration::from_secs(10);

/// A memory log whose announcements can be lost, like pub/sub messages.
struct LossyLog {
    inner: MemoryDocLog,
    tx: broadcast::Sender<Announcement>,
    /// Announcements of updates this long are dropped.
    drop_len: Mutex<Option<usize>>,
}

impl LossyLog {
    fn new() -> Arc<LossyLog> {
        let log = Arc::new(LossyLog {
            inner: MemoryDocLog::new(),
            tx: broadcast::channel(1024).0,
            drop_len: Mutex::new(None),
        });
        let mut rx = log.inner.announcements();
        let me = log.clone();
        tokio::spawn(async move {
            while let Ok(a) = rx.recv().await {
                if *me.drop_len.lock().unwrap() == Some(a.entry.update.len()) {
                    continue;
                }
                let _ = me.tx.send(a);
            }
        });
        log
    }
}

#[async_trait]
impl DocLog for LossyLog {
    async fn append(&self, doc: &str, update: &[u8], origin: &str) -> EngineResult<EntryId> {
        self.inner.append(doc, update, origin).await
    }
    async fn read_after(
        &self,
        doc: &str,
        after: Option<EntryId>,
        limit: usize,
    ) -> EngineResult<Vec<LogEntry>> {
        self.inner.read_after(doc, after, limit).await
    }
    async fn trim_through(&self, doc: &str, through: EntryId) -> EngineResult<u64> {
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
        self.tx.subscribe()
    }
}

fn node(id: &str, log: Arc<dyn DocLog>, limits: Limits) -> Arc<Registry> {
    let r = Registry::new(id.into(), log, None, limits);
    r.spawn_listener(CancellationToken::new());
    r
}

/// A y-websocket Update message inserting `s` at the end of a fresh client's text.
fn insert_msg(client: &Doc, s: &str) -> Vec<u8> {
    let text = client.get_or_insert_text("text");
    let before = client.transact().state_vector();
    {
        let mut txn = client.transact_mut();
        let len = text.len(&txn);
        text.insert(&mut txn, len, s);
    }
    let u = client.transact().encode_diff_v1(&before);
    Message::Sync(SyncMessage::Update(u)).encode_v1()
}

fn text_of(state: &[u8]) -> String {
    let doc = Doc::new();
    let text = doc.get_or_insert_text("text");
    doc.transact_mut()
        .apply_update(Update::decode_v1(state).unwrap())
        .unwrap();
    text.get_string(&doc.transact())
}

async fn until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_announcement_is_recovered_from_the_log() {
    let log = LossyLog::new();
    let one = node("one", log.clone(), Limits::default());
    let two = node("two", log.clone(), Limits::default());
    let a = one.attach("doc:gap").await.unwrap();
    let b = two.attach("doc:gap").await.unwrap();
    let client = Doc::new();

    let first = insert_msg(&client, "lost-");
    // The announcement of the first append never reaches node two.
    *log.drop_len.lock().unwrap() = Some(
        Message::decode_v1(&first)
            .map(|m| match m {
                Message::Sync(SyncMessage::Update(u)) => u.len(),
                _ => 0,
            })
            .unwrap(),
    );
    a.doc.handle(&one, a.conn, true, &first).unwrap();
    until("the first append", || {
        one.counters
            .appends
            .load(std::sync::atomic::Ordering::Relaxed)
            == 1
    })
    .await;
    *log.drop_len.lock().unwrap() = None;
    let second = insert_msg(&client, "found");
    a.doc.handle(&one, a.conn, true, &second).unwrap();

    until("node two has both", || {
        text_of(&b.doc.encode_state()) == "lost-found"
    })
    .await;
    assert_eq!(
        two.counters
            .rereads
            .load(std::sync::atomic::Ordering::Relaxed),
        1,
        "exactly one re-read, for the gap"
    );
    assert_eq!(b.doc.last_applied(), a.doc.last_applied());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unused_document_is_unloaded_after_the_grace() {
    let log: Arc<dyn DocLog> = Arc::new(MemoryDocLog::new());
    let limits = Limits {
        unload_grace: Duration::from_millis(50),
        ..Limits::default()
    };
    let reg = node("one", log.clone(), limits);
    let a = reg.attach("doc:u").await.unwrap();
    let client = Doc::new();
    a.doc
        .handle(&reg, a.conn, true, &insert_msg(&client, "kept"))
        .unwrap();
    until("appended", || a.doc.last_applied().is_some()).await;
    reg.detach(&a.doc, a.conn);
    until("unloaded", || !reg.is_loaded("doc:u")).await;
    // Loaded again from the log alone.
    let again = reg.attach("doc:u").await.unwrap();
    assert_eq!(text_of(&again.doc.encode_state()), "kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_refuse_with_their_errors() {
    let log: Arc<dyn DocLog> = Arc::new(MemoryDocLog::new());
    let limits = Limits {
        max_docs: 1,
        max_clients: 1,
        max_doc_bytes: 200,
        queue_frames: 8,
        ..Limits::default()
    };
    let reg = node("one", log, limits);
    let a = reg.attach("doc:1").await.unwrap();
    assert!(matches!(
        reg.attach("doc:2").await,
        Err(Refusal::TooManyDocs(1))
    ));
    assert!(matches!(
        reg.attach("doc:1").await,
        Err(Refusal::TooManyClients(1))
    ));
    let client = Doc::new();
    a.doc
        .handle(&reg, a.conn, true, &insert_msg(&client, "small"))
        .unwrap();
    let big = insert_msg(&client, &"x".repeat(300));
    let e = a.doc.handle(&reg, a.conn, true, &big).unwrap_err();
    assert!(matches!(e, Refusal::DocTooLarge(200)), "{e:?}");
    assert_eq!(e.close_code(), 4015);
    assert_eq!(
        text_of(&a.doc.encode_state()),
        "small",
        "the big update was not applied"
    );
    let e = a
        .doc
        .handle(&reg, a.conn, true, &[0, 2, 3, 1, 2, 3])
        .unwrap_err();
    assert_eq!(e.close_code(), 1007, "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_does_not_read_is_dropped_as_a_slow_consumer() {
    let log: Arc<dyn DocLog> = Arc::new(MemoryDocLog::new());
    let limits = Limits {
        queue_frames: 8,
        ..Limits::default()
    };
    let reg = node("one", log, limits);
    let writer = reg.attach("doc:s").await.unwrap();
    let mut slow = reg.attach("doc:s").await.unwrap();
    let client = Doc::new();
    let mut n = 0;
    // The writer's own echoes are read (below); the slow one's queue fills and it is dropped.
    let mut writer_rx = writer.rx;
    while n < 200 {
        writer
            .doc
            .handle(&reg, writer.conn, true, &insert_msg(&client, "x"))
            .unwrap();
        n += 1;
        tokio::time::sleep(Duration::from_millis(8)).await;
        while writer_rx.try_recv().is_ok() {}
    }
    let mut got = 0;
    let closed = tokio::time::timeout(WAIT, async {
        while slow.rx.recv().await.is_some() {
            got += 1;
        }
    })
    .await;
    assert!(closed.is_ok(), "the slow connection's queue was closed");
    assert!(got <= 8, "at most the queue's capacity was kept: {got}");
}
