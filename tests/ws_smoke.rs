//! End-to-end smoke: two clients, presence, cursors, a lock, over real sockets.
mod common;

use common::{Codec, Server};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_see_each_other_and_lock() {
    let server = Server::start().await;
    let mut alice = server.client("alice").await;
    let mut bob = server.client("bob").await;
    alice.join("scene:42").await;
    let snap = bob.request(json!({"type":"join","room":"scene:42"})).await;
    assert_eq!(snap["type"], "reply");
    let joined = alice.recv_type("presence.join").await;
    assert_eq!(joined["member"]["user_id"], "bob");

    bob.send(json!({"type":"cursor","room":"scene:42","x":0.5,"y":0.25}))
        .await;
    let c = alice.recv_type("cursor").await;
    assert_eq!(
        (c["user_id"].as_str(), c["x"].as_f64()),
        (Some("bob"), Some(0.5))
    );

    let r = alice
        .request(json!({"type":"lock.acquire","room":"scene:42","resource":"segment:42-1","action":"approve"}))
        .await;
    assert_eq!(r["type"], "reply", "{r}");
    let token = r["token"].as_u64().unwrap();
    let seen = bob.recv_type("lock.acquired").await;
    assert_eq!(seen["holder"]["user_id"], "alice");
    assert!(seen.get("token").is_none(), "others never see the token");
    let denied = bob
        .request(json!({"type":"lock.acquire","room":"scene:42","resource":"segment:42-1","action":"trim"}))
        .await;
    assert_eq!(denied["code"], "lock_held", "{denied}");
    assert_eq!(denied["holder"]["name"], "alice-name");
    assert_eq!(denied["holder"]["action"], "approve");
    let r = alice
        .request(json!({"type":"lock.release","room":"scene:42","resource":"segment:42-1","token":token}))
        .await;
    assert_eq!(r["type"], "reply");
    let rel = bob.recv_type("lock.released").await;
    assert_eq!(rel["reason"], "released");

    let mp_token = server.token("carol", None).await;
    let mut carol = common::Client::connect(server.addr, &mp_token, Codec::MsgPack, None).await;
    let snap = carol
        .request(json!({"type":"join","room":"scene:42"}))
        .await;
    assert_eq!(snap["type"], "reply");
    let j = alice.recv_type("presence.join").await;
    assert_eq!(j["member"]["user_id"], "carol");
}
