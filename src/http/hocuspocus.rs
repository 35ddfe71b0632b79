//! `GET /v1/hocuspocus`: the Hocuspocus provider endpoint. The upgrade itself is not
//! authenticated: a Hocuspocus socket carries many documents and the provider sends a token
//! per document in its auth message, so each document is decided by [`JwtAuthorizer`] (the
//! JWT and room roles of `/v1/ws`: editors and owners `read-write`, viewers and commenters
//! `readonly`, no role or a bad token: permission denied) and served by
//! [`crate::yjs::hocuspocus`].
//!
//! `?token=` on the URL is not read: the provider (4.x) has no option that puts one there
//! and always sends the auth message (an empty token when it has none).

use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use futures_util::FutureExt;
use futures_util::future::BoxFuture;

use super::ApiError;
use super::ws::WsUpgrade;
use crate::auth::Role;
use crate::error::ErrorCode;
use crate::names::Entity;
use crate::node::Node;
use crate::yjs::hocuspocus::{Access, Authorizer, Grant};

/// Room for the address in front of an update: an entity name (at most 161 bytes), a
/// provider's session id, and the varints.
const ADDRESS_ROOM: usize = 512;

pub async fn upgrade(
    State(node): State<Arc<Node>>,
    ip: super::ClientIp,
    ws: WsUpgrade,
) -> Response {
    if !node.is_ready() {
        return ApiError::new(ErrorCode::Unavailable, "node is draining").into_response();
    }
    // A message is one update plus its address.
    let config = super::yjs::socket_config(&node, ADDRESS_ROOM);
    let tasks = node.tasks.clone();
    let registry = node.yjs.clone();
    let draining = node.draining.clone();
    let budget = crate::session::ratelimit::TokenBucket::new(
        node.config.messages_per_second,
        node.config.message_burst,
    );
    let authorizer = Arc::new(JwtAuthorizer { node, ip });
    ws.on_upgrade(config, move |socket, _| {
        tasks.track_future(crate::yjs::hocuspocus::serve(
            registry, socket, authorizer, budget, draining,
        ))
    })
}

/// What an open document keeps: its user's presence listing, and the watch that ends the
/// socket when the document's token expires or is revoked (like a `/v1/yjs` connection, but
/// noticed on the socket's 5 s tick).
struct DocumentKept {
    _member: crate::node::yjs_presence::BridgedMember,
    token: crate::node::yjs_tokens::TokenWatch,
}

impl crate::yjs::hocuspocus::Kept for DocumentKept {
    fn ended(&self) -> Option<(u16, &'static str)> {
        self.token.has_ended()
    }
}

/// Decides a document from its auth message's token, as `/v1/yjs` decides its room.
struct JwtAuthorizer {
    node: Arc<Node>,
    ip: super::ClientIp,
}

impl Authorizer for JwtAuthorizer {
    fn authorize(
        &self,
        document: &str,
        token: String,
    ) -> BoxFuture<'static, Result<Grant, String>> {
        let entity = Entity::parse(document);
        let (node, ip) = (self.node.clone(), self.ip);
        async move {
            let entity = entity.map_err(|e| format!("bad document name: {e}"))?;
            // An empty token is the provider's "no token": refused as missing, not malformed.
            let token = Some(token).filter(|t| !t.is_empty());
            let principal = super::ws::authenticate(&node, token, &HeaderMap::new(), ip)
                .await
                .map_err(|refusal| refusal.reason)?;
            let role = principal
                .role_in(&entity)
                .ok_or_else(|| "no role in this room".to_owned())?;
            let access = if role >= Role::Editor {
                Access::ReadWrite
            } else {
                Access::ReadOnly
            };
            // Listed as a member of the document's room while the document is open on this
            // socket, as a `/v1/yjs` connection is (listing starts after a short delay, so a
            // document refused right after this never flashes a join and a leave).
            let kept = DocumentKept {
                _member: crate::node::yjs_presence::enter(&node, &principal, &entity, role),
                token: node.yjs_tokens.watch(&principal),
            };
            Ok(Grant {
                access,
                keep: Some(Box::new(kept)),
            })
        }
        .boxed()
    }
}
