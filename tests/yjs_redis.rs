//! `GET /v1/yjs/{room}` across real gateway processes sharing a private Redis: convergence
//! through the per-document stream, cold loads from the log, and `kill -9` during a burst.
mod common;
mod yjs_support;

use std::time::Duration;

use common::cluster::{Gateway, token};
use common::redis::RedisServer;
use yjs_support::YClient;
use yrs::Map;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_converge_and_a_cold_node_loads_from_the_log() {
    let redis = RedisServer::start();
    let a = Gateway::start(&redis.url(), "node-a", &[]).await;
    let b = Gateway::start(&redis.url(), "node-b", &[]).await;
    let mut x = YClient::connect(a.addr(), "scene:1", &token("x", None)).await;
    let mut y = YClient::connect(b.addr(), "scene:1", &token("y", None)).await;
    x.until("x synced", |c| c.synced).await;
    y.until("y synced", |c| c.synced).await;

    for i in 0..25 {
        x.insert(&format!("x{i};")).await;
        y.insert(&format!("y{i};")).await;
    }
    y.edit(|txn, _, map| {
        map.insert(txn, "owner", "y");
    })
    .await;
    let all = |c: &YClient| {
        let t = c.text();
        (0..25).all(|i| t.contains(&format!("x{i};")) && t.contains(&format!("y{i};")))
            && c.map_get("owner").is_some()
    };
    x.until("every edit on node a", all).await;
    y.until("every edit on node b", all).await;
    assert_eq!(x.text(), y.text());

    // A third node has never loaded the document: it reads the Redis stream.
    let c = Gateway::start(&redis.url(), "node-c", &[]).await;
    let mut z = YClient::connect(c.addr(), "scene:1", &token("z", None)).await;
    z.until("z synced", |c| c.synced).await;
    assert_eq!(z.text(), x.text());
    assert_eq!(z.map_get("owner").as_deref(), Some("y"));
    let len = redis.cli(&["XLEN", "lockstep:yd:{scene:1}:log"]);
    assert!(
        len.trim().parse::<u64>().unwrap() > 0,
        "stream length {len}"
    );
}

/// Acknowledged = seen by a client connected to another node (it only gets there through the
/// Redis stream). Everything acknowledged before the kill is there afterwards, on a node that
/// loads the document cold, and the writer's reconnect elsewhere brings back the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_burst_loses_no_acknowledged_edit() {
    let redis = RedisServer::start();
    let mut a = Gateway::start(&redis.url(), "node-a", &[]).await;
    let b = Gateway::start(&redis.url(), "node-b", &[]).await;
    let mut writer = YClient::connect(a.addr(), "scene:7", &token("w", None)).await;
    let mut watcher = YClient::connect(b.addr(), "scene:7", &token("v", None)).await;
    writer.until("synced", |c| c.synced).await;
    watcher.until("synced", |c| c.synced).await;

    const N: usize = 300;
    for i in 0..N {
        writer.insert(&format!("e{i};")).await;
        if i == N / 2 {
            watcher
                .until("half the burst", |c| c.text().contains("e100;"))
                .await;
        }
    }
    a.kill9();
    watcher.drain_for(Duration::from_millis(500)).await;
    let acked: Vec<String> = (0..N)
        .map(|i| format!("e{i};"))
        .filter(|e| watcher.text().contains(e.as_str()))
        .collect();
    assert!(acked.len() > 100, "only {} acknowledged", acked.len());

    let c = Gateway::start(&redis.url(), "node-c", &[]).await;
    let mut cold = YClient::connect(c.addr(), "scene:7", &token("c", None)).await;
    cold.until("synced", |c| c.synced).await;
    let text = cold.text();
    let lost: Vec<&String> = acked
        .iter()
        .filter(|e| !text.contains(e.as_str()))
        .collect();
    assert!(lost.is_empty(), "acknowledged edits lost: {lost:?}");

    // The writer reconnects to node b with its local document: the edits node a never
    // appended go out in its SyncStep2, and everyone ends with all N.
    let mut back =
        YClient::connect_with(b.addr(), "scene:7", &token("w", None), Some(writer.state())).await;
    back.until("synced", |c| c.synced).await;
    let every = |c: &YClient| {
        let t = c.text();
        (0..N).all(|i| t.contains(&format!("e{i};")))
    };
    cold.until("all edits after the writer's reconnect", every)
        .await;
    watcher.until("all edits", every).await;
    assert_eq!(cold.text(), watcher.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn awareness_crosses_nodes_reaches_cold_joiners_and_goes_null_on_close() {
    let redis = RedisServer::start();
    let a = Gateway::start(&redis.url(), "node-a", &[]).await;
    let b = Gateway::start(&redis.url(), "node-b", &[]).await;
    let mut x = YClient::connect(a.addr(), "scene:8", &token("x", None)).await;
    let mut y = YClient::connect(b.addr(), "scene:8", &token("y", None)).await;
    x.until("x synced", |c| c.synced).await;
    y.until("y synced", |c| c.synced).await;
    x.set_awareness(1, r#"{"user":{"name":"x"}}"#).await;
    let xid = x.doc.client_id().get();
    y.until("x's state on node b", |c| {
        c.awareness.get(&xid).is_some_and(|j| j.contains("\"x\""))
    })
    .await;

    // A node that never had the document reads the current states from Redis.
    let c = Gateway::start(&redis.url(), "node-c", &[]).await;
    let mut z = YClient::connect(c.addr(), "scene:8", &token("z", None)).await;
    z.until("x's state on a cold node", |c| {
        c.awareness.get(&xid).is_some_and(|j| j.contains("\"x\""))
    })
    .await;

    drop(x);
    y.until("x's state null on node b", |c| {
        c.awareness.get(&xid).is_some_and(|j| j == "null")
    })
    .await;
    z.until("x's state null on node c", |c| {
        c.awareness.get(&xid).is_some_and(|j| j == "null")
    })
    .await;
    let left = redis.cli(&["HLEN", "lockstep:yd:{scene:8}:aw"]);
    assert_eq!(left.trim(), "0", "x's field is deleted from the hash");
}
