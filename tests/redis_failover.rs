//! Replicated grants (`LOCKSTEP_LOCK_REPLICAS`) against real failovers: a primary, a replica
//! and a Sentinel, and a Cluster with a replica per primary, all real `redis-server`s this test
//! starts; gateways are real `lockstep` processes driven over HTTP and WebSockets.
//!
//! "Pausing the replica" is SIGSTOP plus a write of ballast to the primary: a stopped process
//! still receives into its socket buffer and would apply the stream on SIGCONT, so the ballast
//! fills those buffers first and later writes stay in the primary's memory, lost with it (as on
//! a congested or partitioned replication link).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::cluster::{Gateway, token};
use common::redis::{RedisCluster, RedisServer, Sentinel, ballast_port, cli_port};
use common::{Client, Codec};
use lockstep::engine::conformance::{self, LockStoreUnderTest};
use lockstep::engine::redis::audit::RedisAuditSink;
use lockstep::engine::redis::keys;
use lockstep::engine::redis::locks::RedisLockStore;
use lockstep::engine::redis::replication::Replication;
use lockstep::engine::{AcquireOutcome, AcquireRequest, EngineError, Holder, LockKey, LockStore};
use lockstep::names::Entity;
use serde_json::{Value, json};

const ROOM: &str = "scene:1";
const RESOURCE: &str = "segment:X";
/// Bytes written to a primary whose replica is paused (module doc): more than the loopback
/// socket buffers of both ends can hold.
const BALLAST: usize = 48 * 1024 * 1024;
/// How long a failover may take, from the kill to the first grant on the new primary.
const FAILOVER: Duration = Duration::from_secs(30);

