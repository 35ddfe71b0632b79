//! The one place that picks the engines: in-process by default, Redis when
//! `LOCKSTEP_REDIS_URL` is set. A new engine is a new arm here.
//!
//! Audit sinks: without a database, the JSON-lines file (embedded) or the Redis streams (Redis)
//! are both where records go and what `GET /v1/audit` reads. With `LOCKSTEP_DATABASE_URL`, the
//! same file or streams become the outbox that `append` writes to, drained into Postgres by the
//! node's audit writer ([`super::audit_writer`]), and queries read Postgres.

use std::sync::Arc;

use tokio::sync::{Notify, mpsc};

use super::NodeError;
use super::audit_writer::AuditOutbox;
use crate::audit::AuditSink;
use crate::audit::instrumented::Instrumented;
use crate::audit::jsonl::JsonlSink;
use crate::audit::postgres::PgBackedSink;
use crate::config::Config;
use crate::engine::memory::{
    MemoryBroker, MemoryLockStore, MemoryPresenceStore, MemoryResumeStore,
};
use crate::engine::redis::broker::{RedisBroker, Resync};

use crate::engine::redis::{
    self, audit::RedisAuditSink, locks::RedisLockStore, nodes::NodeRegistry,
};
use crate::engine::redis::{
    presence::RedisPresenceStore, replication::Replication, resume::RedisResumeStore,
};
use crate::engine::{Broker, LockStore, PresenceStore, ResumeStore};
use crate::hub::Hub;

pub struct Engines {
    pub locks: Arc<dyn LockStore>,
    pub presence: Arc<dyn PresenceStore>,
    pub broker: Arc<dyn Broker>,
    pub resume: Arc<dyn ResumeStore>,
    pub audit: Arc<dyn AuditSink>,
    /// Present with Redis: what the multi-node duties need.
    pub cluster: Option<ClusterParts>,
    /// Present with `LOCKSTEP_DATABASE_URL` (migrated at start-up).
    pub db: Option<deadpool_postgres::Pool>,
    /// What the node's audit writer drains (or trims).
    pub audit_outbox: AuditOutbox,
    /// Yjs document update logs.
    pub doc_log: Arc<dyn crate::yjs::store::DocLog>,
}

pub struct ClusterParts {
    /// Where Redis is, for the clients the cluster duties build (the revocation listener).
    pub redis: redis::RedisTarget,
    pub registry: NodeRegistry,
    pub resync: mpsc::Receiver<Resync>,
}

/// Postgres connections per node (fence registration and the audit writer).
const DB_POOL_SIZE: usize = 8;

/// Resync requests waiting at once; more are coalesced by the broker (see its docs).
const RESYNC_QUEUE: usize = 64;

