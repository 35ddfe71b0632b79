//! [`Instrumented`]: the node's audit sink, whichever it is, with its metric and its span.
//!
//! - `lockstep_audit_queue_records` counts records handed to the sink and not yet stored in
//!   its outbox. Appends wait while the sink is behind (the JSON-lines writer's queue is
//!   bounded, a Redis pipeline waits on Redis), so a growing gauge means lock operations are
//!   slowing down on their audit writes.
//! - An `audit.append` span around each batch. Records that the Redis lock scripts `XADD`
//!   themselves are inside their `redis` spans; the drains into Postgres have `audit.drain`
//!   spans ([`super::outbox`], [`super::drain`]).
//!
//! One wrapper at the wiring, rather than code in every sink, so the JSON-lines writer and the
//! Redis outbox append (node records: sessions, auth) are measured and traced alike.

use std::sync::Arc;

use async_trait::async_trait;
use tracing::Instrument;
use tracing::field::Empty;

use super::{AuditError, AuditPage, AuditQuery, AuditRecord, AuditSink};
use crate::telemetry::Metrics;

pub struct Instrumented {
    inner: Arc<dyn AuditSink>,
    /// Where the records go: `jsonl` or `redis_outbox`.
    sink: &'static str,
    metrics: Metrics,
}

impl Instrumented {
    pub fn wrap(
        inner: Arc<dyn AuditSink>,
        sink: &'static str,
        metrics: Metrics,
    ) -> Arc<dyn AuditSink> {
        Arc::new(Instrumented {
            inner,
            sink,
            metrics,
        })
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
impl AuditSink for Instrumented {
    async fn append(&self, records: Vec<AuditRecord>) -> Result<(), AuditError> {
        let n = records.len() as i64;
        self.metrics.audit_queued(n);
        let _in_flight = InFlight {
            metrics: &self.metrics,
            records: n,
        };
        let span = tracing::info_span!(
            "audit.append",
            sink = self.sink,
            records = n,
            outcome = Empty,
            otel.status_code = Empty,
        );
        let result = self.inner.append(records).instrument(span.clone()).await;
        record_outcome(&span, if result.is_ok() { "ok" } else { "error" });
        result
    }

    async fn query(&self, q: &AuditQuery) -> Result<AuditPage, AuditError> {
        self.inner.query(q).await
    }

    async fn flush(&self) -> Result<(), AuditError> {
        self.inner.flush().await
    }
}

/// Sets `outcome` (`ok`, `partial`, `error`) and, on `error`, the span's OpenTelemetry status.
pub fn record_outcome(span: &tracing::Span, outcome: &'static str) {
    span.record("outcome", outcome);
    if outcome == "error" {
        span.record("otel.status_code", "error");
    }
}