async fn post(g: &Gateway, path: &str, sub: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(g.url(path))
        .bearer_auth(token(sub, None))
        .json(&body)
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .expect("http request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// `POST /v1/locks/acquire` of the test lock with a 10-minute hold limit.
async fn acquire(g: &Gateway, sub: &str) -> (u16, Value) {
    let body = json!({"room": ROOM, "resource": RESOURCE, "action": "approve", "ttl_ms": 600_000});
    post(g, "/v1/locks/acquire", sub, body).await
}

/// An acquire retried while the node answers 503 (its Redis connection follows the failover),
/// with a `holder_key`, as a real HTTP client retries: a 503 during the failover can be
/// ambiguous (the grant made on the new primary, the answer lost with the connection), and
/// without a key every retry is another holder that the first attempt's grant would block.
async fn acquire_after_failover(g: &Gateway, sub: &str) -> (u16, Value) {
    let deadline = tokio::time::Instant::now() + FAILOVER;
    let body = json!({
        "room": ROOM, "resource": RESOURCE, "action": "approve", "ttl_ms": 600_000,
        "holder_key": format!("{sub}-after-failover"),
    });
    loop {
        let (s, b) = post(g, "/v1/locks/acquire", sub, body.clone()).await;
        if s != 503 || tokio::time::Instant::now() > deadline {
            return (s, b);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn now_ms() -> u64 {
    lockstep::engine::now_ms()
}

/// Primary, replica and Sentinel; the replica is in sync and known to the Sentinel.
fn sentinel_set() -> (RedisServer, RedisServer, Sentinel) {
    let primary = RedisServer::start();
    let replica = RedisServer::start_replica_of(&primary);
    let sentinel = Sentinel::start(&primary, &replica);
    (primary, replica, sentinel)
}

/// Pause the replica, let alice try, kill the primary, promote the replica, let bob try.
/// Returns alice's and bob's answers.
async fn sentinel_scenario(extra: &[(&str, &str)]) -> ((u16, Value), (u16, Value)) {
    let (mut primary, replica, sentinel) = sentinel_set();
    let g = Gateway::start(&sentinel.url(), "n1", extra).await;
    replica.pause();
    primary.ballast("lockstep-test-ballast", BALLAST);
    let alice = acquire(&g, "alice").await;
    primary.kill();
    replica.resume();
    sentinel.wait_promoted(replica.port, FAILOVER);
    // The new primary has no replica until the old one rejoins as one: until then every grant
    // is refused (with the setting on), which is the price of one replica (docs/fencing.md).
    primary.restart_as_replica_of(replica.port);
    let bob = acquire_after_failover(&g, "bob").await;
    (alice, bob)
}

/// The default (`auto` = 1 with Sentinel): alice's grant cannot be acknowledged by the paused
/// replica, so it is withdrawn and she is told `unavailable`; after the failover bob is the
/// only holder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_to_a_lagging_replica_grants_nobody_twice() {
    let ((a_status, a_body), (b_status, b_body)) = sentinel_scenario(&[]).await;
    assert_eq!(a_status, 503, "alice must not be granted: {a_body}");
    assert_eq!(a_body["code"], "unavailable", "{a_body}");
    assert!(a_body.get("token").is_none(), "{a_body}");
    assert_eq!(b_status, 200, "bob is granted after the failover: {b_body}");
    assert!(b_body["token"].as_u64().is_some(), "{b_body}");
}

/// Without a pause the grant is acknowledged and survives the failover: bob is refused,
/// naming alice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_keeps_an_acknowledged_grant() {
    let (mut primary, replica, sentinel) = sentinel_set();
    let g = Gateway::start(&sentinel.url(), "n1", &[]).await;
    let (s, alice) = acquire(&g, "alice").await;
    assert_eq!(s, 200, "{alice}");
    primary.kill();
    sentinel.wait_promoted(replica.port, FAILOVER);
    primary.restart_as_replica_of(replica.port);
    let (s, bob) = acquire_after_failover(&g, "bob").await;
    assert_eq!(s, 409, "alice's grant survived the failover: {bob}");
    assert_eq!(bob["code"], "lock_held", "{bob}");
    assert_eq!(bob["holder"]["user_id"], "alice", "{bob}");
}

/// `LOCKSTEP_LOCK_REPLICAS=0` (the behaviour before replicated grants): the failover grants
/// the same lock twice — alice still holds hers with minutes left when bob is granted. Fencing
/// still orders them (bob's token is higher), which is all a store that checks tokens needs;
/// the people see two holders. This is the claim `docs/fencing.md` makes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_replicas_a_failover_grants_twice() {
    let ((a_status, alice), (b_status, bob)) =
        sentinel_scenario(&[("LOCKSTEP_LOCK_REPLICAS", "0")]).await;
    assert_eq!(a_status, 200, "{alice}");
    assert_eq!(b_status, 200, "bob is granted the same lock: {bob}");
    let alice_until = alice["expires_at"].as_u64().expect("alice's expiry");
    assert!(
        alice_until > now_ms() + 60_000,
        "alice still believes she holds it for minutes: {alice}"
    );
    assert!(
        bob["token"].as_u64() > alice["token"].as_u64(),
        "tokens still rise: {alice} {bob}"
    );
}

/// A hand-off the replicas do not acknowledge is not told: the waiter gets `unavailable`
/// instead of `lock.granted`, and the lock is free (withdrawn) rather than held by someone
/// who does not know.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unacknowledged_handoff_tells_the_waiter_unavailable() {
    let primary = RedisServer::start();
    let replica = RedisServer::start_replica_of(&primary);
    // A standalone URL with the count set explicitly (a "primary + replica behind one name").
    let g = Gateway::start(&primary.url(), "n1", &[("LOCKSTEP_LOCK_REPLICAS", "1")]).await;
    let mut alice = Client::connect(g.addr(), &token("alice", None), Codec::Json, None).await;
    let mut bob = Client::connect(g.addr(), &token("bob", None), Codec::Json, None).await;
    alice.join(ROOM).await;
    bob.join(ROOM).await;
    let lock =
        json!({"type": "lock.acquire", "room": ROOM, "resource": RESOURCE, "action": "trim"});
    let granted = alice.request(lock.clone()).await;
    assert_eq!(granted["type"], "reply", "{granted}");
    let alice_token = granted["token"].as_u64().expect("token");
    let mut wait = lock.clone();
    wait["wait"] = json!(true);
    wait["wait_timeout_ms"] = json!(60_000);
    let queued = bob.request(wait).await;
    assert_eq!(queued["code"], "lock_held", "{queued}");
    assert_eq!(queued["queue_position"], 1, "{queued}");
    let request_id = queued["id"].clone();

    replica.pause();
    let released = alice
        .request(json!({"type": "lock.release", "room": ROOM, "resource": RESOURCE, "token": alice_token}))
        .await;
    assert_eq!(released["type"], "reply", "{released}");
    let told = bob
        .recv_where(|v| v["type"] == "lock.granted" || v["type"] == "error")
        .await;
    replica.resume();
    assert_eq!(
        told["type"], "error",
        "bob must not be told he holds it: {told}"
    );
    assert_eq!(told["code"], "unavailable", "{told}");
    assert_eq!(told["id"], request_id, "{told}");
    // The unacknowledged hand-off was withdrawn: nobody holds the lock.
    let (s, carol) = acquire(&g, "carol").await;
    assert_eq!(s, 200, "the lock is free again: {carol}");
}

/// An extend the replicas do not acknowledge answers `unavailable`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unacknowledged_extend_is_unavailable() {
    let primary = RedisServer::start();
    let replica = RedisServer::start_replica_of(&primary);
    let g = Gateway::start(&primary.url(), "n1", &[("LOCKSTEP_LOCK_REPLICAS", "1")]).await;
    // The failure counter exists at 0 from the start, for every op.
    assert_eq!(failures(&g, "lock_extend").await, Some(0.0));
    assert_eq!(failures(&g, "lock_confirm_handoff").await, Some(0.0));
    let (s, alice) = acquire(&g, "alice").await;
    assert_eq!(s, 200, "{alice}");
    replica.pause();
    let body =
        json!({"room": ROOM, "resource": RESOURCE, "token": alice["token"], "ttl_ms": 900_000});
    let (s, extended) = post(&g, "/v1/locks/extend", "alice", body).await;
    replica.resume();
    assert_eq!(s, 503, "{extended}");
    assert_eq!(extended["code"], "unavailable", "{extended}");
    assert_eq!(failures(&g, "lock_extend").await, Some(1.0));
}

