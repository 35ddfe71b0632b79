//! One WebSocket connection: read loop, command dispatch, outbound queue, heartbeat, close.
//!
//! A single task per connection drives everything with `select!`: frames in, the outbound
//! queue out, heartbeat pings, the node's drain signal and the kill switch of an overflowing
//! queue. Commands run one at a time, so a client's requests are answered in order.

pub mod commands;
pub mod handle;
pub mod outbound;
pub mod ratelimit;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tracing::Instrument;
use tracing::field::Empty;
use tungstenite::Message;
use tungstenite::protocol::frame::CloseFrame;

use crate::auth::Principal;
use crate::error::{ErrorCode, close};
use crate::node::Node;
use crate::node::sessions::EndReason;
use crate::protocol::server::ErrorFrame;
use crate::protocol::{ClientMessage, Codec, Request, ServerMessage};
use handle::SessionHandle;
use outbound::{END_KILL, END_REVOKED, END_TAKEOVER};
use ratelimit::TokenBucket;

/// A client's WebSocket, upgraded by [`crate::http`]'s `/v1/ws` handler.
pub type Socket =
    tokio_tungstenite::WebSocketStream<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>;

/// Frames larger than this are written straight to the connection, not through
/// tungstenite's write buffer, which would keep their size as capacity for as long as the
/// connection lives (a room snapshot of 100 members is ~18 KB). Smaller ones are buffered,
/// so a batch of cursors still goes out in one write.
pub const DIRECT_WRITE: usize = 1024;

/// How long the final frames (close, reconnect) may take to reach a client.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs a connection from its upgrade to its end.
///
/// One span (one trace) per connection: opened or resumed, closed with a reason. It is
/// entered where the session does something that logs or traces (opening, each request,
/// the end), not around the whole connection: the socket loop wakes once per delivered
/// frame, and entering and leaving a span on every one of those polls was a visible share
/// of fan-out CPU. Requests are its children, so log lines inside them still carry session,
/// user and node.
pub async fn run(
    node: Arc<Node>,
    mut socket: Socket,
    principal: Principal,
    codec: Codec,
    resume: Option<String>,
) {
    let span = tracing::info_span!(
        "session",
        session_id = Empty,
        user_id = &*principal.user_id,
        node_id = &*node.id,
        codec = match codec {
            Codec::Json => "json",
            Codec::MsgPack => "msgpack",
        },
        kind = Empty,
        reason = Empty,
    );
    // The rarely-run, large futures (lock paths carry Postgres and timeout futures) are boxed,
    // so the state every idle session keeps alive stays small (7 KB → 1.6 KB per task).
    let opened = Box::pin(node.open_session(principal, codec, resume.as_deref()))
        .instrument(span.clone())
        .await;
    let handle = match opened {
        Ok((handle, resumed)) => {
            span.record("session_id", &*handle.id);
            span.record("kind", if resumed { "resumed" } else { "new" });
            handle
        }
        Err(e) => {
            span.record("reason", "too_many_sessions");
            let message = e.to_string();
            let frame = ErrorFrame::new(None, ErrorCode::TooManySessions, &message);
            let _ = socket
                .send(codec.encode(&ServerMessage::Error(frame)))
                .await;
            close_with(&mut socket, close::TOO_MANY_SESSIONS, "too many sessions").await;
            return;
        }
    };
    let reason = drive(&node, &handle, &mut socket, &span).await;
    span.record("reason", reason.as_str());
    let close = Box::pin(last_words(&node, &handle, &mut socket, reason))
        .instrument(span.clone())
        .await;
    // End (or park) the session before the closing handshake, which may take a while: its
    // locks and presence must not wait on a client that is slow to say goodbye.
    Box::pin(node.end_session(&handle, reason))
        .instrument(span.clone())
        .await;
    if let Some((code, text)) = close {
        close_with(&mut socket, code, text).await;
    }
}

/// The span of one client request, a child of its session's. Cursor frames are the hot path
/// (tens per second per member): their span is at `trace` and presence updates at `debug`, so
/// at the default filters neither costs more than a cached "disabled" check.
fn request_span(req: &Request) -> tracing::Span {
    let m = &req.message;
    let ty = m.type_name();
    let room = m.room().map(|e| e.as_str());
    let resource = m.resource().map(|e| e.as_str());
    macro_rules! span {
        ($level:ident) => {
            tracing::$level!(
                "request",
                "type" = ty,
                // Integers as i64: OpenTelemetry has no unsigned type (u64 would become text).
                id = req.id.map(i64::from),
                room,
                resource,
                error = Empty,
                otel.status_code = Empty,
            )
        };
    }
    match m {
        ClientMessage::Cursor(_) => span!(trace_span),
        ClientMessage::Presence(_) => span!(debug_span),
        _ => span!(info_span),
    }
}

