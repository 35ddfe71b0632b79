//! The Redis audit outbox drained to Postgres: one writer per node, and the stream trimmers.
//!
//! # Why an outbox
//!
//! A lock script writes its audit record to its shard's stream `ls:{S}:audit` in the same
//! atomic step as the lock change ([`crate::engine::redis::audit`]), so lock state and audit
//! can never diverge, and nothing on the lock path waits for Postgres. Getting the records from
//! the 16 streams into `lockstep.audit_events` exactly once is this module's job.
//!
//! # The writer ([`RedisOutboxWriter`], one task per node)
//!
//! All nodes are consumers of one consumer group, [`GROUP`], on every shard stream; the
//! consumer name is the node id. The group is created at offset `0` with `MKSTREAM`
//! (`BUSYGROUP` is fine: another node did it), so records written before the first writer
//! started are drained too; if Redis loses the group (restart without persistence), the next
//! `NOGROUP` error recreates it. Each loop:
//!
//! 1. **Claim** (every `min(claim idle / 2, 5 s)`): `XAUTOCLAIM` per shard takes over entries
//!    idle for longer than the claim idle time ([`DEFAULT_CLAIM_IDLE`], 30 s; env-only
//!    `LOCKSTEP_AUDIT_CLAIM_IDLE`), i.e. read by a consumer that died (or stalled) before it
//!    acknowledged them. Claimed entries form the batch.
//! 2. **Read** otherwise: `XREADGROUP … COUNT 31` on each shard (≤ [`MAX_BATCH`] entries per
//!    batch), non-blocking, on the node's shared pool (one key per command, so it also works
//!    in Redis Cluster, where the 16 streams live in different slots). A node first re-reads
//!    its own pending entries (id `0`): those left by a previous life with the same node id,
//!    and those it has to retry. When nothing is found it sleeps 50 ms, doubling up to 500 ms.
//! 3. **Decode** each entry ([`try_decode`]: the record id is derived from the shard and the
//!    entry id, so a re-read gives the same id). An undecodable entry (or one whose values no
//!    column can hold) becomes a dead letter.
//! 4. **Insert** the batch and its dead letters in one transaction ([`postgres::write_batch`])
//!    and commit.
//! 5. **Acknowledge** (`XACK`) the batch, only after the commit.
//!
//! # Exactly once
//!
//! - *Nothing is lost*: an entry leaves the group's pending list only by `XACK`, which follows
//!   the commit of its row (or dead letter). Until then it is either unread or pending, and the
//!   trimmer never removes such entries. A writer that dies after reading leaves its entries
//!   pending; another node claims them after the claim idle time.
//! - *Nothing is doubled*: every way of seeing an entry again (claim after a crash between
//!   commit and ack, own pending re-read, a retried batch whose commit answer was lost) yields
//!   the same record id, and the insert is `ON CONFLICT (id) DO NOTHING`.
//!
//! # Failures
//!
//! - **Postgres outage** (connection refused or lost, timeout, server shutting down): not a
//!   per-entry failure. The writer keeps the batch in memory and retries the whole of it with
//!   backoff (200 ms doubling to 5 s), acknowledging nothing; `lockstep_audit_write_failures_total`
//!   counts the attempts. Entries pile up in the streams (the backlog gauge shows it) and drain
//!   when Postgres is back. If the outage outlasts the claim idle time, another node may claim
//!   the same entries and write them too: harmless, the second insert does nothing.
//! - **Data error** (Postgres refuses a row: SQLSTATE class 22/23/54): the batch is written again
//!   one savepoint per row, so the good rows commit; a refused entry stays pending and is
//!   re-read (a delivery, counted by Redis) a second later. Once its delivery count (`XPENDING`)
//!   reaches [`MAX_DELIVERIES`] it is moved to `lockstep.audit_dead_letters` and acknowledged,
//!   so a poison entry never blocks its stream.
//! - **Redis errors** just delay the loop (backoff); an `XACK` that fails leaves the entries
//!   pending, to be re-read, re-inserted (a no-op) and acknowledged.
//!
//! # Trimming
//!
//! No `XADD` trims (neither the lock scripts nor
//! [`RedisAuditSink`](crate::engine::redis::audit::RedisAuditSink)'s `append`). With a
//! database, every node runs [`trim_acknowledged`] every [`TRIM_INTERVAL`]: per stream it reads
//! the group's last-delivered id (`XINFO GROUPS`) *then* the oldest pending id (`XPENDING`
//! summary), and trims with `XTRIM MINID` to the smaller of "oldest pending" and "just after
//! last delivered": every entry below that was delivered and acknowledged. (In that order an
//! entry delivered between the two reads is above the last-delivered id read first, so it is
//! kept.) The same pass observes `lockstep_audit_backlog` (pending + `lag`).
//!
//! Without a database the streams are the audit trail itself (`GET /v1/audit` reads them): every
//! node runs [`trim_ring`] every [`RING_TRIM_INTERVAL`], `XTRIM MAXLEN ~ 100000` per stream (a
//! bounded ring), except on streams that have the writer group, where trimming is left to the
//! Postgres writers (mixing nodes with and without a database would otherwise lose records).
//!
//! # Test hook
//!
//! `LOCKSTEP_AUDIT_ACK_DELAY_MS` (**tests only**) sleeps between the commit and the `XACK`, so a
//! test can kill a writer in that window.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use fred::prelude::*;
use futures_util::future::join_all;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::AuditRecord;
use super::postgres::{self, DeadLetter, WriteError};
use crate::engine::redis::audit::{FIELD, MAXLEN, parse_entry_id, try_decode};
use crate::engine::redis::call;
use crate::engine::redis::keys::{self, SHARDS};
use crate::telemetry::{Metrics, RedisMetrics};

