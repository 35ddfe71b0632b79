//! [`RedisAuditSink`]: audit records in the per-shard Redis streams, the outbox that a Postgres
//! writer (a later issue) drains.
//!
//! # Streams
//!
//! Each lock shard `S` has one stream, `ls:{S}:audit` ([`keys::audit_stream`]). The lock scripts
//! `XADD` the records of their own transitions there in the same step as the change (see
//! [`super::locks`]); [`append`](AuditSink::append) adds the node-level records (sessions,
//! auth) to the stream of shard `shard_of(session_id, else user_id, else "")`. Every entry has
//! one field, [`FIELD`] (`rec`): the record as JSON without its `id`, `at` in ms since the epoch
//! (a number; converted to RFC 3339 only when serialized as an [`AuditRecord`]), `token` an exact
//! JSON number. `XADD` does not trim (neither here nor in the lock scripts): trimming is the
//! job of one place, [`crate::audit::outbox`]. With a database, a stream is trimmed only up to
//! the oldest entry the Postgres writer has not acknowledged (never past an unwritten record);
//! without one, every node trims each stream to about [`MAXLEN`] entries every few seconds (a
//! bounded ring, so an outbox nobody drains cannot fill Redis' memory).
//!
//! # Record ids
//!
//! A record's `id` is not stored: it is derived when reading, deterministically, from the shard
//! number and the stream entry id (`<ms>-<seq>`), so re-reading the same entry always gives the
//! same id — the Postgres writer relies on it to insert with `ON CONFLICT (id) DO NOTHING`
//! after a crash between its insert and its acknowledgement. The id is a UUIDv8 (RFC 9562 custom
//! layout) laid out like a UUIDv7, so ids sort by time first:
//!
//! | bits | content |
//! | --- | --- |
//! | 48 | entry ms (Redis server time when added) |
//! | 4 | version `8` |
//! | 12 + 62 (2 variant bits in between) | `seq << 8 \| shard` (74 bits: 64-bit seq, 8-bit shard) |
//!
//! Within a shard ids follow the stream order, hence the order of the transitions. Across shards
//! they order by entry time, then sequence, then shard number. A record handed to `append`
//! therefore gets a new id (its stream one); its `at` is kept.
//!
//! # Queries
//!
//! [`query`](AuditSink::query) reads the 16 streams concurrently, newest first (`XREVRANGE` in
//! batches of [`READ_BATCH`]), applies the [`AuditQuery`] filters with the JSON-lines sink's
//! [`RecordFilter`] and merges with its [`PageCollector`]. Per shard it stops after `limit`
//! matches, after [`MAX_SCAN`] entries (the whole ring), or once entries are older than `since`
//! by more than [`CLOCK_SKEW_MS`] (node records carry their node's `at`, which may run ahead of
//! the stream time). A `before` cursor starts each stream at that id's millisecond. Meant for
//! recent records; the Postgres sink answers for the full trail.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use fred::prelude::*;
use futures_util::future::join_all;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{call, keys};
use crate::audit::jsonl::{PageCollector, RecordFilter};
use crate::audit::{
    AuditError, AuditKind, AuditPage, AuditQuery, AuditRecord, AuditSink, rfc3339_ms,
};
use crate::telemetry::RedisMetrics;

/// The stream field holding a record's JSON.
pub const FIELD: &str = "rec";
/// Approximate length of each shard's stream kept without a database (`XTRIM … MAXLEN ~`).
pub const MAXLEN: i64 = 100_000;
/// Entries per `XREVRANGE` call of a query.
pub const READ_BATCH: u64 = 1_000;
/// Entries a query reads at most per shard.
pub const MAX_SCAN: usize = 100_000;
/// How far a record's `at` may run ahead of its stream entry's time (node clocks).
pub const CLOCK_SKEW_MS: u64 = 5 * 60 * 1000;

/// The Redis [`AuditSink`].
pub struct RedisAuditSink {
    pool: Pool,
    metrics: RedisMetrics,
    /// Whether an unreadable entry was already logged.
    logged_bad: AtomicBool,
}

impl RedisAuditSink {
    pub fn new(pool: Pool) -> RedisAuditSink {
        RedisAuditSink {
            pool,
            metrics: RedisMetrics::default(),
            logged_bad: AtomicBool::new(false),
        }
    }

    /// Records every Redis call in `metrics` (see [`super::call`]).
    pub fn with_metrics(mut self, metrics: RedisMetrics) -> RedisAuditSink {
        self.metrics = metrics;
        self
    }

