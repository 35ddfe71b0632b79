//! `GET /v1/ws`: authenticate, pick the subprotocol, size the buffers, hand the socket to a
//! session task tracked by the node (so the drain can wait for it).
//!
//! The upgrade is done here on hyper's `OnUpgrade` rather than by axum's `WebSocketUpgrade`,
//! so the session owns the tokio-tungstenite stream itself and can write a large frame (a
//! room snapshot) straight to the connection: tungstenite's write buffer keeps the capacity
//! of the largest frame it ever held, which made every member of a large room pay for a
//! snapshot-sized buffer for as long as it stayed connected.

use std::sync::Arc;

use axum::extract::{FromRequestParts, State};
use axum::http::header::{self, HeaderName, HeaderValue};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tungstenite::Message;
use tungstenite::protocol::frame::CloseFrame;
use tungstenite::protocol::{Role, WebSocketConfig};

use super::ApiError;
use crate::auth::AuthError;
use crate::error::{ErrorCode, close};
use crate::node::Node;
use crate::protocol::Codec;
use crate::protocol::codec::{JSON_PROTOCOL, MSGPACK_PROTOCOL};
use crate::session::Socket;

/// Socket buffers: small on purpose. An idle connection costs its buffers, so they are sized
/// for typical client frames (joins and cursors of a hundred bytes) rather than the 128 KiB
/// defaults; larger frames still work, the buffers grow for them. The write buffer only says
/// when tungstenite writes while frames are fed; frames over [`crate::session::DIRECT_WRITE`]
/// bypass it.
const READ_BUFFER: usize = 512;
const WRITE_BUFFER: usize = 4 * 1024;

/// A WebSocket upgrade request (RFC 6455 over HTTP/1.1): its key, the subprotocols it offers
/// and hyper's handle on the connection once the 101 is sent.
pub struct WsUpgrade {
    key: HeaderValue,
    offered: Option<HeaderValue>,
    on_upgrade: hyper::upgrade::OnUpgrade,
}

impl<S: Send + Sync> FromRequestParts<S> for WsUpgrade {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let refuse = |status: StatusCode, what: &str| {
            ApiError::new(
                ErrorCode::BadRequest,
                format!("not a WebSocket upgrade: {what}"),
            )
            .status(status)
            .into_response()
        };
        if parts.method != Method::GET {
            return Err(refuse(StatusCode::METHOD_NOT_ALLOWED, "GET only"));
        }
        let h = &parts.headers;
        if !header_has_token(h, header::CONNECTION, "upgrade")
            || !header_has_token(h, header::UPGRADE, "websocket")
        {
            return Err(refuse(
                StatusCode::UPGRADE_REQUIRED,
                "no Upgrade: websocket",
            ));
        }
        if h.get(header::SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) != Some(b"13") {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "Sec-WebSocket-Version is not 13",
            ));
        }
        let Some(key) = h.get(header::SEC_WEBSOCKET_KEY).cloned() else {
            return Err(refuse(StatusCode::BAD_REQUEST, "no Sec-WebSocket-Key"));
        };
        let offered = h.get(header::SEC_WEBSOCKET_PROTOCOL).cloned();
        let Some(on_upgrade) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>() else {
            return Err(refuse(
                StatusCode::UPGRADE_REQUIRED,
                "connection cannot be upgraded",
            ));
        };
        Ok(WsUpgrade {
            key,
            offered,
            on_upgrade,
        })
    }
}

/// Whether a comma-separated header holds `token` (case-insensitive).
fn header_has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

