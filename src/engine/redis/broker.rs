//! [`RedisBroker`]: fan-out of room events between nodes over Redis pub/sub.
//!
//! # Wire format
//!
//! Every event travels on its room's channel ([`keys::room_channel`], `lockstep:room:{<room>}`)
//! as MessagePack (`rmp_serde::to_vec_named`, so fields are named) of an [`Envelope`]
//! `{node, seq, event}`: the publishing node's id, its sequence number for that room, and the
//! [`RoomEvent`]. Standalone and Sentinel deployments use `PUBLISH`/`SUBSCRIBE`; in a Cluster
//! (detected from the URL's server kind) `SPUBLISH`/`SSUBSCRIBE`, so a message goes to the
//! shard owning the room's slot instead of being broadcast across the whole cluster.
//!
//! # Publishing
//!
//! [`publish`](Broker::publish) hands the event to one publisher task through a bounded
//! queue. The task numbers the events per room in the order it takes them (so numbering
//! order is queue order) and sends them as one pipeline per batch on the command pool,
//! waiting for a batch to complete before sending the next: batches never overtake each other,
//! so the wire order of a room's messages is their numbering order, while a busy node still
//! sends hundreds of events per round trip. `publish` returns once Redis accepted the message
//! (or with [`EngineError::Unavailable`] after a timeout or an error); [`post`](Broker::post),
//! which the node uses, returns once the message is queued (waiting only for a queue slot, up
//! to the same timeout, when the queue is full), and the publisher task logs and counts a
//! failed pipeline instead (receivers see the gap and resync).
//!
//! # This node's own events
//!
//! An event of a room this node subscribes to is handed to the local sink by `publish`/`post`
//! itself, before it is queued, and the node's own messages coming back over pub/sub are
//! dropped: local members get their node's events in publish order without a Redis round
//! trip, exactly as with the memory broker, and a request answered right after its event was
//! posted is answered after its own members saw the event. Node ids must be unique (they
//! already must be for liveness keys, `super::nodes`): a second node with this node's id
//! would have its events dropped here as echoes.
//!
//! Numbering starts at 1 per room on every node start; the counter of a room this node has
//! not published to for a while is forgotten, and starts again at 1. A receiver therefore
//! accepts `seq == 1` from a known origin as a new sequence (a restart), not a gap.
//!
//! # Receiving
//!
//! One [`SubscriberClient`] per node (its own connection, as commands and blocking reads must
//! never delay fan-out) subscribes to the rooms the node has local members in. A reader task
//! consumes its message stream and never blocks: decode → gap check →
//! [`EventSink::deliver`] (which must not block either). Messages of rooms this node no longer
//! subscribes to are dropped, so nothing arrives after [`unsubscribe`](Broker::unsubscribe)
//! returns. Undecodable messages are counted ([`RedisBroker::undecodable`]) and logged, never
//! fatal.
//!
//! # When events may have been lost: [`Resync`]
//!
//! Pub/sub is fire-and-forget; the broker detects the three ways events go missing and asks
//! the node to rebuild its view (a fresh `room.snapshot` for the affected local sessions):
//!
//! - **Gap**: for each (origin node, room) the last `seq` seen is kept; the next message must be
//!   `last + 1` (or `1`, see above). Anything else → [`Resync::Room`]. The first message from an
//!   origin is accepted as it is.
//! - **Lag**: fred's message stream is a broadcast channel ([`super::EVENT_CAPACITY`]); when the
//!   reader falls behind, messages are dropped: they are counted ([`RedisBroker::dropped`]) and
//!   → [`Resync::All`].
//! - **Reconnect** of the subscriber connection (killed, Redis restarted, failover): messages
//!   published while it was down are lost. On every reconnect event of the subscriber client
//!   the broker resubscribes to every room it subscribes to, waits until Redis has them in
//!   effect, and only **then** emits [`Resync::All`], so a snapshot taken on that signal misses
//!   nothing. It does not use fred's `manage_subscriptions()` for this: that resubscribes in a
//!   detached task the broker cannot wait for, and (fred 10.1) its `resubscribe_all()` sends an
//!   argument-less `PSUBSCRIBE` when no patterns are tracked, whose error reply fred then hands
//!   to a later command on the connection.
//!
//! A subscription is in effect when [`subscribe`](Broker::subscribe) returns: fred resolves
//! `SUBSCRIBE` when it is written, so the broker follows it with a `PING` on the same
//! connection and waits for the answer (see `live_barrier`); `SSUBSCRIBE` is confirmed by fred.
//!
//! After a lag or a reconnect the sequence state is reset, so the first message of each
//! origin is accepted again instead of raising one `Resync::Room` per room on top of the
//! `Resync::All`.
//!
//! The resync channel is the node's, bounded. The broker never blocks on it: it uses
//! `try_send`, and a full channel means resyncs are already pending. What could not be sent
//! is not dropped, though (a pending `Room(a)` does not cover a needed `All`): it is remembered,
//! deduplicated (`All` covers every room), and handed over by a small task as soon as the
//! channel has room.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use fred::clients::{Pool, SubscriberClient};
use fred::prelude::*;
use fred::types::Message;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

