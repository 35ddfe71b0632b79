//! One Hocuspocus socket (`GET /v1/hocuspocus`) from its upgrade to its close.
//!
//! Per document (keyed by the message address, `name` or `name\0sessionId`):
//! - the first message for an address opens a slot that **queues** everything but the auth
//!   message (bounded per socket: [`MAX_QUEUED`] messages, [`MAX_QUEUED_BYTES`] bytes; past
//!   that the socket closes with 1008) until the auth message's token is decided and the
//!   document attached to the registry;
//! - then the auth answer goes out (`read-write` or `readonly`), then the registry's first
//!   frames (SyncStep1, awareness), then the queued messages are handled in order;
//! - a refusal (bad token, no role, bad name, node or document full, more than
//!   [`MAX_DOCS_PER_SOCKET`] documents) is a permission-denied message for that document
//!   only; the slot then drops that address's messages until a new auth message or Close;
//! - SyncStep2 and Update from a writer are applied and acknowledged with SyncStatus once they
//!   are in the log; a read-only client's are refused (SyncStatus false, counted), except a
//!   SyncStep2 with nothing new, acknowledged like the Hocuspocus server does;
//! - Close (7) from the client detaches that document; the socket stays.
//!
//! For the socket:
//! - every frame out goes through one bounded queue ([`Limits::queue_frames`]) drained by the
//!   writer half; a full queue closes with 4008 (slow consumer), and so does a document whose
//!   registry queue overflowed;
//! - a message that does not decode closes with 1007 (the Hocuspocus server ends only that
//!   document with a Close message, which the provider takes as final for it: closing the
//!   socket surfaces the error as the provider's `disconnect` rather than a silently dead
//!   document, and is what `/v1/yjs` does);
//! - a frame over the limit closes with 1009, the node draining with 1012;
//! - keep-alive: after [`KEEPALIVE`] with nothing sent (checked every 5 s), a Ping (`[9]`),
//!   which 4.x providers answer with Pong; the Ping itself keeps their 30 s silence timer
//!   (`messageReconnectTimeout`) quiet, also for a provider without awareness;
//!   [`IDLE_TIMEOUT`] without a frame from the client closes with 4010, and
//!   [`AUTH_DEADLINE`] without any document ever authorized closes with 4001;
//! - on close every attached document is detached (the registry nulls its awareness ids).
//!
//! [`Limits::queue_frames`]: crate::yjs::docs::Limits::queue_frames

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::{self, BoxStream, FuturesUnordered, SelectAll, SplitSink};
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tungstenite::Message as WsMessage;
use yrs::updates::encoder::Encode;

use super::codec::{self, DocMessage, Frame, Malformed, kind, sync};
use super::{Access, Authorizer, Grant, Keep};
use crate::error::close;
use crate::session::Socket;
use crate::session::ratelimit::TokenBucket;
use crate::yjs::docs::{Attached, LoadedDoc, Refusal, Registry};

/// Documents (addresses) one socket may have open, waiting or refused at once. Past it, an
/// auth message is answered with permission denied and other messages are dropped.
pub const MAX_DOCS_PER_SOCKET: usize = 64;
/// Messages queued on one socket for documents not authorized yet.
pub const MAX_QUEUED: usize = 256;
/// Bytes of those messages.
pub const MAX_QUEUED_BYTES: usize = 2 * 1024 * 1024;
/// A Ping after this long with nothing sent.
pub const KEEPALIVE: Duration = Duration::from_secs(10);
/// No frame from the client for this long: closed with 4010 (the Hocuspocus server's
/// default `timeout`). A 4.x provider answers every Ping, so only a dead one gets here.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// No document authorized this long after the upgrade: closed with 4001.
pub const AUTH_DEADLINE: Duration = Duration::from_secs(60);
/// Messages queued before auth overflowed (RFC 6455 "policy violation").
pub const POLICY_VIOLATION: u16 = 1008;
/// Why the socket ends: `Some((code, reason))` sends a close frame; `None` when the socket is
/// already gone.
type End = Option<(u16, String)>;

