//! Compaction under a fenced lockstep lock, against a real node (its lock engine and strict
//! fencing) and a private Postgres holding the snapshots. The update log is the engine's
//! memory log behind test hooks (`support.rs`), driven with real Yjs updates made by `yrs`,
//! and every check rebuilds the document from what is stored. `loads.rs`: the
//! `document_loaded` audit of real y-websocket clients; `bench.rs`: compaction throughput.

#[path = "yjs_compact/bench.rs"]
mod bench;
mod common;
#[path = "yjs_compact/loads.rs"]
mod loads;
#[path = "yjs_compact/support.rs"]
mod support;
mod yjs_support;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use common::Server;
use common::postgres::PostgresServer;
use lockstep::auth::Principal;
use lockstep::node::Node;
use lockstep::node::locks::{AcquireParams, Caller};
use lockstep::yjs::compact::{self, Compactor, CompactorConfig, Outcome};
use lockstep::yjs::snapshots::{FileSnapshots, PgSnapshots};
use lockstep::yjs::store::{DocLog, EntryId, Snapshot, SnapshotError, SnapshotStore};
use support::{Editor, VecLog, contents, edit_burst, everything, rebuild};
use tokio::sync::Notify;

// ---- fixtures -------------------------------------------------------------------------

struct Fixture {
    _pg: Option<PostgresServer>,
    server: Server,
    node: Arc<Node>,
    log: Arc<VecLog>,
    snapshots: Arc<dyn SnapshotStore>,
}

async fn with_postgres() -> Fixture {
    let pg = PostgresServer::start();
    let url = pg.url();
    let server = Server::start_with(move |c| c.database_url = Some(url)).await;
    let node = server.running.as_ref().unwrap().node.clone();
    assert!(node.db.is_some(), "a database pool");
    let snapshots = lockstep::yjs::snapshots::for_node(&node)
        .unwrap()
        .expect("a snapshot store");
    Fixture {
        _pg: Some(pg),
        server,
        node,
        log: Arc::new(VecLog::default()),
        snapshots,
    }
}

impl Fixture {
    fn compactor(&self, name: &str) -> Arc<Compactor> {
        self.compactor_with(name, self.snapshots.clone())
    }

    fn compactor_with(&self, name: &str, snapshots: Arc<dyn SnapshotStore>) -> Arc<Compactor> {
        let mut config = CompactorConfig::for_node(&self.node.id);
        config.holder_key = format!("yjs-compactor:{name}");
        config.page = 7; // several pages per round
        Compactor::new(self.node.clone(), self.log.clone(), snapshots, config)
    }

    /// A fencing token of `doc`'s compaction lock, taken and released by another holder
    /// (what a compactor whose lock has since passed on would still carry).
    async fn token_of_another_holder(&self, doc: &str, holder_key: &str) -> u64 {
        let key = compact::lock_key(doc).unwrap();
        let admin = Principal::admin();
        let caller = || Caller::Http {
            principal: &admin,
            holder_key: Some(holder_key),
        };
        let params = AcquireParams {
            room: key.room.clone(),
            resource: key.resource.clone(),
            action: "compact".into(),
            ttl_ms: Some(30_000),
            wait: false,
            wait_timeout_ms: None,
            request_id: None,
        };
        let (lock, _) = self.node.acquire(caller(), params).await.unwrap();
        self.node
            .release(caller(), &key, Some(lock.token), false)
            .await
            .unwrap();
        lock.token
    }
}

fn unique_doc() -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("scene:t-{}", &id[..16])
}

// ---- tests ----------------------------------------------------------------------------

