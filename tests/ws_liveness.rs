//! Liveness: resume within the grace, end after it, normal close, drain.
mod common;

use std::time::Duration;

use common::{Client, Closed, Codec, Server};
use serde_json::json;

const ROOM: &str = "scene:9";

fn acquire(resource: &str) -> serde_json::Value {
    json!({"type":"lock.acquire","room":ROOM,"resource":resource,"action":"trim"})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_within_grace_keeps_session_presence_and_locks_silently() {
    let server = Server::start_with(|c| c.resume_grace = Duration::from_secs(10)).await;
    let token_a = server.token("a", None).await;
    let mut a = Client::connect(server.addr, &token_a, Codec::Json, None).await;
    let mut b = server.client("b").await;
    a.join(ROOM).await;
    b.join(ROOM).await;
    let g = a.request(acquire("segment:9-1")).await;
    let lock_token = g["token"].as_u64().unwrap();
    let (session, resume) = (a.session_id(), a.resume_token());
    a.drop_connection();

    let seen = b.drain_for(Duration::from_millis(600)).await;
    assert!(
        seen.iter()
            .all(|v| v["type"] != "presence.leave" && v["type"] != "lock.released"),
        "no leave or release during the grace: {seen:?}"
    );
    // Resume with the other codec: the session is the same, the socket and codec are new.
    let mut a2 = Client::connect(server.addr, &token_a, Codec::MsgPack, Some(&resume)).await;
    assert_eq!(a2.welcome["resumed"], true);
    assert_eq!(a2.session_id(), session);
    assert_ne!(a2.resume_token(), resume, "resume tokens are single-use");
    let snap = a2.recv_type("room.snapshot").await;
    assert_eq!(
        snap["locks"][0]["token"],
        json!(lock_token),
        "the resumed session still holds its lock"
    );
    let seen = b.drain_for(Duration::from_millis(300)).await;
    assert!(
        seen.iter().all(|v| v["type"] != "presence.join"),
        "no join either: {seen:?}"
    );
    let r = a2
        .request(
            json!({"type":"lock.release","room":ROOM,"resource":"segment:9-1","token":lock_token}),
        )
        .await;
    assert_eq!(r["type"], "reply", "{r}");
    assert_eq!(b.recv_type("lock.released").await["reason"], "released");

    // A resume token works once.
    let again = Client::connect(server.addr, &token_a, Codec::Json, Some(&resume)).await;
    assert_eq!(again.welcome["resumed"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn someone_elses_resume_token_is_not_honoured() {
    let server = Server::start().await;
    let mut a = server.client("a").await;
    a.join(ROOM).await;
    let resume = a.resume_token();
    a.drop_connection();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let token_m = server.token("mallory", None).await;
    let m = Client::connect(server.addr, &token_m, Codec::Json, Some(&resume)).await;
    assert_eq!(m.welcome["resumed"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_grace_presence_leaves_and_locks_are_released_as_disconnected() {
    let server = Server::start_with(|c| c.resume_grace = Duration::from_millis(400)).await;
    let mut a = server.client("a").await;
    let mut b = server.client("b").await;
    a.join(ROOM).await;
    b.join(ROOM).await;
    a.request(acquire("segment:9-2")).await;
    b.request(json!({"type":"lock.acquire","room":ROOM,"resource":"segment:9-2","action":"approve","wait":true}))
        .await;
    a.drop_connection();
    let rel = b.recv_type("lock.released").await;
    assert_eq!(rel["reason"], "disconnected");
    let granted = b.recv_type("lock.granted").await;
    assert_eq!(granted["resource"], "segment:9-2", "the waiter is served");
    let left = b.recv_type("presence.leave").await;
    assert_eq!(left["member"]["user_id"], "a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_normal_close_leaves_at_once() {
    let server = Server::start_with(|c| c.resume_grace = Duration::from_secs(30)).await;
    let mut a = server.client("a").await;
    let mut b = server.client("b").await;
    a.join(ROOM).await;
    b.join(ROOM).await;
    a.close_normally().await;
    let left = b.recv_type("presence.leave").await;
    assert_eq!(left["member"]["user_id"], "a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_sends_reconnect_and_closes_with_1012() {
    let mut server = Server::start().await;
    let mut a = server.client("a").await;
    a.join(ROOM).await;
    let http = server.http.clone();
    let ready = server.url("/readyz");
    let drain = {
        let running = server.running.take().unwrap();
        tokio::spawn(async move { running.shutdown().await })
    };
    let r = a.recv_type("reconnect").await;
    assert_eq!(r["reason"], "draining");
    assert!(r["after_ms"].as_u64().unwrap() < 1000);
    assert_eq!(a.closed().await, Closed::Code(1012));
    tokio::time::timeout(Duration::from_secs(10), drain)
        .await
        .unwrap()
        .unwrap();
    assert!(
        http.get(ready).send().await.is_err(),
        "listener closed after drain"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_takes_over_a_socket_the_server_still_thinks_alive() {
    let server = Server::start().await;
    let token = server.token("a", None).await;
    let mut old = Client::connect(server.addr, &token, Codec::Json, None).await;
    old.join(ROOM).await;
    let g = old.request(acquire("segment:9-3")).await;
    // The old socket stays open (a silent network drop): the server has not noticed.
    let mut new =
        Client::connect(server.addr, &token, Codec::Json, Some(&old.resume_token())).await;
    assert_eq!(new.welcome["resumed"], true);
    assert_eq!(new.session_id(), old.session_id());
    let snap = new.recv_type("room.snapshot").await;
    assert_eq!(
        snap["locks"][0]["token"], g["token"],
        "the lock moved with the session"
    );
    assert_eq!(old.closed().await, Closed::Code(4011));
    let r = new.request(acquire("segment:9-3")).await;
    assert_eq!(
        r["token"], g["token"],
        "still the holder, not denied by its own ghost"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_session_counts_against_the_session_limit_and_can_resume() {
    let server = Server::start_with(|c| {
        c.max_sessions_per_user = 1;
        c.resume_grace = Duration::from_secs(10);
    })
    .await;
    let token = server.token("a", None).await;
    let mut first = Client::connect(server.addr, &token, Codec::Json, None).await;
    first.join(ROOM).await;
    let g = first.request(acquire("segment:9-4")).await;
    let resume = first.resume_token();
    first.drop_connection();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Parked, it still holds presence and a lock: it is one of the user's sessions.
    let (_ws, refused) = Client::open(server.addr, &token, Codec::Json, None).await;
    assert_eq!(
        refused.expect("an error frame first")["code"],
        "too_many_sessions"
    );
    let mut back = Client::connect(server.addr, &token, Codec::Json, Some(&resume)).await;
    assert_eq!(back.welcome["resumed"], true, "its own resume is admitted");
    let snap = back.recv_type("room.snapshot").await;
    assert_eq!(snap["locks"][0]["token"], g["token"]);
    let (_ws, third) = Client::open(server.addr, &token, Codec::Json, None).await;
    assert_eq!(
        third.expect("error frame")["code"],
        "too_many_sessions",
        "the limit still holds"
    );
    back.close_normally().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = Client::connect(server.addr, &token, Codec::Json, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_session_gives_up_its_waits() {
    let server = Server::start_with(|c| c.resume_grace = Duration::from_secs(10)).await;
    let mut holder = server.client("holder").await;
    let mut waiter = server.client("waiter").await;
    let mut next = server.client("next").await;
    for c in [&mut holder, &mut waiter, &mut next] {
        c.join(ROOM).await;
    }
    let g = holder.request(acquire("segment:9-5")).await;
    let w = json!({"type":"lock.acquire","room":ROOM,"resource":"segment:9-5","action":"trim","wait":true});
    assert_eq!(waiter.request(w.clone()).await["queue_position"], 1);
    assert_eq!(next.request(w).await["queue_position"], 2);
    waiter.drop_connection();
    tokio::time::sleep(Duration::from_millis(300)).await;
    holder
        .request(
            json!({"type":"lock.release","room":ROOM,"resource":"segment:9-5","token":g["token"]}),
        )
        .await;
    let granted = next.recv_type("lock.granted").await;
    assert_eq!(
        granted["resource"], "segment:9-5",
        "the parked waiter was skipped"
    );
}
