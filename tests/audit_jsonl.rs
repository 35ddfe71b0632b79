//! The JSON-lines audit sink: round trip, filters, pagination, reopen, concurrency.

use std::collections::HashSet;
use std::sync::Arc;

use lockstep::audit::jsonl::{FILE_NAME, JsonlSink};
use lockstep::audit::{AuditError, AuditKind, AuditQuery, AuditRecord, AuditSink, rfc3339_ms};

fn record(kind: AuditKind, resource: &str, user: &str, at: u64) -> AuditRecord {
    AuditRecord {
        at,
        room: Some("scene:1".into()),
        resource: Some(resource.into()),
        user_id: Some(user.into()),
        session_id: Some(format!("{user}-s").into()),
        token: Some(at),
        detail: serde_json::json!({ "action": "approve" }),
        ..AuditRecord::new(kind, "node-1".into())
    }
}

fn query() -> AuditQuery {
    AuditQuery::default()
}

#[tokio::test]
async fn append_flush_query_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let sink = JsonlSink::open(dir.path()).unwrap();
    let a = record(AuditKind::LockAcquired, "segment:1", "alice", 1_000);
    let b = AuditRecord::new(AuditKind::SessionOpened, "node-1".into()); // sparse fields
    sink.append(vec![a.clone(), b.clone()]).await.unwrap();
    sink.append(vec![]).await.unwrap();
    sink.flush().await.unwrap();

    let page = sink.query(&query()).await.unwrap();
    assert_eq!(page.records, vec![b, a.clone()], "newest first, unchanged");
    assert_eq!(page.next, None);

    // One JSON object per line, in the record's serde form.
    let text = std::fs::read_to_string(dir.path().join(FILE_NAME)).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2);
    let first: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(first["kind"], "lock_acquired");
    assert_eq!(first["at"], rfc3339_ms::format(1_000));
    assert_eq!(first["id"], a.id.to_string());
    assert!(text.ends_with('\n'));
}

#[tokio::test]
async fn filters() {
    let dir = tempfile::tempdir().unwrap();
    let sink = JsonlSink::open(dir.path()).unwrap();
    let r1 = record(AuditKind::LockAcquired, "segment:1", "alice", 1_000);
    let r2 = record(AuditKind::LockDenied, "segment:1", "bob", 2_000);
    let mut r3 = record(AuditKind::LockAcquired, "segment:2", "bob", 3_000);
    r3.room = Some("scene:2".into());
    let r4 = record(AuditKind::LockReleased, "segment:1", "alice", 4_000);
    sink.append(vec![r1.clone(), r2.clone()]).await.unwrap();
    sink.append(vec![r3.clone(), r4.clone()]).await.unwrap();

    let ids = |q: AuditQuery| {
        let sink = &sink;
        async move {
            sink.query(&q)
                .await
                .unwrap()
                .records
                .into_iter()
                .map(|r| r.id)
                .collect::<Vec<_>>()
        }
    };
    let q = AuditQuery {
        resource: Some("segment:1".into()),
        ..query()
    };
    assert_eq!(ids(q).await, vec![r4.id, r2.id, r1.id]);
    let q = AuditQuery {
        room: Some("scene:2".into()),
        ..query()
    };
    assert_eq!(ids(q).await, vec![r3.id]);
    let q = AuditQuery {
        user_id: Some("bob".into()),
        ..query()
    };
    assert_eq!(ids(q).await, vec![r3.id, r2.id]);
    let q = AuditQuery {
        kind: Some("lock_acquired".into()),
        ..query()
    };
    assert_eq!(ids(q).await, vec![r3.id, r1.id]);
    // since is inclusive, until exclusive; both accept ms and RFC 3339.
    let q = AuditQuery {
        since: Some("2000".into()),
        until: Some(rfc3339_ms::format(4_000)),
        ..query()
    };
    assert_eq!(ids(q).await, vec![r3.id, r2.id]);
    let q = AuditQuery {
        before: Some(r3.id),
        ..query()
    };
    assert_eq!(ids(q).await, vec![r2.id, r1.id]);
    let q = AuditQuery {
        resource: Some("segment:1".into()),
        user_id: Some("alice".into()),
        kind: Some("lock_released".into()),
        ..query()
    };
    assert_eq!(ids(q).await, vec![r4.id]);
    let q = AuditQuery {
        resource: Some("segment:9".into()),
        ..query()
    };
    assert!(ids(q).await.is_empty());
}

#[tokio::test]
async fn bad_queries_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sink = JsonlSink::open(dir.path()).unwrap();
    for q in [
        AuditQuery {
            kind: Some("lock_stolen".into()),
            ..query()
        },
        AuditQuery {
            since: Some("yesterday".into()),
            ..query()
        },
        AuditQuery {
            until: Some("2026-13-45T00:00:00Z".into()),
            ..query()
        },
        AuditQuery {
            limit: Some(0),
            ..query()
        },
    ] {
        let err = sink.query(&q).await.unwrap_err();
        assert!(matches!(err, AuditError::BadQuery(_)), "{q:?}: {err:?}");
    }
}

