//! Redis engines: locks, presence and fan-out shared by every node.
//!
//! Only this module knows key names ([`keys`]) and Lua (`scripts/*.lua`). Standalone,
//! Sentinel and Cluster deployments are all reached through fred's URL forms
//! (`redis://`, `redis-sentinel://…?sentinelServiceName=`, `redis-cluster://…?node=`).
//!
//! Every call the engines make to Redis goes through [`call`]: a `redis` tracing span named
//! after the operation, and `lockstep_redis_command_duration_seconds{op}` /
//! `lockstep_redis_errors_total{op}`. `op` is a fixed name per call site (`lock_acquire`,
//! `presence_update`, `publish`, …), never built at run time, so recording does not allocate.

pub mod audit;
pub mod broker;
pub mod keys;
pub mod locks;
pub mod nodes;
pub mod presence;
pub mod resume;

use std::future::Future;
use std::time::{Duration, Instant};

use fred::prelude::*;
use tracing::Instrument;

use crate::engine::EngineError;
use crate::telemetry::RedisMetrics;

/// Commands from one node go over a small pool; blocking reads and pub/sub use their own
/// connections (fred's subscriber client), so a slow command never stalls fan-out.
const POOL_SIZE: usize = 4;

/// Broadcast capacity of fred's event channels (default 32 is far too small for room fan-out;
/// a lagging receiver is counted and triggers a resync).
pub const EVENT_CAPACITY: usize = 16 * 1024;

/// Builds a connected command pool for `url`.
pub async fn connect(url: &str) -> Result<Pool, EngineError> {
    let pool = builder(url)?
        .build_pool(POOL_SIZE)
        .map_err(|e| EngineError::Internal(format!("redis pool: {e}")))?;
    pool.init()
        .await
        .map_err(|e| EngineError::Unavailable(format!("redis connect {url}: {e}")))?;
    Ok(pool)
}

/// A fred builder with the project's reconnect policy and timeouts.
pub fn builder(url: &str) -> Result<Builder, EngineError> {
    let config =
        Config::from_url(url).map_err(|e| EngineError::Internal(format!("bad redis URL: {e}")))?;
    let mut b = Builder::from_config(config);
    b.with_performance_config(|p| {
        p.default_command_timeout = Duration::from_secs(5);
        p.broadcast_channel_capacity = EVENT_CAPACITY;
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
