//! One WebSocket connection: read loop, command dispatch, outbound queue, heartbeat, close.
//!
//! A single task per connection drives everything with `select!`: frames in, the outbound
//! queue out, heartbeat pings, the node's drain signal and the kill switch of an overflowing
//! queue. Commands run one at a time, so a client's requests are answered in order.

pub mod commands;
pub mod handle;
pub mod outbound;
pub mod ratelimit;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::{SinkExt, StreamExt};
use tracing::Instrument;
use tracing::field::Empty;

use crate::auth::Principal;
use crate::error::{ErrorCode, close};
use crate::node::Node;
use crate::node::sessions::EndReason;
use crate::protocol::server::ErrorFrame;
use crate::protocol::{ClientMessage, Codec, Request, ServerMessage};
use handle::SessionHandle;
use ratelimit::TokenBucket;

type Sink = futures_util::stream::SplitSink<WebSocket, Message>;
type Stream = futures_util::stream::SplitStream<WebSocket>;

/// How long the final frames (close, reconnect) may take to reach a client.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs a connection from its upgrade to its end, inside its `session` span.
pub async fn run(
    node: Arc<Node>,
    socket: WebSocket,
    principal: Principal,
    codec: Codec,
    resume: Option<String>,
) {
    // One span (one trace) per connection: opened or resumed, closed with a reason. Requests
    // are its children, so log lines inside them carry session, user and node.
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
    run_session(node, socket, principal, codec, resume)
        .instrument(span)
        .await
}

async fn run_session(
    node: Arc<Node>,
    socket: WebSocket,
    principal: Principal,
    codec: Codec,
    resume: Option<String>,
) {
    let (mut sink, mut stream) = socket.split();
    let span = tracing::Span::current();
    // The rarely-run, large futures (lock paths carry Postgres and timeout futures) are boxed,
    // so the state every idle session keeps alive stays small (7 KB → 1.6 KB per task).
    let handle = match Box::pin(node.open_session(principal, codec, resume.as_deref())).await {
        Ok((handle, resumed)) => {
            span.record("session_id", &*handle.id);
            span.record("kind", if resumed { "resumed" } else { "new" });
            handle
        }
        Err(e) => {
            span.record("reason", "too_many_sessions");
            let message = e.to_string();
            let frame = ErrorFrame::new(None, ErrorCode::TooManySessions, &message);
            let _ = sink.send(codec.encode(&ServerMessage::Error(frame))).await;
            close_with(
                &mut sink,
                &mut stream,
                close::TOO_MANY_SESSIONS,
                "too many sessions",
            )
            .await;
            return;
        }
    };
    let reason = drive(&node, &handle, &mut sink, &mut stream).await;
    span.record("reason", reason.as_str());
    let close = Box::pin(last_words(&node, &handle, &mut sink, reason)).await;
    // End (or park) the session before the closing handshake, which may take a while: its
    // locks and presence must not wait on a client that is slow to say goodbye.
    Box::pin(node.end_session(&handle, reason)).await;
    if let Some((code, text)) = close {
        close_with(&mut sink, &mut stream, code, text).await;
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

async fn drive(
    node: &Node,
    handle: &Arc<SessionHandle>,
    sink: &mut Sink,
    stream: &mut Stream,
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
    let mut spare = VecDeque::new();
    let mut expiry = Expiry::new(handle);
    let auth_timer = tokio::time::sleep_until(expiry.next);
    tokio::pin!(auth_timer);
    loop {
        tokio::select! {
            biased;
            _ = handle.kill.cancelled() => return EndReason::SlowConsumer,
            _ = handle.revoked.cancelled() => return EndReason::Revoked,
            _ = &mut auth_timer, if expiry.armed => {
                if expiry.fire(handle) {
                    return EndReason::TokenExpired;
                }
                auth_timer.as_mut().reset(expiry.next);
            }
            _ = handle.takeover.cancelled() => return EndReason::TakenOver,
            _ = node.draining.cancelled() => return EndReason::Draining,
            _ = handle.outbound.ready() => {
                let batch = handle.outbound.take(std::mem::take(&mut spare));
                // A write into a silent TCP path can block until the window shuts and the
                // timeout fires; a takeover must not wait for that (the resume waits on it).
                let written = tokio::select! {
                    r = tokio::time::timeout(write_timeout, write_batch(sink, batch)) => r,
                    _ = handle.kill.cancelled() => return EndReason::SlowConsumer,
                    _ = handle.takeover.cancelled() => return EndReason::TakenOver,
                };
                match written {
                    Err(_) => return EndReason::SlowConsumer,
                    Ok(Ok(buf)) => spare = buf,
                    Ok(Err(_)) => return EndReason::ConnectionLost,
                }
            }
            frame = stream.next() => {
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
                        if tokio::time::timeout(write_timeout, sink.flush()).await.is_err() {
                            return EndReason::SlowConsumer;
                        }
                        continue;
                    }
                    Message::Pong(_) => continue,
                    Message::Close(c) => {
                        // 1000 or no status (a browser's bare `close()`) is a deliberate end;
                        // anything else (1001 on tab close or reload, errors) may come back.
                        let normal = c.as_ref().is_none_or(|c| c.code == close::NORMAL);
                        return if normal { EndReason::ClientClosed } else { EndReason::ConnectionLost };
                    }
                };
                let ty = handle_frame(node, handle, bytes, &mut limits).await;
                node.metrics.message_in(ty, bytes.len());
                if ty == "auth.refresh" {
                    expiry = Expiry::new(handle);
                    auth_timer.as_mut().reset(expiry.next);
                }
            }
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
                    r = tokio::time::timeout(write_timeout, sink.send(Message::Ping(Default::default()))) => r,
                    _ = handle.takeover.cancelled() => return EndReason::TakenOver,
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

/// Writes a batch and flushes; returns the emptied message buffer for reuse.
async fn write_batch(
    sink: &mut Sink,
    batch: outbound::Batch,
) -> Result<VecDeque<Message>, axum::Error> {
    let outbound::Batch {
        mut messages,
        cursors,
        ..
    } = batch;
    for m in messages.drain(..) {
        sink.feed(m).await?;
    }
    for m in cursors {
        sink.feed(m).await?;
    }
    sink.flush().await?;
    Ok(messages)
}

/// Last words to the client (bounded in time) and the close code to send, if any.
async fn last_words(
    node: &Node,
    handle: &SessionHandle,
    sink: &mut Sink,
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
            let pending = handle.outbound.take(VecDeque::new());
            let flush = async {
                write_batch(sink, pending).await?;
                sink.send(reconnect).await
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
async fn close_with(sink: &mut Sink, stream: &mut Stream, code: u16, reason: &'static str) {
    let handshake = async {
        let frame = CloseFrame {
            code,
            reason: reason.into(),
        };
        if sink.send(Message::Close(Some(frame))).await.is_err() {
            return;
        }
        while let Some(Ok(m)) = stream.next().await {
            if matches!(m, Message::Close(_)) {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, handshake).await;
}

/// A frame or message over the size limit (tungstenite's `Capacity` error, wrapped by axum).
fn is_capacity_error(e: &axum::Error) -> bool {
    use std::error::Error;
    e.source()
        .and_then(|s| s.downcast_ref::<tungstenite::Error>())
        .is_some_and(|t| matches!(t, tungstenite::Error::Capacity(_)))
}
