//! Redis engines: locks, presence and fan-out shared by every node.
//!
//! Only this module knows key names ([`keys`]) and Lua (`scripts/*.lua`). Standalone,
//! Sentinel and Cluster deployments are all reached through fred's URL forms
//! (`redis://`, `redis-sentinel://…?sentinelServiceName=`, `redis-cluster://…?node=`), and
//! each has a TLS form (`rediss://`, `rediss-sentinel://`, `rediss-cluster://`; see [`tls`]).
//!
//! Every call the engines make to Redis goes through [`call`]: a `redis` tracing span named
//! after the operation, and `lockstep_redis_command_duration_seconds{op}` /
//! `lockstep_redis_errors_total{op}`. `op` is a fixed name per call site (`lock_acquire`,
//! `presence_update`, `publish`, …), never built at run time, so recording does not allocate.

pub mod audit;
pub mod broker;
pub mod docs;
pub mod keys;
mod lock_results;
pub mod locks;
pub mod nodes;
pub mod presence;
pub mod replication;
pub mod resume;
mod rooms;
pub mod script;
pub mod tls;

use std::future::Future;
use std::time::{Duration, Instant};

use fred::prelude::*;
use tracing::Instrument;

use crate::config::RedisTls;
use crate::engine::EngineError;
use crate::telemetry::RedisMetrics;
use crate::tls::TlsError;

/// Commands from one node go over a small pool; blocking reads and pub/sub use their own
/// connections (fred's subscriber client), so a slow command never stalls fan-out.
const POOL_SIZE: usize = 4;

/// Broadcast capacity of the room subscriber's event channels (fred's default of 32 is far too
/// small for room fan-out; a lagging receiver is counted and triggers a resync).
///
/// Only the clients whose events are read get it ([`subscriber_builder`]): tokio's broadcast
/// channel allocates every slot up front, and fred gives each client about eight channels, so
/// 16 Ki slots on every pooled client cost a Redis-mode node ~125 MB before its first
/// connection (136 MB idle against 11 MB embedded).
pub const EVENT_CAPACITY: usize = 16 * 1024;

/// Event capacity of command clients (pools): nobody reads their events, fred's default.
const COMMAND_EVENT_CAPACITY: usize = 32;

/// How long fred waits for a command's reply, its re-sends after a reconnect included. Lua
/// scripts that change state are made safe to re-send ([`script`]).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a node's Redis is and how to reach it: the URL and, for a TLS URL (`rediss…`), the
/// TLS config built once from `LOCKSTEP_REDIS_TLS_*` ([`tls`]). Every fred client a node builds
/// (command pools, subscribers, the revocation listener) is built from it.
#[derive(Debug, Clone)]
pub struct RedisTarget {
    url: String,
    tls: Option<tls::Tls>,
}

impl RedisTarget {
    /// `url` with the node's TLS settings; reads their PEM files now.
    pub fn new(url: &str, settings: &RedisTls) -> Result<RedisTarget, TlsError> {
        Ok(RedisTarget {
            url: url.to_owned(),
            tls: tls::build(url, settings)?,
        })
    }

    /// `url` with the default TLS settings (system roots, full verification): tools and tests.
    pub fn from_url(url: &str) -> Result<RedisTarget, EngineError> {
        RedisTarget::new(url, &RedisTls::default())
            .map_err(|e| EngineError::Unavailable(format!("redis TLS: {e}")))
    }

    pub fn url(&self) -> &str {
        &self.url
    }
}

/// Builds a connected command pool for `url` with the default TLS settings ([`connect_to`]
/// with [`RedisTarget::from_url`]).
pub async fn connect(url: &str) -> Result<Pool, EngineError> {
    connect_to(&RedisTarget::from_url(url)?).await
}

/// Builds a connected command pool for `target`.
pub async fn connect_to(target: &RedisTarget) -> Result<Pool, EngineError> {
    let pool = builder(target)?
        .build_pool(POOL_SIZE)
        .map_err(|e| EngineError::Internal(format!("redis pool: {e}")))?;
    if let Err(e) = pool.init().await {
        return Err(connect_err(target, &e).await);
    }
    Ok(pool)
}

/// A failed first connection to `target`, its password redacted; a TLS failure says what to
/// fix ([`tls::explain`], else [`tls::probe`]) instead of fred's bare I/O or Sentinel error.
pub async fn connect_err(target: &RedisTarget, e: &fred::error::Error) -> EngineError {
    let why = match (tls::explain(e), &target.tls) {
        (Some(why), _) => why,
        (None, Some(t)) => tls::probe(&target.url, t)
            .await
            .unwrap_or_else(|| e.to_string()),
        (None, None) => e.to_string(),
    };
    EngineError::Unavailable(format!("redis connect {}: {why}", redacted(&target.url)))
}

/// `url` with any password replaced by `***`, for error messages and logs: connect errors end
/// up in logs, and the Redis URL often carries the password (`redis://:secret@host`).
pub fn redacted(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        // Not parseable as a URL: say nothing of it rather than risk echoing a secret.
        Err(_) => "(unparseable URL)".to_owned(),
    }
}

/// A fred builder for `target` with the project's reconnect policy and timeouts, for command
/// clients (nobody reads their event channels).
pub fn builder(target: &RedisTarget) -> Result<Builder, EngineError> {
    builder_with_events(target, COMMAND_EVENT_CAPACITY)
}

