//! The HTTP surface: WebSocket upgrade, REST API, health, metrics, demo page.
//!
//! Handlers are thin: they authenticate, parse, call the [`Node`] and map its errors to
//! `{"code", "message"}` bodies with a fitting status.
//!
//! [`router`] is the main listener; [`admin_router`] the optional admin listener
//! (`LOCKSTEP_METRICS_LISTEN`) with only `/metrics`, `/healthz` and `/readyz`. Every error
//! response is counted in `lockstep_client_errors_total{code}`.

mod admin;
mod admin_read;
mod api;
mod hocuspocus;
mod limits;
mod ops;
mod ws;
mod yjs;

pub use limits::{ClientIp, flush_auth_failures};

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;

use crate::auth::{AuthError, Principal};
use crate::error::ErrorCode;
use crate::node::{Node, OpError};
use crate::protocol::server::HolderView;

pub fn router(node: Arc<Node>) -> Router {
    let body_limit = node.config.max_frame_bytes;
    Router::new()
        .route("/", get(ops::demo_page))
        .route("/lockstep-client.js", get(ops::client_bundle))
        .route("/yjs", get(ops::yjs_demo_page))
        .route("/yjs-demo.js", get(ops::yjs_demo_bundle))
        .route("/v1/ws", get(ws::upgrade))
        .route("/v1/yjs/{room}", get(yjs::upgrade))
        .route("/v1/hocuspocus", get(hocuspocus::upgrade))
        .route("/v1/presence/{entity_type}/{entity_id}", get(api::presence))
        .route("/v1/locks", get(api::list_locks))
        .route("/v1/locks/acquire", post(api::acquire))
        .route("/v1/locks/release", post(api::release))
        .route("/v1/locks/extend", post(api::extend))
        .route("/v1/locks/validate", post(api::validate))
        .route("/v1/audit", get(api::audit))
        .route("/v1/admin/locks/release", post(api::admin_release))
        .route("/v1/admin/sessions/revoke", post(admin::revoke_sessions))
        .route("/v1/admin/rooms", get(admin_read::rooms))
        .route("/v1/admin/nodes", get(admin_read::nodes))
        .route("/admin", get(admin_read::console_page))
        .route("/v1/dev/token", post(ops::dev_token))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .fallback(|| async { ApiError::new(ErrorCode::NotFound, "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                ErrorCode::MethodNotAllowed,
                "this endpoint does not take that method",
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn_with_state(
            node.clone(),
            limits::throttle_requests,
        ))
        .layer(axum::middleware::from_fn_with_state(
            node.clone(),
            count_errors,
        ))
        .layer(axum::middleware::from_fn_with_state(
            node.clone(),
            trace_request,
        ))
        .with_state(node)
}

/// The admin listener's router (`LOCKSTEP_METRICS_LISTEN`): metrics and probes only, so it can
/// be exposed to the cluster's monitoring without exposing the API.
pub fn admin_router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .fallback(|| async { ApiError::new(ErrorCode::NotFound, "no such endpoint") })
        .with_state(node)
}

/// Counts HTTP error responses in `lockstep_client_errors_total{code}`: every [`ApiError`]
/// leaves its code in the response's extensions.
async fn count_errors(
    axum::extract::State(node): axum::extract::State<Arc<Node>>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let resp = next.run(req).await;
    if let Some(code) = resp.extensions().get::<ErrorCode>() {
        node.metrics.client_error(code.as_str());
    }
    resp
}

/// One `request` span per HTTP request, named `{method} {route}` in traces (OpenTelemetry's
/// HTTP convention). Probes and scrapes (`/healthz`, `/readyz`, `/metrics`) get `debug` spans,
/// so the default trace filter does not export one span per probe.
async fn trace_request(
    axum::extract::State(node): axum::extract::State<Arc<Node>>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    use tracing::Instrument;
    use tracing::field::Empty;
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("unmatched", |p| p.as_str());
    let method = req.method().as_str();
    macro_rules! span {
        ($level:ident) => {
            tracing::$level!(
                "request",
                otel.name = format!("{method} {route}"),
                otel.kind = "server",
                otel.status_code = Empty,
                "type" = "http",
                http.request.method = method,
                http.route = route,
                http.response.status_code = Empty,
                node_id = &*node.id,
                user_id = Empty,
            )
        };
    }
    let span = match route {
        "/healthz" | "/readyz" | "/metrics" => span!(debug_span),
        _ => span!(info_span),
    };
    let response = next.run(req).instrument(span.clone()).await;
    let status = response.status();
    span.record("http.response.status_code", i64::from(status.as_u16()));
    if status.is_server_error() {
        span.record("otel.status_code", "error");
    }
    response
}

/// An error answered as `{"code", "message", ...}`; `lock_held` adds holder and wait.
#[derive(Debug)]
pub struct ApiError {
    code: ErrorCode,
    message: String,
    extra: Option<serde_json::Value>,
    /// Seconds for a `retry-after` header (throttles).
    retry_after: Option<u64>,
    /// A status other than the code's own (408 for a body that never came).
    status: Option<StatusCode>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
            extra: None,
            retry_after: None,
            status: None,
        }
    }

    pub fn retry_after(mut self, seconds: u64) -> ApiError {
        self.retry_after = Some(seconds);
        self
    }

    pub fn status(mut self, status: StatusCode) -> ApiError {
        self.status = Some(status);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status.unwrap_or_else(|| {
            StatusCode::from_u16(self.code.http_status())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
        });
        let mut body = serde_json::json!({ "code": self.code, "message": self.message });
        if let (Some(serde_json::Value::Object(extra)), Some(obj)) =
            (self.extra, body.as_object_mut())
        {
            obj.extend(extra);
        }
        let mut resp = (status, Json(body)).into_response();
        if let Some(s) = self.retry_after {
            resp.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, s.into());
        }
        resp.extensions_mut().insert(self.code);
        resp
    }
}

