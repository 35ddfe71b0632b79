//! [`RedisDocLog`]: Yjs document update logs in Redis, one stream per document.
//!
//! # Keys (tag = the document, so a script's keys and its shard channel share one slot)
//!
//! | key | type | content |
//! |---|---|---|
//! | `lockstep:yd:{<doc>}:log` | stream | entries `u` = one (merged) Yjs v1 update |
//! | channel `lockstep:yd:{<doc>}:ann` | pub/sub | `<id>\n<prev>\n<origin node>\n<update>` |
//!
//! `append` is one Lua script (`scripts/doc_append.lua`): `XREVRANGE … COUNT 1` (the previous
//! newest id), `XADD`, then `PUBLISH` (`SPUBLISH` in a Cluster) of the announcement. It runs at
//! most once per call even when fred re-sends it after a reconnect ([`LuaScript::once`]), so an
//! update is never logged twice. Durability is Redis's: with AOF `appendfsync everysec` a Redis
//! crash may lose the last second of appends; `appendfsync always` loses none (docs/yjs.md).
//!
//! Announcements are read on a subscriber connection of this log's own (so document fan-out
//! never waits behind room events or commands) and handed to a bounded broadcast channel
//! ([`ANNOUNCE_CAPACITY`]); a receiver that falls behind lags and re-reads the log. After the
//! subscriber reconnects, it resubscribes and re-announces each document's newest entry with
//! `prev` set to its own id: a receiver that missed anything sees a gap and re-reads.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use fred::clients::{Pool, SubscriberClient};
use fred::prelude::*;
use fred::types::Value;
use tokio::sync::broadcast;

use super::keys::PREFIX;
use super::script::LuaScript;
use super::{call, engine_err};
use crate::engine::{EngineError, EngineResult};
use crate::telemetry::RedisMetrics;
use crate::yjs::store::{
    Announcement, AwarenessAnnouncement, AwarenessState, DocLog, EntryId, LogEntry,
};

/// Announcements buffered for a slow receiver before it lags (and re-reads the log).
pub const ANNOUNCE_CAPACITY: usize = 4096;

const APPEND: &str = include_str!("scripts/doc_append.lua");
const AWARENESS: &str = include_str!("scripts/doc_awareness.lua");

/// Awareness announcements start with this (entry ids start with a digit).
const AWARENESS_TAG: &[u8] = b"aw\n";

pub fn log_key(doc: &str) -> String {
    format!("{PREFIX}yd:{{{doc}}}:log")
}
pub fn awareness_key(doc: &str) -> String {
    format!("{PREFIX}yd:{{{doc}}}:aw")
}
pub fn channel(doc: &str) -> String {
    format!("{PREFIX}yd:{{{doc}}}:ann")
}

