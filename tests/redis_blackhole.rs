//! A node that loses Redis tells its lock holders in time (`src/node/leases.rs`).
//!
//! One private `redis-server`, two real gateway processes: node A reaches Redis through a TCP
//! proxy inside the test, node B directly. Alice on A holds a lock; the proxy then blackholes
//! A's Redis traffic (nothing forwarded, nothing closed), so A's lease renewals hang. Alice
//! (and carol, her room-mate on A) must get `lock.released {reason: "lost"}` before bob, on B,
//! can be granted the lock, and within the lease of A's last renewal.

mod common;

use std::time::{Duration, Instant};

use common::cluster::{Gateway, token};
use common::proxy::RedisProxy;
use common::redis::{RedisCluster, RedisServer, cli_port};
use common::{Client, Codec, metric_sum};
use lockstep::engine::redis::keys;
use serde_json::{Value, json};
use tokio::sync::oneshot;

const ROOM: &str = "scene:77";
const RESOURCE: &str = "segment:77-1";
const LEASE: Duration = Duration::from_secs(3);

async fn client(g: &Gateway, sub: &str) -> Client {
    let mut c = Client::connect(g.addr(), &token(sub, None), Codec::Json, None).await;
    c.join(ROOM).await;
    c
}

fn acquire() -> Value {
    json!({"type":"lock.acquire","room":ROOM,"resource":RESOURCE,"action":"approve"})
}

fn is_release_of_resource(v: &Value) -> bool {
    v["type"] == "lock.released" && v["resource"] == RESOURCE
}

/// When the first release arrived, and the message.
type Notice = oneshot::Receiver<(Instant, Value)>;
/// The reader: gives back the client and what it read after that release.
type Reader = tokio::task::JoinHandle<(Client, Vec<Value>)>;