use super::{call, engine_err, keys};
use crate::engine::{Broker, EngineError, EngineResult, EventSink, RoomEvent};
use crate::names::Entity;
use crate::telemetry::RedisMetrics;

/// What the node must rebuild because events may have been lost.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Resync {
    /// A gap in one origin's sequence for this room: re-snapshot the room.
    Room(Entity),
    /// Anything may be missing (lagging reader, subscriber reconnect): re-snapshot every room.
    All,
}

/// A room event as it travels between nodes (MessagePack with named fields).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// The publishing node's id.
    pub node: Arc<str>,
    /// The publisher's sequence number for this room: 1, 2, 3, … from its start.
    pub seq: u64,
    pub event: RoomEvent,
}

/// [`Envelope`] borrowed, for encoding without cloning the event.
#[derive(Serialize)]
struct EnvelopeRef<'a> {
    node: &'a str,
    seq: u64,
    event: &'a RoomEvent,
}

/// Publish queue length: publishers wait (up to [`PUBLISH_TIMEOUT`]) when it is full.
const PUBLISH_QUEUE: usize = 8192;
/// Most messages sent in one pipeline.
const PUBLISH_BATCH: usize = 512;
/// Longest a `publish` waits for a queue slot and for Redis.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);
/// A room's publish counter unused this long is forgotten (the next message has `seq` 1).
const SEQ_IDLE: Duration = Duration::from_secs(300);
/// Pause between attempts to resubscribe after a reconnect while Redis is not back yet.
const RESUBSCRIBE_RETRY: Duration = Duration::from_millis(250);
/// Channels per `SUBSCRIBE` when resubscribing after a reconnect.
const RESUBSCRIBE_CHUNK: usize = 1000;
/// `SSUBSCRIBE`s in flight when resubscribing after a reconnect (Cluster).
const RESUBSCRIBE_CONCURRENCY: usize = 32;
/// Stripes of the subscribe/unsubscribe lock (one room's calls never interleave).
const SUB_STRIPES: usize = 64;

struct Outgoing {
    /// `None`: a flush marker, answered once everything queued before it was answered.
    event: Option<Arc<RoomEvent>>,
    /// `None` for [`post`](Broker::post): nobody waits for Redis' answer.
    done: Option<oneshot::Sender<EngineResult<()>>>,
}

/// Tells the waiting publisher, if any, how its message fared; `true` for a posted message
/// that failed (nobody was told: the publisher task logs them, once per batch).
fn answer(done: Option<oneshot::Sender<EngineResult<()>>>, r: EngineResult<()>) -> bool {
    match done {
        Some(done) => {
            let _ = done.send(r);
            false
        }
        None => r.is_err(),
    }
}

/// The Redis [`Broker`]. Create with [`RedisBroker::start`]; dropping it stops its tasks.
pub struct RedisBroker {
    shared: Arc<Shared>,
    pool: Pool,
    subscriber: SubscriberClient,
    sharded: bool,
    queue: mpsc::Sender<Outgoing>,
    sub_locks: Box<[tokio::sync::Mutex<()>]>,
    tasks: Vec<JoinHandle<()>>,
    metrics: RedisMetrics,
}

