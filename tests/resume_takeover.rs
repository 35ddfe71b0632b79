//! Cross-node takeover on resume (issue 12, item 2): a resume that reaches any node moves the
//! session there at once, whatever the old node thinks of its old socket. Real gateway
//! processes sharing one private Redis, driven by real WebSocket clients.
mod common;

use std::time::Duration;

use common::cluster::{Gateway, token};
use common::redis::RedisServer;
use common::{Client, Closed, Codec, metric_sum};
use serde_json::{Value, json};

const ROOM: &str = "scene:12";

fn acquire(resource: &str) -> Value {
    json!({"type":"lock.acquire","room":ROOM,"resource":resource,"action":"approve"})
}

/// A client of `sub` on `g` that joined [`ROOM`] and holds a lock on `resource`; returns the
/// client, its JWT and the lock's token.
async fn holder(g: &Gateway, sub: &str, resource: &str) -> (Client, String, u64) {
    let tok = token(sub, None);
    let mut c = Client::connect(g.addr(), &tok, Codec::Json, None).await;
    c.join(ROOM).await;
    let r = c.request(acquire(resource)).await;
    let t = r["token"]
        .as_u64()
        .unwrap_or_else(|| panic!("granted: {r}"));
    (c, tok, t)
}

async fn watcher(g: &Gateway, sub: &str) -> Client {
    let mut c = Client::connect(g.addr(), &token(sub, None), Codec::Json, None).await;
    c.join(ROOM).await;
    c
}

/// The events of `seen` that would show a session leaving or a lock going away.
fn flaps(seen: &[Value]) -> Vec<&Value> {
    seen.iter()
        .filter(|v| {
            v["type"] == "presence.leave"
                || v["type"] == "presence.join"
                || v["type"] == "lock.released"
        })
        .collect()
}

/// The laptop case: alice's old socket on node 1 goes silent (never read or written again,
/// never closed), and she resumes on node 2. The session moves at once: same id, same lock
/// token (extend and release work from node 2), the old socket is closed with 4011, and bob
/// sees nobody leave or join and no lock released until alice releases it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_on_another_node_takes_over_a_silent_socket() {
    let redis = RedisServer::start();
    let a = Gateway::start(&redis.url(), "node-1", &[]).await;
    let b = Gateway::start(&redis.url(), "node-2", &[]).await;
    let (mut old, tok, t) = holder(&a, "alice", "segment:12-1").await;
    // Bob's join answered after his snapshot, which showed alice's lock.
    let mut bob = watcher(&b, "bob").await;

    let started = std::time::Instant::now();
    let mut moved = Client::connect(b.addr(), &tok, Codec::Json, Some(&old.resume_token())).await;
    assert_eq!(moved.welcome["resumed"], true, "{}", moved.welcome);
    assert_eq!(moved.session_id(), old.session_id());
    assert_eq!(moved.welcome["node_id"], "node-2");
    eprintln!("cross-node takeover: welcome after {:?}", started.elapsed());
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the takeover is bounded by its wait: {:?}",
        started.elapsed()
    );
    let snap = moved.recv_type("room.snapshot").await;
    assert_eq!(snap["locks"][0]["token"], json!(t), "{snap}");
    assert_eq!(
        snap["locks"][0]["holder"]["session_id"],
        json!(old.session_id())
    );
    assert_eq!(old.closed().await, Closed::Code(4011));

    // Still the holder, from the new node, with the old token.
    let r = moved
        .request(json!({"type":"lock.extend","room":ROOM,"resource":"segment:12-1","token":t,"ttl_ms":60000}))
        .await;
    assert_eq!(r["type"], "reply", "extend with the old token: {r}");
    let before_release = bob.drain_for(Duration::from_millis(1500)).await;
    assert!(
        flaps(&before_release).is_empty(),
        "bob saw the move: {before_release:?}"
    );
    let r = moved
        .request(json!({"type":"lock.release","room":ROOM,"resource":"segment:12-1","token":t}))
        .await;
    assert_eq!(r["type"], "reply", "release with the old token: {r}");
    let released = bob.recv_type("lock.released").await;
    assert_eq!(released["reason"], "released", "{released}");
    let after = bob.drain_for(Duration::from_millis(500)).await;
    assert!(
        after
            .iter()
            .all(|v| v["type"] != "presence.leave" && v["type"] != "presence.join"),
        "{after:?}"
    );
    // Operators see the move on the node that took the session over.
    let text = b.metrics().await;
    let takeovers = |outcome| {
        metric_sum(
            &text,
            "lockstep_session_takeovers_total",
            &[("outcome", outcome)],
        )
    };
    assert_eq!(takeovers("remote"), Some(1.0), "{text}");
    assert_eq!(takeovers("not_found"), Some(0.0));
}