#[tokio::test]
async fn compaction_merges_the_log_into_a_snapshot_that_rebuilds_the_document() {
    let f = with_postgres().await;
    let doc = unique_doc();
    let reference = edit_burst(&f.log, &doc, 20).await;
    let c = f.compactor("a");

    let Outcome::Compacted {
        fence,
        covers,
        merged,
        trimmed,
        bytes,
    } = c.compact(&doc).await.unwrap()
    else {
        panic!("expected a compaction");
    };
    assert_eq!((merged, trimmed), (41, 41));
    assert_eq!(
        f.log.len(&doc).await.unwrap(),
        0,
        "the whole log is in Postgres"
    );
    let stored = f.snapshots.load(&doc).await.unwrap().unwrap();
    assert_eq!(
        (stored.fence, stored.covers, stored.state.len()),
        (fence, Some(covers), bytes)
    );
    assert_eq!(
        rebuild(f.snapshots.as_ref(), f.log.as_ref(), &doc).await,
        reference
    );

    // A second round merges the new entries into the stored snapshot, under a newer token.
    let more = Editor::new(33);
    more.apply(&stored.state);
    let u = more.type_text("tail");
    f.log.append(&doc, &u, "n").await.unwrap();
    let Outcome::Compacted {
        fence: fence2,
        merged: 1,
        ..
    } = c.compact(&doc).await.unwrap()
    else {
        panic!("expected a second compaction");
    };
    assert!(fence2 > fence, "every round holds a newer grant");
    assert_eq!(
        rebuild(f.snapshots.as_ref(), f.log.as_ref(), &doc).await,
        contents(&more.doc)
    );
    assert_eq!(
        c.compact(&doc).await.unwrap(),
        Outcome::NothingNew { trimmed: 0 }
    );

    // The lock was released after each round: another compactor gets it at once.
    assert!(matches!(
        f.compactor("b").compact(&doc).await.unwrap(),
        Outcome::NothingNew { .. }
    ));

    // Audited in Postgres: one `document_compacted` per round that wrote.
    let compacted = loads::audited(&f.node, &doc, "document_compacted", 2).await;
    assert!(
        compacted.iter().any(|d| d["covers"] == covers.to_string()),
        "{compacted:?}"
    );
    drop(f.server);
}

#[tokio::test]
async fn the_log_is_trimmed_only_through_what_postgres_holds() {
    let f = with_postgres().await;
    let doc = unique_doc();
    let reference = edit_burst(&f.log, &doc, 10).await;
    // An edit that reaches the log while the round is between its read and its trim.
    let late = Editor::new(44);
    late.doc.get_or_insert_text("text");
    let late_update = late.set("late", 1);
    *f.log.late.lock().unwrap() = Some(late_update.clone());

    let Outcome::Compacted { covers, .. } = f.compactor("a").compact(&doc).await.unwrap() else {
        panic!("expected a compaction");
    };
    let stored = f.snapshots.load(&doc).await.unwrap().unwrap();
    assert_eq!(stored.covers, Some(covers));
    assert_eq!(
        f.log.trims.lock().unwrap().as_slice(),
        &[(doc.clone(), covers)],
        "trimmed exactly through the stored coverage"
    );
    let tail = f.log.read_after(&doc, None, 100).await.unwrap();
    assert_eq!(tail.len(), 1, "the late edit stays in the log");
    assert!(tail[0].id > covers);

    let reader = Editor::new(55);
    reader.apply(&merge_all(&reference_updates(&stored, &late_update)));
    let (text, map) = rebuild(f.snapshots.as_ref(), f.log.as_ref(), &doc).await;
    assert_eq!(text, reference.0);
    assert_eq!((text, map), contents(&reader.doc));
}

fn reference_updates(stored: &Snapshot, late: &[u8]) -> Vec<Vec<u8>> {
    vec![stored.state.clone(), late.to_vec()]
}

fn merge_all(updates: &[Vec<u8>]) -> Vec<u8> {
    yrs::merge_updates_v1(updates.iter()).unwrap()
}