/// The consumer group of the Postgres writers on every shard stream.
pub const GROUP: &str = "lockstep-audit";
/// Entries read per shard per loop.
pub const PER_SHARD: u64 = 31;
/// Largest batch: [`PER_SHARD`] × 16 shards.
pub const MAX_BATCH: usize = PER_SHARD as usize * SHARDS as usize;
/// Deliveries after which an entry Postgres keeps refusing becomes a dead letter.
pub const MAX_DELIVERIES: u64 = 5;
/// Pending entries idle this long are claimed by another writer.
pub const DEFAULT_CLAIM_IDLE: Duration = Duration::from_secs(30);
/// With a database: how often each node trims acknowledged entries and observes the backlog.
pub const TRIM_INTERVAL: Duration = Duration::from_secs(2);
/// Without a database: how often each node trims the streams to the ring size.
pub const RING_TRIM_INTERVAL: Duration = Duration::from_secs(5);

const IDLE_MIN: Duration = Duration::from_millis(50);
const IDLE_MAX: Duration = Duration::from_millis(500);
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Delay before an entry Postgres refused is delivered again.
const RETRY_DELAY: Duration = Duration::from_secs(1);

/// Writer settings taken from the environment only (tuning and test hooks, not in `Config`).
#[derive(Debug, Clone)]
pub struct WriterSettings {
    /// `LOCKSTEP_AUDIT_CLAIM_IDLE` (`30s`): idle time after which pending entries are claimed.
    pub claim_idle: Duration,
    /// `LOCKSTEP_AUDIT_ACK_DELAY_MS` (tests only): sleep between commit and acknowledgement.
    pub ack_delay: Option<Duration>,
}

impl Default for WriterSettings {
    fn default() -> Self {
        WriterSettings {
            claim_idle: DEFAULT_CLAIM_IDLE,
            ack_delay: None,
        }
    }
}

