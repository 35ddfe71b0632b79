//! `GET /v1/yjs/{room}`: the y-websocket endpoint. Authenticates like `/v1/ws` (a JWT in
//! `?token=` or `Authorization: Bearer`), finds the user's role in the room (the last path
//! segment, an entity such as `scene:42`), and hands the socket to [`crate::yjs::conn`].
//! Editors and owners write; viewers and commenters read; no role: close 4003. Bad token:
//! close 4001 (after the upgrade: browsers cannot read an HTTP status on a WebSocket).
//! `?lock=<resource>` (an entity; a bad name is refused with 400 before the upgrade) ties an
//! editor's write access to the lock on `<resource>` in the room ([`crate::yjs::lockgate`]).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tungstenite::protocol::WebSocketConfig;

use super::ApiError;
use super::ws::{WsUpgrade, refuse};
use crate::auth::Role;
use crate::error::{ErrorCode, close};
use crate::names::Entity;
use crate::node::Node;
use crate::yjs::conn::Access;

const READ_BUFFER: usize = 1024;
const WRITE_BUFFER: usize = 4 * 1024;

#[derive(Deserialize)]
pub struct YjsParams {
    token: Option<String>,
    /// A resource in the room: the connection writes only while its user holds its lock.
    lock: Option<String>,
}

/// The socket of a Yjs endpoint: small buffers (an idle connection costs them), and a message
/// limit of one update plus `envelope` bytes (tungstenite closes larger ones with 1009).
pub(super) fn socket_config(node: &Node, envelope: usize) -> WebSocketConfig {
    let max = node.yjs.limits.max_update_bytes + envelope;
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(WRITE_BUFFER + 2 * max.max(node.config.max_frame_bytes))
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
}

pub async fn upgrade(
    State(node): State<Arc<Node>>,
    Path(room): Path<String>,
    super::ApiQuery(params): super::ApiQuery<YjsParams>,
    ip: super::ClientIp,
    headers: HeaderMap,
    ws: WsUpgrade,
) -> Response {
    if !node.is_ready() {
        return ApiError::new(ErrorCode::Unavailable, "node is draining").into_response();
    }
    let entity = match Entity::parse(&room) {
        Ok(e) => e,
        Err(e) => {
            return ApiError::new(ErrorCode::BadRequest, format!("bad room name: {e}"))
                .into_response();
        }
    };
    let lock = match params.lock.as_deref().map(Entity::parse).transpose() {
        Ok(l) => l,
        Err(e) => {
            return ApiError::new(ErrorCode::BadRequest, format!("bad lock name: {e}"))
                .into_response();
        }
    };
    let verified = super::ws::authenticate(&node, params.token, &headers, ip).await;
    let config = socket_config(&node, 64);
    let principal = match verified {
        Ok(p) => p,
        Err(refusal) => {
            return ws.on_upgrade(config, move |socket, _| {
                refuse(socket, refusal.code, refusal.reason)
            });
        }
    };
    let Some(role) = principal.role_in(&entity) else {
        return ws.on_upgrade(config, move |socket, _| {
            refuse(socket, close::FORBIDDEN, "no role in this room".into())
        });
    };
    let access = Access {
        room: entity,
        user: principal.user_id.clone(),
        role_writes: role >= Role::Editor,
        lock,
        token: node.yjs_tokens.watch(&principal),
    };
    let tasks = node.tasks.clone();
    ws.on_upgrade(config, move |socket, _| {
        // Listed as a member of the room while the connection lasts (never waited for);
        // the guard's leave runs on every end, a panic unwinding this task included.
        let member = crate::node::yjs_presence::enter(&node, &principal, &access.room, role);
        tasks.track_future(async move {
            crate::yjs::conn::serve(node, socket, access).await;
            member.leave().await;
        })
    })
}
