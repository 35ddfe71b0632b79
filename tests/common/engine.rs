//! Helpers for tests that drive a lock store directly (no gateway): fresh names, holders and
//! acquire requests.

use lockstep::engine::{AcquireOutcome, AcquireRequest, Holder, LockInfo, LockStore};
use lockstep::names::Entity;

/// A fresh entity of type `ty` that no other test uses (tests share one Redis per binary).
pub fn unique(ty: &str) -> Entity {
    let id = uuid::Uuid::new_v4().simple().to_string();
    Entity::parse(&format!("{ty}:t-{}", &id[..16])).expect("a valid entity")
}

/// A holder for `user` with a fresh session id.
pub fn holder(user: &str) -> Holder {
    let id = uuid::Uuid::new_v4().simple().to_string();
    Holder {
        user_id: user.into(),
        name: format!("User {user}").into(),
        session_id: format!("{user}-{}", &id[..12]).into(),
        node_id: "node-test".into(),
    }
}

/// A plain (no lease, no wait) acquire of `resource` in `room` for `who`.
pub fn request(room: &Entity, resource: &Entity, who: &Holder, ttl_ms: u64) -> AcquireRequest {
    AcquireRequest {
        room: room.clone(),
        resource: resource.clone(),
        action: "trim".into(),
        holder: who.clone(),
        ttl_ms,
        lease_ms: None,
        wait: None,
    }
}

/// Acquires and expects a fresh (not reentrant) grant.
pub async fn grant(store: &dyn LockStore, req: AcquireRequest) -> LockInfo {
    match store.acquire(req).await.expect("acquire") {
        AcquireOutcome::Granted {
            lock,
            reentrant: false,
        } => lock,
        other => panic!("expected a fresh grant, got {other:?}"),
    }
}