pub async fn build(
    config: &Config,
    node_id: &str,
    hub: Arc<Hub>,
    metrics: &crate::telemetry::Metrics,
) -> Result<Engines, NodeError> {
    let db = match config.database_url.as_deref() {
        Some(url) => {
            crate::db::migrate(url).await?;
            Some(crate::db::pool(url, DB_POOL_SIZE)?)
        }
        None => None,
    };
    let Some(url) = config.redis_url.as_deref() else {
        let file = JsonlSink::open(&config.data_dir)?;
        let (audit, audit_outbox): (Arc<dyn AuditSink>, _) = match &db {
            Some(db) => {
                let appended = Arc::new(Notify::new());
                let outbox = AuditOutbox::FileToPostgres {
                    file: file.path().to_owned(),
                    db: db.clone(),
                    appended: appended.clone(),
                };
                let sink = PgBackedSink::new(file, db.clone()).notify_on_append(appended);
                (
                    Instrumented::wrap(Arc::new(sink), "jsonl", metrics.clone()),
                    outbox,
                )
            }
            None => (
                Instrumented::wrap(Arc::new(file), "jsonl", metrics.clone()),
                AuditOutbox::None,
            ),
        };
        return Ok(Engines {
            locks: Arc::new(MemoryLockStore::new(audit.clone())),
            presence: Arc::new(
                MemoryPresenceStore::new().with_max_members(config.max_members_per_room),
            ),
            broker: Arc::new(MemoryBroker::new(hub)),
            resume: Arc::new(MemoryResumeStore::new()),
            audit,
            cluster: None,
            db,
            audit_outbox,
            doc_log: Arc::new(crate::engine::memory::MemoryDocLog::new()),
        });
    };
    let target = redis::RedisTarget::new(url, &config.redis_tls)?;
    let pool = redis::connect_to(&target).await?;
    let m = metrics.redis();
    let (resync_tx, resync) = mpsc::channel(RESYNC_QUEUE);
    let broker =
        RedisBroker::start_with_metrics(&target, node_id, hub, resync_tx, m.clone()).await?;
    observe_broker(metrics, &broker);
    metrics.cluster_started();
    let presence_ttl_ms = config.presence_ttl.as_millis() as u64;
    let streams = RedisAuditSink::new(pool.clone()).with_metrics(m.clone());
    // Without a database, audit records stay in the Redis outbox streams (a bounded ring) and
    // `GET /v1/audit` reads them there; with one, they are drained to Postgres and read there.
    let (audit, audit_outbox): (Arc<dyn AuditSink>, _) = match &db {
        Some(db) => (
            Instrumented::wrap(
                Arc::new(PgBackedSink::new(streams, db.clone())),
                "redis_outbox",
                metrics.clone(),
            ),
            AuditOutbox::RedisToPostgres {
                redis: pool.clone(),
                db: db.clone(),
            },
        ),
        None => (
            Instrumented::wrap(Arc::new(streams), "redis_outbox", metrics.clone()),
            AuditOutbox::RedisRing {
                redis: pool.clone(),
            },
        ),
    };
    // Replicated grants: WAIT blocks its connection for up to the replica timeout when the
    // replicas lag, so the lock store gets connections of its own and presence, resume and
    // audit calls never queue behind a WAIT.
    let replicas = config.lock_replicas_required();
    let lock_pool = if replicas > 0 {
        redis::connect_to(&target).await?
    } else {
        pool.clone()
    };
    if replicas > 0 {
        tracing::info!(
            replicas,
            timeout = ?config.lock_replica_timeout,
            "lock grants wait for Redis replicas (LOCKSTEP_LOCK_REPLICAS)"
        );
    }
    let replication = Replication {
        replicas,
        timeout: config.lock_replica_timeout,
    };
    let doc_log =
        crate::engine::redis::docs::RedisDocLog::start(&target, pool.clone(), m.clone()).await?;
    Ok(Engines {
        doc_log,
        locks: Arc::new(
            RedisLockStore::new(lock_pool)
                .with_metrics(m.clone())
                .with_fence_retention(config.fence_retention)
                .with_replication(replication),
        ),
        presence: Arc::new(
            RedisPresenceStore::new(pool.clone(), presence_ttl_ms)
                .with_max_members(config.max_members_per_room)
                .with_metrics(m.clone()),
        ),
        broker,
        resume: Arc::new(RedisResumeStore::new(pool.clone()).with_metrics(m.clone())),
        audit,
        cluster: Some(ClusterParts {
            redis: target,
            registry: NodeRegistry::new(pool, node_id).with_metrics(m),
            resync,
        }),
        db,
        audit_outbox,
    })
}

/// The broker's own counters, exported at every scrape.
fn observe_broker(metrics: &crate::telemetry::Metrics, broker: &Arc<RedisBroker>) {
    let b = broker.clone();
    metrics.observe_counter(
        "lockstep.pubsub.dropped",
        "Pub/sub messages lost because this node's reader lagged (each triggers a resync)",
        move || b.dropped(),
    );
    let b = broker.clone();
    metrics.observe_counter(
        "lockstep.pubsub.gaps",
        "Sequence gaps detected in a room's pub/sub stream (each triggers a room resync)",
        move || b.gaps(),
    );
    let b = broker.clone();
    metrics.observe_counter(
        "lockstep.pubsub.reconnects",
        "Reconnects of this node's subscriber connection",
        move || b.reconnects(),
    );
    let b = broker.clone();
    metrics.observe_counter(
        "lockstep.pubsub.undecodable",
        "Pub/sub messages that could not be decoded (dropped)",
        move || b.undecodable(),
    );
}
