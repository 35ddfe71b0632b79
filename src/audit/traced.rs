//! [`Traced`]: any [`AuditSink`] with an `audit.append` span around each batch it is handed.
//!
//! One wrapper at the wiring, rather than spans in every sink, so the JSON-lines writer and
//! the Redis outbox append (node records: sessions, auth) are traced alike. Records that the
//! Redis lock scripts `XADD` themselves are inside their `redis` spans; the drains into
//! Postgres have `audit.drain` spans ([`super::outbox`], [`super::drain`]).

use std::sync::Arc;

use async_trait::async_trait;
use tracing::Instrument;
use tracing::field::Empty;

use super::{AuditError, AuditPage, AuditQuery, AuditRecord, AuditSink};

pub struct Traced {
    inner: Arc<dyn AuditSink>,
    /// Where the records go: `jsonl` or `redis_outbox`.
    sink: &'static str,
}

impl Traced {
    pub fn wrap(inner: Arc<dyn AuditSink>, sink: &'static str) -> Arc<dyn AuditSink> {
        Arc::new(Traced { inner, sink })
    }
}

#[async_trait]
impl AuditSink for Traced {
    async fn append(&self, records: Vec<AuditRecord>) -> Result<(), AuditError> {
        let span = tracing::info_span!(
            "audit.append",
            sink = self.sink,
            records = records.len() as i64,
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