impl WsUpgrade {
    /// Our first subprotocol the client offered (JSON before MessagePack), if any.
    fn protocol(&self) -> Option<&'static str> {
        let offered = self.offered.as_ref()?.to_str().ok()?;
        [JSON_PROTOCOL, MSGPACK_PROTOCOL]
            .into_iter()
            .find(|ours| offered.split(',').any(|p| p.trim() == *ours))
    }

    /// Answers 101 and runs `session` on the socket once hyper hands the connection over.
    pub(super) fn on_upgrade<F, Fut>(self, config: WebSocketConfig, session: F) -> Response
    where
        F: FnOnce(Socket, Option<&'static str>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let protocol = self.protocol();
        let accept = tungstenite::handshake::derive_accept_key(self.key.as_bytes());
        let on_upgrade = self.on_upgrade;
        tokio::spawn(async move {
            let Ok(upgraded) = on_upgrade.await else {
                return;
            };
            let io = hyper_util::rt::TokioIo::new(upgraded);
            let socket =
                tokio_tungstenite::WebSocketStream::from_raw_socket(io, Role::Server, Some(config))
                    .await;
            session(socket, protocol).await;
        });
        let mut response = Response::new(axum::body::Body::empty());
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = response.headers_mut();
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        if let Ok(v) = HeaderValue::from_str(&accept) {
            h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
        }
        if let Some(p) = protocol {
            h.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(p));
        }
        response
    }
}

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
    ws: WsUpgrade,
) -> Response {
    if !node.is_ready() {
        return ApiError::new(ErrorCode::Unavailable, "node is draining").into_response();
    }
    let verified = authenticate(&node, params.token, &headers, ip).await;
    let max = node.config.max_frame_bytes;
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(WRITE_BUFFER + 2 * max)
        .max_message_size(Some(max))
        .max_frame_size(Some(max));
    let tasks = node.tasks.clone();
    if let Ok(p) = &verified {
        tracing::Span::current().record("user_id", &*p.user_id);
    }
    match verified {
        Ok(principal) => ws.on_upgrade(config, move |socket, protocol| {
            let codec = Codec::from_subprotocol(protocol);
            tasks.track_future(crate::session::run(
                node,
                socket,
                principal,
                codec,
                params.resume,
            ))
        }),
        // Upgrade, then close: browsers cannot read an HTTP 401 on a WebSocket.
        Err(refusal) => ws.on_upgrade(config, move |socket, _| {
            refuse(socket, refusal.code, refusal.reason)
        }),
    }
}

/// Why a WebSocket's token was refused: the close code (4001 bad or missing, 4013 revoked)
/// and a reason that fits a close frame.
pub(super) struct AuthRefusal {
    pub code: u16,
    pub reason: String,
}

/// Authenticates a WebSocket upgrade (`/v1/ws`, `/v1/yjs`): the token from `?token=` or
/// `Authorization: Bearer`, verified, and refused while its id is revoked. Every failure is
/// counted (aggregated) in the audit. The Hocuspocus endpoint calls it per auth message with
/// the message's token and no headers.
pub(super) async fn authenticate(
    node: &Node,
    query_token: Option<String>,
    headers: &HeaderMap,
    ip: super::ClientIp,
) -> Result<crate::auth::Principal, AuthRefusal> {
    let header_token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::auth::parse_bearer)
        .map(str::to_owned);
    let verified = match query_token.or(header_token).as_deref() {
        Some(t) => node.auth.verify(t),
        None => Err(AuthError::Missing),
    };
    match verified {
        Ok(p) => {
            // A revoked token id is refused (connect and resume alike) until its `exp`.
            let revoked = match p.grants().jti.as_deref() {
                Some(jti) => node.is_revoked(jti).await,
                None => false,
            };
            if !revoked {
                return Ok(p);
            }
            // Aggregated like every auth failure: a revoked token in a loop must not flood
            // the audit.
            super::limits::record_auth_failure(node, ip, "token revoked").await;
            Err(AuthRefusal {
                code: close::REVOKED,
                reason: "token revoked".into(),
            })
        }
        Err(e) => {
            super::limits::record_auth_failure(node, ip, &e.to_string()).await;
            let mut reason = e.to_string();
            // A close reason may carry at most 123 bytes.
            while reason.len() > 120 {
                reason.pop();
            }
            Err(AuthRefusal {
                code: close::UNAUTHORIZED,
                reason,
            })
        }
    }
}

/// Closes an upgraded socket with `code` and waits (bounded) for the client's close, so it
/// reads the code, not a reset.
pub(super) async fn refuse(mut socket: Socket, code: u16, reason: String) {
    let frame = CloseFrame {
        code: code.into(),
        reason: reason.into(),
    };
    let handshake = async {
        if socket.send(Message::Close(Some(frame))).await.is_ok() {
            while let Some(Ok(m)) = socket.next().await {
                if matches!(m, Message::Close(_)) {
                    break;
                }
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), handshake).await;
}
