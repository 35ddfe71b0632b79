//! Every `SnapshotStore` (memory, file, Postgres) against one contract suite: round trips,
//! the stale-writer rule (lower fence or lower coverage refused, nothing changed), idempotent
//! retries, racing writers, odd document names and large states. Plus what only one store has:
//! the file store's atomic replacement and reopening, Postgres' NULL coverage and restart.

mod common;

use std::sync::Arc;

use common::postgres::PostgresServer;
use lockstep::yjs::snapshots::{FileSnapshots, MemorySnapshots, PgSnapshots};
use lockstep::yjs::store::{EntryId, Snapshot, SnapshotError, SnapshotStore};

fn unique_doc() -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("scene:t-{}", &id[..16])
}

fn id(ms: u64, seq: u64) -> Option<EntryId> {
    Some(EntryId { ms, seq })
}

fn snap(state: &[u8], covers: Option<EntryId>, fence: u64) -> Snapshot {
    Snapshot {
        state: state.to_vec(),
        covers,
        fence,
    }
}

async fn expect_stale(store: &dyn SnapshotStore, doc: &str, s: &Snapshot) {
    match store.store(doc, s).await {
        Err(SnapshotError::Stale(why)) => assert!(!why.is_empty()),
        other => panic!("expected Stale for {s:?}, got {other:?}"),
    }
}