impl WriterSettings {
    pub fn from_env() -> WriterSettings {
        let mut s = WriterSettings::default();
        if let Ok(v) = std::env::var("LOCKSTEP_AUDIT_CLAIM_IDLE") {
            match humantime::parse_duration(&v) {
                Ok(d) if !d.is_zero() => s.claim_idle = d,
                _ => tracing::warn!(value = %v, "ignoring an invalid LOCKSTEP_AUDIT_CLAIM_IDLE"),
            }
        }
        if let Ok(v) = std::env::var("LOCKSTEP_AUDIT_ACK_DELAY_MS") {
            match v.parse::<u64>() {
                Ok(ms) if ms > 0 => {
                    tracing::warn!(ms, "LOCKSTEP_AUDIT_ACK_DELAY_MS is set: a test-only hook");
                    s.ack_delay = Some(Duration::from_millis(ms));
                }
                _ => {}
            }
        }
        s
    }

    fn claim_every(&self) -> Duration {
        (self.claim_idle / 2).clamp(Duration::from_millis(100), Duration::from_secs(5))
    }
}

/// What a stream entry holds.
#[derive(Debug, Clone, PartialEq)]
enum Body {
    /// The entry is gone from the stream (a pending id whose entry was deleted).
    Deleted,
    /// The `rec` field's bytes.
    Rec(Vec<u8>),
    /// No `rec` field: the fields as found, for the dead letter.
    Other(String),
}

#[derive(Debug, Clone)]
struct Entry {
    shard: u32,
    id: String,
    body: Body,
}

/// Exponential backoff between failed attempts.
struct Backoff(Duration);

impl Backoff {
    fn next(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(BACKOFF_MAX);
        d
    }
    fn reset(&mut self) {
        self.0 = BACKOFF_MIN;
    }
}