/// State shared by the broker and its tasks.
struct Shared {
    node_id: Arc<str>,
    sink: Arc<dyn EventSink>,
    resync: Resyncer,
    /// Subscribed rooms → origin node → last `seq` seen. A room is here exactly while this
    /// node subscribes to it; messages of other rooms are dropped.
    rooms: Mutex<HashMap<Entity, HashMap<Arc<str>, u64>>>,
    dropped: AtomicU64,
    undecodable: AtomicU64,
    gaps: AtomicU64,
    reconnects: AtomicU64,
}

impl RedisBroker {
    /// Connects a command pool and a subscriber client to `url` (default TLS settings) and
    /// starts the publisher, reader and reconnect tasks. Events of subscribed rooms go to
    /// `sink`; resync requests to `resync` (bounded; see the module docs).
    pub async fn start(
        url: &str,
        node_id: &str,
        sink: Arc<dyn EventSink>,
        resync: mpsc::Sender<Resync>,
    ) -> Result<Arc<RedisBroker>, EngineError> {
        let target = super::RedisTarget::from_url(url)?;
        Self::start_with_metrics(&target, node_id, sink, resync, RedisMetrics::default()).await
    }

    /// [`start`](Self::start) for `target` (the node's TLS settings), recording every Redis
    /// call in `metrics` (see [`super::call`]).
    pub async fn start_with_metrics(
        target: &super::RedisTarget,
        node_id: &str,
        sink: Arc<dyn EventSink>,
        resync: mpsc::Sender<Resync>,
        metrics: RedisMetrics,
    ) -> Result<Arc<RedisBroker>, EngineError> {
        let pool = super::connect_to(target).await?;
        let builder = super::subscriber_builder(target)?;
        let sharded = builder
            .get_config()
            .is_some_and(|c| c.server.is_clustered());
        let subscriber = builder
            .build_subscriber_client()
            .map_err(|e| EngineError::Internal(format!("redis subscriber: {e}")))?;
        let message_rx = subscriber.message_rx();
        if let Err(e) = subscriber.init().await {
            return Err(super::connect_err(target, &e).await);
        }
        // Taken after init: the first connection also counts as a "reconnect" for fred.
        let reconnect_rx = subscriber.reconnect_rx();

        let resyncer = Resyncer::new(resync);
        let shared = Arc::new(Shared {
            node_id: node_id.into(),
            sink,
            resync: resyncer,
            rooms: Mutex::new(HashMap::new()),
            dropped: AtomicU64::new(0),
            undecodable: AtomicU64::new(0),
            gaps: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
        });
        let (queue, queue_rx) = mpsc::channel(PUBLISH_QUEUE);
        let tasks = vec![
            // In the caller's span (the node's), so their logs carry `node_id`.
            tokio::spawn(
                publisher(
                    pool.clone(),
                    sharded,
                    shared.node_id.clone(),
                    queue_rx,
                    metrics.clone(),
                )
                .in_current_span(),
            ),
            tokio::spawn(reader(shared.clone(), message_rx).in_current_span()),
            tokio::spawn(
                on_reconnects(
                    shared.clone(),
                    subscriber.clone(),
                    sharded,
                    reconnect_rx,
                    metrics.clone(),
                )
                .in_current_span(),
            ),
            tokio::spawn(forward_resyncs(shared.clone()).in_current_span()),
        ];
        Ok(Arc::new(RedisBroker {
            shared,
            pool,
            subscriber,
            sharded,
            queue,
            sub_locks: (0..SUB_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            tasks,
            metrics,
        }))
    }

    /// This node's id, as sent in every envelope.
    pub fn node_id(&self) -> &str {
        &self.shared.node_id
    }

    /// Messages lost because the reader lagged behind fred's broadcast channel.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Messages that could not be decoded (or named another room than their channel).
    pub fn undecodable(&self) -> u64 {
        self.shared.undecodable.load(Ordering::Relaxed)
    }

    /// Sequence gaps detected (each raised a [`Resync::Room`]).
    pub fn gaps(&self) -> u64 {
        self.shared.gaps.load(Ordering::Relaxed)
    }

    /// Reconnects of the subscriber connection seen (each raised a [`Resync::All`]).
    pub fn reconnects(&self) -> u64 {
        self.shared.reconnects.load(Ordering::Relaxed)
    }

    /// The rooms currently subscribed, sorted (for tests and diagnostics).
    pub fn subscribed(&self) -> Vec<Entity> {
        let mut rooms: Vec<Entity> = self.shared.rooms().keys().cloned().collect();
        rooms.sort();
        rooms
    }

    /// Stops the tasks and closes both connections.
    pub async fn shutdown(&self) {
        for t in &self.tasks {
            t.abort();
        }
        let _ = self.subscriber.quit().await;
        let _ = self.pool.quit().await;
    }

    fn sub_lock(&self, room: &Entity) -> &tokio::sync::Mutex<()> {
        use std::hash::{Hash, Hasher};
        // DefaultHasher::new() has fixed keys: the same room always maps to the same stripe.
        let mut h = std::hash::DefaultHasher::new();
        room.hash(&mut h);
        &self.sub_locks[(h.finish() as usize) % self.sub_locks.len()]
    }
}

impl Drop for RedisBroker {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        // Close the connections too when a runtime is around to run the QUITs.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (subscriber, pool) = (self.subscriber.clone(), self.pool.clone());
            rt.spawn(async move {
                let _ = subscriber.quit().await;
                let _ = pool.quit().await;
            });
        }
    }
}

