//! One gateway node: owns the engines and the hub, and implements every operation once for
//! both WebSocket sessions and the HTTP API.
//!
//! - [`rooms`]: join, leave, presence, cursors, broadcasts, snapshots.
//! - [`locks`]: acquire, release, extend, waits, force-release, validate.
//! - [`sessions`]: opening, resuming, parking and ending sessions.
//! - [`lifetime`]: token refresh and roles, expiry, admin revocation.
//! - [`fencing`]: strict fencing — every grant registered in Postgres before it is handed out.
//! - [`leases`]: lease renewal, and the watchdog that tells holders their locks are `lost`
//!   when renewals stop reaching Redis.
//! - [`throttle`]: HTTP request budgets per IP and per user, the HTTP lock budget and the
//!   aggregation of `auth_failed` records.
//! - [`yjs_presence`]: Yjs connections listed as room members (the presence bridge).
//!
//! Background loops (one task): the lock reaper (expiries and waiter timeouts, every
//! [`REAP_INTERVAL`]), lease renewal for this node's sessions (every third of the lease), the
//! lease watchdog ([`leases::check`]), and the end of parked sessions whose resume grace passed.

pub mod admin;
mod audit_writer;
mod cluster;
mod engines;
pub mod fencing;
pub mod leases;
pub mod lifetime;
pub mod locks;
pub mod rooms;
pub mod sessions;
pub mod throttle;
pub mod yjs_presence;
pub mod yjs_tokens;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::audit::{AuditKind, AuditRecord, AuditSink};
use crate::auth::{Authenticator, Principal};
use crate::config::Config;
use crate::engine::{
    Broker, LockStore, LockTransition, PresenceStore, ResumeStore, RoomEvent, RoomEventKind,
};
use crate::error::ErrorCode;
use crate::hub::Hub;
use crate::names::Entity;
use crate::telemetry::Metrics;

/// How often expired locks and timed-out waiters are reaped: the precision of expiry.
pub const REAP_INTERVAL: Duration = Duration::from_millis(100);
/// How long the drain waits for a running periodic duty to finish: a little over fred's
/// 5 s command timeout, so only a duty stuck on a dead Redis is left behind.
const BACKGROUND_STOP_TIMEOUT: Duration = Duration::from_secs(6);