/// Sleeps `d` unless `stop` fires first; returns whether to go on.
async fn pause(stop: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

/// Drains the shard streams into Postgres (see the module docs).
pub struct RedisOutboxWriter {
    redis: Pool,
    db: deadpool_postgres::Pool,
    consumer: String,
    settings: WriterSettings,
    metrics: Metrics,
    redis_metrics: RedisMetrics,
    /// Per shard: when to read this consumer's own pending entries instead of new ones.
    history: Vec<Option<Instant>>,
    groups_ready: bool,
    next_claim: Instant,
}

impl RedisOutboxWriter {
    pub fn new(
        redis: Pool,
        db: deadpool_postgres::Pool,
        consumer: &str,
        settings: WriterSettings,
        metrics: Metrics,
    ) -> RedisOutboxWriter {
        let now = Instant::now();
        RedisOutboxWriter {
            redis,
            db,
            consumer: consumer.to_owned(),
            settings,
            redis_metrics: metrics.redis(),
            metrics,
            history: vec![Some(now); SHARDS as usize],
            groups_ready: false,
            next_claim: now,
        }
    }

    /// Runs until `stop` fires (between batches).
    pub async fn run(mut self, stop: CancellationToken) {
        self.metrics.audit_writer_started();
        let mut backoff = Backoff(BACKOFF_MIN);
        let mut idle = IDLE_MIN;
        let mut carried: Option<Vec<Entry>> = None;
        while !stop.is_cancelled() {
            if !self.groups_ready {
                if let Err(e) = ensure_groups(&self.redis, &self.redis_metrics).await {
                    tracing::warn!(error = %e, "cannot create the audit consumer group");
                    if !pause(&stop, backoff.next()).await {
                        return;
                    }
                    continue;
                }
                self.groups_ready = true;
            }
            let batch = match carried.take() {
                Some(b) => b,
                None => match self.next_batch().await {
                    Ok(b) => {
                        backoff.reset();
                        b
                    }
                    Err(e) => {
                        if e.details().contains("NOGROUP") || e.to_string().contains("NOGROUP") {
                            tracing::warn!(
                                "the audit consumer group is gone (Redis restarted?): recreating it"
                            );
                            self.groups_ready = false;
                        } else {
                            tracing::warn!(error = %e, "reading the audit outbox failed");
                        }
                        if !pause(&stop, backoff.next()).await {
                            return;
                        }
                        continue;
                    }
                },
            };
            if batch.is_empty() {
                if !pause(&stop, idle).await {
                    return;
                }
                idle = (idle * 2).min(IDLE_MAX);
                continue;
            }
            idle = IDLE_MIN;
            let span = drain_span("redis_outbox", batch.len());
            let written = self.write(&batch).instrument(span.clone()).await;
            let outcome = if written.is_ok() { "ok" } else { "error" };
            super::instrumented::record_outcome(&span, outcome);
            match written {
                Ok(()) => backoff.reset(),
                Err(e) => {
                    self.metrics.audit_write_failure();
                    tracing::warn!(error = %e, entries = batch.len(),
                        "audit batch not written; keeping it for a retry");
                    carried = Some(batch);
                    if !pause(&stop, backoff.next()).await {
                        return;
                    }
                }
            }
        }
    }

    /// The next batch: claimed entries when a claim pass is due and finds some, else reads.
    async fn next_batch(&mut self) -> Result<Vec<Entry>, fred::error::Error> {
        let now = Instant::now();
        if now >= self.next_claim {
            let claimed = self.claim().await?;
            if !claimed.is_empty() {
                // Claim again on the next loop: there may be more.
                tracing::info!(
                    entries = claimed.len(),
                    "claimed audit entries of a stalled writer"
                );
                return Ok(claimed);
            }
            self.next_claim = now + self.settings.claim_every();
        }
        self.read().await
    }

    async fn claim(&self) -> Result<Vec<Entry>, fred::error::Error> {
        let idle_ms = self.settings.claim_idle.as_millis() as u64;
        let results = join_all((0..SHARDS).map(|shard| async move {
            let claim = self.redis.next().xautoclaim(
                keys::audit_stream(shard),
                GROUP,
                self.consumer.as_str(),
                idle_ms,
                "0-0",
                Some(PER_SHARD),
                false,
            );
            let v: Value = call(&self.redis_metrics, "outbox_claim", claim).await?;
            let mut parts = v.into_array().into_iter();
            let _cursor = parts.next();
            let entries = parts.next().map(parse_entries).unwrap_or_default();
            Ok::<_, fred::error::Error>(to_entries(shard, entries))
        }))
        .await;
        let mut out = Vec::new();
        for r in results {
            out.extend(r?);
        }
        Ok(out)
    }

    async fn read(&mut self) -> Result<Vec<Entry>, fred::error::Error> {
        let now = Instant::now();
        let from_history: Vec<bool> = self
            .history
            .iter()
            .map(|h| h.is_some_and(|t| now >= t))
            .collect();
        let consumer = self.consumer.as_str();
        let redis = &self.redis;
        let m = &self.redis_metrics;
        let results = join_all((0..SHARDS).map(|shard| {
            let own = from_history[shard as usize];
            async move {
                let read = redis.next().xreadgroup(
                    GROUP,
                    consumer,
                    Some(PER_SHARD),
                    None,
                    false,
                    keys::audit_stream(shard),
                    if own { "0" } else { ">" },
                );
                let v: Value = call(m, "outbox_read", read).await?;
                Ok::<_, fred::error::Error>(to_entries(shard, parse_read(v)))
            }
        }))
        .await;
        let mut out = Vec::new();
        for (shard, r) in results.into_iter().enumerate() {
            let entries = r?;
            if from_history[shard] && (entries.len() as u64) < PER_SHARD {
                // All of this consumer's pending entries of the shard are in this batch.
                self.history[shard] = None;
            }
            out.extend(entries);
        }
        dedup(&mut out);
        Ok(out)
    }

    /// Writes one batch and acknowledges it. `Err` only for an outage: nothing acknowledged.
    async fn write(&mut self, batch: &[Entry]) -> Result<(), String> {
        let started = Instant::now();
        let mut records: Vec<AuditRecord> = Vec::new();
        let mut record_entry: Vec<usize> = Vec::new();
        let mut undecodable: Vec<(usize, String)> = Vec::new();
        for (i, e) in batch.iter().enumerate() {
            match &e.body {
                Body::Deleted => {}
                Body::Rec(bytes) => match decode_entry(e.shard, &e.id, bytes) {
                    Ok(r) => {
                        records.push(r);
                        record_entry.push(i);
                    }
                    Err(msg) => undecodable.push((i, msg)),
                },
                Body::Other(_) => undecodable.push((i, format!("no `{FIELD}` field"))),
            }
        }
        let mut dead = Vec::with_capacity(undecodable.len());
        for (i, error) in &undecodable {
            let e = &batch[*i];
            let attempts = self.deliveries(e).await.unwrap_or(1).max(1);
            tracing::warn!(stream = %keys::audit_stream(e.shard), entry = %e.id, %error,
                "undecodable audit entry: moving it to lockstep.audit_dead_letters");
            dead.push(dead_letter(e, error, attempts));
        }
        let mut keep: HashSet<usize> = HashSet::new();
        let mut dead_count = dead.len() as u64;
        match postgres::write_batch(&self.db, &records, &dead).await {
            Ok(()) => {}
            Err(WriteError::Outage(e)) => return Err(e),
            Err(WriteError::Data(e)) => {
                tracing::warn!(error = %e, "Postgres refused a row of an audit batch: writing it row by row");
                let verdicts = postgres::write_isolating(&self.db, &records, &dead)
                    .await
                    .map_err(|e| e.to_string())?;
                let mut exhausted = Vec::new();
                for (k, verdict) in verdicts.iter().enumerate() {
                    let Some(error) = verdict else { continue };
                    let i = record_entry[k];
                    let e = &batch[i];
                    let deliveries = self.deliveries(e).await.unwrap_or(0);
                    if deliveries >= MAX_DELIVERIES {
                        tracing::error!(stream = %keys::audit_stream(e.shard), entry = %e.id,
                            %error, deliveries,
                            "audit entry refused by Postgres too often: moving it to lockstep.audit_dead_letters");
                        exhausted.push(dead_letter(e, error, deliveries));
                    } else {
                        tracing::warn!(stream = %keys::audit_stream(e.shard), entry = %e.id,
                            %error, deliveries, "audit entry refused by Postgres: retrying it");
                        keep.insert(i);
                        self.history[e.shard as usize] = Some(Instant::now() + RETRY_DELAY);
                    }
                }
                if !exhausted.is_empty() {
                    postgres::write_batch(&self.db, &[], &exhausted)
                        .await
                        .map_err(|e| e.to_string())?;
                    dead_count += exhausted.len() as u64;
                }
            }
        }
        if dead_count > 0 {
            self.metrics.audit_dead_letters(dead_count);
        }
        if let Some(d) = self.settings.ack_delay {
            tokio::time::sleep(d).await;
        }
        self.ack(batch, &keep).await;
        self.metrics
            .audit_batch_time(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// `XACK`s the batch but `keep`, per shard. A failed ack leaves the entries pending: they
    /// are re-read (own history), re-inserted (nothing happens) and acknowledged again.
    async fn ack(&mut self, batch: &[Entry], keep: &HashSet<usize>) {
        let mut by_shard: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        for (i, e) in batch.iter().enumerate() {
            if !keep.contains(&i) {
                by_shard.entry(e.shard).or_default().push(e.id.clone());
            }
        }
        let redis = &self.redis;
        let m = &self.redis_metrics;
        let results = join_all(by_shard.into_iter().map(|(shard, ids)| async move {
            let ack = redis.next().xack(keys::audit_stream(shard), GROUP, ids);
            let r: Result<i64, _> = call(m, "outbox_ack", ack).await;
            (shard, r)
        }))
        .await;
        for (shard, r) in results {
            if let Err(e) = r {
                tracing::warn!(error = %e, shard, "XACK of written audit entries failed: they will be re-read");
                self.history[shard as usize] = Some(Instant::now());
            }
        }
    }

    /// How many times the group delivered `e` (its `XPENDING` delivery count).
    async fn deliveries(&self, e: &Entry) -> Result<u64, fred::error::Error> {
        let pending = self.redis.next().xpending(
            keys::audit_stream(e.shard),
            GROUP,
            (e.id.as_str(), e.id.as_str(), 1),
        );
        let v: Value = call(&self.redis_metrics, "outbox_pending", pending).await?;
        Ok(v.into_array()
            .into_iter()
            .next()
            .and_then(|row| row.into_array().get(3).and_then(Value::as_u64))
            .unwrap_or(0))
    }
}

fn decode_entry(shard: u32, id: &str, bytes: &[u8]) -> Result<AuditRecord, String> {
    let rec = std::str::from_utf8(bytes).map_err(|e| format!("record is not UTF-8: {e}"))?;
    let record = try_decode(shard, id, rec)?;
    postgres::check_row(&record)?;
    Ok(record)
}

fn dead_letter(e: &Entry, error: &str, attempts: u64) -> DeadLetter {
    let payload = match &e.body {
        Body::Rec(b) => String::from_utf8_lossy(b).into_owned(),
        Body::Other(s) => s.clone(),
        Body::Deleted => String::new(),
    };
    DeadLetter::new(
        keys::audit_stream(e.shard),
        e.id.clone(),
        &payload,
        error,
        attempts,
    )
}

/// Keeps the first of entries seen twice in one batch (claimed and re-read).
fn dedup(entries: &mut Vec<Entry>) {
    let mut seen = HashSet::new();
    entries.retain(|e| seen.insert((e.shard, e.id.clone())));
}

/// Creates the writer group on every shard stream (at `0`, creating the streams).
pub async fn ensure_groups(redis: &Pool, m: &RedisMetrics) -> Result<(), fred::error::Error> {
    for shard in 0..SHARDS {
        // `BUSYGROUP` (the group exists) is the usual answer, not a failure of the call.
        let create = async {
            let r: Result<Value, _> = redis
                .next()
                .xgroup_create(keys::audit_stream(shard), GROUP, "0", true)
                .await;
            match r {
                Err(e)
                    if e.details().contains("BUSYGROUP") || e.to_string().contains("BUSYGROUP") =>
                {
                    Ok(())
                }
                other => other.map(|_| ()),
            }
        };
        call(m, "outbox_group_create", create).await?;
    }
    Ok(())
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.to_string()),
        Value::Bytes(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::Integer(i) => Some(i.to_string()),
        _ => None,
    }
}

fn bytes(v: Value) -> Vec<u8> {
    match v {
        Value::String(s) => s.as_bytes().to_vec(),
        Value::Bytes(b) => b.to_vec(),
        other => text(&other).unwrap_or_default().into_bytes(),
    }
}

/// Key/value pairs of a RESP2 flat array or a RESP3 map.
fn pairs(v: Value) -> Vec<(String, Value)> {
    match v {
        Value::Map(m) => m
            .inner()
            .into_iter()
            .map(|(k, v)| (k.as_str().map(|s| s.to_string()).unwrap_or_default(), v))
            .collect(),
        other => {
            let mut out = Vec::new();
            let mut it = other.into_array().into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                out.push((text(&k).unwrap_or_default(), v));
            }
            out
        }
    }
}

/// `[[id, [field, value, …] | nil], …]` → (id, body).
fn parse_entries(v: Value) -> Vec<(String, Body)> {
    let mut out = Vec::new();
    for entry in v.into_array() {
        let mut parts = entry.into_array().into_iter();
        let Some(id) = parts.next().as_ref().and_then(text) else {
            continue;
        };
        let body = match parts.next() {
            None | Some(Value::Null) => Body::Deleted,
            Some(fields) => {
                let fields = pairs(fields);
                let rec = fields.iter().position(|(k, _)| k == FIELD);
                match rec {
                    Some(i) => {
                        let mut fields = fields;
                        Body::Rec(bytes(fields.swap_remove(i).1))
                    }
                    None => Body::Other(
                        fields
                            .iter()
                            .map(|(k, v)| format!("{k}={}", text(v).unwrap_or_default()))
                            .collect::<Vec<_>>()
                            .join(" "),
                    ),
                }
            }
        };
        out.push((id, body));
    }
    out
}

/// The entries of a one-stream `XREADGROUP` answer (RESP2 `[[key, entries]]` or RESP3 map).
fn parse_read(v: Value) -> Vec<(String, Body)> {
    match v {
        Value::Null => Vec::new(),
        Value::Map(m) => m.inner().into_values().flat_map(parse_entries).collect(),
        other => other
            .into_array()
            .into_iter()
            .flat_map(|stream| {
                let mut parts = stream.into_array().into_iter();
                let _key = parts.next();
                parts.next().map(parse_entries).unwrap_or_default()
            })
            .collect(),
    }
}

fn to_entries(shard: u32, parsed: Vec<(String, Body)>) -> Vec<Entry> {
    parsed
        .into_iter()
        .map(|(id, body)| Entry { shard, id, body })
        .collect()
}

/// The stream id right after `id` (`ms-seq` + 1).
fn after(id: (u64, u64)) -> (u64, u64) {
    match id.1.checked_add(1) {
        Some(seq) => (id.0, seq),
        None => (id.0.saturating_add(1), 0),
    }
}

/// One stream's group state, as the trimmer saw it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrimPoint {
    /// Entries below this id are acknowledged (`XTRIM MINID` target).
    pub min_id: (u64, u64),
    /// Pending + unread entries.
    pub backlog: u64,
}