/// Marks the current request span with the error code it answered; server-side failures
/// (`unavailable`) also set the OpenTelemetry status to error.
pub fn record_error(code: ErrorCode) {
    let span = tracing::Span::current();
    span.record("error", code.as_str());
    if code == ErrorCode::Unavailable {
        span.record("otel.status_code", "error");
    }
}

/// Why the session must end now, from its raised end signals (most urgent first).
fn end_reason(ends: u8) -> Option<EndReason> {
    if ends & END_KILL != 0 {
        Some(EndReason::SlowConsumer)
    } else if ends & END_REVOKED != 0 {
        Some(EndReason::Revoked)
    } else if ends & END_TAKEOVER != 0 {
        Some(EndReason::TakenOver)
    } else {
        None
    }
}

/// The socket loop. One task owns the socket (no `split()`: reads and writes never run at
/// the same time, so the halves' lock would only cost); it waits on the outbound queue,
/// which also carries the session's end signals, frames in, the heartbeat, the token timer
/// and the node's drain. Each of those is one registration per turn of the loop.
async fn drive(
    node: &Node,
    handle: &Arc<SessionHandle>,
    socket: &mut Socket,
    span: &tracing::Span,
) -> EndReason {
    let cfg = &node.config;
    let mut heartbeat = tokio::time::interval_at(
        tokio::time::Instant::now() + cfg.heartbeat_interval,
        cfg.heartbeat_interval,
    );
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A write that cannot complete within the heartbeat window means the client stopped
    // reading (its TCP window is shut): it is a slow consumer, whatever its queue holds.
    let write_timeout = cfg.heartbeat_interval * cfg.heartbeat_misses;
    // A session is dead after `heartbeat_misses` consecutive intervals without any frame.
    let mut seen_since_tick = false;
    let mut misses = 0;
    let mut limits = Limits {
        budget: TokenBucket::new(cfg.messages_per_second, cfg.message_burst),
        releasing: TokenBucket::new(cfg.messages_per_second, cfg.message_burst),
        last_error: None,
    };
    let mut spare = outbound::Batch::default();
    let mut expiry = Expiry::new(handle);
    let auth_timer = tokio::time::sleep_until(expiry.next);
    tokio::pin!(auth_timer);
    // Registered once for the whole connection, not once per turn.
    let draining = node.draining.cancelled();
    tokio::pin!(draining);
    loop {
        if let Some(end) = end_reason(handle.outbound.ends()) {
            return end;
        }
        tokio::select! {
            biased;
            _ = handle.outbound.ready() => {
                let batch = handle.outbound.take(std::mem::take(&mut spare));
                if batch.is_empty() {
                    spare = batch;
                    continue;
                }
                // A write into a silent TCP path can block until the window shuts and the
                // timeout fires; a takeover must not wait for that (the resume waits on it).
                let written = tokio::select! {
                    r = tokio::time::timeout(write_timeout, write_batch(socket, batch)) => r,
                    ends = handle.outbound.end_signalled() => {
                        return end_reason(ends).unwrap_or(EndReason::SlowConsumer);
                    }
                };
                match written {
                    Err(_) => return EndReason::SlowConsumer,
                    Ok(Ok(buf)) => spare = buf,
                    Ok(Err(_)) => return EndReason::ConnectionLost,
                }
            }
            frame = socket.next() => {
                let Some(frame) = frame else { return EndReason::ConnectionLost };
                let frame = match frame {
                    Ok(f) => f,
                    Err(e) => return if is_capacity_error(&e) { EndReason::TooBig } else { EndReason::ConnectionLost },
                };
                seen_since_tick = true;
                misses = 0;
                let bytes: &[u8] = match &frame {
                    Message::Text(t) => t.as_bytes(),
                    Message::Binary(b) => b,
                    Message::Ping(_) => {
                        // tungstenite queued the pong; flush it now rather than with the next write.
                        if tokio::time::timeout(write_timeout, socket.flush()).await.is_err() {
                            return EndReason::SlowConsumer;
                        }
                        continue;
                    }
                    // Raw frames only exist on the sending side.
                    Message::Pong(_) | Message::Frame(_) => continue,
                    Message::Close(c) => {
                        // 1000 or no status (a browser's bare `close()`) is a deliberate end;
                        // anything else (1001 on tab close or reload, errors) may come back.
                        let normal = c.as_ref().is_none_or(|c| u16::from(c.code) == close::NORMAL);
                        return if normal { EndReason::ClientClosed } else { EndReason::ConnectionLost };
                    }
                };
                let ty = handle_frame(node, handle, bytes, &mut limits)
                    .instrument(span.clone())
                    .await;
                node.metrics.message_in(ty, bytes.len());
                if ty == "auth.refresh" {
                    expiry = Expiry::new(handle);
                    auth_timer.as_mut().reset(expiry.next);
                }
            }
            _ = &mut auth_timer, if expiry.armed => {
                if span.in_scope(|| expiry.fire(handle)) {
                    return EndReason::TokenExpired;
                }
                auth_timer.as_mut().reset(expiry.next);
            }
            _ = &mut draining => return EndReason::Draining,
            _ = heartbeat.tick() => {
                if !seen_since_tick {
                    misses += 1;
                    node.metrics.heartbeat_miss();
                    if misses >= cfg.heartbeat_misses {
                        node.metrics.heartbeat_timeout();
                        return EndReason::HeartbeatTimeout;
                    }
                }
                seen_since_tick = false;
                let ping = tokio::select! {
                    r = tokio::time::timeout(write_timeout, socket.send(Message::Ping(Default::default()))) => r,
                    ends = handle.outbound.end_signalled() => {
                        return end_reason(ends).unwrap_or(EndReason::SlowConsumer);
                    }
                };
                match ping {
                    Err(_) => return EndReason::SlowConsumer,
                    Ok(Err(_)) => return EndReason::ConnectionLost,
                    Ok(Ok(())) => {}
                }
            }
        }
    }
}

