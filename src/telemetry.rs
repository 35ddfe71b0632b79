//! Logging and metrics.
//!
//! Metrics are OpenTelemetry instruments exported in Prometheus text through
//! opentelemetry-prometheus. Each [`Metrics`] owns its registry and meter provider, so several
//! nodes in one test process keep separate counters. Instruments are created once; recording
//! with `&'static str` attribute values does not allocate.

use std::sync::Arc;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Gauge, Histogram, MeterProvider, UpDownCounter};
use opentelemetry_sdk::metrics::SdkMeterProvider;
use prometheus::{Encoder, TextEncoder};

/// Every instrument the node records, created once at start-up.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: prometheus::Registry,
    // Keeps the pipeline alive: dropping the provider empties `/metrics`.
    _provider: SdkMeterProvider,
    meter: opentelemetry::metrics::Meter,
    /// Observable instruments registered later (kept so their callbacks stay registered).
    observed: std::sync::Mutex<Vec<opentelemetry::metrics::ObservableCounter<u64>>>,
    pub sessions: UpDownCounter<i64>,
    pub sessions_opened: Counter<u64>,
    pub joins: Counter<u64>,
    pub messages_in: Counter<u64>,
    pub messages_out: Counter<u64>,
    pub bytes_in: Counter<u64>,
    pub bytes_out: Counter<u64>,
    pub lock_outcomes: Counter<u64>,
    pub lock_acquire_duration: Histogram<f64>,
    pub cursor_dropped: Counter<u64>,
    pub slow_consumers: Counter<u64>,
    pub heartbeat_timeouts: Counter<u64>,
    pub rate_limited: Counter<u64>,
    pub client_errors: Counter<u64>,
    pub resyncs: Counter<u64>,
    pub nodes_gone: Counter<u64>,
    pub audit_backlog: Gauge<u64>,
    pub audit_batch_duration: Histogram<f64>,
    pub audit_write_failures: Counter<u64>,
    pub audit_dead_letters: Counter<u64>,
    pub fence_refusals: Counter<u64>,
    pub fence_failures: Counter<u64>,
}

#[derive(Debug, thiserror::Error)]
#[error("metrics setup failed: {0}")]
pub struct MetricsError(String);