/// Reads one stream's trim point: last-delivered first, then the pending summary (see the
/// module docs for why in this order). `None` when the stream has no writer group.
async fn trim_point(
    redis: &Pool,
    key: &str,
    m: &RedisMetrics,
) -> Result<Option<TrimPoint>, fred::error::Error> {
    let info = async {
        match redis.next().xinfo_groups::<Value, _>(key).await {
            Ok(v) => Ok(Some(v)),
            // No such key: nothing to trim (an answer, not a failed call).
            Err(e) if e.details().contains("no such key") => Ok(None),
            Err(e) => Err(e),
        }
    };
    let Some(groups) = call(m, "outbox_info", info).await? else {
        return Ok(None);
    };
    let mut ours = None;
    for g in groups.into_array() {
        let fields = pairs(g);
        let get = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v);
        if get("name").and_then(text).as_deref() == Some(GROUP) {
            let last = get("last-delivered-id")
                .and_then(text)
                .and_then(|s| parse_entry_id(&s));
            let lag = get("lag").and_then(Value::as_u64);
            ours = Some((last, lag));
        }
    }
    let Some((Some(last_delivered), lag)) = ours else {
        return Ok(None);
    };
    let summary: Value = call(m, "outbox_pending", redis.next().xpending(key, GROUP, ())).await?;
    let mut parts = summary.into_array().into_iter();
    let pending = parts.next().and_then(|v| v.as_u64()).unwrap_or(0);
    let oldest_pending = parts
        .next()
        .as_ref()
        .and_then(text)
        .and_then(|s| parse_entry_id(&s));
    let mut min_id = after(last_delivered);
    if pending > 0 {
        match oldest_pending {
            Some(p) => min_id = min_id.min(p),
            // Pending entries but no readable id: trim nothing.
            None => min_id = (0, 0),
        }
    }
    let unread = match lag {
        Some(l) => l,
        None => call(m, "outbox_len", redis.next().xlen(key)).await?,
    };
    Ok(Some(TrimPoint {
        min_id,
        backlog: pending + unread,
    }))
}

