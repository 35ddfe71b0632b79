//! Operational endpoints: health, readiness, metrics, the demo page and dev tokens.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use serde::Deserialize;

use super::{ApiError, ApiJson};
use crate::auth::Role;
use crate::error::ErrorCode;
use crate::node::Node;

pub async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

/// 200 while the node accepts sessions; 503 once it drains (SIGTERM).
pub async fn readyz(State(node): State<Arc<Node>>) -> Response {
    if node.is_ready() {
        Json(serde_json::json!({ "status": "ready", "node_id": &*node.id })).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "status": "draining" })),
        )
            .into_response()
    }
}

pub async fn metrics(State(node): State<Arc<Node>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        node.metrics.render(),
    )
        .into_response()
}

pub async fn demo_page() -> Html<&'static str> {
    Html(include_str!("demo/index.html"))
}

#[derive(Deserialize)]
pub struct DevTokenBody {
    sub: String,
    name: Option<String>,
    rooms: Option<BTreeMap<String, Role>>,
}

/// `POST /v1/dev/token {sub, name?, rooms?}` → `{token}`; 404 unless in dev mode.
pub async fn dev_token(
    State(node): State<Arc<Node>>,
    ApiJson(b): ApiJson<DevTokenBody>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if !node.auth.is_dev() {
        return Err(ApiError::new(ErrorCode::NotFound, "dev mode is off"));
    }
    let token = node
        .auth
        .mint_dev_token(&b.sub, b.name.as_deref(), b.rooms)?;
    Ok(Json(serde_json::json!({ "token": token })))
}
