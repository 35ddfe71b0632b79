//! `GET /v1/ws`: authenticate, pick the subprotocol, size the buffers, hand the socket to a
//! session task tracked by the node (so the drain can wait for it).

use std::sync::Arc;

use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, WebSocketUpgrade};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::ApiError;
use crate::auth::AuthError;
use crate::error::{ErrorCode, close};
use crate::node::Node;
use crate::protocol::Codec;
use crate::protocol::codec::{JSON_PROTOCOL, MSGPACK_PROTOCOL};

/// Socket buffers: small on purpose. An idle connection costs its buffers, so they are sized
/// for typical frames (a few hundred bytes) rather than axum's 128 KiB defaults; larger
/// frames still work, the buffers grow for them.
const READ_BUFFER: usize = 4 * 1024;
const WRITE_BUFFER: usize = 4 * 1024;

#[derive(Deserialize)]
pub struct WsParams {
    token: Option<String>,
    resume: Option<String>,
}

pub async fn upgrade(
    State(node): State<Arc<Node>>,
    super::ApiQuery(params): super::ApiQuery<WsParams>,
    ip: super::ClientIp,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    if !node.is_ready() {
        return ApiError::new(ErrorCode::Unavailable, "node is draining").into_response();
    }
    let header_token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::auth::parse_bearer)
        .map(str::to_owned);
    let token = params.token.or(header_token);
    let verified = match token.as_deref() {
        Some(t) => node.auth.verify(t),
        None => Err(AuthError::Missing),
    };
    // A revoked token id is refused (connect and resume alike) until its `exp`.
    let revoked = match verified.as_ref().ok().and_then(|p| p.grants().jti.clone()) {
        Some(jti) => node.is_revoked(&jti).await,
        None => false,
    };
    let max = node.config.max_frame_bytes;
    let ws = ws
        .protocols([JSON_PROTOCOL, MSGPACK_PROTOCOL])
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(WRITE_BUFFER + 2 * max)
        .max_message_size(max)
        .max_frame_size(max);
    let tasks = node.tasks.clone();
    if let Ok(p) = &verified {
        tracing::Span::current().record("user_id", &*p.user_id);
    }
    match verified {
        Ok(_) if revoked => {
            // Aggregated like every auth failure: a revoked token in a loop must not flood the audit.
            super::limits::record_auth_failure(&node, ip, "token revoked").await;
            ws.on_upgrade(move |socket| refuse(socket, close::REVOKED, "token revoked".into()))
        }
        Ok(principal) => ws.on_upgrade(move |socket| {
            let codec = Codec::from_subprotocol(socket.protocol().and_then(|p| p.to_str().ok()));
            tasks.track_future(crate::session::run(
                node,
                socket,
                principal,
                codec,
                params.resume,
            ))
        }),
        Err(e) => {
            super::limits::record_auth_failure(&node, ip, &e.to_string()).await;
            // Upgrade, then close with 4001: browsers cannot read an HTTP 401 on a WebSocket.
            let mut reason = e.to_string();
            // A close reason may carry at most 123 bytes.
            while reason.len() > 120 {
                reason.pop();
            }
            ws.on_upgrade(move |socket| refuse(socket, close::UNAUTHORIZED, reason))
        }
    }
}

/// Closes an upgraded socket with `code` and waits (bounded) for the client's close, so it
/// reads the code, not a reset.
async fn refuse(mut socket: axum::extract::ws::WebSocket, code: u16, reason: String) {
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    let handshake = async {
        if socket.send(Message::Close(Some(frame))).await.is_ok() {
            while let Some(Ok(m)) = socket.recv().await {
                if matches!(m, Message::Close(_)) {
                    break;
                }
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), handshake).await;
}