/// With a database: trims every stream up to its oldest unacknowledged entry and records the
/// backlog gauge. Returns the backlog (pending + unread over all shards).
pub async fn trim_acknowledged(redis: &Pool, metrics: &Metrics) -> u64 {
    let m = &metrics.redis();
    let results = join_all((0..SHARDS).map(|shard| async move {
        let key = keys::audit_stream(shard);
        let point = trim_point(redis, &key, m).await?;
        if let Some(p) = point
            && p.min_id > (0, 0)
        {
            let min = format!("{}-{}", p.min_id.0, p.min_id.1);
            let trim = redis.next().xtrim(&key, ("MINID", "=", min));
            let _: i64 = call(m, "outbox_trim", trim).await?;
        }
        Ok::<_, fred::error::Error>(point.map_or(0, |p| p.backlog))
    }))
    .await;
    let mut backlog = 0;
    let mut failed = false;
    for r in results {
        match r {
            Ok(b) => backlog += b,
            Err(e) => {
                failed = true;
                tracing::debug!(error = %e, "audit stream trim failed");
            }
        }
    }
    if !failed {
        metrics.audit_backlog(backlog);
    }
    backlog
}

/// Without a database: trims every stream to about [`MAXLEN`] entries, except streams that a
/// Postgres writer group drains (logged once in `warned`).
pub async fn trim_ring(redis: &Pool, warned: &AtomicBool, m: &RedisMetrics) {
    join_all((0..SHARDS).map(|shard| async move {
        let key = keys::audit_stream(shard);
        match trim_point(redis, &key, m).await {
            Ok(None) => {}
            Ok(Some(_)) => {
                if !warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(stream = %key, group = GROUP,
                        "audit streams are drained by Postgres writers (nodes with LOCKSTEP_DATABASE_URL): \
                         leaving their trimming to them. If Postgres is no longer used, remove the group \
                         (XGROUP DESTROY) on every shard stream");
                }
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, "audit stream inspection failed");
                return;
            }
        }
        let trim = redis.next().xtrim(&key, ("MAXLEN", "~", MAXLEN));
        let r: Result<i64, _> = call(m, "outbox_trim", trim).await;
        if let Err(e) = r {
            tracing::debug!(error = %e, "audit stream trim failed");
        }
    }))
    .await;
}