/// A drain where every client reconnects the moment `reconnect` arrives (`after_ms` taken as
/// 0), before the draining node has parked its session: every resume on the other node is
/// `resumed: true` with its lock, and an observer sees no leave and no lock released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_with_immediate_reconnects_resumes_every_session() {
    const CLIENTS: usize = 20;
    const ROOMS_EACH: usize = 8;
    let redis = RedisServer::start();
    let mut a = Gateway::start(&redis.url(), "node-1", &[]).await;
    let b = Gateway::start(&redis.url(), "node-2", &[]).await;
    let mut observer = watcher(&b, "observer").await;
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let (mut c, tok, t) = holder(&a, &format!("user{i}"), &format!("segment:12-d{i}")).await;
        // Rooms of its own too, as users spread over rooms do: parking then has room
        // subscriptions to drop on the draining node (one at a time there), so the last parks
        // come well after their `reconnect` went out: the race a resume must win.
        for r in 0..ROOMS_EACH {
            c.join(&format!("scene:12{i}x{r}")).await;
        }
        clients.push((c, tok, t));
    }
    // The observer has seen every client join and lock before the drain starts.
    let mut locked = 0;
    while locked < CLIENTS {
        observer.recv_type("lock.acquired").await;
        locked += 1;
    }
    let addr = b.addr();
    let moves: Vec<_> = clients
        .into_iter()
        .map(|(mut c, tok, t)| {
            tokio::spawn(async move {
                let (session, resume) = (c.session_id(), c.resume_token());
                c.recv_type("reconnect").await;
                // At once, not after `after_ms`, and before the old socket is closed.
                let mut moved = Client::connect(addr, &tok, Codec::Json, Some(&resume)).await;
                let resumed = moved.welcome["resumed"] == true && moved.session_id() == session;
                if !resumed {
                    return (false, false, moved);
                }
                let snap = moved.recv_type("room.snapshot").await;
                let kept = snap["locks"]
                    .as_array()
                    .is_some_and(|ls| ls.iter().any(|l| l["token"] == json!(t)));
                (resumed, kept, moved)
            })
        })
        .collect();
    let terminate = tokio::spawn(async move {
        let exited = a.terminate(Duration::from_secs(15)).await;
        (a, exited)
    });
    let mut keep = Vec::new();
    let (mut not_resumed, mut lost) = (Vec::new(), Vec::new());
    for (i, m) in moves.into_iter().enumerate() {
        let (resumed, kept, moved) = m.await.expect("move task");
        if !resumed {
            not_resumed.push(i);
        } else if !kept {
            lost.push(i);
        }
        keep.push(moved);
    }
    assert!(
        not_resumed.is_empty() && lost.is_empty(),
        "of {CLIENTS} clients, not resumed: {not_resumed:?}; resumed without their lock: {lost:?}"
    );
    let (_a, exited) = terminate.await.expect("terminate task");
    assert!(exited, "the drained node exited");
    let seen = observer.drain_for(Duration::from_millis(2000)).await;
    assert!(
        flaps(&seen).is_empty(),
        "the observer saw the move: {:?}",
        flaps(&seen)
    );
}