#[tokio::test]
async fn pagination() {
    let dir = tempfile::tempdir().unwrap();
    let sink = JsonlSink::open(dir.path()).unwrap();
    let all: Vec<AuditRecord> = (0..250)
        .map(|i| record(AuditKind::LockAcquired, "segment:1", "alice", 1_000 + i))
        .collect();
    for chunk in all.chunks(7) {
        sink.append(chunk.to_vec()).await.unwrap();
    }
    let newest_first: Vec<_> = all.iter().rev().map(|r| r.id).collect();

    // Default page size 100.
    let page = sink.query(&query()).await.unwrap();
    assert_eq!(page.records.len(), 100);

    let mut seen = Vec::new();
    let mut before = None;
    loop {
        let page = sink
            .query(&AuditQuery {
                limit: Some(60),
                before,
                ..query()
            })
            .await
            .unwrap();
        seen.extend(page.records.iter().map(|r| r.id));
        match page.next {
            Some(next) => {
                assert_eq!(Some(&next), seen.last(), "next is the page's last id");
                before = Some(next);
            }
            None => break,
        }
    }
    assert_eq!(
        seen, newest_first,
        "pages cover everything once, newest first"
    );

    // A limit over the maximum is capped at 1000.
    let page = sink
        .query(&AuditQuery {
            limit: Some(5000),
            ..query()
        })
        .await
        .unwrap();
    assert_eq!(page.records.len(), 250);
    assert_eq!(page.next, None);
}

#[tokio::test]
async fn reopened_sink_keeps_old_records() {
    let dir = tempfile::tempdir().unwrap();
    let old = record(AuditKind::LockAcquired, "segment:1", "alice", 1_000);
    {
        let sink = JsonlSink::open(dir.path()).unwrap();
        sink.append(vec![old.clone()]).await.unwrap();
        sink.flush().await.unwrap();
    }
    let sink = JsonlSink::open(dir.path()).unwrap();
    let new = record(AuditKind::LockReleased, "segment:1", "alice", 2_000);
    sink.append(vec![new.clone()]).await.unwrap();
    let page = sink.query(&query()).await.unwrap();
    assert_eq!(page.records, vec![new, old]);
}

#[tokio::test]
async fn creates_missing_directories() {
    let dir = tempfile::tempdir().unwrap();
    let nested = dir.path().join("a").join("b");
    let sink = JsonlSink::open(&nested).unwrap();
    sink.append(vec![record(AuditKind::LockAcquired, "segment:1", "a", 1)])
        .await
        .unwrap();
    sink.flush().await.unwrap();
    assert!(nested.join(FILE_NAME).exists());
    assert_eq!(sink.path(), nested.join(FILE_NAME));
}

/// Garbage and a crash's half line are skipped (and counted), never fatal; the next record
/// after a half line starts on a line of its own.
#[tokio::test]
async fn unparsable_lines_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let good = record(AuditKind::LockAcquired, "segment:1", "alice", 1_000);
    let mut text = serde_json::to_string(&good).unwrap();
    text.push_str("\nnot json\n{\"id\": 5}\n\n{\"id\":\"0190");
    std::fs::write(dir.path().join(FILE_NAME), text).unwrap();

    let sink = JsonlSink::open(dir.path()).unwrap();
    let after = record(AuditKind::LockReleased, "segment:1", "alice", 2_000);
    sink.append(vec![after.clone()]).await.unwrap();
    let page = sink.query(&query()).await.unwrap();
    assert_eq!(page.records, vec![after, good]);
    assert_eq!(sink.skipped_lines(), 3, "two bad lines and the half line");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_all_present_once() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Arc::new(JsonlSink::open(dir.path()).unwrap());
    let mut tasks = Vec::new();
    for t in 0..32 {
        let sink = sink.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..20 {
                let batch: Vec<AuditRecord> = (0..3)
                    .map(|j| {
                        record(
                            AuditKind::LockAcquired,
                            &format!("segment:{t}"),
                            "u",
                            i * 3 + j,
                        )
                    })
                    .collect();
                ids.extend(batch.iter().map(|r| r.id));
                sink.append(batch).await.unwrap();
            }
            ids
        }));
    }
    let mut sent = HashSet::new();
    for task in tasks {
        sent.extend(task.await.unwrap());
    }
    assert_eq!(sent.len(), 32 * 20 * 3);
    sink.flush().await.unwrap();

    let text = std::fs::read_to_string(dir.path().join(FILE_NAME)).unwrap();
    let mut written = HashSet::new();
    for line in text.lines() {
        let r: AuditRecord = serde_json::from_str(line).unwrap();
        assert!(written.insert(r.id), "{} written twice", r.id);
    }
    assert_eq!(written, sent);

    let page = sink
        .query(&AuditQuery {
            limit: Some(1000),
            ..query()
        })
        .await
        .unwrap();
    assert_eq!(page.records.len(), 1000);
    assert!(
        page.records.windows(2).all(|w| w[0].id > w[1].id),
        "newest first"
    );
}

/// The lock store's records reach the file through the sink (the embedded default wiring).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_store_conformance_with_jsonl_audit() {
    use lockstep::engine::conformance::{self, LockStoreUnderTest};
    use lockstep::engine::memory::MemoryLockStore;
    let dir = tempfile::tempdir().unwrap();
    let audit: Arc<dyn AuditSink> = Arc::new(JsonlSink::open(dir.path()).unwrap());
    let t = LockStoreUnderTest {
        store: Arc::new(MemoryLockStore::new(audit.clone())),
        audit,
    };
    conformance::lock_audit_trail(&t).await;
    conformance::fifo_queue(&t).await;
}
