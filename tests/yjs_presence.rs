//! The presence bridge: a `/v1/yjs/{room}` connection is a member of the room `{room}` on
//! `/v1/ws` and `GET /v1/presence`, and leaves on every end — a close, a drain, a node's death.
//! Real nodes (embedded and real processes on a private Redis), real sockets.
mod common;
mod yjs_support;

use std::time::{Duration, Instant};

use common::cluster::{Gateway, token};
use common::redis::RedisServer;
use common::{Client, Codec, Server, metric_sum};
use serde_json::{Value, json};
use yjs_support::YClient;

const ROOM: &str = "scene:1";

/// The members `GET /v1/presence/scene/1` lists, as `(user_id, session_id)`.
async fn listed(http: &reqwest::Client, url: &str, token: &str) -> Vec<(String, String)> {
    let r = http
        .get(url)
        .bearer_auth(token)
        .send()
        .await
        .expect("presence request");
    assert!(r.status().is_success(), "{}", r.status());
    let v: Value = r.json().await.expect("presence json");
    v["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| {
            (
                m["user_id"].as_str().unwrap().to_owned(),
                m["session_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// A bridged member as every member sees it.
fn assert_bridged(member: &Value, user: &str) -> String {
    assert_eq!(member["user_id"], user, "{member}");
    assert_eq!(member["name"], format!("{user}-name"), "{member}");
    assert_eq!(member["role"], "editor", "{member}");
    assert_eq!(member["state"], json!({"via": "yjs"}), "{member}");
    assert!(member.get("focus").is_none(), "{member}");
    assert!(member["since"].as_u64().is_some(), "{member}");
    let sid = member["session_id"]
        .as_str()
        .expect("session_id")
        .to_owned();
    assert!(sid.starts_with("yjs-"), "{sid}");
    sid
}

async fn metrics(http: &reqwest::Client, url: &str) -> String {
    http.get(url).send().await.unwrap().text().await.unwrap()
}

/// Join, two tabs, snapshot, HTTP presence and leave on one embedded node. The user is at its
/// session limit on `/v1/ws`: Yjs connections are not sessions and do not count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_yjs_connection_is_a_member_of_its_room_while_it_is_open() {
    let server = Server::start_with(|c| c.max_sessions_per_user = 1).await;
    let mut watcher = server.client("watcher").await;
    watcher.join(ROOM).await;
    // alice's one allowed session, so any count of Yjs connections would refuse the next.
    let mut alice_ws = server.client("alice").await;
    alice_ws.join("scene:9").await;

    let ta = server.token("alice", None).await;
    let mut tab1 = YClient::connect(server.addr, ROOM, &ta).await;
    tab1.until("tab 1 synced", |c| c.synced).await;
    let joined = watcher.recv_type("presence.join").await;
    assert_eq!(joined["room"], ROOM);
    let sid1 = assert_bridged(&joined["member"], "alice");

    let mut tab2 = YClient::connect(server.addr, ROOM, &ta).await;
    tab2.until("tab 2 synced", |c| c.synced).await;
    let sid2 = assert_bridged(&watcher.recv_type("presence.join").await["member"], "alice");
    assert_ne!(sid1, sid2, "two tabs are two members");

    // The document itself works as before.
    tab1.insert("hi").await;
    tab2.until("tab 1's edit", |c| c.text() == "hi").await;

    let url = server.url("/v1/presence/scene/1");
    let members = listed(&server.http, &url, &ta).await;
    let mut ids: Vec<&str> = members.iter().map(|(_, s)| s.as_str()).collect();
    ids.sort();
    let watcher_sid = watcher.session_id();
    let mut want = vec![sid1.as_str(), sid2.as_str(), watcher_sid.as_str()];
    want.sort();
    assert_eq!(ids, want, "{members:?}");

    // A new `/v1/ws` member gets both in its snapshot.
    let mut late = server.client("late").await;
    late.send(json!({"type":"join","room":ROOM})).await;
    let snap = late.recv_type("room.snapshot").await;
    let in_snapshot: Vec<&str> = snap["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["session_id"].as_str())
        .collect();
    assert!(
        in_snapshot.contains(&sid1.as_str()) && in_snapshot.contains(&sid2.as_str()),
        "{snap}"
    );
    let m = metrics(&server.http, &server.url("/metrics")).await;
    assert_eq!(
        metric_sum(&m, "lockstep_yjs_presence_members", &[]),
        Some(2.0)
    );

    // Closing tab 1 (a vanished TCP connection) is its leave; tab 2 stays.
    let closed = Instant::now();
    drop(tab1);
    let left = watcher.recv_type("presence.leave").await;
    assert_eq!(left["member"]["session_id"], sid1.as_str(), "{left}");
    println!("presence.leave {:?} after the close", closed.elapsed());
    let members = listed(&server.http, &url, &ta).await;
    assert!(members.iter().all(|(_, s)| *s != sid1), "{members:?}");
    assert!(members.iter().any(|(_, s)| *s == sid2), "{members:?}");
    drop(tab2);
    let left = watcher.recv_type("presence.leave").await;
    assert_eq!(left["member"]["session_id"], sid2.as_str(), "{left}");
    let m = metrics(&server.http, &server.url("/metrics")).await;
    assert_eq!(
        metric_sum(&m, "lockstep_yjs_presence_members", &[]),
        Some(0.0)
    );
}

/// A connection refused right away (no role in the room: 4003) never shows up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_yjs_connection_is_never_listed() {
    let server = Server::start().await;
    let mut watcher = server.client("watcher").await;
    watcher.join(ROOM).await;
    let nobody = server
        .token("nobody", Some(json!({"scene:2": "editor"})))
        .await;
    let mut y = YClient::connect(server.addr, ROOM, &nobody).await;
    assert_eq!(y.until_closed().await, 4003);
    let seen = watcher.drain_for(Duration::from_millis(600)).await;
    assert!(
        seen.iter().all(|v| v["type"] != "presence.join"),
        "{seen:?}"
    );
}

/// Past the members cap the Yjs connection syncs as usual; it is just not listed, and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_member_cap_the_document_still_syncs_unlisted() {
    let server = Server::start_with(|c| c.max_members_per_room = 1).await;
    let mut watcher = server.client("watcher").await;
    watcher.join(ROOM).await;
    let mut a = YClient::connect(server.addr, ROOM, &server.token("alice", None).await).await;
    let mut b = YClient::connect(server.addr, ROOM, &server.token("bob", None).await).await;
    a.until("a synced", |c| c.synced).await;
    b.until("b synced", |c| c.synced).await;
    a.insert("full room, ").await;
    b.until("a's edit", |c| c.text().contains("full room"))
        .await;
    b.insert("still editing").await;
    a.until("b's edit", |c| c.text().contains("still editing"))
        .await;

    let seen = watcher.drain_for(Duration::from_millis(600)).await;
    assert!(
        seen.iter().all(|v| v["type"] != "presence.join"),
        "{seen:?}"
    );
    let tw = server.token("watcher", None).await;
    let members = listed(&server.http, &server.url("/v1/presence/scene/1"), &tw).await;
    assert_eq!(members.len(), 1, "{members:?}");
    assert_eq!(members[0].0, "watcher");
    let m = metrics(&server.http, &server.url("/metrics")).await;
    assert_eq!(
        metric_sum(&m, "lockstep_yjs_presence_unlisted_total", &[]),
        Some(2.0),
        "{m}"
    );
    assert_eq!(
        metric_sum(&m, "lockstep_yjs_presence_members", &[]),
        Some(0.0)
    );
    // Unlisted connections leave nothing to announce either.
    drop(a);
    drop(b);
    let seen = watcher.drain_for(Duration::from_millis(400)).await;
    assert!(
        seen.iter().all(|v| v["type"] != "presence.leave"),
        "{seen:?}"
    );
}

async fn observer(g: &Gateway, sub: &str) -> Client {
    let mut c = Client::connect(g.addr(), &token(sub, None), Codec::Json, None).await;
    c.join(ROOM).await;
    c
}

/// Redis, two nodes: the Yjs connection is on node A, the `/v1/ws` observer on node B. Join
/// and leave cross nodes; a drained node A (SIGTERM) takes its Yjs members with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn across_two_nodes_join_leave_and_drain() {
    let redis = RedisServer::start();
    let mut a = Gateway::start(&redis.url(), "node-a", &[]).await;
    let b = Gateway::start(&redis.url(), "node-b", &[]).await;
    let mut watcher = observer(&b, "watcher").await;
    let http = reqwest::Client::new();
    let tw = token("watcher", None);

    let mut y = YClient::connect(a.addr(), ROOM, &token("alice", None)).await;
    y.until("synced", |c| c.synced).await;
    let joined = watcher.recv_type("presence.join").await;
    let sid = assert_bridged(&joined["member"], "alice");
    let members = listed(&http, &b.url("/v1/presence/scene/1"), &tw).await;
    assert!(members.iter().any(|(_, s)| *s == sid), "{members:?}");

    drop(y);
    let left = watcher.recv_type("presence.leave").await;
    assert_eq!(left["member"]["session_id"], sid.as_str(), "{left}");
    let members = listed(&http, &b.url("/v1/presence/scene/1"), &tw).await;
    assert!(members.iter().all(|(_, s)| *s != sid), "{members:?}");

    // Drain: node A closes its Yjs connections with 1012 and removes their members.
    let mut y = YClient::connect(a.addr(), ROOM, &token("bob", None)).await;
    y.until("synced", |c| c.synced).await;
    let sid = assert_bridged(&watcher.recv_type("presence.join").await["member"], "bob");
    let (closed, exited) = tokio::join!(y.until_closed(), a.terminate(Duration::from_secs(10)));
    assert_eq!(closed, 1012);
    assert!(exited, "node A drained in time");
    let left = watcher.recv_type("presence.leave").await;
    assert_eq!(left["member"]["session_id"], sid.as_str(), "{left}");
    let members = listed(&http, &b.url("/v1/presence/scene/1"), &tw).await;
    assert!(members.iter().all(|(_, s)| *s != sid), "{members:?}");
}

/// `kill -9` of the node serving the Yjs connection: nobody sends a leave, the entry is no
/// longer refreshed, and node B's sweep removes it within the presence ttl (and announces it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_nodes_yjs_members_are_swept() {
    let redis = RedisServer::start();
    let ttl = [("LOCKSTEP_PRESENCE_TTL", "900ms")];
    let mut a = Gateway::start(&redis.url(), "node-a", &ttl).await;
    let b = Gateway::start(&redis.url(), "node-b", &ttl).await;
    let mut watcher = observer(&b, "watcher").await;
    let mut y = YClient::connect(a.addr(), ROOM, &token("alice", None)).await;
    y.until("synced", |c| c.synced).await;
    let sid = assert_bridged(&watcher.recv_type("presence.join").await["member"], "alice");
    // Several refresh rounds pass: a live bridged member is not swept.
    let seen = watcher.drain_for(Duration::from_secs(3)).await;
    assert!(
        seen.iter().all(|v| v["type"] != "presence.leave"),
        "{seen:?}"
    );

    let killed = Instant::now();
    a.kill9();
    let left = watcher.recv_type("presence.leave").await;
    let took = killed.elapsed();
    assert_eq!(left["member"]["session_id"], sid.as_str(), "{left}");
    println!("dead node's Yjs member swept after {took:?} (ttl 900 ms)");
    assert!(took < Duration::from_secs(4), "{took:?}");
    let members = listed(
        &reqwest::Client::new(),
        &b.url("/v1/presence/scene/1"),
        &token("watcher", None),
    )
    .await;
    assert!(members.iter().all(|(_, s)| *s != sid), "{members:?}");
}

