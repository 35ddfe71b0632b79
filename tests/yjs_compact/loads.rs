//! `document_loaded`: every load of a document on a node is audited once, with its sizes.

use std::time::Duration;

use lockstep::node::Node;

use crate::common::Server;
use crate::common::postgres::PostgresServer;
use crate::unique_doc;
use crate::yjs_support::YClient;

/// The `detail`s of the `kind` records of `doc` in Postgres, oldest first, once there are
/// `want` of them (the audit reaches Postgres through its outbox, a moment later).
pub async fn audited(node: &Node, doc: &str, kind: &str, want: usize) -> Vec<serde_json::Value> {
    let pool = node.db.clone().unwrap();
    let mut details = Vec::new();
    for _ in 0..200 {
        let client = pool.get().await.unwrap();
        details = client
            .query(
                "SELECT detail FROM lockstep.audit_events WHERE room = $1 AND kind = $2
                 ORDER BY at, id",
                &[&doc, &kind],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, serde_json::Value>(0))
            .collect();
        if details.len() >= want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(details.len(), want, "{kind} records of {doc}: {details:?}");
    details
}

#[tokio::test]
async fn every_load_of_a_document_is_audited_once_with_its_sizes() {
    // The node's own compactor folds the log within a moment (LOCKSTEP_YJS_COMPACT_MAX_AGE),
    // and an unused document unloads quickly, so a second load starts from a snapshot.
    let pg = PostgresServer::start();
    let url = pg.url();
    let server = Server::start_with(move |c| {
        c.database_url = Some(url);
        c.yjs_compact_max_age = Duration::from_millis(200);
        c.yjs_unload_grace = Duration::from_millis(300);
    })
    .await;
    let node = server.running.as_ref().unwrap().node.clone();
    let snapshots = lockstep::yjs::snapshots::for_node(&node)
        .unwrap()
        .expect("a snapshot store");
    let doc = unique_doc();
    let token = server.token("ada", None).await;

    // Two clients on one load: one record.
    let mut a = YClient::connect(server.addr, &doc, &token).await;
    let mut b = YClient::connect(server.addr, &doc, &token).await;
    a.until("synced", |c| c.synced).await;
    b.until("synced", |c| c.synced).await;
    a.insert("hello").await;
    b.until("a's edit", |c| c.text() == "hello").await;
    let first = audited(&node, &doc, "document_loaded", 1).await;
    assert_eq!(first[0]["snapshot_bytes"], 0, "{first:?}");
    assert_eq!(first[0]["tail_entries"], 0);
    assert!(first[0]["covers"].is_null());
    assert!(first[0]["load_ms"].is_u64());

    // Compacted by the node's loop, thanks to the short max age.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while snapshots.load(&doc).await.unwrap().is_none() {
        assert!(tokio::time::Instant::now() < deadline, "not compacted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop((a, b));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while node.yjs.is_loaded(&doc) {
        assert!(tokio::time::Instant::now() < deadline, "not unloaded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A second load reads the snapshot: a second record, with its size and coverage.
    let mut c = YClient::connect(server.addr, &doc, &token).await;
    c.until("the document", |c| c.text() == "hello").await;
    let loads = audited(&node, &doc, "document_loaded", 2).await;
    let stored = snapshots.load(&doc).await.unwrap().unwrap();
    assert!(
        loads[1]["snapshot_bytes"].as_u64().unwrap() > 0,
        "{loads:?}"
    );
    assert_eq!(loads[1]["covers"], stored.covers.unwrap().to_string());
    drop(c);
    drop(server);
}
