//! Postgres: the connection pool and schema migrations (`migrations/*.sql`, embedded).
//!
//! Migrations run under a session advisory lock, so several nodes starting at once (or
//! `lockstep migrate` beside running nodes) apply each migration exactly once; refinery records
//! what was applied in `lockstep.refinery_schema_history`.
//!
//! Every connection is opened from the URL through [`tls::target`], so `sslmode` and the
//! certificate parameters apply to the pool and the migrations alike.

pub mod tls;

use deadpool_postgres::{Hook, HookError, Manager, ManagerConfig, Pool, RecyclingMethod};

use crate::engine::LockKey;

refinery::embed_migrations!("migrations");

/// An arbitrary constant identifying "lockstep migrations" among advisory locks.
const MIGRATION_LOCK: i64 = 0x6c6f_636b_7374_6570; // "lockstep"

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("bad database URL: {0}")]
    Url(String),
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("migration failed: {0}")]
    Migration(String),
    #[error("postgres TLS: {0}")]
    Tls(String),
}

/// Run on every new connection. A registered fence (and an acknowledged audit batch) must
/// survive a Postgres crash: with `synchronous_commit = off` (a server setting some operators
/// choose for speed) a crash can undo the last commits, and an undone fence would let a stale
/// token pass `fence_check`. Per connection, so it costs nothing per statement.
const DURABLE_COMMITS: &str = "SET synchronous_commit TO on";

/// A pool of connections to `url` (`postgres://user:pass@host:port/db`).
pub fn pool(url: &str, size: usize) -> Result<Pool, DbError> {
    let target = tls::target(url)?;
    let manager = Manager::from_config(
        target.config,
        target.tls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size)
        .post_create(Hook::async_fn(|client, _| {
            Box::pin(async move {
                client
                    .batch_execute(DURABLE_COMMITS)
                    .await
                    .map_err(HookError::Backend)
            })
        }))
        .build()
        .map_err(|e| DbError::Url(e.to_string()))
}

/// Applies pending migrations; safe to run concurrently from several processes.
pub async fn migrate(url: &str) -> Result<Vec<String>, DbError> {
    let target = tls::target(url)?;
    let (mut client, connection) = target
        .config
        .connect(target.tls)
        .await
        .map_err(|e| tls::connect_error(&e, target.mode))?;
    let conn = tokio::spawn(connection);
    let lock = client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(|e| DbError::Unavailable(e.to_string()));
    let result = match lock {
        Ok(_) => {
            let applied = async {
                client
                    .batch_execute("CREATE SCHEMA IF NOT EXISTS lockstep")
                    .await
                    .map_err(|e| DbError::Migration(e.to_string()))?;
                migrations::runner()
                    .set_migration_table_name("lockstep.refinery_schema_history")
                    .run_async(&mut client)
                    .await
                    .map_err(|e| DbError::Migration(e.to_string()))
            }
            .await;
            let _ = client
                .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
                .await;
            applied.map(|report| {
                report
                    .applied_migrations()
                    .iter()
                    .map(|m| m.to_string())
                    .collect()
            })
        }
        Err(e) => Err(e),
    };
    drop(client);
    let _ = conn.await;
    result
}

/// `lockstep.fence_register(room, resource, token)` (V3): true if `token` is above every
/// token registered for the lock `key` (and is now the registered one), false if not (the
/// grant must be refused).
///
/// One round trip on a pooled connection; the statement is prepared once per connection
/// (deadpool's statement cache).
pub async fn fence_register(pool: &Pool, key: &LockKey, token: u64) -> Result<bool, DbError> {
    let token = i64::try_from(token)
        .map_err(|_| DbError::Unavailable(format!("token {token} does not fit a bigint")))?;
    let client = pool.get().await.map_err(unavailable)?;
    let stmt = client
        .prepare_cached("SELECT lockstep.fence_register($1, $2, $3)")
        .await
        .map_err(unavailable)?;
    let row = client
        .query_one(&stmt, &[&key.room.as_str(), &key.resource.as_str(), &token])
        .await
        .map_err(unavailable)?;
    row.try_get::<_, bool>(0).map_err(unavailable)
}

/// The token registered for the lock `key` (0 if none).
pub async fn fence_registered(pool: &Pool, key: &LockKey) -> Result<u64, DbError> {
    let client = pool.get().await.map_err(unavailable)?;
    let stmt = client
        .prepare_cached("SELECT token FROM lockstep.fences WHERE room = $1 AND resource = $2")
        .await
        .map_err(unavailable)?;
    let row = client
        .query_opt(&stmt, &[&key.room.as_str(), &key.resource.as_str()])
        .await
        .map_err(unavailable)?;
    match row {
        Some(row) => {
            let token: i64 = row.try_get(0).map_err(unavailable)?;
            Ok(u64::try_from(token).unwrap_or(0))
        }
        None => Ok(0),
    }
}

/// Deletes the fence rows of locks whose registered token is below `below_token` (µs since the
/// epoch of now − retention; see `docs/fencing.md`, "Retention"); returns how many.
pub async fn fence_prune(pool: &Pool, below_token: u64) -> Result<u64, DbError> {
    let below = i64::try_from(below_token).unwrap_or(i64::MAX);
    let client = pool.get().await.map_err(unavailable)?;
    let row = client
        .query_one("SELECT lockstep.fence_prune($1)", &[&below])
        .await
        .map_err(unavailable)?;
    let n: i64 = row.try_get(0).map_err(unavailable)?;
    Ok(u64::try_from(n).unwrap_or(0))
}

fn unavailable(e: impl std::fmt::Display) -> DbError {
    DbError::Unavailable(e.to_string())
}