/// A stalled node's Yjs member is swept like a session's, and put back by the node's refresh
/// once it runs again, with the connection still open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_nodes_yjs_member_leaves_and_comes_back() {
    let redis = RedisServer::start();
    let ttl = [("LOCKSTEP_PRESENCE_TTL", "900ms")];
    let a = Gateway::start(&redis.url(), "node-a", &ttl).await;
    let b = Gateway::start(&redis.url(), "node-b", &ttl).await;
    let mut watcher = observer(&b, "watcher").await;
    let mut y = YClient::connect(a.addr(), ROOM, &token("alice", None)).await;
    y.until("synced", |c| c.synced).await;
    let sid = assert_bridged(&watcher.recv_type("presence.join").await["member"], "alice");
    a.pause();
    let left = watcher.recv_type("presence.leave").await;
    assert_eq!(left["member"]["session_id"], sid.as_str(), "{left}");
    a.resume();
    let back = watcher.recv_type("presence.join").await;
    assert_eq!(back["member"]["session_id"], sid.as_str(), "{back}");
    // And the connection is still a working document connection.
    y.insert("after the stall").await;
    let mut z = YClient::connect(b.addr(), ROOM, &token("zed", None)).await;
    z.until("alice's edit on node b", |c| c.text() == "after the stall")
        .await;
}
