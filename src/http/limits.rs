//! HTTP throttles in front of the handlers: the client's IP, its request budget, a deadline
//! and a size limit for the request body, and the aggregated `auth_failed` audit records.
//!
//! The budgets themselves live in [`crate::node::throttle`]; this file only applies them to
//! requests. Header-read and keep-alive timeouts are set on the connection (`lib.rs`).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, header};
use axum::response::{IntoResponse, Response};

use super::ApiError;
use crate::audit::AuditKind;
use crate::error::ErrorCode;
use crate::node::Node;
use crate::node::throttle::AUTH_FAILURE_WINDOW;

/// The client's address as the throttles see it: the TCP peer, or with
/// `LOCKSTEP_TRUST_FORWARDED_FOR` the left-most `X-Forwarded-For` entry. Unknown:
/// `0.0.0.0` (every such request shares one budget).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientIp(pub IpAddr);

impl ClientIp {
    fn of(headers: &HeaderMap, peer: Option<SocketAddr>, trust_forwarded: bool) -> ClientIp {
        let forwarded = trust_forwarded
            .then(|| headers.get("x-forwarded-for")?.to_str().ok())
            .flatten()
            .and_then(|v| v.split(',').next())
            .and_then(|first| first.trim().parse::<IpAddr>().ok());
        ClientIp(
            forwarded
                .or(peer.map(|p| p.ip()))
                .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        )
    }
}

impl<S: Send + Sync> FromRequestParts<S> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<ClientIp>()
            .copied()
            .unwrap_or(ClientIp(IpAddr::V4(Ipv4Addr::UNSPECIFIED))))
    }
}

/// Not budgeted here: probes and scrapes (an orchestrator must always reach them), and
/// WebSocket upgrades — after a drain every client of a node reconnects at once, through the
/// load balancer's few addresses; sessions have their own limits (per user, per message).
/// Dev tokens too: they exist only in dev mode, on loopback, where load tools mint thousands.
/// `/v1/yjs/{room}` upgrades likewise: a drained node's y-websocket clients reconnect together,
/// and a connection is authenticated before its upgrade and bounded per document and node
/// (`LOCKSTEP_YJS_MAX_CLIENTS_PER_DOC`, `LOCKSTEP_YJS_MAX_DOCS`). `/v1/hocuspocus` stays
/// budgeted: its upgrade carries no token (each document authenticates later, within 60 s),
/// so the client's address is the only thing that bounds how many sockets it can hold open.
fn exempt(path: &str) -> bool {
    matches!(
        path,
        "/healthz" | "/readyz" | "/metrics" | "/v1/ws" | "/v1/dev/token"
    ) || path.starts_with("/v1/yjs/")
}

/// Middleware: finds the client IP, spends one token of its budget (429 `rate_limited` with
/// `retry-after` when spent; [`exempt`] paths and the admin token are not budgeted), then reads
/// the body of every request that may have one
/// within `LOCKSTEP_HTTP_READ_TIMEOUT` (408) and `LOCKSTEP_MAX_FRAME_BYTES` (413 `too_large`),
/// so a client trickling a body cannot hold a socket and a handler.
pub async fn throttle_requests(
    State(node): State<Arc<Node>>,
    mut req: Request,
    next: axum::middleware::Next,
) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let ip = ClientIp::of(req.headers(), peer, node.config.trust_forwarded_for);
    req.extensions_mut().insert(ip);
    let budgeted = !exempt(req.uri().path())
        && !super::bearer_of(req.headers()).is_some_and(|t| node.auth.is_admin_token(t));
    if budgeted && let Err(r) = node.throttle.request_from_ip(ip.0) {
        return ApiError::new(
            ErrorCode::RateLimited,
            "too many requests from this address",
        )
        .retry_after(r.0)
        .into_response();
    }
    if matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let limit = node.config.max_frame_bytes;
    let deadline = node.config.http_read_timeout;
    let bytes = match tokio::time::timeout(deadline, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(b)) => b,
        Ok(Err(_)) => {
            return close(ApiError::new(
                ErrorCode::TooLarge,
                format!("request body over {limit} bytes"),
            ));
        }
        Err(_) => return close(body_timeout(deadline)),
    };
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await
}

fn body_timeout(d: Duration) -> ApiError {
    ApiError::new(
        ErrorCode::BadRequest,
        format!("request body not received within {d:?}"),
    )
    .status(axum::http::StatusCode::REQUEST_TIMEOUT)
}

/// The connection is not worth keeping: the rest of a body may still be on its way.
fn close(e: ApiError) -> Response {
    let mut r = e.into_response();
    r.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    r
}

/// Records an authentication failure (HTTP or WebSocket) in the audit trail, aggregated per
/// source: the first failure of a source in a window is recorded at once (`count: 1`); the
/// others of that window are summed into one record when it ends ([`flush_auth_failures`]).
/// A client looping on a bad token writes at most two records a minute.
pub(crate) async fn record_auth_failure(node: &Node, ip: ClientIp, reason: &str) {
    if node.throttle.auth_failure(ip.0, reason) {
        let mut r = node.audit_record(AuditKind::AuthFailed);
        r.detail = serde_json::json!({ "reason": reason, "ip": ip.0.to_string(), "count": 1 });
        node.record(vec![r]).await;
    }
}

/// Writes the summaries of the auth-failure windows that ended (all with `all`, at shutdown).
pub async fn flush_auth_failures(node: &Node, all: bool) {
    let due = node.throttle.due_failures(all);
    if due.is_empty() {
        return;
    }
    let records = due
        .into_iter()
        .map(|s| {
            let mut r = node.audit_record(AuditKind::AuthFailed);
            r.detail = serde_json::json!({
                "reason": s.last_reason,
                "ip": s.source.map_or_else(|| "other".to_owned(), |ip| ip.to_string()),
                "count": s.count,
                "aggregated": true,
                "window_s": AUTH_FAILURE_WINDOW.as_secs(),
            });
            r
        })
        .collect();
    node.record(records).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_only_when_trusted() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "203.0.113.7, 10.0.0.1".parse().unwrap());
        let peer: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        assert_eq!(ClientIp::of(&h, Some(peer), false).0, peer.ip());
        assert_eq!(
            ClientIp::of(&h, Some(peer), true).0,
            "203.0.113.7".parse::<IpAddr>().unwrap()
        );
        h.insert("x-forwarded-for", "garbage".parse().unwrap());
        assert_eq!(ClientIp::of(&h, Some(peer), true).0, peer.ip());
    }

    #[test]
    fn authenticated_upgrades_and_probes_are_not_budgeted_the_api_and_hocuspocus_are() {
        for path in ["/v1/ws", "/v1/yjs/scene:1", "/healthz"] {
            assert!(exempt(path), "{path}");
        }
        for path in [
            "/v1/locks/acquire",
            "/v1/yjs",
            "/v1/yjsx/a",
            "/v1/presence/scene/1",
            "/v1/hocuspocus",
        ] {
            assert!(!exempt(path), "{path}");
        }
    }
}