impl RedisBroker {
    /// Hands `event` to the local sink (when this node subscribes to its room) and queues it
    /// for the publisher; waits only for a queue slot.
    async fn enqueue(
        &self,
        event: Arc<RoomEvent>,
        done: Option<oneshot::Sender<EngineResult<()>>>,
    ) -> EngineResult<()> {
        let permit = self
            .queue
            .reserve()
            .await
            .map_err(|_| EngineError::Unavailable("broker stopped".into()))?;
        // With the slot in hand, nothing can fail any more between the local delivery and the
        // queueing: local and remote members get the same events.
        let subscribed = self.shared.rooms().contains_key(&event.room);
        if subscribed {
            self.shared.sink.deliver(event.clone());
        }
        permit.send(Outgoing {
            event: Some(event),
            done,
        });
        Ok(())
    }
}

#[async_trait]
impl Broker for RedisBroker {
    async fn publish(&self, event: Arc<RoomEvent>) -> EngineResult<()> {
        let (done, result) = oneshot::channel();
        let work = async {
            self.enqueue(event, Some(done)).await?;
            result
                .await
                .map_err(|_| EngineError::Unavailable("broker stopped".into()))?
        };
        tokio::time::timeout(PUBLISH_TIMEOUT, work)
            .await
            .map_err(|_| EngineError::Unavailable("redis publish timed out".into()))?
    }

    async fn flush(&self) -> EngineResult<()> {
        let (done, result) = oneshot::channel();
        let work = async {
            let permit = self
                .queue
                .reserve()
                .await
                .map_err(|_| EngineError::Unavailable("broker stopped".into()))?;
            permit.send(Outgoing {
                event: None,
                done: Some(done),
            });
            result
                .await
                .map_err(|_| EngineError::Unavailable("broker stopped".into()))?
        };
        tokio::time::timeout(PUBLISH_TIMEOUT, work)
            .await
            .map_err(|_| EngineError::Unavailable("redis publish timed out".into()))?
    }

    async fn post(&self, event: Arc<RoomEvent>) -> EngineResult<()> {
        tokio::time::timeout(PUBLISH_TIMEOUT, self.enqueue(event, None))
            .await
            .map_err(|_| EngineError::Unavailable("redis publish queue full".into()))?
    }

