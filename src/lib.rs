//! # lockstep
//!
//! A real-time collaboration gateway: presence, live cursors and exclusive edit locks with
//! fencing tokens, over WebSockets, for every member of a shared room.
//!
//! # Layout
//!
//! - [`config`]: every setting, its env name, default and validation.
//! - [`error`]: client error codes and WebSocket close codes.
//! - [`names`]: validated `type:id` entity names.
//! - [`protocol`]: wire messages and the JSON / MessagePack codecs.
//! - [`auth`]: JWT verification into a principal with room roles.
//! - [`engine`]: the `LockStore`, `PresenceStore` and `Broker` traits, their in-process
//!   implementations and the conformance suite every implementation must pass.
//! - [`audit`]: audit records and sinks (JSON-lines file by default, Redis outbox streams),
//!   and with a database their drainers into Postgres and the Postgres queries.
//! - [`db`]: the Postgres pool and embedded schema migrations (`migrations/`).
//! - [`node`]: one gateway node; owns the engines and the hub, implements every operation
//!   once for both WebSocket sessions and the HTTP API.
//! - [`hub`]: this node's live sessions and their rooms; local fan-out.
//! - [`session`]: one WebSocket connection: read loop, outbound queue, heartbeat, resume.
//! - [`http`]: the router: WebSocket upgrade, REST API, health, metrics, demo page.
//! - [`telemetry`]: OpenTelemetry metrics exported in Prometheus text.
//! - [`tls`]: rustls client configs (ring) for Redis and Postgres, and TLS failures explained.
//! - [`logging`]: the `tracing` subscriber: console logs (text or flat JSON) and OTLP traces.
//! - [`yjs`]: Yjs document sync: update log, snapshots, y-websocket and Hocuspocus endpoints.
//!
//! [`start`] is shared by `main` and the tests, which run the same code on `127.0.0.1:0`.

pub mod audit;
pub mod auth;
pub mod config;
pub mod db;
pub mod engine;
pub mod error;
pub mod http;
pub mod hub;
pub mod logging;
pub mod names;
pub mod node;
pub mod protocol;
pub mod session;
pub mod telemetry;
pub mod tls;
pub mod yjs;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use node::Node;