impl From<OpError> for ApiError {
    fn from(e: OpError) -> ApiError {
        let mut err = ApiError::new(e.code(), e.to_string());
        if let OpError::HttpLockBudget { retry_after_s, .. } = &e {
            err.retry_after = Some(*retry_after_s);
        }
        if let OpError::LockHeld(d) = &e {
            #[derive(Serialize)]
            struct Held<'a> {
                resource: &'a crate::names::Entity,
                holder: HolderView<'a>,
                estimated_wait_ms: u64,
            }
            err.extra = serde_json::to_value(Held {
                resource: &d.current.resource,
                holder: HolderView::of(&d.current),
                estimated_wait_ms: d.estimated_wait_ms,
            })
            .ok();
        }
        err
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> ApiError {
        ApiError::new(e.code(), e.to_string())
    }
}

/// `axum::Json` whose rejections are [`ApiError`]s (`bad_request`, `too_large`).
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(JsonRejection::BytesRejection(e))
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE =>
            {
                Err(ApiError::new(ErrorCode::TooLarge, "request body too large"))
            }
            Err(e) => Err(ApiError::new(ErrorCode::BadRequest, e.body_text())),
        }
    }
}

/// `axum::extract::Query` whose rejections are `bad_request` JSON errors.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| ApiQuery(q.0))
            .map_err(|e| ApiError::new(ErrorCode::BadRequest, e.body_text()))
    }
}

/// The authenticated caller of an HTTP request: `Authorization: Bearer <user JWT | admin token>`.
pub struct Authed(pub Principal);

impl FromRequestParts<Arc<Node>> for Authed {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        node: &Arc<Node>,
    ) -> Result<Self, Self::Rejection> {
        let token = bearer(parts)
            .ok_or_else(|| ApiError::new(ErrorCode::Unauthorized, "missing bearer token"))?;
        match node.auth.verify_bearer(token) {
            Ok(p) => {
                tracing::Span::current().record("user_id", &*p.user_id);
                if !p.admin
                    && let Err(r) = node.throttle.request_from_user(&p.user_id)
                {
                    return Err(ApiError::new(
                        ErrorCode::RateLimited,
                        "too many requests from this user",
                    )
                    .retry_after(r.0));
                }
                Ok(Authed(p))
            }
            Err(e) => {
                let ip = parts.extensions.get::<ClientIp>().copied();
                let ip = ip.unwrap_or(ClientIp(std::net::Ipv4Addr::UNSPECIFIED.into()));
                limits::record_auth_failure(node, ip, &e.to_string()).await;
                Err(e.into())
            }
        }
    }
}

pub(crate) fn bearer(parts: &Parts) -> Option<&str> {
    bearer_of(&parts.headers)
}

pub(crate) fn bearer_of(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::auth::parse_bearer)
}