#[tokio::test]
async fn a_stale_writer_is_refused_and_trims_nothing() {
    let f = with_postgres().await;
    let doc = unique_doc();
    edit_burst(&f.log, &doc, 5).await;
    // The old holder's grant, taken before the current holder's.
    let old_token = f.token_of_another_holder(&doc, "old-holder").await;

    let fresh = f.compactor("fresh");
    let Outcome::Compacted { fence, .. } = fresh.compact(&doc).await.unwrap() else {
        panic!("expected a compaction");
    };
    assert!(fence > old_token);
    let reference = edit_burst(&f.log, &doc, 3).await;
    let before = f.snapshots.load(&doc).await.unwrap();
    let log_len = f.log.len(&doc).await.unwrap();
    let trims = f.log.trims.lock().unwrap().len();

    // The old holder wakes up and finishes its round with its old token.
    let stale = f.compactor("old-holder");
    match stale.compact_under(&doc, old_token).await.unwrap() {
        Outcome::Stale(why) => assert!(why.contains("fencing token"), "{why}"),
        other => panic!("expected Stale, got {other:?}"),
    }
    assert_eq!(
        f.snapshots.load(&doc).await.unwrap(),
        before,
        "Postgres unchanged"
    );
    assert_eq!(f.log.len(&doc).await.unwrap(), log_len, "nothing trimmed");
    assert_eq!(
        f.log.trims.lock().unwrap().len(),
        trims,
        "no trim was even tried"
    );
    // Postgres' own check refuses it too, whatever a caller did before.
    let direct = f
        .snapshots
        .store(
            &doc,
            &Snapshot {
                state: vec![0, 0],
                covers: Some(EntryId {
                    ms: u64::MAX >> 2,
                    seq: 0,
                }),
                fence: old_token,
            },
        )
        .await;
    assert!(matches!(direct, Err(SnapshotError::Stale(_))), "{direct:?}");
    // The second burst's editors started from a fresh doc; the rebuilt document still has
    // everything: the first burst (snapshot) and the second (log).
    let (text, _) = rebuild(f.snapshots.as_ref(), f.log.as_ref(), &doc).await;
    assert!(
        text.contains(&reference.0),
        "{text:?} lacks {:?}",
        reference.0
    );
}

#[tokio::test]
async fn a_round_whose_pages_raced_a_slow_writers_trim_is_abandoned() {
    let f = with_postgres().await;
    let doc = unique_doc();
    let reference = edit_burst(&f.log, &doc, 10).await; // 21 entries: 4 pages of 7
    // The slow writer's grant is older than the new holder's: the new one's token is higher.
    let slow_token = f.token_of_another_holder(&doc, "slow").await;
    let new_token = f.token_of_another_holder(&doc, "new").await;
    assert!(new_token > slow_token);

    // The new holder reads its first page, then stalls...
    let pause = Arc::new((Notify::new(), Notify::new()));
    *f.log.pause.lock().unwrap() = Some(pause.clone());
    let new = f.compactor("new");
    let running = {
        let doc = doc.clone();
        tokio::spawn(async move { new.compact_under(&doc, new_token).await })
    };
    pause.0.notified().await;
    // ...while the slow writer (its lock long expired, but its token still above the stored
    // one: nothing is stored yet) stores everything and trims the log.
    let slow = f.compactor("slow");
    assert!(matches!(
        slow.compact_under(&doc, slow_token).await.unwrap(),
        Outcome::Compacted { merged: 21, .. }
    ));
    assert_eq!(f.log.len(&doc).await.unwrap(), 0);
    // Editing goes on: the new holder's next pages find these, above the trimmed gap.
    edit_burst(&f.log, &doc, 3).await;
    // The new holder's later pages skipped trimmed entries: it must not store what it merged
    // (its token and coverage are both above the stored snapshot's).
    pause.1.notify_one();
    match running.await.unwrap().unwrap() {
        Outcome::Stale(why) => assert!(why.contains("during this round"), "{why}"),
        other => panic!("expected the round to be abandoned, got {other:?}"),
    }
    assert_eq!(
        f.snapshots.load(&doc).await.unwrap().unwrap().fence,
        slow_token
    );
    assert_eq!(
        rebuild(f.snapshots.as_ref(), f.log.as_ref(), &doc).await,
        everything(&f.log, &doc)
    );
    // The next round (a fresh grant) folds the new edits in.
    assert!(matches!(
        f.compactor("new").compact(&doc).await.unwrap(),
        Outcome::Compacted { merged: 7, .. }
    ));
    let (text, _) = rebuild(f.snapshots.as_ref(), f.log.as_ref(), &doc).await;
    assert_eq!(text, everything(&f.log, &doc).0);
    assert!(text.contains(&reference.0));
}

