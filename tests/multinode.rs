//! Several real gateway processes sharing one private Redis, driven by real WebSocket clients.
mod common;

use std::time::Duration;

use common::cluster::{Gateway, token};
use common::redis::RedisServer;
use common::{Client, Closed, Codec};
use serde_json::{Value, json};

const ROOM: &str = "scene:5";

async fn client(g: &Gateway, sub: &str) -> Client {
    let mut c = Client::connect(g.addr(), &token(sub, None), Codec::Json, None).await;
    c.join(ROOM).await;
    c
}

fn acquire(resource: &str, extra: Value) -> Value {
    let mut m = json!({"type":"lock.acquire","room":ROOM,"resource":resource,"action":"approve"});
    if let (Some(m), Some(e)) = (m.as_object_mut(), extra.as_object()) {
        m.extend(e.clone());
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_crosses_nodes() {
    let redis = RedisServer::start();
    let a = Gateway::start(&redis.url(), "node-a", &[]).await;
    let b = Gateway::start(&redis.url(), "node-b", &[]).await;
    let mut alice = client(&a, "alice").await;
    let mut bob = client(&b, "bob").await;
    assert_ne!(alice.welcome["node_id"], bob.welcome["node_id"]);

    let joined = alice.recv_type("presence.join").await;
    assert_eq!(joined["member"]["user_id"], "bob");
    bob.send(json!({"type":"presence","room":ROOM,"focus":"segment:5-1"}))
        .await;
    let upd = alice.recv_type("presence.update").await;
    assert_eq!(upd["member"]["focus"], "segment:5-1");
    bob.send(json!({"type":"cursor","room":ROOM,"x":0.25,"y":0.75}))
        .await;
    assert_eq!(alice.recv_type("cursor").await["user_id"], "bob");
    alice
        .send(json!({"type":"broadcast","room":ROOM,"event":"chat","data":{"text":"hi"}}))
        .await;
    assert_eq!(bob.recv_type("broadcast").await["data"]["text"], "hi");

    let g = alice.request(acquire("segment:5-1", json!({}))).await;
    let t = g["token"].as_u64().expect("granted");
    assert_eq!(
        bob.recv_type("lock.acquired").await["holder"]["user_id"],
        "alice"
    );
    let denied = bob
        .request(acquire("segment:5-1", json!({"wait": true})))
        .await;
    assert_eq!(denied["code"], "lock_held");
    assert_eq!(denied["holder"]["name"], "alice-name");
    assert_eq!(denied["queue_position"], 1);
    alice
        .request(json!({"type":"lock.release","room":ROOM,"resource":"segment:5-1","token":t}))
        .await;
    let granted = bob.recv_type("lock.granted").await;
    assert!(granted["token"].as_u64().unwrap() > t);
    assert_eq!(granted["id"], denied["id"]);

    // Presence is answered from any node.
    let http = reqwest::Client::new();
    let p: Value = http
        .get(b.url("/v1/presence/segment/5-1?room=scene:5"))
        .bearer_auth(token("carol", None))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<_> = p["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["user_id"].clone())
        .collect();
    assert_eq!(ids, [json!("bob")], "{p}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_rounds_of_twelve_clients_on_three_nodes_have_one_winner_each() {
    let redis = RedisServer::start();
    let nodes = [
        Gateway::start(&redis.url(), "n1", &[]).await,
        Gateway::start(&redis.url(), "n2", &[]).await,
        Gateway::start(&redis.url(), "n3", &[]).await,
    ];
    let mut clients = Vec::new();
    for i in 0..12 {
        clients.push(client(&nodes[i % 3], &format!("racer{i}")).await);
    }
    for round in 0..100 {
        let resource = format!("segment:5-r{round}");
        let answers = futures_util::future::join_all(clients.iter_mut().map(|c| {
            let r = resource.clone();
            async move { c.request(acquire(&r, json!({}))).await }
        }))
        .await;
        let winners: Vec<_> = answers
            .iter()
            .enumerate()
            .filter(|(_, a)| a["type"] == "reply")
            .collect();
        assert_eq!(winners.len(), 1, "round {round}: {answers:?}");
        let (wi, w) = winners[0];
        let winner_session = clients[wi].session_id();
        for a in answers.iter().filter(|a| a["type"] != "reply") {
            assert_eq!(a["code"], "lock_held", "round {round}: {a}");
            assert_eq!(
                a["holder"]["session_id"],
                json!(winner_session),
                "round {round}"
            );
        }
        let token = w["token"].clone();
        let r = clients[wi]
            .request(json!({"type":"lock.release","room":ROOM,"resource":resource,"token":token}))
            .await;
        assert_eq!(r["type"], "reply", "round {round}: {r}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_holders_node_frees_its_lock_for_a_waiter_elsewhere() {
    let redis = RedisServer::start();
    let mut a = Gateway::start(&redis.url(), "node-a", &[]).await;
    let b = Gateway::start(&redis.url(), "node-b", &[]).await;
    let mut holder = client(&a, "holder").await;
    let mut waiter = client(&b, "waiter").await;
    let g = holder.request(acquire("segment:5-k", json!({}))).await;
    let t = g["token"].as_u64().unwrap();
    let w = waiter
        .request(acquire(
            "segment:5-k",
            json!({"wait": true, "wait_timeout_ms": 30000}),
        ))
        .await;
    assert_eq!(w["queue_position"], 1);
    let killed = std::time::Instant::now();
    a.kill9();
    // The lease is 1 s in these tests: the lock lapses and the waiter is served.
    let rel = waiter
        .recv_where(|v| v["type"] == "lock.released" && v["resource"] == "segment:5-k")
        .await;
    assert_eq!(rel["reason"], "disconnected");
    let granted = waiter.recv_type("lock.granted").await;
    assert!(granted["token"].as_u64().unwrap() > t);
    assert!(
        killed.elapsed() < Duration::from_secs(5),
        "freed in {:?}",
        killed.elapsed()
    );
    drop(holder);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_holder_loses_its_lock_and_its_stale_token_is_refused() {
    let redis = RedisServer::start();
    let a = Gateway::start(&redis.url(), "node-a", &[]).await;
    let b = Gateway::start(&redis.url(), "node-b", &[]).await;
    let mut holder = client(&a, "holder").await;
    let mut other = client(&b, "other").await;
    let g = holder.request(acquire("segment:5-p", json!({}))).await;
    let t1 = g["token"].as_u64().unwrap();
    a.pause();
    // Paused past its lease (1 s): node B's reaper frees the lock and B's client takes it.
    let mut t2 = None;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let r = other.request(acquire("segment:5-p", json!({}))).await;
        if r["type"] == "reply" {
            t2 = r["token"].as_u64();
            break;
        }
    }
    a.resume();
    let t2 = t2.expect("the lock was freed while its holder's node was paused");
    assert!(t2 > t1);
    let stale = holder
        .request(json!({"type":"lock.release","room":ROOM,"resource":"segment:5-p","token":t1}))
        .await;
    assert_eq!(stale["code"], "lock_not_held", "{stale}");
    let stale = holder
        .request(json!({"type":"lock.extend","room":ROOM,"resource":"segment:5-p","token":t1,"ttl_ms":60000}))
        .await;
    assert_eq!(stale["code"], "lock_not_held", "{stale}");
    let http = reqwest::Client::new();
    let v: Value = http
        .post(b.url("/v1/locks/validate"))
        .bearer_auth(token("app", None))
        .json(&json!({"room":ROOM,"resource":"segment:5-p","token":t1}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["valid"], false, "{v}");
    assert_eq!(v["holder"]["user_id"], "other");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty_nodes_recover_and_clients_resync() {
    let mut redis = RedisServer::start();
    let a = Gateway::start(&redis.url(), "node-a", &[]).await;
    let b = Gateway::start(&redis.url(), "node-b", &[]).await;
    let mut alice = client(&a, "alice").await;
    let mut bob = client(&b, "bob").await;
    let g = alice.request(acquire("segment:5-x", json!({}))).await;
    let t1 = g["token"].as_u64().unwrap();
    redis.restart();
    // Each client is told the truth again: a snapshot after the reconnect.
    let snap = alice.recv_type("room.snapshot").await;
    assert_eq!(snap["room"], ROOM);
    bob.recv_type("room.snapshot").await;
    // Presence comes back (re-registered by each node) and new locks work, with larger tokens.
    let mut members = Vec::new();
    for _ in 0..50 {
        let p: Value = reqwest::Client::new()
            .get(a.url("/v1/presence/scene/5"))
            .bearer_auth(token("carol", None))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        members = p["members"].as_array().cloned().unwrap_or_default();
        if members.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(members.len(), 2, "{members:?}");
    let g = bob.request(acquire("segment:5-y", json!({}))).await;
    assert!(g["token"].as_u64().expect("locks work after the restart") > t1);
    let g = bob.request(acquire("segment:5-x", json!({}))).await;
    assert!(
        g["token"].as_u64().expect("the lost lock is free") > t1,
        "tokens never go back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_pubsub_connections_resync_and_events_flow_again() {
    let redis = RedisServer::start();
    let a = Gateway::start(&redis.url(), "node-a", &[]).await;
    let b = Gateway::start(&redis.url(), "node-b", &[]).await;
    let mut alice = client(&a, "alice").await;
    let mut bob = client(&b, "bob").await;
    alice.recv_type("presence.join").await;
    let killed = redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    assert_ne!(killed, "0", "there were subscriber connections to kill");
    alice.recv_type("room.snapshot").await;
    let mut got = None;
    for _ in 0..30 {
        bob.send(json!({"type":"cursor","room":ROOM,"x":0.5,"y":0.5}))
            .await;
        let seen = alice.drain_for(Duration::from_millis(200)).await;
        if let Some(c) = seen.into_iter().find(|v| v["type"] == "cursor") {
            got = Some(c);
            break;
        }
    }
    assert_eq!(got.expect("cursor events flow again")["user_id"], "bob");
    let metrics = a.metrics().await;
    let value = |name: &str| {
        metrics
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    assert!(
        value("lockstep_pubsub_reconnects_total") >= 1.0,
        "{metrics}"
    );
    assert!(value("lockstep_resyncs_total{") >= 1.0, "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_nodes_client_resumes_on_another_node_with_its_lock() {
    let redis = RedisServer::start();
    let mut a = Gateway::start(&redis.url(), "node-a", &[]).await;
    let b = Gateway::start(&redis.url(), "node-b", &[]).await;
    let tok = token("holder", None);
    let mut holder = Client::connect(a.addr(), &tok, Codec::Json, None).await;
    holder.join(ROOM).await;
    let mut watcher = client(&b, "watcher").await;
    let g = holder.request(acquire("segment:5-d", json!({}))).await;
    let (session, resume) = (holder.session_id(), holder.resume_token());
    let terminate = tokio::spawn(async move {
        let exited = a.terminate(Duration::from_secs(10)).await;
        (a, exited)
    });
    let r = holder.recv_type("reconnect").await;
    assert_eq!(r["reason"], "draining");
    assert_eq!(holder.closed().await, Closed::Code(1012));
    let mut moved = Client::connect(b.addr(), &tok, Codec::Json, Some(&resume)).await;
    assert_eq!(moved.welcome["resumed"], true);
    assert_eq!(moved.session_id(), session);
    let snap = moved.recv_type("room.snapshot").await;
    assert_eq!(
        snap["locks"][0]["token"], g["token"],
        "the lock moved with the session"
    );
    let (_a, exited) = terminate.await.unwrap();
    assert!(exited, "the drained node exited");
    let seen = watcher.drain_for(Duration::from_millis(1500)).await;
    assert!(
        seen.iter()
            .all(|v| v["type"] != "presence.leave" && v["type"] != "lock.released"),
        "no flapping: {seen:?}"
    );
    let r = moved
        .request(
            json!({"type":"lock.release","room":ROOM,"resource":"segment:5-d","token":g["token"]}),
        )
        .await;
    assert_eq!(r["type"], "reply", "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_deployment_works() {
    // With replicas: a Cluster URL makes every grant and hand-off wait for one replica
    // (LOCKSTEP_LOCK_REPLICAS=auto), which this exercises across nodes and shards.
    let cluster = common::redis::RedisCluster::start_with_replicas();
    // The longest replica timeout: six Redis processes and the other tests share two cores
    // here, and a replica's ack once took longer than the default 500 ms (the grant was then
    // withdrawn, correctly, and this test failed). What the timeout does is tested in
    // redis_failover.rs; this test is about a cluster working across nodes and shards.
    let slow_replicas = [("LOCKSTEP_LOCK_REPLICA_TIMEOUT", "4s")];
    let a = Gateway::start(&cluster.url(), "node-a", &slow_replicas).await;
    let b = Gateway::start(&cluster.url(), "node-b", &slow_replicas).await;
    let mut alice = client(&a, "alice").await;
    let mut bob = client(&b, "bob").await;
    assert_eq!(
        alice.recv_type("presence.join").await["member"]["user_id"],
        "bob"
    );
    // Resources spread over shards, hence over the cluster's masters.
    for i in 0..8 {
        let resource = format!("segment:5-c{i}");
        let g = alice.request(acquire(&resource, json!({}))).await;
        let t = g["token"].as_u64().unwrap_or_else(|| panic!("{g}"));
        let w = bob.request(acquire(&resource, json!({"wait": true}))).await;
        assert_eq!(w["queue_position"], 1, "{w}");
        alice
            .request(json!({"type":"lock.release","room":ROOM,"resource":resource,"token":t}))
            .await;
        let granted = bob
            .recv_where(|v| v["type"] == "lock.granted" && v["resource"] == json!(resource))
            .await;
        assert!(granted["token"].as_u64().unwrap() > t);
    }
    bob.send(json!({"type":"cursor","room":ROOM,"x":0.1,"y":0.2}))
        .await;
    assert_eq!(alice.recv_type("cursor").await["user_id"], "bob");
}

/// Reconnects a drained client to `to` with its resume token and checks it kept its lock.
async fn follow(client: &mut Client, to: &Gateway, tok: &str, lock_token: &Value) {
    let r = client.recv_type("reconnect").await;
    assert_eq!(r["reason"], "draining");
    let resume = client.resume_token();
    let session = client.session_id();
    assert_eq!(client.closed().await, Closed::Code(1012));
    let mut moved = Client::connect(to.addr(), tok, Codec::Json, Some(&resume)).await;
    assert_eq!(moved.welcome["resumed"], true, "resumed on {}", to.node_id);
    assert_eq!(moved.session_id(), session);
    let snap = moved.recv_type("room.snapshot").await;
    let mine = snap["locks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l.get("token").is_some())
        .cloned()
        .unwrap_or_else(|| panic!("lock lost on the move: {snap}"));
    assert_eq!(&mine["token"], lock_token);
    *client = moved;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_every_node_loses_no_lock_and_shows_no_flapping() {
    let redis = RedisServer::start();
    let url = redis.url();
    let mut nodes = [
        Gateway::start(&url, "r1", &[]).await,
        Gateway::start(&url, "r2", &[]).await,
        Gateway::start(&url, "r3", &[]).await,
    ];
    // One lock holder per node, and a watcher that moves along too.
    let mut holders = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let tok = token(&format!("h{i}"), None);
        let mut c = Client::connect(node.addr(), &tok, Codec::Json, None).await;
        c.join(ROOM).await;
        let g = c
            .request(acquire(&format!("segment:5-roll{i}"), json!({})))
            .await;
        holders.push((c, tok, g["token"].clone(), i));
    }
    let wtok = token("watcher", None);
    let mut watcher = Client::connect(nodes[0].addr(), &wtok, Codec::Json, None).await;
    watcher.join(ROOM).await;
    let mut watcher_at = 0;
    let mut seen_by_watcher = Vec::new();

    for victim in 0..3 {
        let target = (victim + 1) % 3;
        let mut old = std::mem::replace(
            &mut nodes[victim],
            Gateway::start(&url, &format!("r{victim}b"), &[]).await,
        );
        let drain = tokio::spawn(async move { old.terminate(Duration::from_secs(10)).await });
        for (c, tok, lock_token, at) in holders.iter_mut() {
            if *at == victim {
                follow(c, &nodes[target], tok, lock_token).await;
                *at = target;
            }
        }
        if watcher_at == victim {
            let r = watcher.recv_type("reconnect").await;
            assert_eq!(r["reason"], "draining");
            let resume = watcher.resume_token();
            watcher.closed().await;
            watcher =
                Client::connect(nodes[target].addr(), &wtok, Codec::Json, Some(&resume)).await;
            assert_eq!(watcher.welcome["resumed"], true);
            watcher_at = target;
        } else {
            seen_by_watcher.extend(watcher.drain_for(Duration::from_millis(300)).await);
        }
        assert!(drain.await.unwrap(), "node {victim} exited after its drain");
    }
    seen_by_watcher.extend(watcher.drain_for(Duration::from_millis(1500)).await);
    assert!(
        seen_by_watcher.iter().all(|v| !matches!(
            v["type"].as_str(),
            Some("presence.leave" | "presence.join" | "lock.released")
        )),
        "no leave/join flapping and no lock lost: {seen_by_watcher:?}"
    );
    for (c, _, lock_token, _) in holders.iter_mut() {
        let snapshot = c.request(json!({"type":"join","room":ROOM})).await;
        assert_eq!(snapshot["type"], "reply");
        let v: Value = reqwest::Client::new()
            .post(nodes[0].url("/v1/locks/validate"))
            .bearer_auth(token("app", None))
            .json(&json!({"room": ROOM, "resource": format!("segment:5-roll{}", c.user_id()[1..].to_owned()), "token": lock_token}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["valid"], true, "{v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_nodes_members_leave_and_come_back_when_it_recovers() {
    let redis = RedisServer::start();
    let ttl = [("LOCKSTEP_PRESENCE_TTL", "900ms")];
    let a = Gateway::start(&redis.url(), "node-a", &ttl).await;
    let b = Gateway::start(&redis.url(), "node-b", &ttl).await;
    let mut watcher = client(&b, "watcher").await;
    let _alice = client(&a, "alice").await;
    assert_eq!(
        watcher.recv_type("presence.join").await["member"]["user_id"],
        "alice"
    );
    a.pause();
    // Node B sweeps the entry node A could not refresh…
    let left = watcher.recv_type("presence.leave").await;
    assert_eq!(left["member"]["user_id"], "alice");
    a.resume();
    // …and node A, alive again with alice still connected, puts it back.
    let back = watcher.recv_type("presence.join").await;
    assert_eq!(back["member"]["user_id"], "alice");
}
