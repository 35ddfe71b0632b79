//! One y-websocket connection (`GET /v1/yjs/{room}`) from its upgrade to its close: attach to
//! the document, then read client frames and write queued ones until either side ends.
//!
//! What a client sees:
//! - on connect: the server's SyncStep1 and the current awareness states; its own SyncStep1 is
//!   answered with SyncStep2 (after which y-websocket counts as synced);
//! - the updates of everyone (its own included, after they are in the log) and every awareness
//!   change (its own included, which keeps its 30 s silence timer quiet), and after 10 s with
//!   nothing else an awareness message with no clients (a no-op keep-alive);
//! - a read-only user's (viewer, commenter) updates are dropped without a reply: the connection
//!   stays open and keeps receiving the others' edits; its local edits never leave it;
//! - the close codes in [`crate::error::close`]: 1007 malformed message or update, 1009 frame
//!   over the update limit, 1012 node draining, 1013 node full or log unavailable, 4001 bad
//!   token, 4003 no role in the room, 4008 slow consumer, 4014 document full, 4015 document
//!   too large, 4016 lock lost. y-websocket reconnects after any of them.
//!
//! Write access: the role decides (editor, owner), and with `?lock=<resource>` also the lock
//! ([`super::lockgate`]): writable only while the user holds it; when it is lost the socket is
//! closed with 4016, and no update read after the loss is known is applied.
//!
//! Budget: every message takes a token from the connection's and its user's bucket
//! ([`super::budget`]). When none is there, the loop stops reading the socket until one is
//! (the message waits, counted as throttled) but keeps writing: the flooder's TCP window
//! fills, and the others on the document are not slowed down.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tungstenite::Message as WsMessage;
use tungstenite::protocol::frame::CloseFrame;

use super::lockgate::Gate;
use crate::engine::{LockKey, UserId};
use crate::error::close;
use crate::names::Entity;
use crate::node::Node;
use crate::node::yjs_tokens::TokenWatch;
use crate::session::Socket;

const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// y-websocket closes a connection that received no message for 30 s (WebSocket pings do not
/// count). Its own awareness renewals (every 15 s) come back to it, but a client without a
/// local awareness state sends none: after this long without a frame to it, the server sends
/// an awareness message with no clients, which the client applies as a no-op.
const KEEPALIVE: Duration = Duration::from_secs(10);

/// `[messageAwareness, varUint8Array([0 clients])]`.
const EMPTY_AWARENESS: &[u8] = &[1, 1, 0];

/// What the endpoint decided about a connection before the upgrade.
pub struct Access {
    /// The document (its room).
    pub room: Entity,
    /// The token's `sub`: whose lock opens the gate and whose budget the messages take.
    pub user: UserId,
    /// The role in the room allows writing (editor, owner).
    pub role_writes: bool,
    /// `?lock=<resource>`: writable only while `user` holds this lock in `room`.
    pub lock: Option<Entity>,
    /// The connection's token: it ends at the token's `exp` (4012) or its revocation (4013).
    pub token: TokenWatch,
}

/// How one client message leaves the loop.
type End = Option<(u16, String)>;

/// Serves `access.room`'s document on `socket` until either side ends or the node drains.
pub async fn serve(node: Arc<Node>, mut socket: Socket, access: Access) {
    let Access {
        room,
        user,
        role_writes,
        lock,
        token,
    } = access;
    let gated = lock.is_some();
    let gate = match lock {
        Some(resource) if role_writes => {
            let key = LockKey::new(room.clone(), resource);
            match node.yjs_locks.open(&node, key, user.clone()).await {
                Ok(g) => g,
                Err(e) => {
                    // Without the holder the connection cannot know whether it may write:
                    // refused like an unavailable log (the provider retries with backoff).
                    tracing::debug!(%room, error = %e, "yjs: lock state unavailable");
                    let reason = "lock state unavailable, retry later";
                    close_with(&mut socket, close::TRY_AGAIN_LATER, reason).await;
                    return;
                }
            }
        }
        _ => None,
    };
    // A lock asked for and not held: read-only for the connection's life (the app acquires
    // the lock and reconnects the provider to write again).
    let writes = role_writes && (!gated || gate.is_some());
    let end = run(
        &node,
        &mut socket,
        &room,
        &user,
        writes,
        gate.as_ref(),
        &token,
    )
    .await;
    if let Some(g) = gate {
        g.close(&node).await;
    }
    if let Some((code, reason)) = end {
        close_with(&mut socket, code, &reason).await;
    }
}