    /// The newest records of one shard matching `filter`, at most `limit`.
    async fn scan_shard(
        &self,
        shard: u32,
        filter: &RecordFilter,
        end: &str,
        stop_below_ms: u64,
    ) -> Result<Vec<AuditRecord>, AuditError> {
        let key = keys::audit_stream(shard);
        let mut end = end.to_owned();
        let mut out = Vec::new();
        let mut scanned = 0;
        loop {
            let read = self
                .pool
                .next()
                .xrevrange_values(&key, end.as_str(), "-", Some(READ_BATCH));
            let batch: Vec<(String, std::collections::HashMap<String, String>)> =
                call(&self.metrics, "audit_scan", read)
                    .await
                    .map_err(|e| AuditError::Unavailable(format!("redis: {e}")))?;
            let n = batch.len();
            let mut last = None;
            for (entry_id, fields) in batch {
                scanned += 1;
                if parse_entry_id(&entry_id).is_some_and(|(ms, _)| ms < stop_below_ms) {
                    return Ok(out);
                }
                match fields
                    .get(FIELD)
                    .and_then(|rec| decode(shard, &entry_id, rec))
                {
                    Some(record) => {
                        if filter.matches(&record) {
                            out.push(record);
                            if out.len() >= filter.limit() {
                                return Ok(out);
                            }
                        }
                    }
                    None => {
                        if !self.logged_bad.swap(true, Ordering::Relaxed) {
                            tracing::warn!(stream = %key, entry = %entry_id,
                                "skipping an unreadable audit stream entry (logged once)");
                        }
                    }
                }
                last = Some(entry_id);
            }
            match last {
                Some(id) if n as u64 >= READ_BATCH && scanned < MAX_SCAN => {
                    end = format!("({id}");
                }
                _ => return Ok(out),
            }
        }
    }
}