    async fn subscribe(&self, room: &Entity) -> EngineResult<()> {
        let _serial = self.sub_lock(room).lock().await;
        let fresh = match self.shared.rooms().entry(room.clone()) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(HashMap::new());
                true
            }
        };
        let channel = keys::room_channel(room.as_str());
        let subscribe = async {
            if self.sharded {
                self.subscriber.ssubscribe(channel).await
            } else {
                self.subscriber.subscribe(channel).await?;
                live_barrier(&self.subscriber).await
            }
        };
        let r = call(&self.metrics, "subscribe", subscribe).await;
        if let Err(e) = r {
            if fresh {
                self.shared.rooms().remove(room);
            }
            return Err(engine_err(e));
        }
        Ok(())
    }

    async fn unsubscribe(&self, room: &Entity) -> EngineResult<()> {
        let _serial = self.sub_lock(room).lock().await;
        self.shared.rooms().remove(room);
        let channel = keys::room_channel(room.as_str());
        let unsubscribe = async {
            if self.sharded {
                self.subscriber.sunsubscribe(channel).await
            } else {
                self.subscriber.unsubscribe(channel).await
            }
        };
        call(&self.metrics, "unsubscribe", unsubscribe)
            .await
            .map_err(engine_err)
    }
}

impl Shared {
    fn rooms(&self) -> MutexGuard<'_, HashMap<Entity, HashMap<Arc<str>, u64>>> {
        // Only short, panic-free sections run under this lock; recover from poisoning anyway.
        self.rooms.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets every origin's last `seq` (after a lag or reconnect: a resync of everything
    /// is on its way, and the next message of each origin starts afresh).
    fn reset_sequences(&self) {
        for origins in self.rooms().values_mut() {
            origins.clear();
        }
    }

    fn on_message(&self, msg: Message) {
        let Some(bytes) = msg.value.as_bytes() else {
            self.reject(&msg.channel, "not a byte string");
            return;
        };
        let envelope: Envelope = match rmp_serde::from_slice(bytes) {
            Ok(e) => e,
            Err(e) => {
                self.reject(&msg.channel, &e.to_string());
                return;
            }
        };
        let room = &envelope.event.room;
        if keys::room_channel(room.as_str()) != *msg.channel {
            self.reject(&msg.channel, &format!("event of room {room}"));
            return;
        }
        // Our own event: the local sink had it when it was published (module doc).
        if envelope.node == self.node_id {
            return;
        }
        let gap = {
            let mut rooms = self.rooms();
            // Not (or no longer) subscribed: a message that was in flight at unsubscribe.
            let Some(origins) = rooms.get_mut(room) else {
                return;
            };
            match origins.get_mut(&*envelope.node) {
                None => {
                    origins.insert(envelope.node.clone(), envelope.seq);
                    false
                }
                Some(last) => {
                    let gap = envelope.seq != last.wrapping_add(1) && envelope.seq != 1;
                    *last = envelope.seq;
                    gap
                }
            }
        };
        if gap {
            self.gaps.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%room, origin = %envelope.node, seq = envelope.seq, "broker: sequence gap, resyncing the room");
            self.resync.emit(Resync::Room(room.clone()));
        }
        self.sink.deliver(Arc::new(envelope.event));
    }

    fn reject(&self, channel: &str, why: &str) {
        let n = self.undecodable.fetch_add(1, Ordering::Relaxed) + 1;
        // Logged at 1, 2, 4, 8, … so a flood of garbage cannot flood the log.
        if n.is_power_of_two() {
            tracing::warn!(%channel, why, total = n, "broker: undecodable message dropped");
        }
    }
}