/// A fred builder for a subscriber whose messages are read: [`EVENT_CAPACITY`] slots per
/// event channel.
pub fn subscriber_builder(target: &RedisTarget) -> Result<Builder, EngineError> {
    builder_with_events(target, EVENT_CAPACITY)
}

fn builder_with_events(target: &RedisTarget, events: usize) -> Result<Builder, EngineError> {
    // fred is given the plain scheme: with a TLS one it would build its own rustls config from
    // the process-default crypto provider, which [`crate::tls`] avoids.
    let mut config = Config::from_url(&tls::plain_scheme(&target.url))
        .map_err(|e| EngineError::Internal(format!("bad redis URL: {e}")))?;
    config.tls = target.tls.as_ref().map(|t| t.fred.clone());
    let mut b = Builder::from_config(config);
    b.with_performance_config(|p| {
        p.default_command_timeout = COMMAND_TIMEOUT;
        p.broadcast_channel_capacity = events;
    })
    .with_connection_config(|c| {
        c.connection_timeout = Duration::from_secs(5);
        c.internal_command_timeout = Duration::from_secs(5);
    })
    .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2));
    Ok(b)
}

/// Maps a fred error to the engine's error.
pub fn engine_err(e: fred::error::Error) -> EngineError {
    EngineError::Unavailable(format!("redis: {e}"))
}

/// Runs one Redis call (a command, a script or a pipeline) as operation `op`: inside a
/// `redis` span, timed, its failure counted. A call abandoned before it finished (its caller
/// timed out) is not recorded.
pub async fn call<T, E>(
    metrics: &RedisMetrics,
    op: &'static str,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let started = Instant::now();
    let r = fut
        .instrument(tracing::info_span!("redis", otel.name = op, op))
        .await;
    metrics.record(op, started.elapsed().as_secs_f64(), r.is_err());
    r
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing::field::{Field, Visit};
    use tracing_subscriber::layer::{Context, SubscriberExt};

    use super::*;
    use crate::telemetry::Metrics;

    /// Records each new span's name and fields.
    #[derive(Clone, Default)]
    struct Spans(Arc<Mutex<Vec<SeenSpan>>>);

    /// A span's name and its fields.
    type SeenSpan = (String, Vec<(String, String)>);

    struct Fields(Vec<(String, String)>);
    impl Visit for Fields {
        fn record_debug(&mut self, f: &Field, v: &dyn std::fmt::Debug) {
            self.0.push((f.name().to_owned(), format!("{v:?}")));
        }
        fn record_str(&mut self, f: &Field, v: &str) {
            self.0.push((f.name().to_owned(), v.to_owned()));
        }
    }

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Spans {
        fn on_new_span(
            &self,
            attrs: &tracing::span::Attributes<'_>,
            _: &tracing::span::Id,
            _: Context<'_, S>,
        ) {
            let mut fields = Fields(Vec::new());
            attrs.record(&mut fields);
            let name = attrs.metadata().name().to_owned();
            self.0.lock().unwrap().push((name, fields.0));
        }
    }

    #[test]
    fn a_call_is_a_redis_span_and_is_timed_and_counted() {
        let spans = Spans::default();
        let subscriber = tracing_subscriber::registry().with(spans.clone());
        let metrics = Metrics::new("t").unwrap();
        let m = metrics.redis();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        tracing::subscriber::with_default(subscriber, || {
            rt.block_on(async {
                assert_eq!(
                    call(&m, "lock_acquire", async { Ok::<_, ()>(1) }).await,
                    Ok(1)
                );
                assert!(
                    call(&m, "lock_acquire", async { Err::<(), _>("down") })
                        .await
                        .is_err()
                );
                call(&m, "publish", async { Ok::<_, ()>(()) })
                    .await
                    .unwrap();
            })
        });
        let seen = spans.0.lock().unwrap().clone();
        assert_eq!(seen.len(), 3, "{seen:?}");
        let (name, fields) = &seen[0];
        assert_eq!(name, "redis");
        let field = |k: &str| fields.iter().find(|(f, _)| f == k).map(|(_, v)| v.as_str());
        assert_eq!(field("otel.name"), Some("lock_acquire"));
        assert_eq!(field("op"), Some("lock_acquire"));

        let text = metrics.render();
        let line = |prefix: &str| {
            text.lines()
                .find(|l| l.starts_with(prefix))
                .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
                .rsplit_once(' ')
                .unwrap()
                .1
                .to_owned()
        };
        let count = "lockstep_redis_command_duration_seconds_count";
        assert_eq!(line(&format!("{count}{{op=\"lock_acquire\"}}")), "2");
        assert_eq!(line(&format!("{count}{{op=\"publish\"}}")), "1");
        assert_eq!(
            line("lockstep_redis_errors_total{op=\"lock_acquire\"}"),
            "1"
        );
        // Present, at zero, for an op that never failed.
        assert_eq!(line("lockstep_redis_errors_total{op=\"publish\"}"), "0");
    }

    #[test]
    fn redacted_hides_passwords_only() {
        assert_eq!(
            redacted("redis://:s3cret@cache:6379/0"),
            "redis://:***@cache:6379/0"
        );
        assert_eq!(
            redacted("redis-sentinel://user:pw@h:26379/0?sentinelServiceName=m"),
            "redis-sentinel://user:***@h:26379/0?sentinelServiceName=m"
        );
        assert_eq!(redacted("redis://cache:6379"), "redis://cache:6379");
        assert_eq!(redacted("not a url :pw@"), "(unparseable URL)");
    }
}
