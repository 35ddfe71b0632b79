//! Logging and metrics.
//!
//! Metrics are OpenTelemetry instruments exported in Prometheus text through
//! opentelemetry-prometheus. Each [`Metrics`] owns its registry and meter provider, so several
//! nodes in one test process keep separate counters. Instruments are created once; recording
//! with `&'static str` attribute values does not allocate (the SDK finds an existing series by
//! the attribute slice; only a series' first point allocates).
//!
//! The exporter rewrites names: dots become underscores, monotonic counters get `_total`, the
//! unit `s` becomes `_seconds` and `By` `_bytes` (so `lockstep.received` with unit `By` is
//! exposed as `lockstep_received_bytes_total`). `docs/operations.md` lists every exposed name;
//! `tests/metrics.rs` checks that list against a live node.
//!
//! Every label-less counter, and every labelled counter whose label values are a closed set,
//! is recorded at zero when the node starts, so rates and `increase()` see a series from the
//! start instead of losing the first increment. Histograms appear with their first observation.

use std::sync::Arc;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Gauge, Histogram, MeterProvider, UpDownCounter};
use opentelemetry_sdk::metrics::SdkMeterProvider;
use prometheus::{Encoder, TextEncoder};
use std::any::Any;

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
    observed: std::sync::Mutex<Vec<Box<dyn Any + Send + Sync>>>,
    sessions: UpDownCounter<i64>,
    sessions_opened: Counter<u64>,
    sessions_closed: Counter<u64>,
    session_takeovers: Counter<u64>,
    joins: Counter<u64>,
    draining: Gauge<i64>,
    messages_received: Counter<u64>,
    messages_sent: Counter<u64>,
    received_bytes: Counter<u64>,
    sent_bytes: Counter<u64>,
    lock_outcomes: Counter<u64>,
    lock_acquire_duration: Histogram<f64>,
    cursor_dropped: Counter<u64>,
    slow_consumers: Counter<u64>,
    heartbeat_misses: Counter<u64>,
    heartbeat_timeouts: Counter<u64>,
    rate_limited: Counter<u64>,
    client_errors: Counter<u64>,
    resyncs: Counter<u64>,
    nodes_gone: Counter<u64>,
    audit_backlog: Gauge<u64>,
    audit_queue_records: UpDownCounter<i64>,
    audit_batch_duration: Histogram<f64>,
    audit_write_failures: Counter<u64>,
    audit_dead_letters: Counter<u64>,
    fence_refusals: Counter<u64>,
    fence_failures: Counter<u64>,
    redis: RedisMetrics,
}

/// Label values of `lockstep_sessions_opened_total{kind}`.
pub const SESSION_KINDS: &[&str] = &["new", "resumed"];

/// Label values of `lockstep_session_takeovers_total{outcome}`: a resume found its session
/// still attached on this node (`local`) or on another one and moved it here (`remote`); asked
/// the cluster and nobody had it (`not_found`); or the holding node did not park it in time
/// (`timeout`). The last two open a new session.
pub const TAKEOVER_OUTCOMES: &[&str] = &["local", "remote", "not_found", "timeout"];

/// Label values of `lockstep_sessions_closed_total{reason}` (see `EndReason::metric_label`).
pub const CLOSE_REASONS: &[&str] = &[
    "client",
    "connection_lost",
    "heartbeat",
    "slow_consumer",
    "protocol",
    "drain",
    "superseded",
    "token_expired",
    "revoked",
];

/// Label values of `lockstep_lock_outcomes_total{outcome}`.
pub const LOCK_OUTCOMES: &[&str] = &[
    "granted",
    "denied",
    "queued",
    "released",
    "expired",
    "disconnected",
    "forced",
    "revoked",
    "extended",
    "stale",
    "wait_expired",
    "wait_failed",
    "lost",
];

/// Label values of `lockstep_resyncs_total{scope}`.
pub const RESYNC_SCOPES: &[&str] = &["room", "all"];

#[derive(Debug, thiserror::Error)]
#[error("metrics setup failed: {0}")]
pub struct MetricsError(String);