/// Serves one Hocuspocus socket until either side ends or `draining` fires.
pub async fn serve(
    registry: Arc<Registry>,
    socket: Socket,
    authorizer: Arc<dyn Authorizer>,
    budget: TokenBucket,
    draining: CancellationToken,
) {
    let (mut sink, mut stream) = socket.split();
    let (out, mut out_rx) = mpsc::channel(registry.limits.queue_frames.max(16));
    let mut conn = Conn::new(registry.clone(), authorizer, out, budget);
    let end = tokio::select! {
        end = conn.run(&mut stream, &draining) => end,
        () = write_all(&mut sink, &mut out_rx) => None,
    };
    let pending = conn.detach_all();
    if !pending.is_empty() {
        // Authorizations still running may yet attach: detach whatever they bring.
        tokio::spawn(async move {
            let mut pending = pending;
            while let Some(done) = pending.next().await {
                if let Ok((a, ..)) = done.result {
                    registry.detach(&a.doc, a.conn);
                }
            }
        });
    }
    if let Some((code, reason)) = end {
        tracing::debug!(code, %reason, "hocuspocus: closing a socket");
        // The halves come from one socket, so they always reunite.
        if let Ok(mut socket) = sink.reunite(stream) {
            crate::yjs::conn::close_with(&mut socket, code, &reason).await;
        }
    }
}

/// Drains the outbound queue into the socket (feeding what is ready, then one flush).
async fn write_all(sink: &mut SplitSink<Socket, WsMessage>, rx: &mut mpsc::Receiver<Bytes>) {
    while let Some(frame) = rx.recv().await {
        if sink.feed(WsMessage::Binary(frame)).await.is_err() {
            return;
        }
        while let Ok(frame) = rx.try_recv() {
            if sink.feed(WsMessage::Binary(frame)).await.is_err() {
                return;
            }
        }
        if sink.flush().await.is_err() {
            return;
        }
    }
}

/// The outcome of authorizing (and attaching) one address.
struct AuthDone {
    address: Box<str>,
    slot: u64,
    /// The attachment, whether it may write and what to keep while it is open, or the
    /// permission-denied reason.
    result: Result<(Attached, bool, Option<Keep>), String>,
}

/// A frame from a document's registry queue, already prefixed; `None`: the queue closed.
type DocFrame = (u64, Option<Bytes>);

enum Slot {
    /// Before the auth message is decided: messages wait here.
    Waiting {
        slot: u64,
        queue: Vec<Bytes>,
        authorizing: bool,
    },
    /// Refused: messages are dropped until a new auth message or Close.
    Denied,
    Open(Open),
}

struct Open {
    slot: u64,
    doc: Arc<LoadedDoc>,
    conn: u64,
    writable: bool,
    prefix: Bytes,
    /// The first SyncStep1 of the client is answered with SyncStep2 only: attaching already
    /// queued the server's SyncStep1. Later ones (the provider's `forceSync`) get both, like
    /// the Hocuspocus server answers every one.
    step1_seen: bool,
    /// The authorizer's [`Keep`] (presence listing, token watch): dropped with the slot.
    keep: Option<Keep>,
}

struct Conn {
    registry: Arc<Registry>,
    authorizer: Arc<dyn Authorizer>,
    out: mpsc::Sender<Bytes>,
    slots: HashMap<Box<str>, Slot>,
    /// Ids of the open slots (a frame of an older attachment of the same address is dropped).
    open: HashSet<u64>,
    next_slot: u64,
    auths: FuturesUnordered<BoxFuture<'static, AuthDone>>,
    frames: SelectAll<BoxStream<'static, DocFrame>>,
    ever_authorized: bool,
    last_out: Instant,
    last_in: Instant,
    /// The socket's message budget (`/v1/yjs`'s per-connection rate). A socket may carry
    /// documents of several users, so there is no per-user budget here.
    budget: TokenBucket,
}

impl Conn {
    fn new(
        registry: Arc<Registry>,
        authorizer: Arc<dyn Authorizer>,
        out: mpsc::Sender<Bytes>,
        budget: TokenBucket,
    ) -> Conn {
        Conn {
            registry,
            authorizer,
            out,
            slots: HashMap::new(),
            open: HashSet::new(),
            next_slot: 1,
            auths: FuturesUnordered::new(),
            frames: SelectAll::new(),
            ever_authorized: false,
            last_out: Instant::now(),
            last_in: Instant::now(),
            budget,
        }
    }

