//! The node's audit background work, chosen with the engines ([`super::engines`]):
//!
//! - Redis + database: the outbox writer (stream consumer group → Postgres) and the trimmer
//!   that removes acknowledged entries and observes the backlog ([`crate::audit::outbox`]).
//! - Redis without a database: the ring trimmer (`XTRIM MAXLEN ~ 100000` per stream).
//! - Embedded + database: the JSON-lines tailer ([`crate::audit::drain`]).
//! - With a database and `LOCKSTEP_AUDIT_RETENTION`: pruning with `lockstep.prune_audit` every
//!   [`PRUNE_INTERVAL`].
//!
//! All of it stops with the node's other background work, after the drain.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use tokio::sync::Notify;
use tracing::Instrument;

use super::{Node, every};
use crate::audit::drain::FileDrainer;
use crate::audit::outbox::{
    self, RING_TRIM_INTERVAL, RedisOutboxWriter, TRIM_INTERVAL, WriterSettings,
};

/// How often each node prunes old audit records (when a retention is set).
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(600);

/// Where the node's audit records wait before Postgres, and what drains them.
pub enum AuditOutbox {
    /// Embedded without a database: the JSON-lines file is the trail; nothing to drain.
    None,
    /// Redis without a database: the streams are the trail, kept as a bounded ring.
    RedisRing { redis: fred::prelude::Pool },
    /// Redis with a database: the streams drained by this node's writer.
    RedisToPostgres {
        redis: fred::prelude::Pool,
        db: deadpool_postgres::Pool,
    },
    /// Embedded with a database: the JSON-lines file tailed into Postgres.
    FileToPostgres {
        file: PathBuf,
        db: deadpool_postgres::Pool,
        appended: Arc<Notify>,
    },
}

pub fn spawn(node: &Arc<Node>, outbox: AuditOutbox) {
    let stop = node.stop_background.clone();
    match outbox {
        AuditOutbox::None => {}
        AuditOutbox::RedisRing { redis } => {
            let warned = Arc::new(AtomicBool::new(false));
            every(node, RING_TRIM_INTERVAL, move |node| {
                let (redis, warned) = (redis.clone(), warned.clone());
                async move { outbox::trim_ring(&redis, &warned, &node.metrics.redis()).await }
            });
        }
        AuditOutbox::RedisToPostgres { redis, db } => {
            let writer = RedisOutboxWriter::new(
                redis.clone(),
                db,
                &node.id,
                WriterSettings::from_env(),
                node.metrics.clone(),
            );
            tokio::spawn(writer.run(stop).instrument(node.span()));
            every(node, TRIM_INTERVAL, move |node| {
                let redis = redis.clone();
                async move {
                    outbox::trim_acknowledged(&redis, &node.metrics).await;
                }
            });
        }
        AuditOutbox::FileToPostgres { file, db, appended } => {
            let ack_delay = WriterSettings::from_env().ack_delay;
            let drainer = FileDrainer::new(&file, db, node.metrics.clone(), appended, ack_delay);
            tokio::spawn(drainer.run(stop).instrument(node.span()));
        }
    }
    if let (Some(db), Some(keep)) = (node.db.clone(), node.config.audit_retention) {
        every(node, PRUNE_INTERVAL, move |_| {
            let db = db.clone();
            async move { prune(&db, keep).await }
        });
    }
}

/// Deletes audit records older than `keep` (safe on several nodes at once).
async fn prune(db: &deadpool_postgres::Pool, keep: Duration) {
    let run = async {
        let client = db.get().await.map_err(|e| e.to_string())?;
        let row = client
            .query_one(
                "SELECT lockstep.prune_audit(make_interval(secs => $1))",
                &[&keep.as_secs_f64()],
            )
            .await
            .map_err(|e| e.to_string())?;
        row.try_get::<_, i64>(0).map_err(|e| e.to_string())
    };
    match tokio::time::timeout(Duration::from_secs(300), run).await {
        Ok(Ok(0)) => {}
        Ok(Ok(n)) => tracing::info!(removed = n, "pruned old audit records"),
        Ok(Err(e)) => tracing::warn!(error = %e, "audit pruning failed"),
        Err(_) => tracing::warn!("audit pruning timed out"),
    }
}