/// `lockstep_lock_replication_failures_total{op}` on `g`.
async fn failures(g: &Gateway, op: &str) -> Option<f64> {
    let text = reqwest::get(g.url("/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    common::metric_sum(
        &text,
        "lockstep_lock_replication_failures_total",
        &[("op", op)],
    )
}

/// `refresh_leases` fails (rather than reporting leases renewed) when the replicas do not
/// acknowledge the renewal, so the node can tell the holders; with the replica back it works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unacknowledged_lease_refresh_is_an_error() {
    let primary = RedisServer::start();
    let replica = RedisServer::start_replica_of(&primary);
    let pool = lockstep::engine::redis::connect(&primary.url())
        .await
        .expect("connect");
    let store = RedisLockStore::new(pool).with_replication(Replication {
        replicas: 1,
        timeout: Duration::from_millis(300),
    });
    let key = LockKey::new(
        Entity::parse(ROOM).expect("room"),
        Entity::parse(RESOURCE).expect("resource"),
    );
    let req = AcquireRequest {
        room: key.room.clone(),
        resource: key.resource.clone(),
        action: "edit".into(),
        holder: Holder {
            user_id: "alice".into(),
            name: "Alice".into(),
            session_id: "s-alice".into(),
            node_id: "n1".into(),
        },
        ttl_ms: 600_000,
        lease_ms: Some(10_000),
        wait: None,
    };
    let AcquireOutcome::Granted { lock, .. } = store.acquire(req).await.expect("acquire") else {
        panic!("not granted");
    };
    let held = vec![(key.clone(), lock.token)];
    assert_eq!(
        store.refresh_leases(&held, 10_000).await.expect("refresh"),
        vec![]
    );
    replica.pause();
    let refreshed = store.refresh_leases(&held, 10_000).await;
    replica.resume();
    assert!(
        matches!(refreshed, Err(EngineError::NotReplicated { .. })),
        "{refreshed:?}"
    );
    replica.wait_link_up();
    assert_eq!(
        store.refresh_leases(&held, 10_000).await.expect("refresh"),
        vec![]
    );
}

