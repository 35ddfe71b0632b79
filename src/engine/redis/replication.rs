//! Replicated grants: a lock script whose change must survive a failover is followed by `WAIT`
//! on the same connection, and its outcome is only used once the replicas acknowledged it
//! (`LOCKSTEP_LOCK_REPLICAS`, `docs/fencing.md` "Failover and replicated grants").
//!
//! # The pipeline
//!
//! [`Replication::eval`] sends three commands in one fred pipeline, on one pooled client:
//!
//! 1. `EVALSHA script` — the lock script itself;
//! 2. `SET <marker> 1 PX 60000` — a write in the same hash slot (beside the shard's op keys);
//! 3. `WAIT <replicas> <timeout>`.
//!
//! `WAIT` only counts the writes of its own connection: it blocks until the replicas have
//! acknowledged the replication offset of that connection's last write. The marker is that
//! last write, and it comes *after* everything the script read or wrote in the primary's
//! replication stream. So an acknowledged marker means the replicas hold the state the script
//! saw and made — also when the script itself wrote nothing: a reentrant grant (the grant was
//! made earlier, maybe by another node), a `once` script answering a re-send from its stored
//! reply ([`super::script`]), a lease refresh that renewed nothing.
//!
//! # Why the three cannot be split across connections
//!
//! A `WAIT` that reaches a *fresh* connection (fred reconnected after the script ran) counts
//! no write of its own and returns at once with the number of connected replicas: a false
//! acknowledgement. Two things rule that out:
//!
//! - Every command of the pipeline is sent with `max_attempts = 1`: fred writes it at most
//!   once and never re-sends it after a reconnect (its retry path fails a command whose
//!   attempts are used up). fred's router writes the commands of one pipeline back-to-back in
//!   one pass over the same routing (the reconnect it may decide on is queued behind the
//!   pipeline), so the three land on one connection in order, or the ones that could not be
//!   written fail.
//! - In a Cluster every command carries the slot of the script's first key
//!   (`ClusterHash::Custom`): `WAIT` has no key and would otherwise go to any node. A `MOVED`
//!   reply (the slot moved after a failover) fails the script and the marker (the redirect
//!   would be a second write attempt), so a `WAIT` that ran on the old node is never believed.
//!
//! A transient failure of the pipeline (a lost connection, `MOVED`, `READONLY` from a demoted
//! primary; not a script's `ERR`, see [`retryable`]) is retried here, with the **same call keys** — so a `once` script's op key is the
//! same and a script that already ran answers from its stored reply instead of running twice
//! ([`super::script`]; the `plain` scripts land the same when repeated) — until
//! [`COMMAND_TIMEOUT`](super::COMMAND_TIMEOUT) has passed. That is the retry fred would have
//! done itself, made explicit so each attempt is one script plus its own `WAIT`. A
//! `NOSCRIPT` (empty script cache after a restart or failover) loads the script and retries.
//!
//! # What an acknowledgement is worth
//!
//! `WAIT` is not consensus: a replica that acknowledged can still lose the write if another
//! replica, which had not, is promoted; Redis may also promote a lagging replica when the
//! acknowledging one is unreachable. `docs/fencing.md` says what is guaranteed then (fencing
//! tokens keep rising; strict fencing refuses stale holders) and which Redis settings narrow it.

use std::time::{Duration, Instant};

use fred::prelude::*;
use fred::types::{ClusterHash, CustomCommand};
use fred::util::redis_keyslot;

use super::script::{LuaScript, op_key};

/// The op labels of `lockstep_lock_replication_failures_total{op}`, all present at 0 from the
/// start (see [`crate::telemetry::RedisMetrics::replication_started`]).
pub const REPLICATED_OPS: &[&str] = &[
    "lock_acquire",
    "lock_extend",
    "lock_reissue",
    "lock_refresh_leases",
    "lock_confirm_handoff",
];

/// How long the marker key lives; it is rewritten by every replicated call.
const MARKER_TTL_MS: i64 = 60_000;

/// Pause between two attempts of one call (a reconnect, a Sentinel switch, a cluster resync).
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// How many replicas must acknowledge a lock change, and how long to wait for them.
#[derive(Debug, Clone, Copy)]
pub struct Replication {
    pub replicas: u32,
    pub timeout: Duration,
}

/// A script's reply and how many replicas acknowledged the state it saw and made.
#[derive(Debug)]
pub struct Acked<R> {
    pub reply: R,
    pub acked: u32,
}

impl Replication {
    /// Whether `acked` replicas are enough.
    pub fn satisfied(&self, acked: u32) -> bool {
        acked >= self.replicas
    }