/// Buckets for in-process decisions that may include a Redis or Postgres round trip.
const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// Buckets for Redis calls: a loopback round trip (~100 µs) up to fred's 5 s command timeout.
const REDIS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

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
        let bytes = |name: &'static str, desc: &'static str| {
            m.u64_counter(name)
                .with_unit("By")
                .with_description(desc)
                .build()
        };
        let seconds = |name: &'static str, desc: &'static str, buckets: &[f64]| {
            m.f64_histogram(name)
                .with_unit("s")
                .with_description(desc)
                .with_boundaries(buckets.to_vec())
                .build()
        };
        let inner = Inner {
            sessions: m
                .i64_up_down_counter("lockstep.sessions")
                .with_description("WebSocket sessions connected to this node")
                .build(),
            sessions_opened: counter(
                "lockstep.sessions.opened",
                "Sessions opened on this node, by kind (new, resumed)",
            ),
            sessions_closed: counter(
                "lockstep.sessions.closed",
                "Session sockets closed on this node, by reason",
            ),
            session_takeovers: counter(
                "lockstep.session.takeovers",
                "Resumes that had to take their session over from a socket still attached, by outcome",
            ),
            joins: counter("lockstep.joins", "Room joins"),
            draining: m
                .i64_gauge("lockstep.draining")
                .with_description("1 while the node drains after SIGTERM, else 0")
                .build(),
            messages_received: counter(
                "lockstep.messages.received",
                "Client messages received, by type (invalid, rate_limited for refused frames)",
            ),
            messages_sent: counter(
                "lockstep.messages.sent",
                "Server messages queued to clients, by type",
            ),
            received_bytes: bytes("lockstep.received", "Bytes received in WebSocket frames"),
            sent_bytes: bytes("lockstep.sent", "Bytes of server messages queued to clients"),
            lock_outcomes: counter(
                "lockstep.lock.outcomes",
                "Lock outcomes: granted, denied, queued, released, expired, disconnected, forced, revoked, extended, stale, wait_expired, wait_failed, lost (holder told its lease could not be renewed in time)",
            ),
            lock_acquire_duration: seconds(
                "lockstep.lock.acquire.duration",
                "Time to decide a lock acquire, engine and fence registration included",
                LATENCY_BUCKETS,
            ),
            cursor_dropped: counter(
                "lockstep.cursor.dropped",
                "Stale cursor updates replaced or dropped before being sent",
            ),
            slow_consumers: counter(
                "lockstep.slow_consumer.disconnects",
                "Sessions closed for reading too slowly (4008)",
            ),
            heartbeat_misses: counter(
                "lockstep.heartbeat.misses",
                "Heartbeat intervals in which a session sent nothing",
            ),
            heartbeat_timeouts: counter(
                "lockstep.heartbeat.timeouts",
                "Sessions ended by missed heartbeats",
            ),
            rate_limited: counter(
                "lockstep.rate_limited",
                "Client messages dropped by the per-session rate limit",
            ),
            client_errors: counter(
                "lockstep.client.errors",
                "Error frames and HTTP error responses sent, by code",
            ),
            resyncs: counter(
                "lockstep.resyncs",
                "Snapshot resyncs after possibly lost events, by scope (room, all)",
            ),
            nodes_gone: counter(
                "lockstep.nodes.gone",
                "Other nodes found dead (liveness key expired) and swept",
            ),
            audit_backlog: m
                .u64_gauge("lockstep.audit.backlog")
                .with_description(
                    "Audit outbox entries not yet in Postgres (pending + unread), as last observed",
                )
                .build(),
            audit_queue_records: m
                .i64_up_down_counter("lockstep.audit.queue.records")
                .with_description(
                    "Audit records handed to the node's audit sink and not yet stored in its outbox",
                )
                .build(),
            audit_batch_duration: seconds(
                "lockstep.audit.batch.duration",
                "Time to write one audit batch to Postgres and acknowledge it",
                &[
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ],
            ),
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
            redis: RedisMetrics(Some(Arc::new(RedisInstruments {
                duration: seconds(
                    "lockstep.redis.command.duration",
                    "Time of one Redis call (command, script or pipeline), by op",
                    REDIS_BUCKETS,
                ),
                errors: counter(
                    "lockstep.redis.errors",
                    "Redis calls that failed (error reply, timeout, connection lost), by op",
                ),
                replication_failures: counter(
                    "lockstep.lock.replication.failures",
                    "Lock changes not acknowledged by LOCKSTEP_LOCK_REPLICAS replicas in time \
                     (the grant was withdrawn or the request answered unavailable), by op",
                ),
            }))),
            registry,
            meter: m.clone(),
            observed: std::sync::Mutex::new(Vec::new()),
            _provider: provider,
        };
        let metrics = Metrics {
            inner: Arc::new(inner),
        };
        metrics.start_at_zero();
        Ok(metrics)
    }

    /// Records every node-wide series at zero (see the module docs).
    fn start_at_zero(&self) {
        let i = &self.inner;
        i.sessions.add(0, &[]);
        i.draining.record(0, &[]);
        i.audit_queue_records.add(0, &[]);
        for c in [
            &i.joins,
            &i.received_bytes,
            &i.sent_bytes,
            &i.cursor_dropped,
            &i.slow_consumers,
            &i.heartbeat_misses,
            &i.heartbeat_timeouts,
            &i.rate_limited,
            &i.fence_refusals,
            &i.fence_failures,
        ] {
            c.add(0, &[]);
        }
        for kind in SESSION_KINDS {
            i.sessions_opened.add(0, &[KeyValue::new("kind", *kind)]);
        }
        for outcome in TAKEOVER_OUTCOMES {
            i.session_takeovers
                .add(0, &[KeyValue::new("outcome", *outcome)]);
        }
        for reason in CLOSE_REASONS {
            i.sessions_closed
                .add(0, &[KeyValue::new("reason", *reason)]);
        }
        for outcome in LOCK_OUTCOMES {
            i.lock_outcomes
                .add(0, &[KeyValue::new("outcome", *outcome)]);
        }
        for code in crate::error::ErrorCode::ALL {
            i.client_errors
                .add(0, &[KeyValue::new("code", code.as_str())]);
        }
    }

    /// Makes the multi-node (Redis) series visible, at zero, from the node's start.
    pub fn cluster_started(&self) {
        self.inner.nodes_gone.add(0, &[]);
        for scope in RESYNC_SCOPES {
            self.inner.resyncs.add(0, &[KeyValue::new("scope", *scope)]);
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.inner.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        String::from_utf8(buf).unwrap_or_default()
    }

    fn keep(&self, instrument: impl Any + Send + Sync) {
        self.inner
            .observed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Box::new(instrument));
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
        self.keep(counter);
    }

    /// Exports a gauge computed by `read` at every scrape: state that is cheaper to add up
    /// once per scrape than to track on every change (queued bytes over all sessions).
    /// `unit` is an OpenTelemetry unit (`By` → `_bytes`) or empty.
    pub fn observe_gauge(
        &self,
        name: &'static str,
        unit: &'static str,
        description: &'static str,
        read: impl Fn() -> u64 + Send + Sync + 'static,
    ) {
        let mut b = self
            .inner
            .meter
            .u64_observable_gauge(name)
            .with_description(description)
            .with_callback(move |o| o.observe(read(), &[]));
        if !unit.is_empty() {
            b = b.with_unit(unit);
        }
        self.keep(b.build());
    }

    /// The handle the Redis engines record their calls with.
    pub fn redis(&self) -> RedisMetrics {
        self.inner.redis.clone()
    }

    pub fn session_opened(&self, resumed: bool) {
        let kind = if resumed { "resumed" } else { "new" };
        self.inner.sessions.add(1, &[]);
        self.inner
            .sessions_opened
            .add(1, &[KeyValue::new("kind", kind)]);
    }
    /// A resume had to take its session over (`outcome`: one of [`TAKEOVER_OUTCOMES`]).
    pub fn session_takeover(&self, outcome: &'static str) {
        self.inner
            .session_takeovers
            .add(1, &[KeyValue::new("outcome", outcome)]);
    }
    /// A session's socket closed (`reason`: one of [`CLOSE_REASONS`]).
    pub fn session_closed(&self, reason: &'static str) {
        self.inner.sessions.add(-1, &[]);
        self.inner
            .sessions_closed
            .add(1, &[KeyValue::new("reason", reason)]);
    }
    pub fn joined(&self) {
        self.inner.joins.add(1, &[]);
    }
    pub fn draining(&self) {
        self.inner.draining.record(1, &[]);
    }
    pub fn message_in(&self, ty: &'static str, bytes: usize) {
        self.inner
            .messages_received
            .add(1, &[KeyValue::new("type", ty)]);
        self.inner.received_bytes.add(bytes as u64, &[]);
    }
    pub fn messages_out(&self, ty: &'static str, count: u64, bytes: u64) {
        self.inner
            .messages_sent
            .add(count, &[KeyValue::new("type", ty)]);
        self.inner.sent_bytes.add(bytes, &[]);
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
    pub fn heartbeat_miss(&self) {
        self.inner.heartbeat_misses.add(1, &[]);
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
    /// Makes the audit writer's series visible (at zero) from its start.
    pub fn audit_writer_started(&self) {
        self.inner.audit_write_failures.add(0, &[]);
        self.inner.audit_dead_letters.add(0, &[]);
        self.inner.audit_backlog.record(0, &[]);
    }
    pub fn audit_backlog(&self, entries: u64) {
        self.inner.audit_backlog.record(entries, &[]);
    }
    /// `records` more (or, negative, fewer) audit records on their way into the sink.
    pub fn audit_queued(&self, records: i64) {
        self.inner.audit_queue_records.add(records, &[]);
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

    /// A counter for a subsystem that records it itself (the Yjs compactor's outcomes). Asking
    /// twice for one name gives the same series.
    pub fn counter(&self, name: &'static str, description: &'static str) -> Counter<u64> {
        self.inner
            .meter
            .u64_counter(name)
            .with_description(description)
            .build()
    }

    /// A histogram in seconds for a subsystem that records it itself (Yjs compaction rounds).
    pub fn seconds_histogram(
        &self,
        name: &'static str,
        description: &'static str,
        buckets: &[f64],
    ) -> Histogram<f64> {
        self.inner
            .meter
            .f64_histogram(name)
            .with_unit("s")
            .with_description(description)
            .with_boundaries(buckets.to_vec())
            .build()
    }

    /// [`observe_gauge`](Self::observe_gauge) for a fractional value (an age in seconds).
    pub fn observe_gauge_f64(
        &self,
        name: &'static str,
        unit: &'static str,
        description: &'static str,
        read: impl Fn() -> f64 + Send + Sync + 'static,
    ) {
        let mut b = self
            .inner
            .meter
            .f64_observable_gauge(name)
            .with_description(description)
            .with_callback(move |o| o.observe(read(), &[]));
        if !unit.is_empty() {
            b = b.with_unit(unit);
        }
        self.keep(b.build());
    }
}

/// What the Redis engines record per call: `lockstep_redis_command_duration_seconds{op}` and
/// `lockstep_redis_errors_total{op}`. Cheap to clone; the default records nothing (engines
/// built outside a node, as in engine tests).
#[derive(Clone, Default)]
pub struct RedisMetrics(Option<Arc<RedisInstruments>>);

struct RedisInstruments {
    duration: Histogram<f64>,
    errors: Counter<u64>,
    replication_failures: Counter<u64>,
}

impl RedisMetrics {
    /// One finished call of `op`. The error counter is also touched on success (adding 0), so
    /// an op's error series exists from its first call and its first failure is not lost to
    /// `increase()`.
    pub fn record(&self, op: &'static str, seconds: f64, failed: bool) {
        if let Some(i) = &self.0 {
            let attrs = [KeyValue::new("op", op)];
            i.duration.record(seconds, &attrs);
            i.errors.add(u64::from(failed), &attrs);
        }
    }
}

impl RedisMetrics {
    /// Makes `lockstep_lock_replication_failures_total{op}` visible at zero for every op that
    /// waits for replicas (called when the lock store is built).
    pub fn replication_started(&self, ops: &[&'static str]) {
        if let Some(i) = &self.0 {
            for op in ops {
                i.replication_failures.add(0, &[KeyValue::new("op", *op)]);
            }
        }
    }

    /// A lock change of `op` that the required replicas did not acknowledge in time.
    pub fn replication_failure(&self, op: &'static str) {
        if let Some(i) = &self.0 {
            i.replication_failures.add(1, &[KeyValue::new("op", op)]);
        }
    }
}