/// Reads `c` in the background: reports the instant the first `lock.released` of
/// [`RESOURCE`] arrives (and the message), then keeps reading until `stop` fires; returns the
/// client and every message seen after that release.
fn watch(mut c: Client, stop: oneshot::Receiver<()>) -> (Notice, Reader) {
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(async move {
        let mut tx = Some(tx);
        let mut after = Vec::new();
        let mut stop = stop;
        loop {
            tokio::select! {
                _ = &mut stop => return (c, after),
                m = c.next_within(Duration::from_secs(120)) => {
                    let m = m.expect("socket stays open");
                    if tx.is_none() {
                        after.push(m);
                    } else if is_release_of_resource(&m) {
                        let _ = tx.take().unwrap().send((Instant::now(), m));
                    }
                }
            }
        }
    });
    (rx, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_that_loses_redis_tells_its_holders_before_anyone_else_is_granted() {
    let redis = RedisServer::start();
    let proxy = RedisProxy::start(redis.port).await;
    let lease = format!("{}ms", LEASE.as_millis());
    let settings = [("LOCKSTEP_LOCK_LEASE", lease.as_str())];
    let a = Gateway::start(&proxy.url(), "node-a", &settings).await;
    let b = Gateway::start(&redis.url(), "node-b", &settings).await;

    let mut alice = client(&a, "alice").await;
    let carol = client(&a, "carol").await;
    let mut bob = client(&b, "bob").await;
    let granted = alice.request(acquire()).await;
    let alice_token = granted["token"].as_u64().expect("alice is granted");
    assert_eq!(
        bob.recv_type("lock.acquired").await["holder"]["user_id"],
        "alice"
    );
    // Some renewals go through before the outage.
    tokio::time::sleep(LEASE / 2).await;

    let (stop_alice, alice_stop) = oneshot::channel();
    let (stop_carol, carol_stop) = oneshot::channel();
    let (alice_notice, alice_task) = watch(alice, alice_stop);
    let (carol_notice, carol_task) = watch(carol, carol_stop);
    let cut = Instant::now();
    proxy.blackhole();

    // Bob keeps asking on B until the lock lapses in Redis and is his.
    let deadline = cut + Duration::from_secs(30);
    let (bob_granted, bob_token) = loop {
        assert!(Instant::now() < deadline, "bob was never granted the lock");
        let r = bob.request(acquire()).await;
        if r["type"] == "reply" {
            break (Instant::now(), r["token"].as_u64().expect("token"));
        }
        assert_eq!(r["code"], "lock_held", "{r}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(bob_token > alice_token);
    let (told, notice) = tokio::time::timeout(Duration::from_secs(10), alice_notice)
        .await
        .expect("alice was told within 10 s of bob's grant")
        .expect("alice's reader runs");
    assert_eq!(notice["reason"], "lost", "{notice}");
    assert_eq!(notice["room"], ROOM, "{notice}");
    assert!(
        told < bob_granted,
        "alice was told {:?} after bob was granted",
        told - bob_granted
    );
    // Her node's last renewal that Redis answered was sent before the cut.
    assert!(
        told - cut <= LEASE,
        "alice was told {:?} after the cut: later than a lease after the last renewal",
        told - cut
    );
    let (_, carol_saw) = tokio::time::timeout(Duration::from_secs(5), carol_notice)
        .await
        .expect("carol, alice's room-mate on node A, is told too")
        .unwrap();
    assert_eq!(carol_saw["reason"], "lost", "{carol_saw}");
    eprintln!(
        "told after {:?}, bob granted after {:?} (notice {:?} ahead)",
        told - cut,
        bob_granted - cut,
        bob_granted - told
    );

    // Redis comes back for A: nothing comes back silently, and alice's old token moves nothing.
    proxy.restore();
    let _ = stop_alice.send(());
    let _ = stop_carol.send(());
    let (mut alice, _) = alice_task.await.unwrap();
    let (carol, _) = carol_task.await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let ext = json!({"type":"lock.extend","room":ROOM,"resource":RESOURCE,"token":alice_token,"ttl_ms":60_000});
    let rel = json!({"type":"lock.release","room":ROOM,"resource":RESOURCE,"token":alice_token});
    for msg in [ext, rel] {
        loop {
            // A's Redis connection may take a few seconds to come back.
            let r = alice.request(msg.clone()).await;
            if r["code"] == "unavailable" && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            assert_eq!(r["code"], "lock_not_held", "{msg} answered {r}");
            break;
        }
    }
    let ext = json!({"type":"lock.extend","room":ROOM,"resource":RESOURCE,"token":bob_token,"ttl_ms":60_000});
    let r = bob.request(ext).await;
    assert_eq!(r["type"], "reply", "bob still holds the lock: {r}");

    // A few renewal periods later, alice has not been handed the lock back.
    let seen = alice.drain_for(LEASE).await;
    assert!(
        !seen.iter().any(|m| m["type"] == "lock.granted"
            || (m["type"] == "lock.acquired" && m["holder"]["user_id"] == "alice")),
        "{seen:?}"
    );
    let text = a.metrics().await;
    let lost = metric_sum(
        &text,
        "lockstep_lock_outcomes_total",
        &[("outcome", "lost")],
    );
    assert_eq!(lost, Some(1.0), "one lock declared lost on node A");
    drop((carol, alice, bob, a, b));
}

/// The primary that owns the shard of lock `room`/`resource` in `cluster`.
fn primary_of(cluster: &RedisCluster, room: &str, resource: &str) -> u16 {
    let shard = keys::shard_of(&format!("{room}/{resource}"));
    let slot = cluster.keyslot(&format!("{{ls{shard}}}"));
    cluster
        .primary_of_slot(cluster.ports[0], slot)
        .expect("a primary owns the slot")
}

/// One Cluster primary refuses writes (it lost its replicas: `min-replicas-to-write`) while the
/// others answer: a lease renewal that reaches every shard then fails on one of them only. The
/// holder of a lock on that primary must still be told `lost` in time — a renewal that worked
/// on the other shards must not pass for one that renewed hers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_renewal_that_fails_on_one_cluster_shard_is_not_taken_for_renewed() {
    let cluster = RedisCluster::start();
    // Two resources of one room whose locks live on different primaries.
    let room = "scene:78";
    let first = "segment:78-0";
    let failing = primary_of(&cluster, room, first);
    let other = (1..200)
        .map(|i| format!("segment:78-{i}"))
        .find(|r| primary_of(&cluster, room, r) != failing)
        .expect("a resource on another primary");
    let lease = format!("{}ms", LEASE.as_millis());
    let settings = [
        ("LOCKSTEP_LOCK_LEASE", lease.as_str()),
        // No replicas in this cluster: what is under test is a shard failing, not WAIT.
        ("LOCKSTEP_LOCK_REPLICAS", "0"),
    ];
    let a = Gateway::start(&cluster.url(), "node-a", &settings).await;
    let mut alice = Client::connect(a.addr(), &token("alice", None), Codec::Json, None).await;
    alice.join(room).await;
    for resource in [first, other.as_str()] {
        let r = alice
            .request(json!({"type":"lock.acquire","room":room,"resource":resource,"action":"trim"}))
            .await;
        assert!(r["token"].as_u64().is_some(), "{resource}: {r}");
    }
    // Some renewals of both go through first.
    tokio::time::sleep(LEASE / 2).await;

    let refused = cli_port(failing, &["config", "set", "min-replicas-to-write", "1"]);
    assert!(refused.contains("OK"), "{refused}");
    let cut = Instant::now();
    let notice = alice
        .recv_where(|m| m["type"] == "lock.released" && m["resource"] == first)
        .await;
    let told = cut.elapsed();
    assert_eq!(notice["reason"], "lost", "{notice}");
    assert!(
        told <= LEASE,
        "alice was told {told:?} after her shard stopped renewing: later than a lease"
    );
    eprintln!("told {told:?} after one shard stopped renewing");
    cli_port(failing, &["config", "set", "min-replicas-to-write", "0"]);
    drop((alice, a, cluster));
}