/// The span of one batch drained into Postgres (`source`: `redis_outbox` or `jsonl_file`).
pub(crate) fn drain_span(source: &'static str, records: usize) -> tracing::Span {
    tracing::info_span!(
        "audit.drain",
        source,
        records = records as i64,
        outcome = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn s(x: &str) -> Value {
        Value::Bytes(Bytes::copy_from_slice(x.as_bytes()))
    }

    #[test]
    fn parses_read_answers_with_deleted_and_foreign_entries() {
        let v = Value::Array(vec![Value::Array(vec![
            s("lockstep:ls:{ls1}:audit"),
            Value::Array(vec![
                Value::Array(vec![s("1-0"), Value::Array(vec![s("rec"), s("{}")])]),
                Value::Array(vec![s("1-1"), Value::Null]),
                Value::Array(vec![s("1-2"), Value::Array(vec![s("x"), s("y")])]),
            ]),
        ])]);
        let got = parse_read(v);
        assert_eq!(
            got,
            vec![
                ("1-0".to_owned(), Body::Rec(b"{}".to_vec())),
                ("1-1".to_owned(), Body::Deleted),
                ("1-2".to_owned(), Body::Other("x=y".into())),
            ]
        );
        assert!(parse_read(Value::Null).is_empty());
    }

    #[test]
    fn the_trim_point_follows_the_last_delivered_id() {
        assert_eq!(after((5, 1)), (5, 2));
        assert_eq!(after((5, u64::MAX)), (6, 0));
    }

    #[test]
    fn batches_are_bounded() {
        const { assert!(MAX_BATCH <= 500) };
        let s = WriterSettings {
            claim_idle: Duration::from_secs(1),
            ack_delay: None,
        };
        assert_eq!(s.claim_every(), Duration::from_millis(500));
        assert_eq!(
            WriterSettings::default().claim_every(),
            Duration::from_secs(5)
        );
    }
}