    /// Runs `script` and then the marker write and `WAIT` (module doc), retrying a failed
    /// pipeline with the same call keys until [`COMMAND_TIMEOUT`](super::COMMAND_TIMEOUT); the
    /// error is the last attempt's.
    pub async fn eval<R: FromValue>(
        &self,
        pool: &Pool,
        script: &LuaScript,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> Result<Acked<R>, fred::error::Error> {
        let keys = script.call_keys(keys);
        let first = keys.first().cloned().unwrap_or_default();
        let marker = marker_key(&first);
        let slot = redis_keyslot(first.as_bytes());
        let deadline = Instant::now() + super::COMMAND_TIMEOUT;
        loop {
            let client = pool.next();
            let remaining = deadline.saturating_duration_since(Instant::now());
            let attempt = self
                .attempt(client, script, &keys, &args, &marker, slot, remaining)
                .await;
            let err = match attempt {
                Ok(acked) => return Ok(acked),
                Err(e) => e,
            };
            if !retryable(&err) || Instant::now() + RETRY_PAUSE >= deadline {
                return Err(err);
            }
            if err.details().starts_with("NOSCRIPT") {
                // Not run: load it (on every primary) and try again at once.
                script.load(client).await?;
                continue;
            }
            tracing::debug!(error = %err, "replicated lock call failed; retrying");
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }

    /// One pipeline: script, marker, `WAIT`; each written at most once, all to `slot`.
    #[allow(clippy::too_many_arguments)]
    async fn attempt<R: FromValue>(
        &self,
        client: &Client,
        script: &LuaScript,
        keys: &[String],
        args: &[String],
        marker: &str,
        slot: u16,
        remaining: Duration,
    ) -> Result<Acked<R>, fred::error::Error> {
        let options = Options {
            max_attempts: Some(1),
            cluster_hash: Some(ClusterHash::Custom(slot)),
            // The WAIT's own timeout plus room for the script and the round trip.
            timeout: Some(remaining.max(self.timeout + Duration::from_millis(500))),
            ..Options::default()
        };
        let pipeline = client.pipeline().with_options(&options);
        // Queued, not sent: these return at once. fred's pipelines have no `evalsha`, so it
        // goes as a custom command (same arguments, routed to `slot`).
        let mut evalsha: Vec<String> = Vec::with_capacity(2 + keys.len() + args.len());
        evalsha.push(script.sha1().to_owned());
        evalsha.push(keys.len().to_string());
        evalsha.extend(keys.iter().cloned());
        evalsha.extend(args.iter().cloned());
        let cmd = CustomCommand::new_static("EVALSHA", ClusterHash::Custom(slot), false);
        let () = pipeline.custom(cmd, evalsha).await?;
        let () = pipeline
            .set(marker, 1, Some(Expiration::PX(MARKER_TTL_MS)), None, false)
            .await?;
        let wait_ms = self.timeout.as_millis().clamp(1, i64::MAX as u128) as i64;
        let () = pipeline.wait(i64::from(self.replicas), wait_ms).await?;
        let mut results = pipeline.try_all::<Value>().await.into_iter();
        let (Some(reply), Some(set), Some(wait)) = (results.next(), results.next(), results.next())
        else {
            return Err(fred::error::Error::new(
                ErrorKind::Unknown,
                "replicated lock call: missing pipeline replies",
            ));
        };
        // The script's reply first: a NOSCRIPT must reach the caller as such.
        let reply = reply?;
        set?;
        let acked = wait?.convert::<i64>()?;
        Ok(Acked {
            reply: reply.convert()?,
            acked: u32::try_from(acked.max(0)).unwrap_or(u32::MAX),
        })
    }
}

/// Whether a failed attempt may succeed when sent again: connection trouble and the replies of
/// a server in transition (`READONLY` from a demoted primary, `MOVED`, `LOADING`,
/// `MASTERDOWN`, `NOSCRIPT`, fred's "too many write attempts" for a command it would not
/// re-send). An `ERR` reply (a script error) or a wrong argument would fail the same way again.
fn retryable(e: &fred::error::Error) -> bool {
    match e.kind() {
        ErrorKind::IO
        | ErrorKind::Canceled
        | ErrorKind::Timeout
        | ErrorKind::Cluster
        | ErrorKind::Routing
        | ErrorKind::Sentinel
        | ErrorKind::Backpressure => true,
        ErrorKind::Unknown => !e.details().starts_with("ERR"),
        _ => false,
    }
}

/// The marker key of a call whose first key is `first`: in `first`'s slot, beside the op keys
/// ([`op_key`] with a fixed id, which no op id — 32 hex digits — can equal).
pub fn marker_key(first: &str) -> String {
    op_key(first, "replication-marker")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::redis::keys;

    #[test]
    fn the_marker_shares_the_scripts_slot() {
        let first = keys::lock("scene:1/segment:2");
        let marker = marker_key(&first);
        assert_eq!(
            redis_keyslot(marker.as_bytes()),
            redis_keyslot(first.as_bytes())
        );
        assert!(marker.ends_with(":op:replication-marker"), "{marker}");
    }

    #[test]
    fn only_transient_failures_are_retried() {
        use fred::error::Error;
        for (kind, details) in [
            (ErrorKind::IO, "connection reset"),
            (ErrorKind::Canceled, "canceled"),
            (ErrorKind::Cluster, "MOVED 3999 127.0.0.1:7001"),
            (
                ErrorKind::Unknown,
                "READONLY You can't write against a read only replica.",
            ),
            (ErrorKind::Unknown, "NOSCRIPT No matching script."),
            (ErrorKind::Unknown, "Too many failed write attempts."),
        ] {
            assert!(retryable(&Error::new(kind.clone(), details)), "{details}");
        }
        for (kind, details) in [
            (
                ErrorKind::Unknown,
                "ERR Error running script (call to f_x): oops",
            ),
            (
                ErrorKind::InvalidArgument,
                "WRONGTYPE Operation against a key",
            ),
            (ErrorKind::Parse, "Could not convert to number."),
        ] {
            assert!(!retryable(&Error::new(kind.clone(), details)), "{details}");
        }
    }

    #[test]
    fn enough_is_at_least_the_setting() {
        let r = Replication {
            replicas: 2,
            timeout: Duration::from_millis(500),
        };
        assert!(!r.satisfied(1));
        assert!(r.satisfied(2));
        assert!(r.satisfied(3));
    }
}
