//! The conformance suites against the in-process engines.

use std::sync::Arc;

use lockstep::audit::AuditSink;
use lockstep::engine::conformance::{self, LockStoreUnderTest, RecordingAuditSink};
use lockstep::engine::memory::{MemoryBroker, MemoryLockStore, MemoryPresenceStore};
use lockstep::engine::{Broker, EventSink, LockStore, PresenceStore};
use lockstep::names::Entity;

async fn lock_store() -> LockStoreUnderTest {
    let audit: Arc<dyn AuditSink> = Arc::new(RecordingAuditSink::new());
    let store: Arc<dyn LockStore> = Arc::new(MemoryLockStore::new(audit.clone()));
    LockStoreUnderTest { store, audit }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_lock_store_conformance() {
    conformance::lock_store_suite(lock_store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_presence_store_conformance() {
    conformance::presence_store_suite(|| async {
        Arc::new(MemoryPresenceStore::new()) as Arc<dyn PresenceStore>
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_broker_conformance() {
    conformance::broker_suite(|sink: Arc<dyn EventSink>| async move {
        Arc::new(MemoryBroker::new(sink)) as Arc<dyn Broker>
    })
    .await;
}

/// The memory broker tracks subscriptions (the node must keep them right for the Redis broker)
/// but delivers regardless of them: with one node, the hub filters by local members.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_broker_tracks_subscriptions_and_delivers_regardless() {
    let sink = Arc::new(conformance::CollectingSink::new());
    let broker = MemoryBroker::new(sink.clone());
    let (a, b) = (
        Entity::parse("scene:a").unwrap(),
        Entity::parse("scene:b").unwrap(),
    );
    broker.subscribe(&b).await.unwrap();
    broker.subscribe(&a).await.unwrap();
    broker.subscribe(&a).await.unwrap();
    assert_eq!(broker.subscribed(), vec![a.clone(), b.clone()]);
    broker.unsubscribe(&a).await.unwrap();
    assert_eq!(broker.subscribed(), vec![b.clone()]);

    let event = Arc::new(lockstep::engine::RoomEvent {
        room: a.clone(),
        origin: None,
        kind: lockstep::engine::RoomEventKind::WaitExpired {
            resource: Entity::parse("segment:1").unwrap(),
            session_id: "s".into(),
            request_id: Some(3),
        },
    });
    broker.publish(event.clone()).await.unwrap();
    // Synchronous: delivered before publish returned.
    assert_eq!(sink.events(), vec![event]);
}

/// An audit sink that fails: the transition happens and is returned (to be announced).
struct FailingSink;

#[async_trait::async_trait]
impl AuditSink for FailingSink {
    async fn append(
        &self,
        _: Vec<lockstep::audit::AuditRecord>,
    ) -> Result<(), lockstep::audit::AuditError> {
        Err(lockstep::audit::AuditError::Unavailable("disk full".into()))
    }
    async fn query(
        &self,
        _: &lockstep::audit::AuditQuery,
    ) -> Result<lockstep::audit::AuditPage, lockstep::audit::AuditError> {
        Err(lockstep::audit::AuditError::Unavailable("disk full".into()))
    }
    async fn flush(&self) -> Result<(), lockstep::audit::AuditError> {
        Ok(())
    }
}

#[tokio::test]
async fn audit_failure_does_not_lose_the_transition() {
    use lockstep::engine::{AcquireOutcome, AcquireRequest, Holder};
    let store = MemoryLockStore::new(Arc::new(FailingSink));
    let resource = Entity::parse("segment:1").unwrap();
    let req = AcquireRequest {
        room: Entity::parse("scene:1").unwrap(),
        resource: resource.clone(),
        action: "trim".into(),
        holder: Holder {
            user_id: "u".into(),
            name: "U".into(),
            session_id: "s".into(),
            node_id: "n".into(),
        },
        ttl_ms: 60_000,
        lease_ms: None,
        wait: None,
    };
    let outcome = store.acquire(req).await.unwrap();
    assert!(
        matches!(outcome, AcquireOutcome::Granted { .. }),
        "{outcome:?}"
    );
    let key = lockstep::engine::LockKey::new(Entity::parse("scene:1").unwrap(), resource);
    assert!(store.get(&key).await.unwrap().is_some());
}