/// Numbers and sends queued events, one pipeline per batch, batches strictly one after another.
async fn publisher(
    pool: Pool,
    sharded: bool,
    node_id: Arc<str>,
    mut queue: mpsc::Receiver<Outgoing>,
    metrics: RedisMetrics,
) {
    let mut seqs: HashMap<Entity, (u64, Instant)> = HashMap::new();
    let mut last_prune = Instant::now();
    let mut batch = Vec::with_capacity(PUBLISH_BATCH);
    while queue.recv_many(&mut batch, PUBLISH_BATCH).await > 0 {
        let now = Instant::now();
        let mut unreported = 0usize;
        let pipeline = pool.next().pipeline();
        let mut waiting = Vec::with_capacity(batch.len());
        let mut flushes = Vec::new();
        for out in batch.drain(..) {
            let Some(event) = &out.event else {
                // Answered after this batch's pipeline: everything queued before is answered.
                flushes.extend(out.done);
                continue;
            };
            let room = &event.room;
            let counter = seqs.entry(room.clone()).or_insert((0, now));
            let seq = counter.0 + 1;
            let encoded = rmp_serde::to_vec_named(&EnvelopeRef {
                node: &node_id,
                seq,
                event,
            });
            let bytes = match encoded {
                Ok(b) => b,
                Err(e) => {
                    // Not numbered: receivers see no gap for an event that never left.
                    let e = EngineError::Internal(format!("encoding a room event: {e}"));
                    unreported += usize::from(answer(out.done, Err(e)));
                    continue;
                }
            };
            *counter = (seq, now);
            let channel = keys::room_channel(room.as_str());
            // Queuing in a pipeline only buffers the command in memory.
            let queued: Result<(), _> = if sharded {
                pipeline.spublish(channel, bytes).await
            } else {
                pipeline.publish(channel, bytes).await
            };
            match queued {
                Ok(()) => waiting.push(out.done),
                Err(e) => {
                    // The seq is spent: receivers see a gap and resync, which is right.
                    unreported += usize::from(answer(out.done, Err(engine_err(e))));
                }
            }
        }
        if !waiting.is_empty() {
            // One pipeline is one measured call; it failed if any PUBLISH in it did.
            let sent = async {
                let results: Vec<Result<Value, fred::error::Error>> = pipeline.try_all().await;
                if results.iter().any(Result::is_err) {
                    Err(results)
                } else {
                    Ok(results)
                }
            };
            let results = call(&metrics, "publish", sent)
                .await
                .unwrap_or_else(|results| results);
            let mut results = results.into_iter();
            for done in waiting {
                let r = match results.next() {
                    Some(Ok(_)) => Ok(()),
                    Some(Err(e)) => Err(engine_err(e)),
                    None => Err(EngineError::Unavailable(
                        "redis: no reply to PUBLISH".into(),
                    )),
                };
                unreported += usize::from(answer(done, r));
            }
        }
        for done in flushes {
            let _ = done.send(Ok(()));
        }
        if unreported > 0 {
            // Remote receivers see the gap and resync; local members had them already.
            tracing::warn!(
                failed = unreported,
                "broker: posted room events not published"
            );
        }
        if now.duration_since(last_prune) >= SEQ_IDLE {
            seqs.retain(|_, (_, used)| now.duration_since(*used) < SEQ_IDLE);
            seqs.shrink_to_fit();
            last_prune = now;
        }
    }
}