/// The session's token timeline: `auth.expiring` at `exp` minus the lead, the end at `exp`.
struct Expiry {
    /// When the timer fires next.
    next: tokio::time::Instant,
    /// False when the token has no `exp` or the session already ended.
    armed: bool,
    warned: bool,
    exp_ms: u64,
}

impl Expiry {
    fn new(handle: &SessionHandle) -> Expiry {
        let exp_ms = handle
            .principal
            .grants()
            .exp
            .map(|s| s.saturating_mul(1000))
            .unwrap_or(0);
        let now = tokio::time::Instant::now();
        if exp_ms == 0 {
            return Expiry {
                next: now + Duration::from_secs(86_400 * 365),
                armed: false,
                warned: false,
                exp_ms,
            };
        }
        let remaining = Duration::from_millis(exp_ms.saturating_sub(crate::engine::now_ms()));
        let lead = crate::node::lifetime::expiry_lead(remaining);
        Expiry {
            next: now + (remaining - lead),
            armed: true,
            warned: false,
            exp_ms,
        }
    }

    /// Warns (and re-arms for `exp`) or says the token is past `exp`.
    fn fire(&mut self, handle: &SessionHandle) -> bool {
        let remaining = self.exp_ms.saturating_sub(crate::engine::now_ms());
        if self.warned || remaining == 0 {
            return true;
        }
        self.warned = true;
        handle.send(&ServerMessage::AuthExpiring {
            expires_at: self.exp_ms,
            in_ms: remaining,
        });
        self.next = tokio::time::Instant::now() + Duration::from_millis(remaining);
        false
    }
}

/// A session's message budgets. Releasing messages (`lock.release`, `leave`,
/// `lock.cancel_wait`) have their own budget, so a flood of other messages can never keep a
/// client from giving resources back, and they cannot be used to flood either.
struct Limits {
    budget: TokenBucket,
    releasing: TokenBucket,
    last_error: Option<Instant>,
}

/// Decodes, rate-limits and executes one frame; returns its type for metrics.
async fn handle_frame(
    node: &Node,
    handle: &Arc<SessionHandle>,
    bytes: &[u8],
    limits: &mut Limits,
) -> &'static str {
    let decoded = handle.codec.decode(bytes);
    let releasing = matches!(
        decoded.as_ref().map(|r| &r.message),
        Ok(ClientMessage::LockRelease(_)
            | ClientMessage::Leave(_)
            | ClientMessage::LockCancelWait(_))
    );
    let now = Instant::now();
    let bucket = if releasing {
        &mut limits.releasing
    } else {
        &mut limits.budget
    };
    if !bucket.take(now) {
        node.metrics.rate_limited();
        let id = decoded.as_ref().ok().and_then(|r| r.id);
        // A request with an id is always answered, so no client waits forever; id-less
        // messages (cursors) get one error per second at most, so a flood is not amplified.
        let due = limits
            .last_error
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1));
        if id.is_some() || due {
            limits.last_error = Some(now);
            let msg = format!(
                "over {} messages per second: this message was dropped",
                node.config.messages_per_second
            );
            node.metrics.client_error(ErrorCode::RateLimited.as_str());
            handle.send(&ServerMessage::Error(ErrorFrame::new(
                id,
                ErrorCode::RateLimited,
                &msg,
            )));
        }
        return "rate_limited";
    }
    match decoded {
        Ok(req) => {
            let ty = req.message.type_name();
            let span = request_span(&req);
            Box::pin(commands::handle(node, handle, req))
                .instrument(span)
                .await;
            ty
        }
        Err(e) => {
            node.metrics.client_error(e.code.as_str());
            handle.send(&ServerMessage::Error(ErrorFrame::new(
                e.id, e.code, &e.message,
            )));
            "invalid"
        }
    }
}