    async fn run(
        &mut self,
        stream: &mut futures_util::stream::SplitStream<Socket>,
        draining: &CancellationToken,
    ) -> End {
        let opened = Instant::now();
        let mut keepalive = tokio::time::interval(KEEPALIVE / 2);
        keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        keepalive.reset();
        loop {
            let step = tokio::select! {
                incoming = stream.next() => match incoming {
                    Some(Ok(WsMessage::Binary(data))) => {
                        self.last_in = Instant::now();
                        if let Err(wait) = self.budget.take_or_wait(self.last_in.into_std()) {
                            // Over budget: this message waits for its token (at most one
                            // token's refill time) and the socket is not read meanwhile, so
                            // a flooder is slowed by TCP backpressure; nothing is dropped.
                            self.registry.counters.throttled.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(wait).await;
                            let _ = self.budget.take_or_wait(Instant::now().into_std());
                        }
                        self.on_frame(data)
                    }
                    Some(Ok(WsMessage::Close(_))) | None => return None,
                    // Text, WebSocket pings and pongs: a sign of life, nothing to handle.
                    Some(Ok(_)) => {
                        self.last_in = Instant::now();
                        Ok(())
                    }
                    Some(Err(tungstenite::Error::Capacity(e))) => {
                        return Some((close::TOO_BIG, e.to_string()));
                    }
                    Some(Err(_)) => return None,
                },
                Some(done) = self.auths.next(), if !self.auths.is_empty() => self.on_authorized(done),
                Some((slot, frame)) = self.frames.next(), if !self.frames.is_empty() => {
                    match frame {
                        Some(f) if self.open.contains(&slot) => self.push(f),
                        None if self.open.contains(&slot) => {
                            // The registry dropped this connection: its queue was full.
                            Err(Some((close::SLOW_CONSUMER, "slow consumer".into())))
                        }
                        _ => Ok(()),
                    }
                }
                _ = keepalive.tick() => self.on_tick(opened),
                _ = draining.cancelled() => {
                    return Some((close::SERVICE_RESTART, "node draining".into()));
                }
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    /// Queues a frame for the writer; a full queue ends the socket (slow consumer).
    fn push(&mut self, frame: Bytes) -> Result<(), End> {
        self.last_out = Instant::now();
        self.out.try_send(frame).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                Some((close::SLOW_CONSUMER, "slow consumer".to_owned()))
            }
            mpsc::error::TrySendError::Closed(_) => None,
        })
    }

    fn on_tick(&mut self, opened: Instant) -> Result<(), End> {
        for slot in self.slots.values() {
            if let Slot::Open(open) = slot
                && let Some((code, reason)) = open.keep.as_ref().and_then(|k| k.ended())
            {
                return Err(Some((code, reason.to_owned())));
            }
        }
        if self.last_in.elapsed() >= IDLE_TIMEOUT {
            return Err(Some((
                close::HEARTBEAT_TIMEOUT,
                "no message for 60 s".into(),
            )));
        }
        if !self.ever_authorized && opened.elapsed() >= AUTH_DEADLINE {
            return Err(Some((
                close::UNAUTHORIZED,
                "no document authorized within 60 s".into(),
            )));
        }
        if self.last_out.elapsed() >= KEEPALIVE {
            self.push(Bytes::from_static(codec::PING))?;
        }
        Ok(())
    }