/// The Redis [`DocLog`].
pub struct RedisDocLog {
    pool: Pool,
    subscriber: SubscriberClient,
    sharded: bool,
    append: LuaScript,
    awareness: LuaScript,
    aw_tx: broadcast::Sender<AwarenessAnnouncement>,
    subscribed: Arc<Mutex<HashSet<String>>>,
    tx: broadcast::Sender<Announcement>,
    metrics: RedisMetrics,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Parses an announcement published by `doc_append.lua`.
fn parse_announcement(doc: String, msg: &[u8]) -> Option<Announcement> {
    let mut parts = msg.splitn(4, |b| *b == b'\n');
    let id = EntryId::parse(std::str::from_utf8(parts.next()?).ok()?)?;
    let prev = std::str::from_utf8(parts.next()?).ok()?;
    let prev = if prev.is_empty() {
        None
    } else {
        Some(EntryId::parse(prev)?)
    };
    let origin = std::str::from_utf8(parts.next()?).ok()?.to_owned();
    let update = parts.next()?.to_vec();
    Some(Announcement {
        doc,
        entry: LogEntry { id, update },
        prev,
        origin_node: origin,
    })
}

#[derive(serde::Serialize, serde::Deserialize)]
struct AwarenessWire {
    o: String,
    s: Vec<(u64, u32, String)>,
}

fn parse_awareness(doc: String, msg: &[u8]) -> Option<AwarenessAnnouncement> {
    let w: AwarenessWire = serde_json::from_slice(msg).ok()?;
    Some(AwarenessAnnouncement {
        doc,
        origin_node: w.o,
        states: w
            .s
            .into_iter()
            .map(|(client, clock, json)| AwarenessState {
                client,
                clock,
                json,
            })
            .collect(),
    })
}

/// The document a channel name belongs to.
fn doc_of_channel(ch: &str) -> Option<String> {
    let rest = ch.strip_prefix(PREFIX)?.strip_prefix("yd:{")?;
    Some(rest.strip_suffix("}:ann")?.to_owned())
}

/// Parses an `XRANGE`/`XREVRANGE` reply.
fn parse_entries(v: Value) -> EngineResult<Vec<LogEntry>> {
    let bad = || EngineError::Internal("unexpected XRANGE reply".into());
    let Value::Array(items) = v else {
        return if matches!(v, Value::Null) {
            Ok(Vec::new())
        } else {
            Err(bad())
        };
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let Value::Array(mut pair) = item else {
            return Err(bad());
        };
        if pair.len() != 2 {
            return Err(bad());
        }
        let fields = pair.pop().ok_or_else(bad)?;
        let id = pair.pop().ok_or_else(bad)?;
        let id = id
            .as_str()
            .and_then(|s| EntryId::parse(&s))
            .ok_or_else(bad)?;
        let Value::Array(fields) = fields else {
            return Err(bad());
        };
        let update = fields
            .chunks(2)
            .find(|kv| kv[0].as_str().as_deref() == Some("u"))
            .and_then(|kv| kv.get(1))
            .and_then(|v| v.as_bytes().map(<[u8]>::to_vec))
            .ok_or_else(bad)?;
        out.push(LogEntry { id, update });
    }
    Ok(out)
}

impl RedisDocLog {
    /// Connects the log's subscriber and starts its reader.
    pub async fn start(
        target: &super::RedisTarget,
        pool: Pool,
        metrics: RedisMetrics,
    ) -> Result<Arc<RedisDocLog>, EngineError> {
        let builder = super::subscriber_builder(target)?;
        let sharded = builder
            .get_config()
            .is_some_and(|c| c.server.is_clustered());
        let subscriber = builder
            .build_subscriber_client()
            .map_err(|e| EngineError::Internal(format!("redis subscriber: {e}")))?;
        let mut messages = subscriber.message_rx();
        if let Err(e) = subscriber.init().await {
            return Err(super::connect_err(target, &e).await);
        }
        let mut reconnects = subscriber.reconnect_rx();
        let (tx, _) = broadcast::channel(ANNOUNCE_CAPACITY);
        let log = Arc::new(RedisDocLog {
            pool,
            subscriber,
            sharded,
            append: LuaScript::once("", APPEND),
            awareness: LuaScript::plain(AWARENESS),
            aw_tx: broadcast::channel(ANNOUNCE_CAPACITY).0,
            subscribed: Arc::new(Mutex::new(HashSet::new())),
            tx,
            metrics,
        });
        let reader_tx = log.tx.clone();
        let aw_tx = log.aw_tx.clone();
        let subscribed = log.subscribed.clone();
        tokio::spawn(async move {
            loop {
                match messages.recv().await {
                    Ok(m) => {
                        let Some(doc) = doc_of_channel(&m.channel) else {
                            continue;
                        };
                        if !lock(&subscribed).contains(&doc) {
                            continue;
                        }
                        let Some(bytes) = m.value.as_bytes() else {
                            continue;
                        };
                        if let Some(rest) = bytes.strip_prefix(AWARENESS_TAG) {
                            match parse_awareness(doc, rest) {
                                Some(a) => {
                                    let _ = aw_tx.send(a);
                                }
                                None => tracing::warn!("yjs: undecodable awareness dropped"),
                            }
                            continue;
                        }
                        match parse_announcement(doc, bytes) {
                            Some(a) => {
                                let _ = reader_tx.send(a);
                            }
                            None => tracing::warn!("yjs: undecodable announcement dropped"),
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        // Nothing to re-announce from: force a re-read through a gap on every
                        // subscribed document.
                        tracing::warn!(lost = n, "yjs: announcement reader lagged");
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        let weak = Arc::downgrade(&log);
        tokio::spawn(async move {
            while let Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) = reconnects.recv().await
            {
                let Some(log) = weak.upgrade() else { return };
                log.after_reconnect().await;
            }
        });
        Ok(log)
    }

    /// Resubscribes, then re-announces each document's newest entry as its own successor, so
    /// receivers that missed entries meanwhile see a gap and re-read.
    async fn after_reconnect(&self) {
        let docs: Vec<String> = lock(&self.subscribed).iter().cloned().collect();
        for doc in docs {
            if let Err(e) = self.sub(&doc).await {
                tracing::warn!(%doc, error = %e, "yjs: resubscribe failed");
            }
            let newest: Result<Value, _> = self
                .pool
                .next()
                .xrevrange(log_key(&doc), "+", "-", Some(1))
                .await;
            if let Ok(Some(e)) = newest
                .map_err(engine_err)
                .and_then(parse_entries)
                .map(|v| v.into_iter().next())
            {
                let _ = self.tx.send(Announcement {
                    doc,
                    prev: Some(e.id),
                    entry: e,
                    origin_node: String::new(),
                });
            }
        }
    }

    async fn sub(&self, doc: &str) -> Result<(), fred::error::Error> {
        if self.sharded {
            self.subscriber.ssubscribe(channel(doc)).await
        } else {
            self.subscriber.subscribe(channel(doc)).await?;
            // SUBSCRIBE resolves when written: a PING answered after it means it took effect.
            let _: Value = self.subscriber.ping(None).await?;
            Ok(())
        }
    }
}

#[async_trait]
impl DocLog for RedisDocLog {
    async fn append(&self, doc: &str, update: &[u8], origin_node: &str) -> EngineResult<EntryId> {
        let keys = self.append.call_keys(vec![log_key(doc)]);
        let args: Vec<Value> = vec![
            Value::Bytes(Bytes::copy_from_slice(update)),
            origin_node.into(),
            channel(doc).into(),
            if self.sharded { "1" } else { "0" }.into(),
        ];
        let client = self.pool.next();
        let run = async {
            match client
                .evalsha::<Value, _, _, _>(self.append.sha1(), keys.clone(), args.clone())
                .await
            {
                Err(e) if e.details().contains("NOSCRIPT") => {
                    self.append.load(client).await?;
                    client
                        .evalsha::<Value, _, _, _>(self.append.sha1(), keys, args)
                        .await
                }
                r => r,
            }
        };
        let reply = call(&self.metrics, "doc_append", run)
            .await
            .map_err(engine_err)?;
        let id = match reply {
            Value::Array(v) => v
                .first()
                .and_then(|v| v.as_str())
                .and_then(|s| EntryId::parse(&s)),
            _ => None,
        };
        id.ok_or_else(|| EngineError::Internal("unexpected doc_append reply".into()))
    }

    async fn read_after(
        &self,
        doc: &str,
        after: Option<EntryId>,
        limit: usize,
    ) -> EngineResult<Vec<LogEntry>> {
        let start = match after {
            Some(id) => format!("({id}"),
            None => "-".to_owned(),
        };
        let v: Value = call(
            &self.metrics,
            "doc_read",
            self.pool
                .next()
                .xrange(log_key(doc), start, "+", Some(limit as u64)),
        )
        .await
        .map_err(engine_err)?;
        parse_entries(v)
    }

    async fn trim_through(&self, doc: &str, through: EntryId) -> EngineResult<u64> {
        // MINID keeps ids >= its argument: the id just after `through`.
        let next = EntryId {
            ms: through.ms,
            seq: through.seq + 1,
        };
        let n: u64 = call(
            &self.metrics,
            "doc_trim",
            self.pool.next().custom(
                fred::types::CustomCommand::new_static(
                    "XTRIM",
                    fred::types::ClusterHash::FirstKey,
                    false,
                ),
                vec![log_key(doc), "MINID".into(), next.to_string()],
            ),
        )
        .await
        .map_err(engine_err)?;
        Ok(n)
    }

    async fn len(&self, doc: &str) -> EngineResult<u64> {
        call(
            &self.metrics,
            "doc_len",
            self.pool.next().xlen(log_key(doc)),
        )
        .await
        .map_err(engine_err)
    }

    async fn subscribe(&self, doc: &str) -> EngineResult<()> {
        lock(&self.subscribed).insert(doc.to_owned());
        let r = call(&self.metrics, "doc_subscribe", self.sub(doc)).await;
        if let Err(e) = r {
            lock(&self.subscribed).remove(doc);
            return Err(engine_err(e));
        }
        Ok(())
    }

    async fn unsubscribe(&self, doc: &str) -> EngineResult<()> {
        lock(&self.subscribed).remove(doc);
        let ch = channel(doc);
        let r = if self.sharded {
            self.subscriber.sunsubscribe(ch).await
        } else {
            self.subscriber.unsubscribe(ch).await
        };
        r.map_err(engine_err)
    }

    fn announcements(&self) -> broadcast::Receiver<Announcement> {
        self.tx.subscribe()
    }

    async fn publish_awareness(
        &self,
        doc: &str,
        states: &[AwarenessState],
        origin_node: &str,
        ttl_ms: u64,
    ) -> EngineResult<()> {
        let wire = AwarenessWire {
            o: origin_node.to_owned(),
            s: states
                .iter()
                .map(|s| (s.client, s.clock, s.json.clone()))
                .collect(),
        };
        let mut msg = AWARENESS_TAG.to_vec();
        msg.extend(serde_json::to_vec(&wire).map_err(|e| EngineError::Internal(e.to_string()))?);
        let mut args: Vec<String> = vec![
            channel(doc),
            if self.sharded { "1" } else { "0" }.into(),
            String::from_utf8(msg).map_err(|e| EngineError::Internal(e.to_string()))?,
            crate::engine::now_ms().to_string(),
            ttl_ms.to_string(),
        ];
        for s in states {
            args.push(s.client.to_string());
            args.push(s.clock.to_string());
            args.push(s.json.clone());
        }
        let client = self.pool.next();
        call(
            &self.metrics,
            "doc_awareness",
            self.awareness
                .eval::<Value>(client, vec![awareness_key(doc)], args),
        )
        .await
        .map_err(engine_err)?;
        Ok(())
    }

    async fn awareness_states(&self, doc: &str) -> EngineResult<Vec<AwarenessState>> {
        let all: std::collections::HashMap<String, String> = call(
            &self.metrics,
            "doc_awareness_read",
            self.pool.next().hgetall(awareness_key(doc)),
        )
        .await
        .map_err(engine_err)?;
        let now = crate::engine::now_ms();
        Ok(all
            .into_iter()
            .filter_map(|(client, v)| {
                let mut p = v.splitn(3, '\n');
                let clock = p.next()?.parse().ok()?;
                let expires: u64 = p.next()?.parse().ok()?;
                let json = p.next()?.to_owned();
                (expires > now).then_some(AwarenessState {
                    client: client.parse().ok()?,
                    clock,
                    json,
                })
            })
            .collect())
    }

    fn awareness_updates(&self) -> Option<broadcast::Receiver<AwarenessAnnouncement>> {
        Some(self.aw_tx.subscribe())
    }
}