/// With replicated grants on and a healthy replica, the store behaves exactly like the plain
/// one: the whole lock conformance suite passes (its scripts run inside the replicated
/// pipeline, starting from an empty script cache, so `NOSCRIPT` is handled too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_conformance_suite_passes_with_replicated_grants() {
    let primary = RedisServer::start();
    let _replica = RedisServer::start_replica_of(&primary);
    let pool = lockstep::engine::redis::connect(&primary.url())
        .await
        .expect("connect");
    conformance::lock_store_suite(|| {
        let pool = pool.clone();
        async move {
            LockStoreUnderTest {
                store: Arc::new(
                    RedisLockStore::new(pool.clone()).with_replication(Replication {
                        replicas: 1,
                        timeout: Duration::from_secs(2),
                    }),
                ),
                audit: Arc::new(RedisAuditSink::new(pool.clone())),
            }
        }
    })
    .await;
}

/// The Cluster scenario: the primary owning the lock's slot is killed while its replica is
/// paused, and the replica takes over. Returns alice's and bob's answers.
async fn cluster_scenario(extra: &[(&str, &str)]) -> ((u16, Value), (u16, Value)) {
    let mut cluster = RedisCluster::start_with_replicas();
    let shard = keys::shard_of(&format!("{ROOM}/{RESOURCE}"));
    let tag = format!("{{ls{shard}}}");
    let slot = cluster.keyslot(&tag);
    let primary = cluster
        .primary_of_slot(cluster.ports[0], slot)
        .expect("a primary owns the slot");
    let replica = cluster
        .replica_of(primary)
        .expect("the primary has a replica");
    let g = Gateway::start(&cluster.url(), "n1", extra).await;

    cluster.pause(replica);
    ballast_port(primary, &format!("lockstep-test-ballast{tag}"), BALLAST);
    let alice = acquire(&g, "alice").await;
    cluster.kill(primary);
    cluster.resume(replica);
    let taken = cli_port(replica, &["cluster", "failover", "takeover"]);
    assert!(taken.contains("OK"), "takeover: {taken}");
    let deadline = std::time::Instant::now() + FAILOVER;
    while cluster.primary_of_slot(replica, slot) != Some(replica)
        || !cli_port(replica, &["cluster", "info"]).contains("cluster_state:ok")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the replica never took over"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // As with Sentinel: the new primary needs a replica again before it can grant.
    cluster.restart(primary);
    let bob = acquire_after_failover(&g, "bob").await;
    (alice, bob)
}

/// The default (`auto` = 1 with a Cluster URL): no double grant across a Cluster failover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_failover_to_a_lagging_replica_grants_nobody_twice() {
    let ((a_status, a_body), (b_status, b_body)) = cluster_scenario(&[]).await;
    assert_eq!(a_status, 503, "alice must not be granted: {a_body}");
    assert_eq!(a_body["code"], "unavailable", "{a_body}");
    assert_eq!(b_status, 200, "bob is granted after the failover: {b_body}");
}

/// The same with `LOCKSTEP_LOCK_REPLICAS=0`: two holders.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_without_replicas_a_failover_grants_twice() {
    let ((a_status, alice), (b_status, bob)) =
        cluster_scenario(&[("LOCKSTEP_LOCK_REPLICAS", "0")]).await;
    assert_eq!(a_status, 200, "{alice}");
    assert_eq!(b_status, 200, "bob is granted the same lock: {bob}");
    assert!(alice["expires_at"].as_u64().expect("expiry") > now_ms() + 60_000);
}