#[async_trait]
impl AuditSink for RedisAuditSink {
    async fn append(&self, records: Vec<AuditRecord>) -> Result<(), AuditError> {
        if records.is_empty() {
            return Ok(());
        }
        let unavailable = |e: fred::error::Error| AuditError::Unavailable(format!("redis: {e}"));
        let pipe = self.pool.next().pipeline();
        for r in &records {
            let home = r
                .session_id
                .as_deref()
                .or(r.user_id.as_deref())
                .unwrap_or("");
            let stream = keys::audit_stream(keys::shard_of(home));
            let _: () = pipe
                .xadd(
                    stream,
                    false,
                    Option::<()>::None,
                    "*",
                    vec![(FIELD, encode(r)?)],
                )
                .await
                .map_err(unavailable)?;
        }
        let _: Vec<Value> = call(&self.metrics, "audit_append", pipe.all())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn query(&self, q: &AuditQuery) -> Result<AuditPage, AuditError> {
        let filter = RecordFilter::new(q)?;
        let end = match q.before {
            Some(id) => uuid_ms(id).to_string(),
            None => "+".to_owned(),
        };
        let stop_below_ms = q
            .since
            .as_deref()
            .and_then(rfc3339_ms::parse)
            .map_or(0, |s| s.saturating_sub(CLOCK_SKEW_MS));
        let results = join_all(
            (0..keys::SHARDS).map(|shard| self.scan_shard(shard, &filter, &end, stop_below_ms)),
        )
        .await;
        let mut page = PageCollector::new(filter.limit());
        for r in results {
            for record in r? {
                page.offer(record);
            }
        }
        Ok(page.finish())
    }

    /// Nothing to do: `append` returns once Redis has the records.
    async fn flush(&self) -> Result<(), AuditError> {
        Ok(())
    }
}

/// A record as a stream entry holds it: the [`AuditRecord`] without `id`, `at` in ms.
#[derive(Serialize, Deserialize)]
struct StreamRecord {
    at: u64,
    kind: AuditKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    room: Option<Arc<str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    resource: Option<Arc<str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    user_id: Option<Arc<str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    session_id: Option<Arc<str>>,
    node_id: Arc<str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    token: Option<u64>,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    detail: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    actor: Option<crate::engine::Actor>,
}

/// The `rec` JSON of a record (what the lock scripts write for theirs).
pub fn encode(r: &AuditRecord) -> Result<String, AuditError> {
    serde_json::to_string(&StreamRecord {
        at: r.at,
        kind: r.kind,
        room: r.room.clone(),
        resource: r.resource.clone(),
        user_id: r.user_id.clone(),
        session_id: r.session_id.clone(),
        node_id: r.node_id.clone(),
        token: r.token,
        detail: r.detail.clone(),
        actor: r.actor.clone(),
    })
    .map_err(|e| AuditError::Unavailable(format!("encoding an audit record: {e}")))
}

/// The record of stream entry `entry_id` of `shard`, whose `rec` field is `rec`.
pub fn decode(shard: u32, entry_id: &str, rec: &str) -> Option<AuditRecord> {
    try_decode(shard, entry_id, rec).ok()
}

/// [`decode`], saying what is wrong with an undecodable entry (the Postgres writer keeps that
/// reason with the dead letter).
pub fn try_decode(shard: u32, entry_id: &str, rec: &str) -> Result<AuditRecord, String> {
    let id = record_id(shard, entry_id)
        .ok_or_else(|| format!("unusable stream entry id {entry_id:?} (shard {shard})"))?;
    let s: StreamRecord =
        serde_json::from_str(rec).map_err(|e| format!("undecodable record JSON: {e}"))?;
    Ok(AuditRecord {
        id,
        at: s.at,
        kind: s.kind,
        room: s.room,
        resource: s.resource,
        user_id: s.user_id,
        session_id: s.session_id,
        node_id: s.node_id,
        token: s.token,
        detail: s.detail,
        actor: s.actor,
    })
}

/// `<ms>-<seq>` of a stream entry id.
pub fn parse_entry_id(entry_id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = entry_id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

const LOW_62: u128 = (1 << 62) - 1;

/// The record id of stream entry `entry_id` of `shard` (see the module doc for the layout).
pub fn record_id(shard: u32, entry_id: &str) -> Option<Uuid> {
    let (ms, seq) = parse_entry_id(entry_id)?;
    if ms >= 1 << 48 || shard > 0xff {
        return None;
    }
    let payload = (u128::from(seq) << 8) | u128::from(shard);
    let v = (u128::from(ms) << 80) | ((payload >> 62) << 64) | (payload & LOW_62);
    Some(uuid::Builder::from_custom_bytes(v.to_be_bytes()).into_uuid())
}

/// The shard and stream entry id a record id was derived from; `None` for other ids.
pub fn entry_of(id: Uuid) -> Option<(u32, String)> {
    if id.get_version_num() != 8 {
        return None;
    }
    let v = id.as_u128();
    let payload = (((v >> 64) & 0xfff) << 62) | (v & LOW_62);
    let shard = (payload & 0xff) as u32;
    let seq = (payload >> 8) as u64;
    Some((shard, format!("{}-{seq}", uuid_ms(id))))
}

/// The millisecond part of a derived id (or of a UUIDv7).
fn uuid_ms(id: Uuid) -> u64 {
    (id.as_u128() >> 80) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_deterministic_reversible_and_time_ordered() {
        let a = record_id(3, "1763700000123-0").unwrap();
        assert_eq!(a, record_id(3, "1763700000123-0").unwrap());
        assert_eq!(a.get_version_num(), 8);
        assert_eq!(entry_of(a), Some((3, "1763700000123-0".to_owned())));
        let big = record_id(15, &format!("1763700000123-{}", u64::MAX)).unwrap();
        assert_eq!(
            entry_of(big),
            Some((15, format!("1763700000123-{}", u64::MAX)))
        );
        // Time, then sequence, then shard.
        let ids = [
            record_id(15, "1763700000122-9").unwrap(),
            record_id(0, "1763700000123-0").unwrap(),
            record_id(1, "1763700000123-0").unwrap(),
            record_id(0, "1763700000123-1").unwrap(),
            big,
            record_id(0, "1763700000124-0").unwrap(),
        ];
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
        assert_eq!(record_id(0, "nonsense"), None);
        assert_eq!(entry_of(Uuid::now_v7()), None);
    }

    #[test]
    fn records_round_trip_with_exact_tokens() {
        let mut r = AuditRecord::new(AuditKind::LockAcquired, "n1".into());
        r.token = Some(1_763_700_000_123_457);
        r.session_id = Some("s".into());
        r.detail = serde_json::json!({"via": "request"});
        let json = encode(&r).unwrap();
        assert!(json.contains("\"token\":1763700000123457"), "{json}");
        assert!(!json.contains("\"id\""), "{json}");
        let back = decode(2, "5-6", &json).unwrap();
        assert_eq!(back.id, record_id(2, "5-6").unwrap());
        assert_eq!(AuditRecord { id: r.id, ..back }, r);
    }
}