pub struct Node {
    pub id: Arc<str>,
    pub config: Arc<Config>,
    pub locks: Arc<dyn LockStore>,
    pub presence: Arc<dyn PresenceStore>,
    pub broker: Arc<dyn Broker>,
    pub resume: Arc<dyn ResumeStore>,
    pub audit: Arc<dyn AuditSink>,
    /// Postgres, when configured: fence registration and the audit trail.
    pub db: Option<deadpool_postgres::Pool>,
    pub hub: Arc<Hub>,
    pub auth: Authenticator,
    pub metrics: Metrics,
    /// When each held lock's lease was last known to be started or renewed ([`leases`]).
    pub leases: leases::Leases,
    /// HTTP request budgets, the HTTP lock budget and `auth_failed` aggregation.
    pub throttle: throttle::Throttle,
    /// Cancelled on SIGTERM: sessions send `reconnect` and close with 1012.
    pub draining: CancellationToken,
    /// Session tasks, waited for during the drain.
    pub tasks: TaskTracker,
    ready: AtomicBool,
    stop_background: CancellationToken,
    /// The periodic duties ([`every`]), waited for after `stop_background` so that none is
    /// still running (a lease renewal, say) once the drain hands the parked sessions over.
    background: TaskTracker,
    /// Serializes broker (un)subscriptions: each re-reads the hub under it, so racing joins
    /// and leaves always converge on "subscribed iff there are local members".
    subscriptions: tokio::sync::Mutex<()>,
    /// With Redis: the channel admin revocations reach the other nodes by (set at start).
    pub(crate) revocations: std::sync::OnceLock<Arc<crate::engine::redis::nodes::NodeRegistry>>,
    /// Folds Yjs document logs into snapshots. Its background task owns it (and it holds the
    /// node): the node keeps a weak handle, for the embedded mode's flush on drain.
    compactor: std::sync::OnceLock<std::sync::Weak<crate::yjs::compact::Compactor>>,
    /// Yjs documents loaded on this node (`GET /v1/yjs/{room}`).
    pub yjs: Arc<crate::yjs::docs::Registry>,
    /// Yjs connections of this node listed as room members ([`yjs_presence`]).
    pub bridged: Arc<yjs_presence::Bridged>,
    /// The tokens of this node's Yjs connections: ended at `exp` or on revocation.
    pub yjs_tokens: Arc<yjs_tokens::YjsTokens>,
    /// `/v1/yjs` connections writable only while a lock is held (`?lock=`).
    pub yjs_locks: Arc<crate::yjs::lockgate::LockGate>,
    /// Message budgets of this node's `/v1/yjs` users.
    pub yjs_budgets: Arc<crate::yjs::budget::UserBudgets>,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    #[error(transparent)]
    Metrics(#[from] crate::telemetry::MetricsError),
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    #[error(transparent)]
    Db(#[from] crate::db::DbError),
    #[error("redis TLS: {0}")]
    RedisTls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Snapshots(#[from] crate::yjs::store::SnapshotError),
}

/// Why an operation failed, as the client sees it.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("join {0} first")]
    NotInRoom(Entity),
    #[error("at most {0} rooms per session")]
    TooManyRooms(usize),
    #[error("at most {0} locks and waits per session")]
    TooManyLocks(usize),
    #[error("{} holds {}", .0.current.holder.name, .0.current.resource)]
    LockHeld(Box<locks::Denied>),
    #[error("that token does not hold the lock (stale, released or expired)")]
    LockNotHeld,
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("temporarily unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("the room is full ({0} members)")]
    RoomFull(usize),
    #[error("at most {per_minute} HTTP lock acquisitions per minute per user")]
    HttpLockBudget { per_minute: u32, retry_after_s: u64 },
}

impl OpError {
    pub fn code(&self) -> ErrorCode {
        match self {
            OpError::BadRequest(_) => ErrorCode::BadRequest,
            OpError::Forbidden(_) => ErrorCode::Forbidden,
            OpError::NotInRoom(_) => ErrorCode::NotInRoom,
            OpError::TooManyRooms(_) => ErrorCode::TooManyRooms,
            OpError::TooManyLocks(_) => ErrorCode::TooManyLocks,
            OpError::LockHeld(_) => ErrorCode::LockHeld,
            OpError::LockNotHeld => ErrorCode::LockNotHeld,
            OpError::NotFound(_) => ErrorCode::NotFound,
            OpError::Unauthorized(_) => ErrorCode::Unauthorized,
            OpError::Unavailable(_) => ErrorCode::Unavailable,
            OpError::TooLarge(_) => ErrorCode::TooLarge,
            OpError::RoomFull(_) => ErrorCode::RoomFull,
            OpError::HttpLockBudget { .. } => ErrorCode::TooManyLocks,
        }
    }
}

impl From<crate::engine::EngineError> for OpError {
    fn from(e: crate::engine::EngineError) -> Self {
        if let crate::engine::EngineError::RoomFull(max) = e {
            return OpError::RoomFull(max);
        }
        tracing::warn!(error = %e, "engine error");
        OpError::Unavailable(e.to_string())
    }
}

impl Node {
    /// Builds a node with the engines the configuration asks for and starts its background loop.
    /// Called inside the node's span ([`node_span`]): the engine tasks spawned while building
    /// (the Redis broker's) keep it.
    pub async fn start(config: Config) -> Result<Arc<Node>, NodeError> {
        let id: Arc<str> = Arc::from(config.node_id.as_str());
        let metrics = Metrics::new(&id)?;
        let auth = Authenticator::from_config(&config)?;
        let hub = Arc::new(Hub::new(metrics.clone()));
        observe_hub(&metrics, &hub);
        let engines = engines::build(&config, &id, hub.clone(), &metrics).await?;
        let throttle = throttle::Throttle::new(&config);
        let leases = leases::Leases::new(config.lock_lease);
        // A document is its snapshot (Postgres, or files when embedded) plus its log's tail.
        let snapshots = crate::yjs::snapshots::open(
            engines.db.as_ref(),
            config.redis_url.is_some(),
            &config.data_dir,
        )?;
        let yjs = crate::yjs::docs::Registry::new(
            id.clone(),
            engines.doc_log.clone(),
            snapshots.clone(),
            config.yjs_limits(),
        );
        let doc_log = engines.doc_log.clone();
        observe_yjs(&metrics, &yjs);
        let bridged = yjs_presence::Bridged::new();
        yjs_presence::observe(&metrics, &bridged);
        let yjs_locks = crate::yjs::lockgate::LockGate::new();
        hub.watch_locks(yjs_locks.clone());
        let yjs_budgets =
            crate::yjs::budget::UserBudgets::new(config.messages_per_second, config.message_burst);
        let node = Arc::new(Node {
            yjs,
            yjs_locks,
            yjs_budgets,
            bridged,
            yjs_tokens: yjs_tokens::YjsTokens::new(),
            id,
            config: Arc::new(config),
            locks: engines.locks,
            presence: engines.presence,
            broker: engines.broker,
            resume: engines.resume,
            audit: engines.audit,
            db: engines.db,
            hub,
            auth,
            metrics,
            leases,
            throttle,
            draining: CancellationToken::new(),
            tasks: TaskTracker::new(),
            ready: AtomicBool::new(true),
            stop_background: CancellationToken::new(),
            background: TaskTracker::new(),
            subscriptions: tokio::sync::Mutex::new(()),
            revocations: std::sync::OnceLock::new(),
            compactor: std::sync::OnceLock::new(),
        });
        node.yjs.spawn_listener(node.stop_background.clone());
        node.background.spawn(
            node.yjs_locks
                .clone()
                .run(node.locks.clone(), node.stop_background.clone()),
        );
        crate::yjs::compact::audit_loads(&node);
        // No snapshot store (Redis without a database, see `snapshots::for_node`): nothing to
        // compact into, so the update logs keep everything and grow in Redis.
        match snapshots {
            None => tracing::warn!(
                "yjs: Redis without LOCKSTEP_DATABASE_URL: documents are not compacted (their update logs grow in Redis)"
            ),
            Some(snapshots) => {
                let compactor = crate::yjs::compact::Compactor::new(
                    node.clone(),
                    doc_log,
                    snapshots,
                    node.config.yjs_compactor(),
                );
                let _ = node.compactor.set(Arc::downgrade(&compactor));
                observe_compactor(&node.metrics, &compactor.watch());
                let registry = node.yjs.clone();
                node.background.spawn(
                    compactor.run(move || registry.loaded_docs(), node.stop_background.clone()),
                );
            }
        }
        spawn_background(&node);
        audit_writer::spawn(&node, engines.audit_outbox);
        fencing::spawn_pruning(&node);
        if let Some(parts) = engines.cluster {
            cluster::spawn(&node, parts);
        }
        Ok(node)
    }

    /// The span of this node's background work: its logs carry `node_id` (several nodes
    /// share a test process, so it cannot be a global). Not exported as a trace.
    pub fn span(&self) -> tracing::Span {
        node_span(&self.id)
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed) && !self.draining.is_cancelled()
    }

    /// SIGTERM: fail readiness, tell every session to reconnect elsewhere, wait for them to
    /// close (at most `drain_timeout`), then stop background work and flush the audit log.
    pub async fn drain(&self) {
        self.ready.store(false, Ordering::Relaxed);
        self.metrics.draining();
        self.draining.cancel();
        self.tasks.close();
        if tokio::time::timeout(self.config.drain_timeout, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "drain timeout: {} session tasks still running",
                self.tasks.len()
            );
        }
        // Embedded, a document's log lives in this process: a clean stop folds it into the
        // snapshot files first (before the background stops: the compactor lives in it).
        // With Redis the log is durable and outlives the node.
        if self.config.redis_url.is_none()
            && let Some(c) = self.compactor.get().and_then(std::sync::Weak::upgrade)
        {
            let flushed = c.flush(&self.yjs.loaded_docs()).await;
            tracing::info!(flushed, "yjs documents compacted before the exit");
        }
        self.stop_background.cancel();
        // A renewal still in flight would shorten the leases the hand-over stretches. A duty
        // stuck on an unreachable Redis must not hold the exit up past its command timeout.
        self.background.close();
        if tokio::time::timeout(BACKGROUND_STOP_TIMEOUT, self.background.wait())
            .await
            .is_err()
        {
            tracing::warn!("background duties still running after the drain");
        }
        self.hand_over_parked().await;
        // Events are posted, not confirmed (`publish`): send what is still queued.
        if let Err(e) = self.broker.flush().await {
            tracing::warn!(error = %e, "room events not published before the exit");
        }
        if let Err(e) = self.audit.flush().await {
            tracing::error!(error = %e, "audit flush on shutdown failed");
        }
    }

    /// Appends audit records the lock store does not write itself (sessions, auth).
    pub async fn record(&self, records: Vec<AuditRecord>) {
        if let Err(e) = self.audit.append(records).await {
            tracing::error!(error = %e, "audit append failed");
        }
    }

    pub fn audit_record(&self, kind: AuditKind) -> AuditRecord {
        AuditRecord::new(kind, self.id.clone())
    }

    /// Records a permission denial and returns the error for it.
    pub async fn forbidden(&self, who: &Principal, room: &Entity, what: &str) -> OpError {
        let mut r = self.audit_record(AuditKind::Forbidden);
        r.room = Some(Arc::from(room.as_str()));
        r.user_id = Some(who.user_id.clone());
        r.detail = serde_json::json!({ "attempted": what });
        self.record(vec![r]).await;
        OpError::Forbidden(format!("your role in {room} does not allow {what}"))
    }

    /// Subscribes this node to `room` if it has local members or lock-gated Yjs connections
    /// there, unsubscribes otherwise.
    pub async fn sync_subscription(&self, room: &Entity) -> Result<(), crate::engine::EngineError> {
        let _order = self.subscriptions.lock().await;
        if self.hub.has_members(room) || self.yjs_locks.watches(room) {
            self.broker.subscribe(room).await
        } else {
            self.broker.unsubscribe(room).await
        }
    }

    pub async fn publish(
        &self,
        room: &Entity,
        origin: Option<&crate::engine::SessionId>,
        kind: RoomEventKind,
    ) {
        let event = Arc::new(RoomEvent {
            room: room.clone(),
            origin: origin.cloned(),
            kind,
        });
        // Queued, not confirmed: local members have it now, other nodes in queue order.
        if let Err(e) = self.broker.post(event).await {
            tracing::warn!(error = %e, %room, "publish failed");
        }
    }

    /// Announces a lock transition to its room, and the next holder's grant, if any, once its
    /// token is registered (see [`fencing`]).
    pub async fn announce(&self, t: LockTransition) {
        match t {
            LockTransition::Released {
                lock,
                reason,
                granted,
            } => {
                self.metrics.lock_outcome(reason.as_str());
                let room = lock.room.clone();
                self.publish(&room, None, RoomEventKind::LockReleased { lock, reason })
                    .await;
                if let Some(grant) = granted {
                    // Registered (strict fencing) before it is announced.
                    self.serve_handoff(grant).await;
                }
            }
            LockTransition::WaitExpired {
                room,
                resource,
                session_id,
                request_id,
            } => {
                self.metrics.lock_outcome("wait_expired");
                self.publish(
                    &room,
                    None,
                    RoomEventKind::WaitExpired {
                        resource,
                        session_id,
                        request_id,
                    },
                )
                .await;
            }
        }
    }
}

/// Gauges read from the hub at every scrape: adding them up once per scrape costs less than
/// tracking them on every message. The callbacks hold the hub weakly: the metrics live inside
/// the hub, and a strong reference would keep both alive forever.
fn observe_hub(metrics: &Metrics, hub: &Arc<Hub>) {
    let read = |f: fn(&Hub) -> usize| {
        let hub = Arc::downgrade(hub);
        move || hub.upgrade().map_or(0, |h| f(&h) as u64)
    };
    metrics.observe_gauge(
        "lockstep.rooms",
        "",
        "Rooms with at least one member connected to this node",
        read(Hub::room_count),
    );
    metrics.observe_gauge(
        "lockstep.outbound.queue",
        "By",
        "Bytes queued to clients across this node's sessions, not yet written",
        read(Hub::queued_bytes),
    );
    metrics.observe_gauge(
        "lockstep.lock.waiters",
        "",
        "Lock waits queued by this node's sessions",
        read(Hub::waiters),
    );
}

/// The `node` span (`node_id`): the context of a node's background work and start-up.
/// Always a root: tasks spawned during start-up (already inside a `node` span) would otherwise
/// nest a second `node` span in the first, and every log line would name the node twice.
pub fn node_span(id: &str) -> tracing::Span {
    tracing::info_span!(parent: None, "node", node_id = id)
}

/// The node's periodic work, one task per duty so a slow one (ending parked sessions can wait
/// on the audit log) never delays lease renewal into a false expiry. All stop after the drain.
fn spawn_background(node: &Arc<Node>) {
    every(node, REAP_INTERVAL, |node| async move {
        match node.locks.reap(crate::engine::now_ms()).await {
            Ok(transitions) => {
                for t in transitions {
                    node.announce(t).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "lock reap failed"),
        }
    });
    every(node, node.config.lock_lease / 3, |node| async move {
        leases::renew(&node).await
    });
    // Its own timer: a renewal may hang in a call for the command timeout, and the holders
    // must be told before their leases run out all the same.
    every(
        node,
        leases::check_period(node.config.lock_lease),
        |node| async move { leases::check(&node) },
    );
    every(node, Duration::from_millis(250), |node| async move {
        for handle in node.hub.expired_parked(Instant::now()) {
            node.expire_parked(&handle).await;
        }
    });
    every(node, sessions::ADMISSION_TTL / 3, |node| async move {
        node.keep_admitted().await
    });
}

/// Runs `duty` every `period` (skipping missed ticks) until the node stops its background work.
pub(crate) fn every<F, Fut>(node: &Arc<Node>, period: Duration, duty: F)
where
    F: Fn(Arc<Node>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let node = node.clone();
    let span = node.span();
    let background = node.background.clone();
    background.spawn(
        async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = node.stop_background.cancelled() => return,
                    _ = tick.tick() => duty(node.clone()).await,
                }
            }
        }
        .instrument(span),
    );
}