    fn on_frame(&mut self, data: Bytes) -> Result<(), End> {
        let m = match codec::parse(&data) {
            Ok(Frame::Ping) => return self.push(Bytes::from_static(codec::PONG)),
            Ok(Frame::Pong) => return Ok(()),
            Ok(Frame::Doc(m)) => m,
            Err(e) => return Err(malformed(&e)),
        };
        let slot = self.next_slot;
        match self.slots.get_mut(m.address) {
            Some(Slot::Open(_)) => self.on_open_message(&m),
            Some(Slot::Waiting {
                slot,
                queue,
                authorizing,
            }) => {
                if m.kind == kind::AUTH && !*authorizing {
                    *authorizing = true;
                    let slot = *slot;
                    return self.authorize(&m, slot);
                }
                if m.kind == kind::CLOSE {
                    // A late authorization result finds no slot and is detached.
                    self.slots.remove(m.address);
                    return Ok(());
                }
                queue.push(data.clone());
                self.check_queue_bounds()
            }
            Some(Slot::Denied) => match m.kind {
                kind::AUTH => {
                    self.next_slot += 1;
                    self.slots.insert(
                        m.address.into(),
                        Slot::Waiting {
                            slot,
                            queue: Vec::new(),
                            authorizing: true,
                        },
                    );
                    self.authorize(&m, slot)
                }
                kind::CLOSE => {
                    self.slots.remove(m.address);
                    Ok(())
                }
                _ => Ok(()),
            },
            None => {
                if m.kind == kind::CLOSE {
                    return Ok(());
                }
                if self.slots.len() >= MAX_DOCS_PER_SOCKET {
                    if m.kind != kind::AUTH {
                        return Ok(());
                    }
                    let reason =
                        format!("this socket has its maximum of {MAX_DOCS_PER_SOCKET} documents");
                    let prefix = codec::address_prefix(m.address);
                    return self.push(codec::permission_denied(&prefix, &reason));
                }
                self.next_slot += 1;
                let is_auth = m.kind == kind::AUTH;
                self.slots.insert(
                    m.address.into(),
                    Slot::Waiting {
                        slot,
                        queue: if is_auth {
                            Vec::new()
                        } else {
                            vec![data.clone()]
                        },
                        authorizing: is_auth,
                    },
                );
                if is_auth {
                    self.authorize(&m, slot)
                } else {
                    self.check_queue_bounds()
                }
            }
        }
    }

    /// Closes the socket (1008) when the messages waiting for auth exceed their bounds.
    fn check_queue_bounds(&self) -> Result<(), End> {
        let (mut count, mut bytes) = (0, 0);
        for slot in self.slots.values() {
            if let Slot::Waiting { queue, .. } = slot {
                count += queue.len();
                bytes += queue.iter().map(Bytes::len).sum::<usize>();
            }
        }
        if count > MAX_QUEUED || bytes > MAX_QUEUED_BYTES {
            return Err(Some((
                POLICY_VIOLATION,
                format!("more than {MAX_QUEUED} messages or {MAX_QUEUED_BYTES} bytes before auth"),
            )));
        }
        Ok(())
    }

    /// Starts authorizing `m` (an auth message) for the slot with id `slot`: the token decides
    /// the access, then the document is attached.
    fn authorize(&mut self, m: &DocMessage<'_>, slot: u64) -> Result<(), End> {
        let token = codec::auth_token(m.body).map_err(|e| malformed(&e))?;
        let token = token.unwrap_or_default().to_owned();
        let address: Box<str> = m.address.into();
        let document = m.document().to_owned();
        let decided = self.authorizer.authorize(&document, token);
        let registry = self.registry.clone();
        self.auths.push(
            async move {
                let result = match decided.await {
                    Ok(Grant { access, keep }) => registry
                        .attach(&document)
                        .await
                        .map(|a| (a, access == Access::ReadWrite, keep))
                        .map_err(|e| e.to_string()),
                    Err(reason) => Err(reason),
                };
                AuthDone {
                    address,
                    slot,
                    result,
                }
            }
            .boxed(),
        );
        Ok(())
    }

    fn on_authorized(&mut self, done: AuthDone) -> Result<(), End> {
        let queue = match self.slots.get_mut(&done.address) {
            Some(Slot::Waiting { slot, queue, .. }) if *slot == done.slot => std::mem::take(queue),
            _ => {
                // The client closed this address meanwhile.
                if let Ok((a, ..)) = done.result {
                    self.registry.detach(&a.doc, a.conn);
                }
                return Ok(());
            }
        };
        let prefix = codec::address_prefix(&done.address);
        let (attached, writable, keep) = match done.result {
            Ok(x) => x,
            Err(reason) => {
                tracing::debug!(address = %done.address, %reason, "hocuspocus: permission denied");
                self.slots.insert(done.address, Slot::Denied);
                return self.push(codec::permission_denied(&prefix, &reason));
            }
        };
        self.ever_authorized = true;
        self.push(codec::authenticated(&prefix, writable))?;
        let Attached { doc, conn, rx } = attached;
        let slot = done.slot;
        self.frames.push(doc_frames(slot, prefix.clone(), rx));
        self.open.insert(slot);
        self.slots.insert(
            done.address,
            Slot::Open(Open {
                slot,
                doc,
                conn,
                writable,
                prefix,
                step1_seen: false,
                keep,
            }),
        );
        for data in queue {
            self.on_frame(data)?;
        }
        Ok(())
    }