/// Writes a batch with one flush (tungstenite buffers the frames and writes them together
/// once past its write buffer, or at the flush); returns the emptied batch for reuse.
async fn write_batch(
    socket: &mut Socket,
    mut batch: outbound::Batch,
) -> Result<outbound::Batch, tungstenite::Error> {
    for m in batch.messages.drain(..) {
        write_frame(socket, m).await?;
    }
    for (_, _, m) in batch.cursors.drain(..) {
        socket.feed(m).await?;
    }
    socket.flush().await?;
    Ok(batch)
}

/// Feeds one frame to tungstenite, or writes a large one straight to the connection after
/// what tungstenite holds (see [`DIRECT_WRITE`]).
async fn write_frame(socket: &mut Socket, m: Message) -> Result<(), tungstenite::Error> {
    use tungstenite::protocol::frame::Frame;
    use tungstenite::protocol::frame::coding::{Data, OpCode};
    let (opcode, payload) = match m {
        Message::Text(t) if t.len() > DIRECT_WRITE => (Data::Text, tungstenite::Bytes::from(t)),
        Message::Binary(b) if b.len() > DIRECT_WRITE => (Data::Binary, b),
        m => return socket.feed(m).await,
    };
    // Everything fed before goes first; then the frame, formatted by tungstenite (one final,
    // unmasked frame: a server's) into a buffer that is freed once written.
    socket.flush().await?;
    let frame = Frame::message(payload, OpCode::Data(opcode), true);
    let mut bytes = Vec::with_capacity(frame.len());
    frame.format(&mut bytes)?;
    let io = socket.get_mut();
    io.write_all(&bytes).await?;
    io.flush().await?;
    Ok(())
}

/// Last words to the client (bounded in time) and the close code to send, if any.
async fn last_words(
    node: &Node,
    handle: &SessionHandle,
    socket: &mut Socket,
    reason: EndReason,
) -> Option<(u16, &'static str)> {
    Some(match reason {
        EndReason::Draining => {
            // What is queued, then where to go: spread reconnects over a second so a
            // draining node does not stampede its peers.
            let after_ms = rand::random_range(0..1000);
            let reconnect = handle.codec.encode(&ServerMessage::Reconnect {
                reason: "draining",
                after_ms,
            });
            let pending = handle.outbound.take(outbound::Batch::default());
            let flush = async {
                write_batch(socket, pending).await?;
                socket.send(reconnect).await
            };
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, flush).await;
            (close::SERVICE_RESTART, "node draining")
        }
        EndReason::TooBig => {
            node.metrics.client_error(ErrorCode::TooLarge.as_str());
            (close::TOO_BIG, "frame too large")
        }
        EndReason::SlowConsumer => (close::SLOW_CONSUMER, "slow consumer"),
        EndReason::HeartbeatTimeout => (close::HEARTBEAT_TIMEOUT, "heartbeat timeout"),
        EndReason::TakenOver => (close::TAKEN_OVER, "session resumed by another connection"),
        EndReason::TokenExpired => (close::TOKEN_EXPIRED, "token expired"),
        EndReason::Revoked => (close::REVOKED, "session revoked"),
        EndReason::ClientClosed | EndReason::ConnectionLost | EndReason::GraceExpired => {
            return None;
        }
    })
}

/// Sends a close frame and waits (bounded) for the client's: dropping the socket at once
/// would make a client that is still sending (an automatic pong) get a reset instead of the
/// close frame, and it would never learn the close code.
async fn close_with(socket: &mut Socket, code: u16, reason: &'static str) {
    let handshake = async {
        let frame = CloseFrame {
            code: code.into(),
            reason: reason.into(),
        };
        if socket.send(Message::Close(Some(frame))).await.is_err() {
            return;
        }
        while let Some(Ok(m)) = socket.next().await {
            if matches!(m, Message::Close(_)) {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, handshake).await;
}

/// A frame or message over the size limit.
fn is_capacity_error(e: &tungstenite::Error) -> bool {
    matches!(e, tungstenite::Error::Capacity(_))
}
