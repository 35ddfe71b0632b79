//! [`MemoryBroker`]: room-event fan-out for a single node.
//!
//! With one node, every published event goes back to this node's hub: `publish` calls the
//! sink's [`deliver`](EventSink::deliver) synchronously, before it returns, so events reach the
//! hub in publish order. Delivery does not depend on subscriptions: the hub ignores rooms with no
//! local members, so filtering here would only duplicate its check. The set of subscribed rooms
//! is still kept (and shown by [`MemoryBroker::subscribed`]) so tests can check that the node
//! subscribes and unsubscribes as the Redis broker needs it to.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::lock_state;
use crate::engine::{Broker, EngineResult, EventSink, RoomEvent};
use crate::names::Entity;

/// The in-process [`Broker`].
pub struct MemoryBroker {
    sink: Arc<dyn EventSink>,
    subscribed: Mutex<HashSet<Entity>>,
}

impl MemoryBroker {
    /// A broker delivering every published event to `sink` (the node's hub).
    pub fn new(sink: Arc<dyn EventSink>) -> MemoryBroker {
        MemoryBroker {
            sink,
            subscribed: Mutex::new(HashSet::new()),
        }
    }

    /// The rooms currently subscribed, sorted (for tests and diagnostics).
    pub fn subscribed(&self) -> Vec<Entity> {
        let mut rooms: Vec<Entity> = match self.subscribed.lock() {
            Ok(set) => set.iter().cloned().collect(),
            Err(poisoned) => poisoned.into_inner().iter().cloned().collect(),
        };
        rooms.sort();
        rooms
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    async fn publish(&self, event: Arc<RoomEvent>) -> EngineResult<()> {
        self.sink.deliver(event);
        Ok(())
    }

    async fn subscribe(&self, room: &Entity) -> EngineResult<()> {
        lock_state(&self.subscribed, "broker")?.insert(room.clone());
        Ok(())
    }

    async fn unsubscribe(&self, room: &Entity) -> EngineResult<()> {
        lock_state(&self.subscribed, "broker")?.remove(room);
        Ok(())
    }
}
