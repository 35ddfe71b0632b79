//! [`Metered`]: the node's audit sink wrapped so `lockstep_audit_queue_records` shows how many
//! records were handed to it and are not yet stored in its outbox.
//!
//! Appends wait while the sink is behind (the JSON-lines writer's queue is bounded, a Redis
//! pipeline waits on Redis), so a growing gauge means lock operations are slowing down on
//! their audit writes. Counting around `append` covers every sink the same way.

use std::sync::Arc;

use async_trait::async_trait;

use super::{AuditError, AuditPage, AuditQuery, AuditRecord, AuditSink};
use crate::telemetry::Metrics;

pub struct Metered {
    inner: Arc<dyn AuditSink>,
    metrics: Metrics,
}

impl Metered {
    pub fn new(inner: Arc<dyn AuditSink>, metrics: Metrics) -> Metered {
        Metered { inner, metrics }
    }
}

/// Takes the records back off the gauge when the append finishes or is abandoned.
struct InFlight<'a> {
    metrics: &'a Metrics,
    records: i64,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.metrics.audit_queued(-self.records);
    }
}

#[async_trait]
impl AuditSink for Metered {
    async fn append(&self, records: Vec<AuditRecord>) -> Result<(), AuditError> {
        let n = records.len() as i64;
        self.metrics.audit_queued(n);
        let _in_flight = InFlight {
            metrics: &self.metrics,
            records: n,
        };
        self.inner.append(records).await
    }

    async fn query(&self, q: &AuditQuery) -> Result<AuditPage, AuditError> {
        self.inner.query(q).await
    }

    async fn flush(&self) -> Result<(), AuditError> {
        self.inner.flush().await
    }
}