#[tokio::test]
async fn a_crash_between_store_and_trim_loses_nothing_and_the_next_round_trims() {
    let f = with_postgres().await;
    let doc = unique_doc();
    let reference = edit_burst(&f.log, &doc, 8).await;

    // The crashed round: it stored its snapshot (under its grant), then died before the trim.
    let token = f.token_of_another_holder(&doc, "crashed").await;
    let entries = f.log.read_after(&doc, None, usize::MAX).await.unwrap();
    let updates: Vec<&[u8]> = entries.iter().map(|e| e.update.as_slice()).collect();
    let state = compact::merge(&doc, None, &updates).unwrap();
    let last = entries.last().unwrap().id;
    f.snapshots
        .store(
            &doc,
            &Snapshot {
                state,
                covers: Some(last),
                fence: token,
            },
        )
        .await
        .unwrap();
    assert_eq!(f.log.len(&doc).await.unwrap(), entries.len() as u64);
    // Nothing lost: a node loading now gets the snapshot, and no tail after it.
    assert_eq!(
        rebuild(f.snapshots.as_ref(), f.log.as_ref(), &doc).await,
        reference
    );
    // Applying the covered entries again (a node that read the log before the snapshot) is
    // harmless: Yjs updates are idempotent.
    let twice = Editor::new(77);
    twice.apply(&f.snapshots.load(&doc).await.unwrap().unwrap().state);
    for e in &entries {
        twice.apply(&e.update);
    }
    assert_eq!(contents(&twice.doc), reference);

    // The next round finds nothing new and trims what the snapshot covers.
    let outcome = f.compactor("next").compact(&doc).await.unwrap();
    assert_eq!(
        outcome,
        Outcome::NothingNew {
            trimmed: entries.len() as u64
        }
    );
    assert_eq!(f.log.len(&doc).await.unwrap(), 0);
    assert_eq!(
        rebuild(f.snapshots.as_ref(), f.log.as_ref(), &doc).await,
        reference
    );
}

