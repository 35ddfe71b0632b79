//! `GET /v1/yjs/{room}` on one embedded node: real sockets, a y-websocket client built on yrs.
mod common;
mod yjs_support;

use std::time::Duration;

use common::Server;
use serde_json::json;
use yjs_support::YClient;
use yrs::Map;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_converge_on_text_and_map() {
    let server = Server::start().await;
    let ta = server.token("alice", None).await;
    let tb = server.token("bob", None).await;
    let mut a = YClient::connect(server.addr, "scene:1", &ta).await;
    let mut b = YClient::connect(server.addr, "scene:1", &tb).await;
    a.until("alice synced", |c| c.synced).await;
    b.until("bob synced", |c| c.synced).await;

    a.insert("hello ").await;
    b.edit(|txn, _, map| {
        map.insert(txn, "status", "approved");
    })
    .await;
    a.until("bob's map entry", |c| c.map_get("status").is_some())
        .await;
    b.until("alice's text", |c| c.text() == "hello ").await;

    // Concurrent edits from both sides, then both hold the same document.
    for i in 0..20 {
        a.insert(&format!("a{i}")).await;
        b.insert(&format!("b{i}")).await;
    }
    a.until("all 40 edits", |c| {
        c.text().matches('b').count() == 20 && c.text().matches('a').count() == 20
    })
    .await;
    b.until("all 40 edits", |c| {
        c.text().matches('a').count() == 20 && c.text().matches('b').count() == 20
    })
    .await;
    a.until("alice equals bob", |_| true).await;
    let (ta, tb) = (a.text(), b.text());
    assert_eq!(ta, tb);
    assert_eq!(a.map_get("status").as_deref(), Some("approved"));
    assert_eq!(b.map_get("status").as_deref(), Some("approved"));

    // A late joiner gets all of it from SyncStep2 alone.
    let tc = server.token("carol", None).await;
    let mut c = YClient::connect(server.addr, "scene:1", &tc).await;
    c.until("carol synced", |c| c.synced).await;
    assert_eq!(c.text(), ta);
    assert_eq!(c.map_get("status").as_deref(), Some("approved"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewers_update_is_refused_and_never_reaches_others() {
    let server = Server::start().await;
    let te = server.token("ed", None).await;
    let tv = server
        .token("vic", Some(json!({"scene:2": "viewer"})))
        .await;
    let mut ed = YClient::connect(server.addr, "scene:2", &te).await;
    let mut vic = YClient::connect(server.addr, "scene:2", &tv).await;
    ed.until("ed synced", |c| c.synced).await;
    vic.until("vic synced", |c| c.synced).await;

    vic.insert("EVIL").await;
    // Frames of one connection are handled in order: once ed sees vic's awareness, vic's
    // update before it was handled (and dropped).
    vic.set_awareness(1, r#"{"user":"vic"}"#).await;
    let vic_id = vic.doc.client_id().get();
    ed.until("vic's awareness", |c| c.awareness.contains_key(&vic_id))
        .await;
    ed.insert("good").await;
    vic.until("ed's edit reaches the viewer", |c| {
        c.text().contains("good")
    })
    .await;
    assert!(!ed.text().contains("EVIL"), "{}", ed.text());

    let tc = server.token("carol", None).await;
    let mut c = YClient::connect(server.addr, "scene:2", &tc).await;
    c.until("carol synced", |c| c.synced).await;
    assert_eq!(c.text(), "good");
    let metrics = server.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("lockstep_yjs_readonly_refused_total") && !l.ends_with(" 0")),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_update_closes_only_its_own_connection() {
    let server = Server::start().await;
    let t1 = server.token("one", None).await;
    let t2 = server.token("two", None).await;
    let mut good = YClient::connect(server.addr, "scene:3", &t1).await;
    let mut bad = YClient::connect(server.addr, "scene:3", &t2).await;
    good.until("synced", |c| c.synced).await;
    bad.until("synced", |c| c.synced).await;
    good.insert("before").await;
    bad.until("before", |c| c.text() == "before").await;

    // Sync (0), Update (2), a 5-byte buffer of garbage.
    bad.send_raw(vec![0, 2, 5, 0xff, 0xff, 0xff, 0xff, 0xff])
        .await;
    assert_eq!(bad.until_closed().await, 1007);

    good.insert(" after").await;
    good.until("own echo", |c| c.text() == "before after").await;
    let t3 = server.token("three", None).await;
    let mut late = YClient::connect(server.addr, "scene:3", &t3).await;
    late.until("synced", |c| c.synced).await;
    assert_eq!(late.text(), "before after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_have_their_close_codes() {
    let server = Server::start().await;
    let none = server
        .token("nobody", Some(json!({"scene:9": "editor"})))
        .await;
    let mut c = YClient::connect(server.addr, "scene:4", &none).await;
    assert_eq!(c.until_closed().await, 4003, "no role in the room");
    let mut c = YClient::connect(server.addr, "scene:4", "not-a-token").await;
    assert_eq!(c.until_closed().await, 4001, "bad token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn awareness_reaches_everyone_and_goes_null_on_close() {
    let server = Server::start().await;
    let ta = server.token("alice", None).await;
    let tb = server.token("bob", None).await;
    let mut a = YClient::connect(server.addr, "scene:5", &ta).await;
    a.until("synced", |c| c.synced).await;
    a.set_awareness(1, r#"{"user":{"name":"alice"}}"#).await;
    let a_id = a.doc.client_id().get();
    a.until("own awareness echoed", |c| c.awareness.contains_key(&a_id))
        .await;
    // A joiner is sent the current states on connect.
    let mut b = YClient::connect(server.addr, "scene:5", &tb).await;
    b.until("alice's state", |c| {
        c.awareness.get(&a_id).is_some_and(|j| j.contains("alice"))
    })
    .await;
    drop(a);
    b.until("alice's state goes null", |c| {
        c.awareness.get(&a_id).is_some_and(|j| j == "null")
    })
    .await;
    b.drain_for(Duration::from_millis(10)).await;
}
