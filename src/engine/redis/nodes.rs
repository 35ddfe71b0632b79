//! Node liveness: each node refreshes `node:<id>` (short expiry) and is listed in `nodes`.
//!
//! A node whose key expired is gone: its locks lapse with their leases and its members leave
//! with their presence expiry, so nothing it held outlives it by more than
//! `LOCKSTEP_LOCK_LEASE` / `LOCKSTEP_PRESENCE_TTL`. Finding one is logged and counted, and it
//! is removed from `nodes` so the set does not grow with every pod ever started.

use fred::prelude::*;

use super::{call, engine_err, keys};
use crate::engine::EngineResult;
use crate::telemetry::RedisMetrics;

pub struct NodeRegistry {
    pool: Pool,
    id: String,
    metrics: RedisMetrics,
}

impl NodeRegistry {
    pub fn new(pool: Pool, id: &str) -> NodeRegistry {
        NodeRegistry {
            pool,
            id: id.to_owned(),
            metrics: RedisMetrics::default(),
        }
    }

    /// Records every Redis call in `metrics` (see [`super::call`]).
    pub fn with_metrics(mut self, metrics: RedisMetrics) -> NodeRegistry {
        self.metrics = metrics;
        self
    }

    /// Marks this node alive for `ttl_ms`. `status` is what the operator's node listing shows
    /// of it (a small JSON object: session counts, draining); only the key's presence means
    /// alive.
    pub async fn beat(&self, ttl_ms: u64, status: &str) -> EngineResult<()> {
        let set = self.pool.set(
            keys::node(&self.id),
            status,
            Some(Expiration::PX(ttl_ms as i64)),
            None,
            false,
        );
        let _: () = call(&self.metrics, "node_beat", set)
            .await
            .map_err(engine_err)?;
        let _: i64 = call(
            &self.metrics,
            "node_register",
            self.pool.sadd(keys::nodes(), &self.id),
        )
        .await
        .map_err(engine_err)?;
        Ok(())
    }

    /// Node ids listed as members whose liveness key is gone; they are removed from the list.
    pub async fn reap_dead(&self) -> EngineResult<Vec<String>> {
        let ids: Vec<String> = call(
            &self.metrics,
            "node_list",
            self.pool.smembers(keys::nodes()),
        )
        .await
        .map_err(engine_err)?;
        let mut dead = Vec::new();
        for id in ids.into_iter().filter(|id| *id != self.id) {
            let alive: i64 = call(
                &self.metrics,
                "node_exists",
                self.pool.exists(keys::node(&id)),
            )
            .await
            .map_err(engine_err)?;
            if alive == 0 {
                let removed: i64 = call(
                    &self.metrics,
                    "node_remove",
                    self.pool.srem(keys::nodes(), &id),
                )
                .await
                .map_err(engine_err)?;
                // Only the node that removed it reports it, so each death is counted once.
                if removed > 0 {
                    dead.push(id);
                }
            }
        }
        Ok(dead)
    }

    /// Ids of the nodes whose liveness key is present (this one included).
    pub async fn alive(&self) -> EngineResult<Vec<String>> {
        let ids: Vec<String> = call(
            &self.metrics,
            "node_list",
            self.pool.smembers(keys::nodes()),
        )
        .await
        .map_err(engine_err)?;
        let mut alive = Vec::new();
        for id in ids {
            let n: i64 = call(
                &self.metrics,
                "node_exists",
                self.pool.exists(keys::node(&id)),
            )
            .await
            .map_err(engine_err)?;
            if n > 0 {
                alive.push(id);
            }
        }
        Ok(alive)
    }

    /// The live nodes (at most `max`, by id) with the status each wrote with its last beat
    /// (`"1"` from a node older than the status). One `GET` per listed node, concurrently:
    /// the keys are in different Cluster slots, so no `MGET`.
    pub async fn list(&self, max: usize) -> EngineResult<Vec<(String, String)>> {
        let mut ids: Vec<String> = call(
            &self.metrics,
            "node_list",
            self.pool.smembers(keys::nodes()),
        )
        .await
        .map_err(engine_err)?;
        ids.sort();
        ids.truncate(max);
        let reads = futures_util::future::join_all(ids.iter().map(|id| {
            call(
                &self.metrics,
                "node_status",
                self.pool.get::<Option<String>, _>(keys::node(id)),
            )
        }))
        .await;
        let mut out = Vec::new();
        for (id, status) in ids.into_iter().zip(reads) {
            if let Some(status) = status.map_err(engine_err)? {
                out.push((id, status));
            }
        }
        Ok(out)
    }

    /// Removes this node's liveness key (clean shutdown).
    pub async fn leave(&self) -> EngineResult<()> {
        let _: i64 = call(
            &self.metrics,
            "node_leave",
            self.pool.del(keys::node(&self.id)),
        )
        .await
        .map_err(engine_err)?;
        let _: i64 = call(
            &self.metrics,
            "node_remove",
            self.pool.srem(keys::nodes(), &self.id),
        )
        .await
        .map_err(engine_err)?;
        Ok(())
    }

    /// Sends an admin revocation (opaque JSON) to every node listening on the channel.
    pub async fn publish_revocation(&self, payload: String) -> EngineResult<()> {
        let client = self.pool.next().clone();
        let channel = keys::revoke_channel();
        let publish = async move { client.publish(channel, payload).await };
        let _: i64 = call(&self.metrics, "revoke_publish", publish)
            .await
            .map_err(engine_err)?;
        Ok(())
    }
}

/// Connects a subscriber of the revocation channel (resubscribed after reconnects). A
/// revocation published while it is disconnected is missed by this node; the `jti` part
/// still holds there (connect, resume and refresh check the shared list).
pub async fn listen_revocations(
    target: &super::RedisTarget,
) -> EngineResult<(
    fred::clients::SubscriberClient,
    tokio::sync::broadcast::Receiver<fred::types::Message>,
)> {
    // Revocations and takeover requests come in bursts (a cluster-wide revoke, every resume
    // of a fleet roll): a lag would miss one, so this listener gets the rooms' capacity.
    let subscriber = super::subscriber_builder(target)?
        .build_subscriber_client()
        .map_err(|e| crate::engine::EngineError::Internal(format!("redis subscriber: {e}")))?;
    let rx = subscriber.message_rx();
    subscriber.init().await.map_err(engine_err)?;
    let _task = subscriber.manage_subscriptions();
    subscriber
        .subscribe(keys::revoke_channel())
        .await
        .map_err(engine_err)?;
    Ok((subscriber, rx))
}