/// The compactor's view of the loaded documents' logs, as of its last checks (each second):
/// read at scrape time, no Redis call per scrape.
fn observe_compactor(metrics: &Metrics, watch: &crate::yjs::compact::LogWatch) {
    type Pick = fn(&crate::yjs::compact::LogStats) -> u64;
    let gauges: [(&'static str, &'static str, Pick); 2] = [
        (
            "lockstep.yjs.log_entries",
            "Update-log entries not compacted yet, summed over the Yjs documents loaded on this node",
            |s| s.entries,
        ),
        (
            "lockstep.yjs.log_entries_max",
            "Update-log entries not compacted yet of the longest log among the documents loaded here",
            |s| s.entries_max,
        ),
    ];
    for (name, description, pick) in gauges {
        let w = watch.clone();
        metrics.observe_gauge(name, "", description, move || pick(&w.stats()));
    }
    let w = watch.clone();
    metrics.observe_gauge_f64(
        "lockstep.yjs.compaction_lag",
        "s",
        "Age of the oldest update-log entry not compacted yet among the documents loaded here (0: none)",
        move || w.stats().lag_seconds(crate::engine::now_ms()),
    );
}

/// The document layer's metrics, read at every scrape.
fn observe_yjs(metrics: &Metrics, yjs: &Arc<crate::yjs::docs::Registry>) {
    use std::sync::atomic::Ordering::Relaxed;
    let y = yjs.clone();
    metrics.observe_gauge(
        "lockstep.yjs.documents",
        "",
        "Yjs documents loaded on this node",
        move || y.loaded() as u64,
    );
    // One pass over the loaded documents per gauge and scrape; no per-document series (a
    // client can create documents at will).
    type Size = fn((u64, u64)) -> u64;
    let sizes: [(&'static str, &'static str, &'static str, Size); 2] = [
        (
            "lockstep.yjs.document",
            "By",
            "Size of the Yjs documents loaded on this node, summed (bytes of the snapshot and updates each was built from, the measure of LOCKSTEP_YJS_MAX_DOC_BYTES)",
            |(total, _)| total,
        ),
        (
            "lockstep.yjs.document.bytes_max",
            "",
            "Size of the largest Yjs document loaded on this node (same measure)",
            |(_, max)| max,
        ),
    ];
    for (name, unit, description, pick) in sizes {
        let y = yjs.clone();
        metrics.observe_gauge(name, unit, description, move || pick(y.sizes()));
    }
    type Pick = fn(&crate::yjs::docs::Counters) -> &std::sync::atomic::AtomicU64;
    let counters: [(&'static str, &'static str, Pick); 6] = [
        (
            "lockstep.yjs.updates",
            "Yjs updates applied on this node (from local clients and from other nodes)",
            |c| &c.updates,
        ),
        (
            "lockstep.yjs.appends",
            "Merged Yjs updates appended to document logs by this node",
            |c| &c.appends,
        ),
        (
            "lockstep.yjs.appended_bytes",
            "Bytes of merged Yjs updates appended to document logs by this node",
            |c| &c.appended_bytes,
        ),
        (
            "lockstep.yjs.readonly_refused",
            "Yjs updates dropped because their connection is read-only",
            |c| &c.refused_readonly,
        ),
        (
            "lockstep.yjs.rereads",
            "Document log re-reads after a gap or a lagging announcement receiver",
            |c| &c.rereads,
        ),
        (
            "lockstep.yjs.throttled",
            "Yjs client messages that waited for their connection's or user's message budget",
            |c| &c.throttled,
        ),
    ];
    for (name, description, pick) in counters {
        let y = yjs.clone();
        metrics.observe_counter(name, description, move || pick(&y.counters).load(Relaxed));
    }
}