/// A started gateway: its bound address and node; [`Running::shutdown`] drains it.
pub struct Running {
    pub addr: SocketAddr,
    /// The admin listener's address (`LOCKSTEP_METRICS_LISTEN`), if configured.
    pub metrics_addr: Option<SocketAddr>,
    pub node: Arc<Node>,
    stop_accepting: CancellationToken,
    /// Stops the admin listener, last: it reports readiness and metrics during the drain.
    stop_admin: CancellationToken,
    server: tokio::task::JoinHandle<()>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Node(#[from] node::NodeError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Starts a node and its HTTP/WebSocket listener. In dev mode (no JWT key) it binds
/// loopback only, whatever the configured address.
pub async fn start(mut config: Config) -> Result<Running, StartError> {
    if config.dev_mode() {
        tracing::warn!(
            "DEV MODE: no JWT key configured (LOCKSTEP_JWT_SECRET / _PUBLIC_KEY / _JWKS). Anyone can mint \
             tokens at POST /v1/dev/token; binding loopback only. Never run this in production."
        );
        if !config.listen.ip().is_loopback() {
            config.listen.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        if let Some(m) = config.metrics_listen.as_mut()
            && !m.ip().is_loopback()
        {
            m.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
    }
    let (listener, addr) = bind(config.listen).await?;
    let admin = match config.metrics_listen {
        Some(a) => Some(bind(a).await?),
        None => None,
    };
    // Start-up and the node's background tasks log inside its span, so they carry `node_id`.
    let span = node::node_span(&config.node_id);
    let node = tracing::Instrument::instrument(Node::start(config), span.clone()).await?;
    let stop_admin = CancellationToken::new();
    let metrics_addr = admin.map(|(listener, addr)| {
        let app = http::admin_router(node.clone());
        let stop = stop_admin.clone();
        let read_timeout = node.config.http_read_timeout;
        tokio::spawn(serve(listener, app, read_timeout, stop));
        tracing::info!(%addr, "admin listener (/metrics, /healthz, /readyz)");
        addr
    });
    let stop_accepting = CancellationToken::new();
    let app = http::router(node.clone());
    let stop = stop_accepting.clone();
    let server = tokio::spawn(tracing::Instrument::instrument(
        serve(listener, app, node.config.http_read_timeout, stop),
        node.span(),
    ));
    spawn_auth_failure_flush(&node, stop_admin.clone());
    span.in_scope(|| tracing::info!(%addr, "lockstep listening"));
    Ok(Running {
        addr,
        metrics_addr,
        node,
        stop_accepting,
        stop_admin,
        server,
    })
}

/// The accept loop: HTTP/1.1 with upgrades (WebSockets), the peer address in each request's
/// extensions (`ConnectInfo`) for the per-IP throttles, and a header-read timeout. axum's own
/// `serve` has none, so a client sending half a request line would hold its socket forever;
/// here it is closed after `read_timeout`, and so is a keep-alive connection idle that long
/// (hyper runs the same timer while it waits for the next request's head).
///
/// On `stop` no new connection is accepted and open HTTP connections finish their request
/// and close; upgraded WebSockets are sessions, drained by the node, not here.
async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    read_timeout: std::time::Duration,
    stop: CancellationToken,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(read_timeout);
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors or a connection reset before accept: back off a
                    // little instead of spinning, and keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        // Small frames (lock replies, cursors) must leave at once: with Nagle's algorithm a
        // reply waits for the client's delayed ACK, ~40 ms per round trip.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
        let app = app.clone();
        let service =
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer));
                tower_service::Service::call(&mut app.clone(), req)
            });
        let conn = http
            .serve_connection(TokioIo::new(tcp), service)
            .with_upgrades();
        let stop = stop.clone();
        connections.spawn(async move {
            let mut conn = std::pin::pin!(conn);
            let done = tokio::select! {
                r = conn.as_mut() => Some(r),
                _ = stop.cancelled() => None,
            };
            let result = match done {
                Some(r) => r,
                None => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                // Timeouts, resets and malformed requests: the client's doing, not ours.
                tracing::debug!(error = %e, %peer, "http connection ended with an error");
            }
        });
    }
    connections.close();
    connections.wait().await;
}

/// Writes the aggregated `auth_failed` records of ended windows every few seconds, until
/// `stop`; the shutdown writes the windows still open ([`Running::shutdown`]).
fn spawn_auth_failure_flush(node: &Arc<Node>, stop: CancellationToken) {
    let node = node.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => http::flush_auth_failures(&node, false).await,
                _ = stop.cancelled() => return,
            }
        }
    });
}

async fn bind(addr: SocketAddr) -> Result<(tokio::net::TcpListener, SocketAddr), StartError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| StartError::Bind { addr, source })?;
    Ok((listener, bound))
}

impl Running {
    /// Graceful stop: readiness fails, sessions get `reconnect` + close 1012, the listener
    /// stops, and the call returns once sessions closed (or `drain_timeout` passed).
    pub async fn shutdown(self) {
        let span = self.node.span();
        tracing::Instrument::instrument(self.shutdown_inner(), span).await
    }

    async fn shutdown_inner(self) {
        let node = self.node.clone();
        let stop = self.stop_accepting.clone();
        // Before the drain, whose last step flushes the audit sink.
        http::flush_auth_failures(&node, true).await;
        // Stop accepting and drain sessions at the same time: axum's graceful shutdown waits
        // for open connections, which end only when the sessions do.
        let drain = tokio::spawn(async move { node.drain().await });
        stop.cancel();
        let _ = drain.await;
        let grace = self.node.config.drain_timeout;
        if tokio::time::timeout(grace, self.server).await.is_err() {
            tracing::warn!("listener did not stop within the drain timeout");
        }
        self.stop_admin.cancel();
    }
}