/// A snapshot store that holds `load` until the test opens the gate: a round in flight.
struct Gated {
    inner: Arc<dyn SnapshotStore>,
    entered: Notify,
    gate: Notify,
    armed: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl SnapshotStore for Gated {
    async fn load(&self, doc: &str) -> Result<Option<Snapshot>, SnapshotError> {
        if self.armed.swap(false, Ordering::SeqCst) {
            self.entered.notify_one();
            self.gate.notified().await;
        }
        self.inner.load(doc).await
    }
    async fn store(&self, doc: &str, s: &Snapshot) -> Result<(), SnapshotError> {
        self.inner.store(doc, s).await
    }
}

#[tokio::test]
async fn two_compactors_racing_on_one_document_never_both_write() {
    let f = with_postgres().await;
    let doc = unique_doc();
    let gated = Arc::new(Gated {
        inner: f.snapshots.clone(),
        entered: Notify::new(),
        gate: Notify::new(),
        armed: Default::default(),
    });
    let one = f.compactor_with("one", gated.clone());
    let two = f.compactor_with("two", gated.clone());
    let mut fences = Vec::new();
    for round in 0..6 {
        edit_burst(&f.log, &doc, 2).await;
        let (first, second) = if round % 2 == 0 {
            (&one, &two)
        } else {
            (&two, &one)
        };
        gated.armed.store(true, Ordering::SeqCst);
        let running = {
            let first = first.clone();
            let doc = doc.clone();
            tokio::spawn(async move { first.compact(&doc).await })
        };
        // The first holds the lock and is mid-round: the second is turned away.
        gated.entered.notified().await;
        match second.compact(&doc).await.unwrap() {
            Outcome::Busy { holder } => assert!(holder.contains("yjs-compactor"), "{holder}"),
            other => panic!("round {round}: expected Busy, got {other:?}"),
        }
        gated.gate.notify_one();
        match running.await.unwrap().unwrap() {
            Outcome::Compacted { fence, .. } => fences.push(fence),
            other => panic!("round {round}: expected a compaction, got {other:?}"),
        }
        assert_eq!(f.log.len(&doc).await.unwrap(), 0);
    }
    assert!(fences.windows(2).all(|w| w[0] < w[1]), "{fences:?}");
}

#[tokio::test]
async fn snapshot_and_log_tail_rebuild_the_document_after_a_restart() {
    let pg = PostgresServer::start();
    let url = pg.url();
    let log = Arc::new(VecLog::default());
    let doc = unique_doc();
    let editor = Editor::new(88);
    let first = {
        let url = url.clone();
        let server = Server::start_with(move |c| c.database_url = Some(url)).await;
        let node = server.running.as_ref().unwrap().node.clone();
        let snapshots = Arc::new(PgSnapshots::new(node.db.clone().unwrap()));
        for i in 0..30 {
            log.append(&doc, &editor.type_text(&format!("{i},")), "n")
                .await
                .unwrap();
        }
        let c = Compactor::new(
            node,
            log.clone(),
            snapshots,
            CompactorConfig::for_node("n1"),
        );
        assert!(matches!(
            c.compact(&doc).await.unwrap(),
            Outcome::Compacted { .. }
        ));
        server
    };
    // Edits after the compaction stay in the log (the tail).
    for i in 0..5 {
        log.append(&doc, &editor.type_text(&format!("t{i},")), "n")
            .await
            .unwrap();
    }
    let mut first = first;
    first.shutdown().await;
    drop(first);
    pg.stop();
    pg.start_again();

    let server = Server::start_with(move |c| c.database_url = Some(url)).await;
    let node = server.running.as_ref().unwrap().node.clone();
    let snapshots = PgSnapshots::new(node.db.clone().unwrap());
    assert_eq!(log.len(&doc).await.unwrap(), 5);
    assert_eq!(
        rebuild(&snapshots, log.as_ref(), &doc).await,
        contents(&editor.doc)
    );
}

#[tokio::test]
async fn the_loop_compacts_loaded_documents_that_are_due_in_embedded_mode() {
    // No database: fenced locks from the in-process engine, snapshots in files.
    let server = Server::start().await;
    let node = server.running.as_ref().unwrap().node.clone();
    let snapshots = lockstep::yjs::snapshots::for_node(&node)
        .unwrap()
        .expect("a snapshot store");
    let log = Arc::new(VecLog::default());
    let (busy, quiet, idle) = (unique_doc(), unique_doc(), unique_doc());
    let busy_ref = edit_burst(&log, &busy, 30).await; // 61 entries: over max_entries
    let quiet_ref = edit_burst(&log, &quiet, 2).await; // 5 entries: due by age only
    let mut config = CompactorConfig::for_node(&node.id);
    config.max_entries = 50;
    config.max_age = Duration::from_millis(300);
    config.check_every = Duration::from_millis(50);
    let c = Compactor::new(node.clone(), log.clone(), snapshots.clone(), config);
    let cancel = tokio_util::sync::CancellationToken::new();
    let docs = vec![busy.clone(), quiet.clone(), idle.clone()];
    let task = tokio::spawn(c.clone().run(move || docs.clone(), cancel.clone()));

    // Poll for the outcome; the deadline is generous for a loaded machine.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while log.len(&busy).await.unwrap() > 0 || log.len(&quiet).await.unwrap() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the loop did not compact"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the loop stops when cancelled")
        .unwrap();
    assert_eq!(
        rebuild(snapshots.as_ref(), log.as_ref(), &busy).await,
        busy_ref
    );
    assert_eq!(
        rebuild(snapshots.as_ref(), log.as_ref(), &quiet).await,
        quiet_ref
    );
    assert_eq!(
        snapshots.load(&idle).await.unwrap(),
        None,
        "nothing to compact"
    );
    let file = FileSnapshots::open(server.dir.path())
        .unwrap()
        .path_of(&busy)
        .unwrap();
    assert!(file.exists(), "{}", file.display());

    // A clean stop flushes what is not due yet (the in-process log dies with the process).
    let last_edit = Editor::fresh().type_text("bye");
    log.append(&quiet, &last_edit, "n").await.unwrap();
    let docs = [busy.clone(), quiet.clone(), idle.clone()];
    assert_eq!(
        c.flush(&docs).await,
        1,
        "only the document with entries is written"
    );
    assert_eq!(log.len(&quiet).await.unwrap(), 0);
    let (text, _) = rebuild(snapshots.as_ref(), log.as_ref(), &quiet).await;
    assert!(
        text.contains("bye") && text.contains(&quiet_ref.0),
        "{text:?}"
    );
}

/// A log can hold an update whose dependency is not in it yet (it is in a later entry): the
/// merged snapshot must keep it pending, not drop it.
#[test]
fn merge_keeps_updates_whose_dependencies_are_missing() {
    let editor = Editor::fresh();
    let first = editor.type_text("hello ");
    let second = editor.type_text("world");
    let snapshot = compact::merge("scene:1", None, &[second.as_slice()]).unwrap();
    let later = compact::merge("scene:1", Some(&snapshot), &[first.as_slice()]).unwrap();
    let reader = Editor::fresh();
    reader.apply(&later);
    assert_eq!(contents(&reader.doc).0, "hello world");
}