/// The connection's loop: attach, then read and write until an end.
async fn run(
    node: &Node,
    socket: &mut Socket,
    room: &Entity,
    user: &UserId,
    writes: bool,
    gate: Option<&Gate>,
    token: &TokenWatch,
) -> End {
    let registry = &node.yjs;
    let attached = match registry.attach(room.as_str()).await {
        Ok(a) => a,
        Err(e) => return Some((e.close_code(), e.to_string())),
    };
    let (doc, conn, mut rx) = (attached.doc, attached.conn, attached.rx);
    let mut budget = node.yjs_budgets.budget(user);
    // A message read while the budget was spent, handled once a token is there; the socket
    // is not read meanwhile.
    let mut held: Option<WsMessage> = None;
    let wake = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(wake);
    let mut keepalive = tokio::time::interval(KEEPALIVE);
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    keepalive.reset();
    let mut sent_since_tick = false;
    let lost = async {
        match gate {
            Some(g) => g.lost().await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(lost);
    let token_end = token.ended();
    tokio::pin!(token_end);
    let end: End = loop {
        let incoming = tokio::select! {
            _ = &mut lost => break Some((close::LOCK_LOST, "lock lost".into())),
            (code, reason) = &mut token_end => break Some((code, reason.into())),
            _ = keepalive.tick() => {
                if !std::mem::take(&mut sent_since_tick)
                    && socket
                        .send(WsMessage::Binary(bytes::Bytes::from_static(EMPTY_AWARENESS)))
                        .await
                        .is_err()
                {
                    break None;
                }
                continue;
            }
            _ = &mut wake, if held.is_some() => {
                let now = Instant::now();
                match budget.take(now) {
                    Ok(()) => held.take(),
                    Err(wait) => {
                        wake.as_mut().reset((now + wait).into());
                        continue;
                    }
                }
            }
            incoming = socket.next(), if held.is_none() => match incoming {
                Some(Ok(WsMessage::Close(_))) | None => break None,
                Some(Ok(msg)) => {
                    let now = Instant::now();
                    if let Err(wait) = budget.take(now) {
                        registry.counters.throttled.fetch_add(1, Ordering::Relaxed);
                        held = Some(msg);
                        wake.as_mut().reset((now + wait).into());
                        continue;
                    }
                    Some(msg)
                }
                Some(Err(tungstenite::Error::Capacity(e))) => {
                    break Some((close::TOO_BIG, e.to_string()));
                }
                Some(Err(_)) => break None,
            },
            out = rx.recv() => match out {
                Some(frame) => {
                    sent_since_tick = true;
                    if socket.send(WsMessage::Binary(frame)).await.is_err() {
                        break None;
                    }
                    continue;
                }
                None => break Some((close::SLOW_CONSUMER, "slow consumer".into())),
            },
            _ = node.draining.cancelled() => {
                break Some((close::SERVICE_RESTART, "node draining".into()));
            }
        };
        if let Some(WsMessage::Binary(data)) = incoming {
            // Checked at the message, not only by the select above: an update read after the
            // loss is known is never applied.
            let writable = writes && gate.is_none_or(Gate::is_open);
            if let Err(e) = doc.handle(registry, conn, writable, &data) {
                tracing::debug!(%room, error = %e, "yjs: closing a connection");
                break Some((e.close_code(), e.to_string()));
            }
        }
    };
    registry.detach(&doc, conn);
    end
}

/// Sends a close frame and waits (bounded) for the client's, so it reads the code.
pub async fn close_with(socket: &mut Socket, code: u16, reason: &str) {
    let mut reason = reason.to_owned();
    while reason.len() > 120 {
        reason.pop();
    }
    let frame = CloseFrame {
        code: code.into(),
        reason: reason.into(),
    };
    let handshake = async {
        if socket.send(WsMessage::Close(Some(frame))).await.is_ok() {
            while let Some(Ok(m)) = socket.next().await {
                if matches!(m, WsMessage::Close(_)) {
                    break;
                }
            }
        }
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, handshake).await;
}

#[cfg(test)]
mod tests {
    use yrs::sync::Message;
    use yrs::updates::decoder::Decode;

    #[test]
    fn the_keepalive_is_an_awareness_update_with_no_clients() {
        match Message::decode_v1(super::EMPTY_AWARENESS).unwrap() {
            Message::Awareness(u) => assert!(u.clients.is_empty()),
            other => panic!("{other:?}"),
        }
    }
}
