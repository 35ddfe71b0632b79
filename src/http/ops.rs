//! Operational endpoints: health, readiness, metrics, the demo pages (`/` with the SDK's
//! browser bundle it imports, `/yjs` with its Yjs bundle) and dev tokens.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
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

/// Neither the page nor the bundle has a version in its URL, and both change together with the
/// binary: `no-cache` lets a browser keep them but makes it ask each time, so a page from a new
/// build never runs against a stale bundle (or the reverse).
const REVALIDATE: &str = "no-cache";

pub async fn demo_page() -> Response {
    (
        [(header::CACHE_CONTROL, REVALIDATE)],
        Html(include_str!("demo/index.html")),
    )
        .into_response()
}

/// `@lockstep/client`'s browser bundle, embedded so that `cargo run --release` serves a working
/// demo on a machine without Node. `scripts/check-demo-bundle.sh` fails when this copy is not
/// what the SDK's source builds; `src/http/demo/README.md` has the command that refreshes it.
const CLIENT_JS: &str = include_str!("demo/lockstep-client.js");
/// FNV-1a of the bundle, computed at compile time: the ETag that makes the revalidation a 304.
const CLIENT_JS_HASH: u64 = fnv1a(CLIENT_JS.as_bytes());

const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        h ^= bytes[i] as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    h
}

/// `GET /lockstep-client.js`: the bundle the demo page imports, `304` when the browser's copy
/// is current.
pub async fn client_bundle(headers: HeaderMap) -> Response {
    embedded_js(&headers, CLIENT_JS, CLIENT_JS_HASH)
}

/// `GET /yjs`: the Yjs demo page (a shared textarea over `/v1/yjs`, awareness, status).
pub async fn yjs_demo_page() -> Response {
    (
        [(header::CACHE_CONTROL, REVALIDATE)],
        Html(include_str!("demo/yjs.html")),
    )
        .into_response()
}

/// The Yjs demo's script bundled with `yjs` and `y-websocket` (minified), embedded for the same
/// reason as [`CLIENT_JS`] and checked against its source by the same script.
const YJS_DEMO_JS: &str = include_str!("demo/yjs-demo.js");
const YJS_DEMO_JS_HASH: u64 = fnv1a(YJS_DEMO_JS.as_bytes());

/// `GET /yjs-demo.js`: the script `/yjs` loads, `304` when the browser's copy is current.
pub async fn yjs_demo_bundle(headers: HeaderMap) -> Response {
    embedded_js(&headers, YJS_DEMO_JS, YJS_DEMO_JS_HASH)
}

/// An embedded script with its ETag, or `304` when `If-None-Match` already names it.
fn embedded_js(headers: &HeaderMap, body: &'static str, hash: u64) -> Response {
    let etag = format!("\"{hash:016x}\"");
    let cached = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let common = [
        (header::CACHE_CONTROL, REVALIDATE.to_owned()),
        (header::ETAG, etag),
    ];
    if cached {
        return (StatusCode::NOT_MODIFIED, common).into_response();
    }
    (
        common,
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        body,
    )
        .into_response()
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
