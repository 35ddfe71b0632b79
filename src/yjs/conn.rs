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
//!   too large. y-websocket reconnects after any of them.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_util::sync::CancellationToken;
use tungstenite::Message as WsMessage;
use tungstenite::protocol::frame::CloseFrame;

use super::docs::Registry;
use crate::error::close;
use crate::session::Socket;

const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// y-websocket closes a connection that received no message for 30 s (WebSocket pings do not
/// count). Its own awareness renewals (every 15 s) come back to it, but a client without a
/// local awareness state sends none: after this long without a frame to it, the server sends
/// an awareness message with no clients, which the client applies as a no-op.
const KEEPALIVE: Duration = Duration::from_secs(10);

/// `[messageAwareness, varUint8Array([0 clients])]`.
const EMPTY_AWARENESS: &[u8] = &[1, 1, 0];

/// Serves `room`'s document on `socket` until either side ends or `draining` fires.
pub async fn serve(
    registry: Arc<Registry>,
    mut socket: Socket,
    room: String,
    writable: bool,
    draining: CancellationToken,
) {
    let attached = match registry.attach(&room).await {
        Ok(a) => a,
        Err(e) => {
            close_with(&mut socket, e.close_code(), &e.to_string()).await;
            return;
        }
    };
    let (doc, conn, mut rx) = (attached.doc, attached.conn, attached.rx);
    let mut keepalive = tokio::time::interval(KEEPALIVE);
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    keepalive.reset();
    let mut sent_since_tick = false;
    let end: Option<(u16, String)> = loop {
        tokio::select! {
            _ = keepalive.tick() => {
                if !std::mem::take(&mut sent_since_tick)
                    && socket
                        .send(WsMessage::Binary(bytes::Bytes::from_static(EMPTY_AWARENESS)))
                        .await
                        .is_err()
                {
                    break None;
                }
            }
            incoming = socket.next() => match incoming {
                Some(Ok(WsMessage::Binary(data))) => {
                    if let Err(e) = doc.handle(&registry, conn, writable, &data) {
                        tracing::debug!(%room, error = %e, "yjs: closing a connection");
                        break Some((e.close_code(), e.to_string()));
                    }
                }
                Some(Ok(WsMessage::Close(_))) | None => break None,
                Some(Ok(_)) => {}
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
                }
                None => break Some((close::SLOW_CONSUMER, "slow consumer".into())),
            },
            _ = draining.cancelled() => break Some((close::SERVICE_RESTART, "node draining".into())),
        }
    };
    registry.detach(&doc, conn);
    if let Some((code, reason)) = end {
        close_with(&mut socket, code, &reason).await;
    }
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