/// Consumes fred's message stream; never blocks.
async fn reader(shared: Arc<Shared>, mut messages: broadcast::Receiver<Message>) {
    loop {
        match messages.recv().await {
            Ok(msg) => shared.on_message(msg),
            Err(broadcast::error::RecvError::Lagged(n)) => {
                let total = shared.dropped.fetch_add(n, Ordering::Relaxed) + n;
                tracing::warn!(
                    lost = n,
                    total,
                    "broker: reader lagged behind the pub/sub stream, resyncing everything"
                );
                shared.reset_sequences();
                shared.resync.emit(Resync::All);
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// On every reconnect of the subscriber connection: resubscribe, then ask for a full resync.
async fn on_reconnects(
    shared: Arc<Shared>,
    subscriber: SubscriberClient,
    sharded: bool,
    mut events: broadcast::Receiver<fred::types::config::Server>,
    metrics: RedisMetrics,
) {
    loop {
        let server = match events.recv().await {
            Ok(server) => Some(server),
            // Reconnect events were missed: they were reconnects all the same.
            Err(broadcast::error::RecvError::Lagged(_)) => None,
            Err(broadcast::error::RecvError::Closed) => return,
        };
        shared.reconnects.fetch_add(1, Ordering::Relaxed);
        tracing::info!(server = ?server, "broker: subscriber reconnected, resubscribing");
        shared.reset_sequences();
        loop {
            let again = resubscribe(&shared, &subscriber, sharded);
            match call(&metrics, "resubscribe", again).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "broker: resubscribing failed, retrying");
                    tokio::time::sleep(RESUBSCRIBE_RETRY).await;
                }
            }
        }
        // Only now: a snapshot taken on this signal sees everything published from here on.
        shared.resync.emit(Resync::All);
    }
}

/// Subscribes again to every room in `shared.rooms` (after a reconnect), and returns once the
/// subscriptions are in effect.
///
/// Not fred's `resubscribe_all()` (nor `manage_subscriptions()`, which calls it): with no
/// pattern subscriptions it still sends an argument-less `PSUBSCRIBE`, and Redis's error reply
/// to it is taken as the reply of a later command on the connection.
async fn resubscribe(
    shared: &Shared,
    subscriber: &SubscriberClient,
    sharded: bool,
) -> Result<(), fred::error::Error> {
    let channels: Vec<String> = shared
        .rooms()
        .keys()
        .map(|room| keys::room_channel(room.as_str()))
        .collect();
    if channels.is_empty() {
        return Ok(());
    }
    if sharded {
        // Every room has its own slot (the channel is tagged by room): one SSUBSCRIBE each,
        // confirmed by fred, a few at a time.
        let results: Vec<Result<(), fred::error::Error>> =
            futures_util::stream::iter(channels.into_iter().map(|c| subscriber.ssubscribe(c)))
                .buffer_unordered(RESUBSCRIBE_CONCURRENCY)
                .collect()
                .await;
        results.into_iter().collect()
    } else {
        for chunk in channels.chunks(RESUBSCRIBE_CHUNK) {
            subscriber.subscribe(chunk.to_vec()).await?;
        }
        live_barrier(subscriber).await
    }
}

/// Waits until Redis has processed every (un)subscribe sent so far on the subscriber
/// connection. fred resolves `SUBSCRIBE` (unlike `SSUBSCRIBE`) as soon as it is written, not
/// when Redis confirms it, so a message published right after could still miss the new
/// subscription. Redis answers a connection's commands in order, and `PING` is allowed in
/// subscriber mode: once its answer is back, the subscriptions before it are in effect.
async fn live_barrier(subscriber: &SubscriberClient) -> Result<(), fred::error::Error> {
    let _: Value = subscriber.ping(None).await?;
    Ok(())
}

/// Hands over the resyncs that found the node's channel full.
async fn forward_resyncs(shared: Arc<Shared>) {
    let r = &shared.resync;
    loop {
        r.notify.notified().await;
        loop {
            let Ok(permit) = r.tx.reserve().await else {
                return;
            };
            match r.owed().take() {
                Some(resync) => permit.send(resync),
                None => break,
            }
        }
    }
}

/// Sends resync requests without ever blocking; see the module docs.
struct Resyncer {
    tx: mpsc::Sender<Resync>,
    owed: Mutex<Owed>,
    notify: Notify,
}

/// Resyncs not yet handed over because the channel was full.
#[derive(Default)]
struct Owed {
    all: bool,
    rooms: HashSet<Entity>,
}

impl Owed {
    fn is_empty(&self) -> bool {
        !self.all && self.rooms.is_empty()
    }

    fn add(&mut self, r: Resync) {
        match r {
            Resync::All => {
                self.all = true;
                self.rooms.clear();
            }
            Resync::Room(room) if !self.all => {
                self.rooms.insert(room);
            }
            Resync::Room(_) => {}
        }
    }

    fn take(&mut self) -> Option<Resync> {
        if std::mem::take(&mut self.all) {
            return Some(Resync::All);
        }
        let room = self.rooms.iter().next().cloned()?;
        self.rooms.remove(&room);
        Some(Resync::Room(room))
    }
}

impl Resyncer {
    fn new(tx: mpsc::Sender<Resync>) -> Resyncer {
        Resyncer {
            tx,
            owed: Mutex::new(Owed::default()),
            notify: Notify::new(),
        }
    }

    fn owed(&self) -> MutexGuard<'_, Owed> {
        self.owed.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn emit(&self, r: Resync) {
        let mut owed = self.owed();
        if owed.is_empty() {
            match self.tx.try_send(r) {
                Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => return,
                Err(mpsc::error::TrySendError::Full(r)) => owed.add(r),
            }
        } else {
            // Keep the order simple: while anything is owed, everything goes through the
            // forwarder (deduplicated there).
            owed.add(r);
        }
        drop(owed);
        self.notify.notify_one();
    }
}
