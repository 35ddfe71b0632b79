//! The operator console (`GET /admin`) and the read endpoints it needs beyond the rest of the
//! API: `GET /v1/admin/rooms` (live rooms, paged) and `GET /v1/admin/nodes` (live nodes).
//! The console itself is one static page built on the HTTP API; it holds no secrets (the
//! token is typed into it and kept in the tab's `sessionStorage`).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::{Html, IntoResponse, Response};
use serde::Deserialize;

use super::{ApiError, ApiQuery, Authed};
use crate::engine::now_ms;
use crate::error::ErrorCode;
use crate::node::Node;
use crate::node::admin::may_list_rooms;

/// Rooms per page unless `limit` says otherwise, and the most it may say.
const DEFAULT_ROOMS: usize = 50;
const MAX_ROOMS: usize = 200;
/// Longest cursor accepted (ours are a few dozen bytes).
const MAX_CURSOR_BYTES: usize = 256;

pub async fn console_page() -> Response {
    (
        [
            // The page runs only its own inline script and talks only to this origin.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                 connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
                 frame-ancestors 'none'",
            ),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        Html(include_str!("console/index.html")),
    )
        .into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoomsQuery {
    cursor: Option<String>,
    limit: Option<usize>,
}

/// `GET /v1/admin/rooms?cursor=&limit=` → `{rooms: [{room, members, locks}], next?,
/// server_time}`: the admin token sees every live room, an owner's token the rooms it owns.
pub async fn rooms(
    State(node): State<Arc<Node>>,
    caller: Authed,
    ApiQuery(q): ApiQuery<RoomsQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if !may_list_rooms(&caller.0) {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            "listing rooms needs the admin token or an owner's token",
        ));
    }
    let limit = q.limit.unwrap_or(DEFAULT_ROOMS);
    if !(1..=MAX_ROOMS).contains(&limit) {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            format!("limit must be 1 to {MAX_ROOMS}"),
        ));
    }
    let cursor = q.cursor.as_deref().filter(|c| !c.is_empty());
    let bad_cursor = || {
        ApiError::new(
            ErrorCode::BadRequest,
            "cursor is not a next value of this listing",
        )
    };
    if cursor.is_some_and(|c| c.len() > MAX_CURSOR_BYTES) {
        return Err(bad_cursor());
    }
    let page = node
        .list_rooms(&caller.0, cursor, limit)
        .await?
        .ok_or_else(bad_cursor)?;
    let mut body = serde_json::to_value(page).unwrap_or_default();
    body["server_time"] = now_ms().into();
    Ok(Json(body))
}

/// `GET /v1/admin/nodes` (admin token) → `{nodes: [{node_id, attached, parked, rooms,
/// draining, at}], node_id, server_time}`; `node_id` is the node that answered.
pub async fn nodes(
    State(node): State<Arc<Node>>,
    caller: Authed,
) -> Result<Json<serde_json::Value>, ApiError> {
    if !caller.0.admin {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            "the node listing needs the admin token",
        ));
    }
    let nodes = node.list_nodes().await?;
    Ok(Json(serde_json::json!({
        "nodes": nodes,
        "node_id": &*node.id,
        "server_time": now_ms(),
    })))
}