/// The contract every store keeps.
async fn suite(store: Arc<dyn SnapshotStore>) {
    let doc = unique_doc();
    let s = store.as_ref();
    assert_eq!(s.load(&doc).await.unwrap(), None, "no snapshot yet");

    let first = snap(b"state-1", None, 5);
    s.store(&doc, &first).await.unwrap();
    assert_eq!(s.load(&doc).await.unwrap(), Some(first.clone()));

    // Same holder, more of the log.
    let second = snap(b"state-2", id(100, 3), 5);
    s.store(&doc, &second).await.unwrap();
    assert_eq!(s.load(&doc).await.unwrap(), Some(second.clone()));

    // A lower fencing token is refused even with more coverage; nothing changes.
    expect_stale(s, &doc, &snap(b"stale", id(200, 0), 4)).await;
    // A higher token covering less of the log is refused too (trimmed entries would be lost).
    expect_stale(s, &doc, &snap(b"behind", id(100, 2), 9)).await;
    expect_stale(s, &doc, &snap(b"behind", None, 9)).await;
    assert_eq!(s.load(&doc).await.unwrap(), Some(second.clone()));

    // A retried write (its answer was lost) is accepted.
    s.store(&doc, &second).await.unwrap();
    // A newer holder with the same coverage replaces it.
    let third = snap(b"state-3", id(100, 3), 6);
    s.store(&doc, &third).await.unwrap();
    assert_eq!(s.load(&doc).await.unwrap(), Some(third.clone()));
    // Entry ids order by (ms, seq), not as text: 100-10 is above 100-9.
    s.store(&doc, &snap(b"s", id(100, 9), 6)).await.unwrap();
    s.store(&doc, &snap(b"s", id(100, 10), 6)).await.unwrap();
    expect_stale(s, &doc, &snap(b"s", id(100, 9), 6)).await;

    // Documents are independent, whatever their names look like.
    let odd = [
        "scene:a.b~c-d_e".to_owned(),
        "scene%3Aa".to_owned(),
        "../../etc/passwd".to_owned(),
        ".".to_owned(),
        "story:é 漢字/\\:%".to_owned(),
    ];
    for (i, name) in odd.iter().enumerate() {
        let name = format!("{name}{}", &doc[8..]);
        let mine = snap(name.as_bytes(), id(i as u64, 0), 1);
        s.store(&name, &mine).await.unwrap();
        assert_eq!(s.load(&name).await.unwrap(), Some(mine));
    }
    assert_eq!(s.load(&doc).await.unwrap().unwrap().covers, id(100, 10));

    // Racing writers: whatever the interleaving, the highest (fence, covers) wins and every
    // other write either landed before it or was refused.
    let race = unique_doc();
    let mut tasks = Vec::new();
    for i in 1..=16u64 {
        let store = store.clone();
        let race = race.clone();
        tasks.push(tokio::spawn(async move {
            let r = store
                .store(&race, &snap(&i.to_be_bytes(), id(i, 0), i))
                .await;
            match r {
                Ok(()) | Err(SnapshotError::Stale(_)) => {}
                Err(e) => panic!("racing writer {i}: {e}"),
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let won = s.load(&race).await.unwrap().unwrap();
    assert_eq!((won.fence, won.covers), (16, id(16, 0)));
    assert_eq!(won.state, 16u64.to_be_bytes());

    // A large state (4 MiB) round-trips byte for byte.
    let big_doc = unique_doc();
    let big: Vec<u8> = (0..4 << 20).map(|i: u32| (i % 251) as u8).collect();
    let big = snap(&big, id(7, 7), 3);
    s.store(&big_doc, &big).await.unwrap();
    assert_eq!(s.load(&big_doc).await.unwrap(), Some(big));
}

#[tokio::test]
async fn memory_store_keeps_the_contract() {
    suite(Arc::new(MemorySnapshots::new())).await;
}

#[tokio::test]
async fn file_store_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    suite(FileSnapshots::open(dir.path()).unwrap()).await;
}

#[tokio::test]
async fn postgres_store_keeps_the_contract() {
    let pg = PostgresServer::start();
    lockstep::db::migrate(&pg.url()).await.unwrap();
    let pool = lockstep::db::pool(&pg.url(), 8).unwrap();
    suite(Arc::new(PgSnapshots::new(pool))).await;
}

#[tokio::test]
async fn file_store_replaces_atomically_and_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileSnapshots::open(dir.path()).unwrap();
    let doc = "scene:42";
    store.store(doc, &snap(b"one", id(1, 0), 1)).await.unwrap();
    store.store(doc, &snap(b"two", id(2, 0), 2)).await.unwrap();
    // One file per document, no temp files left behind, the name percent-encoded.
    let names: Vec<String> = std::fs::read_dir(dir.path().join("yjs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["scene%3A42.ydoc".to_owned()]);

    // A fresh store on the same directory (a restarted node) reads it and keeps refusing
    // stale writers.
    drop(store);
    let reopened = FileSnapshots::open(dir.path()).unwrap();
    assert_eq!(
        reopened.load(doc).await.unwrap(),
        Some(snap(b"two", id(2, 0), 2))
    );
    expect_stale(reopened.as_ref(), doc, &snap(b"old", id(3, 0), 1)).await;

    // A damaged file is reported, never taken for an empty document.
    let path = reopened.path_of(doc).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.truncate(bytes.len() - 1);
    std::fs::write(&path, bytes).unwrap();
    match reopened.load(doc).await {
        Err(SnapshotError::Unavailable(m)) => assert!(m.contains("corrupt"), "{m}"),
        other => panic!("expected a corrupt-file error, got {other:?}"),
    }
    // Too long a name is refused with a clear error instead of failing in the file system.
    let long = format!("scene:{}", "é".repeat(60));
    match reopened.store(&long, &snap(b"x", None, 1)).await {
        Err(SnapshotError::Unavailable(m)) => assert!(m.contains("too long"), "{m}"),
        other => panic!("expected a name-too-long error, got {other:?}"),
    }
}

#[tokio::test]
async fn postgres_store_keeps_null_coverage_and_survives_a_restart() {
    let pg = PostgresServer::start();
    lockstep::db::migrate(&pg.url()).await.unwrap();
    let pool = lockstep::db::pool(&pg.url(), 2).unwrap();
    let store = PgSnapshots::new(pool);
    let doc = unique_doc();
    store.store(&doc, &snap(b"empty", None, 3)).await.unwrap();
    assert_eq!(
        pg.psql(&format!(
            "SELECT covers_ms IS NULL AND covers_seq IS NULL, fence FROM lockstep.documents WHERE doc = '{doc}'"
        )),
        "t|3"
    );
    store
        .store(&doc, &snap(b"full", id(9, 1), 3))
        .await
        .unwrap();

    pg.stop();
    pg.start_again();
    let store = PgSnapshots::new(lockstep::db::pool(&pg.url(), 2).unwrap());
    assert_eq!(
        store.load(&doc).await.unwrap(),
        Some(snap(b"full", id(9, 1), 3))
    );
    expect_stale(&store, &doc, &snap(b"old", id(10, 0), 2)).await;
}