/// Two resumes of one token at once, on two other nodes: exactly one gets the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_racing_resumes_of_one_token_give_exactly_one_session() {
    let redis = RedisServer::start();
    let a = Gateway::start(&redis.url(), "node-1", &[]).await;
    let b = Gateway::start(&redis.url(), "node-2", &[]).await;
    let c = Gateway::start(&redis.url(), "node-3", &[]).await;
    let (mut old, tok, t) = holder(&a, "alice", "segment:12-r").await;
    let resume = old.resume_token();
    let session = old.session_id();
    let race = |addr: std::net::SocketAddr| {
        let (tok, resume) = (tok.clone(), resume.clone());
        tokio::spawn(async move { Client::connect(addr, &tok, Codec::Json, Some(&resume)).await })
    };
    let (x, y) = (race(b.addr()), race(c.addr()));
    let mut results = [x.await.unwrap(), y.await.unwrap()];
    let winners: Vec<usize> = (0..2)
        .filter(|&i| results[i].welcome["resumed"] == true)
        .collect();
    assert_eq!(
        winners.len(),
        1,
        "exactly one resume wins: {} / {}",
        results[0].welcome,
        results[1].welcome
    );
    let w = winners[0];
    assert_eq!(results[w].session_id(), session);
    assert_ne!(
        results[1 - w].session_id(),
        session,
        "the loser got a new session"
    );
    assert_eq!(old.closed().await, Closed::Code(4011));
    let snap = results[w].recv_type("room.snapshot").await;
    assert_eq!(snap["locks"][0]["token"], json!(t), "{snap}");
    // The loser's new session does not hold alice's lock; the winner does.
    let loser = &mut results[1 - w];
    loser.join(ROOM).await;
    let r = loser
        .request(json!({"type":"lock.release","room":ROOM,"resource":"segment:12-r","token":t}))
        .await;
    assert_eq!(r["type"], "error", "{r}");
    let r = results[w]
        .request(json!({"type":"lock.release","room":ROOM,"resource":"segment:12-r","token":t}))
        .await;
    assert_eq!(r["type"], "reply", "{r}");
}

/// Another user's connection with alice's resume token, and a bogus token, kick nobody:
/// alice's socket stays open and she keeps her lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_users_or_bogus_resume_token_kicks_nobody() {
    let redis = RedisServer::start();
    let a = Gateway::start(&redis.url(), "node-1", &[]).await;
    let b = Gateway::start(&redis.url(), "node-2", &[]).await;
    let (mut alice, tok, t) = holder(&a, "alice", "segment:12-w").await;
    let resume = alice.resume_token();

    // Mallory has a session of her own, so her resume does ask the cluster (a user with no
    // session anywhere is answered at once): node 1 must refuse to give alice's up.
    let mtok = token("mallory", None);
    let _mallory_tab = Client::connect(a.addr(), &mtok, Codec::Json, None).await;
    let mallory = Client::connect(b.addr(), &mtok, Codec::Json, Some(&resume)).await;
    assert_eq!(mallory.welcome["resumed"], false, "{}", mallory.welcome);
    assert_ne!(mallory.session_id(), alice.session_id());
    let bogus = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    let nobody = token("nobody", None);
    for (g, who) in [(&a, &tok), (&b, &tok), (&b, &nobody)] {
        let c = Client::connect(g.addr(), who, Codec::Json, Some(bogus)).await;
        assert_eq!(c.welcome["resumed"], false);
        assert_ne!(c.session_id(), alice.session_id());
    }
    // Alice is untouched: her socket answers and her lock is hers.
    let seen = alice.drain_for(Duration::from_millis(1000)).await;
    assert!(seen.iter().all(|v| v["type"] != "reconnect"), "{seen:?}");
    alice.ping().await;
    let r = alice
        .request(json!({"type":"lock.extend","room":ROOM,"resource":"segment:12-w","token":t,"ttl_ms":60000}))
        .await;
    assert_eq!(r["type"], "reply", "{r}");
    // And her own token still resumes (the failed attempts did not consume it).
    let moved = Client::connect(b.addr(), &tok, Codec::Json, Some(&resume)).await;
    assert_eq!(moved.welcome["resumed"], true, "{}", moved.welcome);
    assert_eq!(alice.closed().await, Closed::Code(4011));
}