    /// A message for an open document.
    fn on_open_message(&mut self, m: &DocMessage<'_>) -> Result<(), End> {
        let Some(Slot::Open(open)) = self.slots.get_mut(m.address) else {
            return Ok(());
        };
        let reg = &self.registry;
        let mut replies: Vec<Bytes> = Vec::new();
        let result = match m.kind {
            kind::SYNC | kind::SYNC_REPLY => {
                let (step, payload) = codec::sync_parts(m.body).map_err(|e| malformed(&e))?;
                match step {
                    sync::STEP1 => {
                        if std::mem::replace(&mut open.step1_seen, true) {
                            let sv = open.doc.state_vector().encode_v1();
                            replies.push(codec::sync_step1(&open.prefix, &sv));
                        }
                        // `handle` answers with SyncStep2 through the registry queue; it takes
                        // a y-websocket message, which a SyncReply is not.
                        let owned;
                        let message = if m.kind == kind::SYNC {
                            m.message
                        } else {
                            owned = [&[kind::SYNC as u8][..], m.body].concat();
                            &owned[..]
                        };
                        open.doc.handle(reg, open.conn, open.writable, message)
                    }
                    _ if open.writable => open.doc.write_acked(reg, open.conn, payload.to_vec()),
                    // Read-only: never applied. A SyncStep2 with nothing new is "saved" (the
                    // provider's `unsyncedChanges` reaches 0), anything else is refused.
                    _ => {
                        let nothing_new = match step {
                            sync::STEP2 => open.doc.contains_update(payload),
                            _ => Ok(false),
                        };
                        nothing_new.map(|saved| {
                            if !saved {
                                reg.counters
                                    .refused_readonly
                                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            replies.push(codec::sync_status(&open.prefix, saved));
                        })
                    }
                }
            }
            kind::AWARENESS | kind::QUERY_AWARENESS => {
                open.doc.handle(reg, open.conn, open.writable, m.message)
            }
            kind::CLOSE => {
                let Some(Slot::Open(open)) = self.slots.remove(m.address) else {
                    return Ok(());
                };
                self.open.remove(&open.slot);
                self.registry.detach(&open.doc, open.conn);
                return Ok(());
            }
            // Auth on an open document (a token refresh: the Hocuspocus server only passes
            // it to an `onTokenSync` hook), Stateless and BroadcastStateless (no hooks
            // here), and the server's own types: nothing to do.
            _ => Ok(()),
        };
        for r in replies {
            self.push(r)?;
        }
        match result {
            Ok(()) => Ok(()),
            Err(Refusal::Malformed(e)) => Err(Some((close::INVALID_PAYLOAD, e))),
            Err(refusal) => self.close_doc(m.address, &refusal.to_string()),
        }
    }

    /// Ends one document on this socket with a Close message; the socket stays.
    fn close_doc(&mut self, address: &str, reason: &str) -> Result<(), End> {
        let Some(Slot::Open(open)) = self.slots.remove(address) else {
            return Ok(());
        };
        tracing::debug!(%address, %reason, "hocuspocus: closing a document");
        self.open.remove(&open.slot);
        self.registry.detach(&open.doc, open.conn);
        self.push(codec::close(&open.prefix, reason))
    }

    /// Detaches every open document; returns the authorizations still running.
    fn detach_all(&mut self) -> FuturesUnordered<BoxFuture<'static, AuthDone>> {
        for (_, slot) in self.slots.drain() {
            if let Slot::Open(open) = slot {
                self.registry.detach(&open.doc, open.conn);
            }
        }
        self.open.clear();
        std::mem::take(&mut self.auths)
    }
}

fn malformed(e: &Malformed) -> End {
    Some((close::INVALID_PAYLOAD, e.to_string()))
}

/// A document's registry queue as a stream of prefixed frames, ending with `None` once closed.
fn doc_frames(slot: u64, prefix: Bytes, rx: mpsc::Receiver<Bytes>) -> BoxStream<'static, DocFrame> {
    stream::unfold(Some(rx), move |rx| {
        let prefix = prefix.clone();
        async move {
            let mut rx = rx?;
            match rx.recv().await {
                Some(frame) => Some(((slot, Some(codec::prefixed(&prefix, &frame))), Some(rx))),
                None => Some(((slot, None), None)),
            }
        }
    })
    .boxed()
}