impl Metrics {
    pub fn new(node_id: &str) -> Result<Metrics, MetricsError> {
        let registry = prometheus::Registry::new();
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .without_target_info()
            .scope_info_enabled(false)
            .build()
            .map_err(|e| MetricsError(e.to_string()))?;
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name("lockstep")
            .with_attribute(KeyValue::new("node_id", node_id.to_owned()))
            .build();
        let provider = SdkMeterProvider::builder()
            .with_reader(exporter)
            .with_resource(resource)
            .build();
        let m = provider.meter("lockstep");
        let counter = |name: &'static str, desc: &'static str| {
            m.u64_counter(name).with_description(desc).build()
        };
        let inner = Inner {
            sessions: m
                .i64_up_down_counter("lockstep.sessions")
                .with_description("WebSocket sessions connected to this node")
                .build(),
            sessions_opened: counter(
                "lockstep.sessions.opened",
                "Sessions opened (new or resumed)",
            ),
            joins: counter("lockstep.joins", "Room joins"),
            messages_in: counter("lockstep.messages.in", "Client messages received, by type"),
            messages_out: counter("lockstep.messages.out", "Server messages sent, by type"),
            bytes_in: m
                .u64_counter("lockstep.bytes.in")
                .with_unit("By")
                .with_description("Bytes received in frames")
                .build(),
            bytes_out: m
                .u64_counter("lockstep.bytes.out")
                .with_unit("By")
                .with_description("Bytes queued to clients")
                .build(),
            lock_outcomes: counter(
                "lockstep.lock.outcomes",
                "Lock outcomes: granted, denied, queued, released, expired, disconnected, forced, extended, stale",
            ),
            lock_acquire_duration: m
                .f64_histogram("lockstep.lock.acquire.duration")
                .with_unit("s")
                .with_description("Time to decide a lock acquire, engine included")
                .with_boundaries(vec![
                    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                    0.25, 1.0,
                ])
                .build(),
            cursor_dropped: counter(
                "lockstep.cursor.dropped",
                "Stale cursor updates replaced before being sent",
            ),
            slow_consumers: counter(
                "lockstep.slow_consumer.disconnects",
                "Sessions closed for reading too slowly",
            ),
            heartbeat_timeouts: counter(
                "lockstep.heartbeat.timeouts",
                "Sessions ended by missed heartbeats",
            ),
            rate_limited: counter(
                "lockstep.rate_limited",
                "Client messages dropped by the per-session rate limit",
            ),
            client_errors: counter("lockstep.client.errors", "Error frames sent, by code"),
            resyncs: counter(
                "lockstep.resyncs",
                "Snapshot resyncs after possibly lost events, by scope (room, all)",
            ),
            nodes_gone: counter(
                "lockstep.nodes.gone",
                "Other nodes found dead (liveness key expired)",
            ),
            audit_backlog: m
                .u64_gauge("lockstep.audit.backlog")
                .with_description(
                    "Audit outbox entries not yet in Postgres (pending + unread), as last observed",
                )
                .build(),
            audit_batch_duration: m
                .f64_histogram("lockstep.audit.batch.duration")
                .with_unit("s")
                .with_description("Time to write one audit batch to Postgres and acknowledge it")
                .with_boundaries(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ])
                .build(),
            audit_write_failures: counter(
                "lockstep.audit.write.failures",
                "Audit batches that could not be written to Postgres (retried)",
            ),
            audit_dead_letters: counter(
                "lockstep.audit.dead_letters",
                "Audit outbox entries moved to lockstep.audit_dead_letters",
            ),
            fence_refusals: counter(
                "lockstep.fence.refusals",
                "Grants refused by Postgres fence registration (token not above the registered one)",
            ),
            fence_failures: counter(
                "lockstep.fence.failures",
                "Grants withdrawn because fence registration failed (Postgres unavailable)",
            ),
            registry,
            meter: m.clone(),
            observed: std::sync::Mutex::new(Vec::new()),
            _provider: provider,
        };
        Ok(Metrics {
            inner: Arc::new(inner),
        })
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.inner.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Exports a counter read from `read` at every scrape (engine-owned atomics, such as the
    /// Redis broker's dropped messages).
    pub fn observe_counter(
        &self,
        name: &'static str,
        description: &'static str,
        read: impl Fn() -> u64 + Send + Sync + 'static,
    ) {
        let counter = self
            .inner
            .meter
            .u64_observable_counter(name)
            .with_description(description)
            .with_callback(move |o| o.observe(read(), &[]))
            .build();
        self.inner
            .observed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(counter);
    }

    pub fn session_opened(&self) {
        self.inner.sessions.add(1, &[]);
        self.inner.sessions_opened.add(1, &[]);
    }
    pub fn session_closed(&self) {
        self.inner.sessions.add(-1, &[]);
    }
    pub fn joined(&self) {
        self.inner.joins.add(1, &[]);
    }
    pub fn message_in(&self, ty: &'static str, bytes: usize) {
        self.inner.messages_in.add(1, &[KeyValue::new("type", ty)]);
        self.inner.bytes_in.add(bytes as u64, &[]);
    }
    pub fn messages_out(&self, ty: &'static str, count: u64, bytes: u64) {
        self.inner
            .messages_out
            .add(count, &[KeyValue::new("type", ty)]);
        self.inner.bytes_out.add(bytes, &[]);
    }
    pub fn lock_outcome(&self, outcome: &'static str) {
        self.inner
            .lock_outcomes
            .add(1, &[KeyValue::new("outcome", outcome)]);
    }
    pub fn lock_acquire_time(&self, seconds: f64) {
        self.inner.lock_acquire_duration.record(seconds, &[]);
    }
    pub fn cursor_dropped(&self, n: u64) {
        self.inner.cursor_dropped.add(n, &[]);
    }
    pub fn slow_consumer(&self) {
        self.inner.slow_consumers.add(1, &[]);
    }
    pub fn heartbeat_timeout(&self) {
        self.inner.heartbeat_timeouts.add(1, &[]);
    }
    pub fn rate_limited(&self) {
        self.inner.rate_limited.add(1, &[]);
    }
    pub fn resync(&self, all: bool) {
        let scope = if all { "all" } else { "room" };
        self.inner.resyncs.add(1, &[KeyValue::new("scope", scope)]);
    }
    pub fn node_gone(&self) {
        self.inner.nodes_gone.add(1, &[]);
    }
    /// Makes the audit writer's counters visible (at zero) from its start.
    pub fn audit_writer_started(&self) {
        self.inner.audit_write_failures.add(0, &[]);
        self.inner.audit_dead_letters.add(0, &[]);
    }
    pub fn audit_backlog(&self, entries: u64) {
        self.inner.audit_backlog.record(entries, &[]);
    }
    pub fn audit_batch_time(&self, seconds: f64) {
        self.inner.audit_batch_duration.record(seconds, &[]);
    }
    pub fn audit_write_failure(&self) {
        self.inner.audit_write_failures.add(1, &[]);
    }
    pub fn audit_dead_letters(&self, n: u64) {
        self.inner.audit_dead_letters.add(n, &[]);
    }
    pub fn client_error(&self, code: &'static str) {
        self.inner
            .client_errors
            .add(1, &[KeyValue::new("code", code)]);
    }
    pub fn fence_refusal(&self) {
        self.inner.fence_refusals.add(1, &[]);
    }
    pub fn fence_failure(&self) {
        self.inner.fence_failures.add(1, &[]);
    }
}
