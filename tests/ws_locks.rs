//! Lock behaviour over real sockets: races, fencing, expiry, stale holders, FIFO hand-off.
mod common;

use std::time::Duration;

use common::{Client, Server};
use serde_json::{Value, json};

const ROOM: &str = "scene:7";

fn acquire(resource: &str, extra: Value) -> Value {
    let mut m = json!({"type":"lock.acquire","room":ROOM,"resource":resource,"action":"approve"});
    if let (Some(m), Some(e)) = (m.as_object_mut(), extra.as_object()) {
        m.extend(e.clone());
    }
    m
}

async fn joined(server: &Server, sub: &str) -> Client {
    let mut c = server.client(sub).await;
    c.join(ROOM).await;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_simultaneous_acquires_have_exactly_one_winner() {
    let server = Server::start().await;
    let mut clients = Vec::new();
    for i in 0..20 {
        clients.push(joined(&server, &format!("racer{i}")).await);
    }
    let answers = futures_util::future::join_all(
        clients
            .iter_mut()
            .map(|c| async move { c.request(acquire("segment:7-1", json!({}))).await }),
    )
    .await;
    let winners: Vec<_> = answers.iter().filter(|a| a["type"] == "reply").collect();
    assert_eq!(winners.len(), 1, "{answers:#?}");
    let winner_session = clients
        .iter()
        .zip(&answers)
        .find(|(_, a)| a["type"] == "reply")
        .map(|(c, _)| c.session_id())
        .unwrap();
    for a in answers.iter().filter(|a| a["type"] != "reply") {
        assert_eq!(a["code"], "lock_held", "{a}");
        assert_eq!(
            a["holder"]["session_id"],
            json!(winner_session),
            "every loser names the same winner"
        );
        assert!(a["estimated_wait_ms"].as_u64().is_some());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_increase_across_expiry_and_stale_holders_are_refused() {
    let server = Server::start().await;
    let mut a = joined(&server, "a").await;
    let mut b = joined(&server, "b").await;
    let first = a
        .request(acquire("segment:7-2", json!({"ttl_ms": 300})))
        .await;
    let t1 = first["token"].as_u64().expect("granted");
    let expired = b
        .recv_where(|v| v["type"] == "lock.released" && v["resource"] == "segment:7-2")
        .await;
    assert_eq!(expired["reason"], "expired");
    let second = b.request(acquire("segment:7-2", json!({}))).await;
    let t2 = second["token"].as_u64().expect("granted after expiry");
    assert!(t2 > t1, "fencing tokens strictly increase: {t1} then {t2}");

    let stale_release = a
        .request(json!({"type":"lock.release","room":ROOM,"resource":"segment:7-2","token":t1}))
        .await;
    assert_eq!(stale_release["code"], "lock_not_held", "{stale_release}");
    let stale_extend = a
        .request(json!({"type":"lock.extend","room":ROOM,"resource":"segment:7-2","token":t1,"ttl_ms":60000}))
        .await;
    assert_eq!(stale_extend["code"], "lock_not_held", "{stale_extend}");
    // Without `room`, a session holding nothing on the resource is asked for it.
    let no_room = a
        .request(json!({"type":"lock.release","resource":"segment:7-2","token":t1}))
        .await;
    assert_eq!(no_room["code"], "bad_request", "{no_room}");
    assert!(
        no_room["message"]
            .as_str()
            .unwrap_or("")
            .contains("room is required"),
        "{no_room}"
    );
    // Even with the live token, another session cannot release the lock.
    let theft = a
        .request(json!({"type":"lock.release","room":ROOM,"resource":"segment:7-2","token":t2}))
        .await;
    assert_eq!(theft["code"], "forbidden", "{theft}");

    let r = b
        .request(json!({"type":"lock.release","resource":"segment:7-2","token":t2}))
        .await;
    assert_eq!(r["type"], "reply");
    let third = a.request(acquire("segment:7-2", json!({}))).await;
    assert!(third["token"].as_u64().unwrap() > t2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_acquire_returns_the_same_grant_and_extend_moves_expiry() {
    let server = Server::start().await;
    let mut a = joined(&server, "a").await;
    let mut b = joined(&server, "b").await;
    let g1 = a
        .request(acquire("segment:7-3", json!({"ttl_ms": 10_000})))
        .await;
    let g2 = a
        .request(acquire("segment:7-3", json!({"ttl_ms": 10_000})))
        .await;
    assert_eq!(g1["token"], g2["token"], "a retry is not a second grant");
    let token = g1["token"].as_u64().unwrap();
    let ext = a
        .request(
            json!({"type":"lock.extend","resource":"segment:7-3","token":token,"ttl_ms":60_000}),
        )
        .await;
    assert_eq!(ext["type"], "reply", "{ext}");
    assert!(ext["expires_at"].as_u64() > g1["expires_at"].as_u64());
    let seen = b
        .recv_where(|v| v["type"] == "lock.acquired" && v["expires_at"] == ext["expires_at"])
        .await;
    assert_eq!(seen["holder"]["user_id"], "a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_are_served_first_come_first_served() {
    let server = Server::start().await;
    let mut holder = joined(&server, "holder").await;
    let mut w: Vec<Client> = Vec::new();
    for name in ["w1", "w2", "w3"] {
        w.push(joined(&server, name).await);
    }
    let g = holder.request(acquire("segment:7-4", json!({}))).await;
    let mut token = g["token"].as_u64().unwrap();
    let mut ids = Vec::new();
    for (i, c) in w.iter_mut().enumerate() {
        let r = c
            .request(acquire(
                "segment:7-4",
                json!({"wait": true, "wait_timeout_ms": 30_000}),
            ))
            .await;
        assert_eq!(r["code"], "lock_held");
        assert_eq!(r["queue_position"], json!(i + 1), "{r}");
        ids.push(r["id"].clone());
    }
    // w2 gives up; the queue is then w1, w3.
    let c = w[1]
        .request(json!({"type":"lock.cancel_wait","resource":"segment:7-4"}))
        .await;
    assert_eq!(c["type"], "reply", "{c}");

    let r = holder
        .request(json!({"type":"lock.release","resource":"segment:7-4","token":token}))
        .await;
    assert_eq!(r["type"], "reply");
    let granted = w[0].recv_type("lock.granted").await;
    assert_eq!(
        granted["id"], ids[0],
        "the grant answers the waiter's request id"
    );
    let t1 = granted["token"].as_u64().unwrap();
    assert!(t1 > token);
    token = t1;
    let acquired = w[2]
        .recv_where(|v| v["type"] == "lock.acquired" && v["holder"]["user_id"] == "w1")
        .await;
    assert_eq!(acquired["resource"], "segment:7-4");

    let r = w[0]
        .request(json!({"type":"lock.release","resource":"segment:7-4","token":token}))
        .await;
    assert_eq!(r["type"], "reply");
    let granted = w[2].recv_type("lock.granted").await;
    assert_eq!(granted["id"], ids[2]);
    assert!(granted["token"].as_u64().unwrap() > token);
    let quiet = w[1].drain_for(Duration::from_millis(300)).await;
    assert!(
        quiet.iter().all(|v| v["type"] != "lock.granted"),
        "cancelled waiter is skipped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_times_out_with_its_request_id() {
    let server = Server::start().await;
    let mut a = joined(&server, "a").await;
    let mut b = joined(&server, "b").await;
    a.request(acquire("segment:7-5", json!({}))).await;
    let r = b
        .request(acquire(
            "segment:7-5",
            json!({"wait": true, "wait_timeout_ms": 300}),
        ))
        .await;
    assert_eq!(r["queue_position"], 1);
    let timeout = b
        .recv_where(|v| v["type"] == "error" && v["code"] == "wait_timeout")
        .await;
    assert_eq!(timeout["id"], r["id"]);
    assert_eq!(timeout["resource"], "segment:7-5");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaving_the_room_releases_its_locks() {
    let server = Server::start().await;
    let mut a = joined(&server, "a").await;
    let mut b = joined(&server, "b").await;
    a.request(acquire("segment:7-6", json!({}))).await;
    a.send(json!({"type":"leave","room":ROOM,"id":99})).await;
    let own = a
        .recv_where(|v| v["type"] == "lock.released" || v["type"] == "reply")
        .await;
    assert_eq!(
        own["type"], "lock.released",
        "the leaver sees its own lock go first: {own}"
    );
    assert_eq!(a.recv_type("reply").await["id"], 99);
    let rel = b.recv_type("lock.released").await;
    assert_eq!(
        (rel["resource"].as_str(), rel["reason"].as_str()),
        (Some("segment:7-6"), Some("released"))
    );
    let left = b.recv_type("presence.leave").await;
    assert_eq!(left["member"]["user_id"], "a");
    let g = b.request(acquire("segment:7-6", json!({}))).await;
    assert_eq!(g["type"], "reply");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_lists_locks_with_the_token_only_for_the_holder() {
    let server = Server::start().await;
    let mut a = joined(&server, "a").await;
    let g = a.request(acquire("segment:7-7", json!({}))).await;
    let mut b = server.client("b").await;
    b.send(json!({"type":"join","room":ROOM})).await;
    let snap = b.recv_type("room.snapshot").await;
    let lock = &snap["locks"][0];
    assert_eq!(lock["resource"], "segment:7-7");
    assert_eq!(lock["holder"]["user_id"], "a");
    assert!(lock.get("token").is_none());
    a.send(json!({"type":"join","room":ROOM})).await;
    let own = a.recv_type("room.snapshot").await;
    assert_eq!(own["locks"][0]["token"], g["token"]);
}

/// One session's held locks plus queued waits are capped: past the cap an acquire is refused
/// with `too_many_locks` and nothing is granted or queued; retrying a lock it holds or waits
/// for is not a new one; releasing frees budget; another session has its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_and_waits_per_session_are_capped() {
    let server = Server::start_with(|c| c.max_locks_per_session = 3).await;
    let mut alice = joined(&server, "alice").await;
    let mut bob = joined(&server, "bob").await;
    let b = bob.request(acquire("segment:9-9", json!({}))).await;
    assert_eq!(b["type"], "reply", "{b}");

    let t1 = alice.request(acquire("segment:9-1", json!({}))).await["token"]
        .as_u64()
        .unwrap();
    alice.request(acquire("segment:9-2", json!({}))).await;
    // A wait counts too.
    let w = alice
        .request(acquire(
            "segment:9-9",
            json!({"wait": true, "wait_timeout_ms": 30_000}),
        ))
        .await;
    assert_eq!(w["code"], "lock_held", "{w}");
    let e = alice
        .expect_error(acquire("segment:9-3", json!({})), "too_many_locks")
        .await;
    assert!(e["id"].is_u64(), "{e}");
    // Nothing was granted: bob can take it.
    let g = bob.request(acquire("segment:9-3", json!({}))).await;
    assert_eq!(
        g["type"], "reply",
        "refused acquire left no lock behind: {g}"
    );
    // Retrying a held lock is not a new lock.
    let again = alice.request(acquire("segment:9-1", json!({}))).await;
    assert_eq!(again["token"].as_u64(), Some(t1), "{again}");

    let r = alice
        .request(json!({"type":"lock.release","resource":"segment:9-1","token":t1}))
        .await;
    assert_eq!(r["type"], "reply", "{r}");
    let ok = alice.request(acquire("segment:9-4", json!({}))).await;
    assert_eq!(ok["type"], "reply", "released budget is reusable: {ok}");
    alice
        .expect_error(acquire("segment:9-5", json!({})), "too_many_locks")
        .await;
    // Cancelling the wait frees its slot.
    let c = alice
        .request(json!({"type":"lock.cancel_wait","resource":"segment:9-9"}))
        .await;
    assert_eq!(c["type"], "reply", "{c}");
    let ok = alice.request(acquire("segment:9-5", json!({}))).await;
    assert_eq!(ok["type"], "reply", "{ok}");
    // Another session of the same user has its own budget.
    let mut alice2 = joined(&server, "alice").await;
    let ok = alice2.request(acquire("segment:9-6", json!({}))).await;
    assert_eq!(ok["type"], "reply", "{ok}");
}

/// The attack of the issue: an editor of `scene:1` who is only a viewer of `scene:42` locks
/// `segment:42-7` naming `room: "scene:1"`. Locks are identified by (room, resource), so that
/// lock is a lock *in scene:1* only: scene 42's editor still locks the segment in scene:42,
/// scene 42's snapshot shows scene 42's lock (and only it) to its owner, the owner can
/// force-release it, and the attacker can neither block, see, release nor extend it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_editor_of_another_room_can_neither_hold_nor_block_a_rooms_resource() {
    let server = Server::start().await;
    let connect = |sub: &'static str, rooms: Value| {
        let server = &server;
        async move {
            let token = server.token(sub, Some(rooms)).await;
            Client::connect(server.addr, &token, common::Codec::Json, None).await
        }
    };
    let mut attacker = connect(
        "mallory",
        json!({"scene:1": "editor", "scene:42": "viewer"}),
    )
    .await;
    let mut editor = connect("erin", json!({"scene:42": "editor"})).await;
    let mut owner = connect("olga", json!({"scene:42": "owner"})).await;
    attacker.join("scene:1").await;
    attacker.join("scene:42").await;
    editor.join("scene:42").await;

    // The attack: lock scene 42's segment by naming scene:1.
    let lock = json!({"type":"lock.acquire","room":"scene:1","resource":"segment:42-7","action":"approve"});
    let stolen = attacker.request(lock).await;
    assert_eq!(stolen["type"], "reply", "a lock in scene:1: {stolen}");
    assert_eq!(stolen["room"], "scene:1");
    // Naming scene:42 itself is refused (viewer).
    let direct = json!({"type":"lock.acquire","room":"scene:42","resource":"segment:42-7","action":"approve"});
    let refused = attacker.request(direct.clone()).await;
    assert_eq!(refused["code"], "forbidden", "{refused}");

    // Scene 42's editor is not blocked.
    let mine = editor.request(direct).await;
    assert_eq!(
        mine["type"], "reply",
        "not blocked by the lock in scene:1: {mine}"
    );
    let token = mine["token"].as_u64().expect("token");

    // The owner's snapshot of scene:42 shows scene 42's lock, held by erin, and nothing else.
    owner.send(json!({"type":"join","room":"scene:42"})).await;
    let snap = owner.recv_type("room.snapshot").await;
    let locks = snap["locks"].as_array().expect("locks");
    assert_eq!(locks.len(), 1, "{snap}");
    assert_eq!(locks[0]["resource"], "segment:42-7");
    assert_eq!(locks[0]["holder"]["user_id"], "erin");

    // The attacker cannot end or extend scene 42's lock, even with its token.
    let forced = attacker
        .request(
            json!({"type":"lock.release","room":"scene:42","resource":"segment:42-7","force":true}),
        )
        .await;
    assert_eq!(forced["code"], "forbidden", "{forced}");
    let theft = attacker
        .request(json!({"type":"lock.release","room":"scene:42","resource":"segment:42-7","token":token}))
        .await;
    assert_eq!(theft["code"], "forbidden", "{theft}");
    // Without `room` the attacker's own lock (scene:1) is the one meant: the token is stale there.
    let wrong = attacker
        .request(
            json!({"type":"lock.extend","resource":"segment:42-7","token":token,"ttl_ms":60_000}),
        )
        .await;
    assert_eq!(wrong["code"], "lock_not_held", "{wrong}");

    // The owner force-releases it; scene 42 hears `forced`; the attacker's lock stays in scene:1.
    let r = owner
        .request(
            json!({"type":"lock.release","room":"scene:42","resource":"segment:42-7","force":true}),
        )
        .await;
    assert_eq!(r["type"], "reply", "{r}");
    assert_eq!(r["room"], "scene:42");
    let released = editor
        .recv_where(|v| v["type"] == "lock.released" && v["resource"] == "segment:42-7")
        .await;
    assert_eq!(
        (released["room"].as_str(), released["reason"].as_str()),
        (Some("scene:42"), Some("forced"))
    );
    let r = attacker
        .request(json!({"type":"lock.release","resource":"segment:42-7","token":stolen["token"]}))
        .await;
    assert_eq!(
        r["type"], "reply",
        "its own lock, resolved without room: {r}"
    );
    assert_eq!(r["room"], "scene:1");
}

/// A session holding the same resource in two rooms must say which one; `lock.extend` is
/// refused to a holder whose role in the lock's room is below editor now; releasing stays allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_is_required_when_ambiguous_and_extend_needs_an_editor() {
    let server = Server::start().await;
    let mut a = server.client("a").await;
    a.join("scene:1").await;
    a.join("scene:2").await;
    let acq = |room: &str| json!({"type":"lock.acquire","room":room,"resource":"segment:5","action":"trim"});
    let t1 = a.request(acq("scene:1")).await["token"]
        .as_u64()
        .expect("t1");
    let t2 = a.request(acq("scene:2")).await["token"]
        .as_u64()
        .expect("t2");
    let e = a
        .request(json!({"type":"lock.release","resource":"segment:5","token":t1}))
        .await;
    assert_eq!(e["code"], "bad_request", "{e}");
    assert!(
        e["message"]
            .as_str()
            .unwrap_or("")
            .contains("room is required"),
        "{e}"
    );
    let r = a
        .request(json!({"type":"lock.release","room":"scene:1","resource":"segment:5","token":t1}))
        .await;
    assert_eq!(r["type"], "reply", "{r}");
    // Now unambiguous.
    let r = a
        .request(json!({"type":"lock.release","resource":"segment:5","token":t2}))
        .await;
    assert_eq!(
        (r["type"].as_str(), r["room"].as_str()),
        (Some("reply"), Some("scene:2")),
        "{r}"
    );

    // The holder's role is checked again at extend: the same user, holding a lock granted
    // while an editor of scene:3, presents a token that now says viewer. Extending is
    // refused; releasing its own lock stays allowed.
    let editor = server.token("v", Some(json!({"scene:3": "editor"}))).await;
    let viewer = server.token("v", Some(json!({"scene:3": "viewer"}))).await;
    let http = reqwest::Client::new();
    let post = |path: &str, bearer: &str, body: Value| {
        http.post(server.url(path))
            .bearer_auth(bearer.to_owned())
            .json(&body)
            .send()
    };
    let g: Value = post(
        "/v1/locks/acquire",
        &editor,
        json!({"room":"scene:3","resource":"segment:6","action":"trim"}),
    )
    .await
    .expect("acquire")
    .json()
    .await
    .expect("json");
    let token = g["token"].as_u64().expect("token");
    let ext = post(
        "/v1/locks/extend",
        &viewer,
        json!({"room":"scene:3","resource":"segment:6","token":token,"ttl_ms":60_000}),
    )
    .await
    .expect("extend");
    assert_eq!(ext.status().as_u16(), 403);
    let rel = post(
        "/v1/locks/release",
        &viewer,
        json!({"room":"scene:3","resource":"segment:6","token":token}),
    )
    .await
    .expect("release");
    assert_eq!(rel.status().as_u16(), 200);
}