/// A hand-off during the move is not lost: alice (node 1) waits for carol's lock, her socket
/// goes silent, carol releases, so the `lock.granted` goes to the silent socket only. Alice
/// resumes on node 2: her snapshot lists the lock as hers with its token, and she can release
/// it with that token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_sent_to_the_silent_socket_comes_back_in_the_snapshot() {
    let redis = RedisServer::start();
    let a = Gateway::start(&redis.url(), "node-1", &[]).await;
    let b = Gateway::start(&redis.url(), "node-2", &[]).await;
    let (mut carol, _, t) = holder(&b, "carol", "segment:12-g").await;
    let tok = token("alice", None);
    let mut old = Client::connect(a.addr(), &tok, Codec::Json, None).await;
    old.join(ROOM).await;
    let mut wait = acquire("segment:12-g");
    wait["wait"] = json!(true);
    let denied = old.request(wait).await;
    assert_eq!(denied["queue_position"], 1, "{denied}");
    // From here on alice's old socket is never read again. Carol's release hands the lock
    // to alice (the hand-off may be announced before the release's reply: read both).
    carol
        .send(json!({"type":"lock.release","room":ROOM,"resource":"segment:12-g","token":t}))
        .await;
    let acquired = carol
        .recv_where(|v| v["type"] == "lock.acquired" && v["holder"]["user_id"] == "alice")
        .await;
    assert_eq!(acquired["resource"], "segment:12-g");

    let mut moved = Client::connect(b.addr(), &tok, Codec::Json, Some(&old.resume_token())).await;
    assert_eq!(moved.welcome["resumed"], true, "{}", moved.welcome);
    let snap = moved.recv_type("room.snapshot").await;
    let lock = snap["locks"]
        .as_array()
        .and_then(|ls| ls.iter().find(|l| l["resource"] == "segment:12-g"))
        .cloned()
        .unwrap_or_else(|| panic!("the granted lock is in the snapshot: {snap}"));
    assert_eq!(lock["holder"]["session_id"], json!(old.session_id()));
    let granted = lock["token"]
        .as_u64()
        .unwrap_or_else(|| panic!("own lock with its token: {lock}"));
    assert!(granted > t);
    let r = moved
        .request(
            json!({"type":"lock.release","room":ROOM,"resource":"segment:12-g","token":granted}),
        )
        .await;
    assert_eq!(r["type"], "reply", "{r}");
    assert_eq!(old.closed().await, Closed::Code(4011));
}

/// A silent TCP path whose window is shut: the old node's socket task is stuck in a write (it
/// would be for `heartbeat_interval × heartbeat_misses`). The takeover still stops it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_stops_a_socket_stuck_in_a_write() {
    let redis = RedisServer::start();
    // Large frames and an outbound budget nothing reaches, so the old session is neither
    // refused nor closed as a slow consumer: its writes just stop completing.
    let big = [
        ("LOCKSTEP_MAX_FRAME_BYTES", "1048576"),
        ("LOCKSTEP_MAX_BROADCAST_BYTES", "400000"),
        ("LOCKSTEP_MAX_QUEUE_BYTES", "268435456"),
        ("LOCKSTEP_MESSAGES_PER_SECOND", "10000"),
        ("LOCKSTEP_MESSAGE_BURST", "10000"),
    ];
    let a = Gateway::start(&redis.url(), "node-1", &big).await;
    let b = Gateway::start(&redis.url(), "node-2", &big).await;
    let (old, tok, t) = holder(&a, "alice", "segment:12-s").await;
    let mut bob = watcher(&b, "bob").await;
    // Alice's old socket is never read again: fill its window from node 2 until node 1 has
    // bytes queued for it that it cannot write.
    let blob = "x".repeat(300_000);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        for _ in 0..10 {
            bob.send(json!({"type":"broadcast","room":ROOM,"event":"blob","data":blob}))
                .await;
        }
        bob.ping().await;
        let metrics = a.metrics().await;
        let queued = common::metric_sum(&metrics, "lockstep_outbound_queue_bytes", &[]);
        if queued.is_some_and(|q| q > 1_000_000.0) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "node 1 never got stuck writing (queued: {queued:?})"
        );
    }
    let mut moved = Client::connect(b.addr(), &tok, Codec::Json, Some(&old.resume_token())).await;
    assert_eq!(moved.welcome["resumed"], true, "{}", moved.welcome);
    assert_eq!(moved.session_id(), old.session_id());
    let snap = moved.recv_type("room.snapshot").await;
    assert_eq!(snap["locks"][0]["token"], json!(t), "{snap}");
    drop(old);
}
