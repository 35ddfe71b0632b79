//! Test harness: a real gateway on a free loopback port and real WebSocket/HTTP clients.
#![allow(dead_code)]

pub mod certs;
pub mod cluster;
pub mod engine;
pub mod k6;
pub mod postgres;
pub mod proxy;
pub mod redis;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use lockstep::config::Config;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

pub const WAIT: Duration = Duration::from_secs(5);

/// A loopback port nobody listens on right now, for the servers the tests start.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

pub struct Server {
    pub running: Option<lockstep::Running>,
    pub addr: std::net::SocketAddr,
    pub dir: tempfile::TempDir,
    pub http: reqwest::Client,
}

impl Server {
    pub async fn start() -> Server {
        Server::start_with(|_| {}).await
    }

    /// A dev-mode node (tokens minted over HTTP) with test-friendly timers, tweaked by `f`.
    pub async fn start_with(f: impl FnOnce(&mut Config)) -> Server {
        let _ = lockstep::logging::init(lockstep::config::LogFormat::Text, "test");
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config::for_tests(dir.path().to_owned());
        config.drain_timeout = Duration::from_secs(3);
        f(&mut config);
        let running = lockstep::start(config).await.expect("server starts");
        Server {
            addr: running.addr,
            running: Some(running),
            dir,
            http: reqwest::Client::new(),
        }
    }

    /// The node's `/metrics` text.
    pub async fn metrics(&self) -> String {
        let r = self.http.get(self.url("/metrics")).send().await;
        r.expect("GET /metrics").text().await.expect("metrics text")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Mints a dev token with `rooms` (default: editor everywhere).
    pub async fn token(&self, sub: &str, rooms: Option<Value>) -> String {
        let mut body = json!({ "sub": sub, "name": format!("{sub}-name") });
        if let Some(r) = rooms {
            body["rooms"] = r;
        }
        let r: Value = self
            .http
            .post(self.url("/v1/dev/token"))
            .json(&body)
            .send()
            .await
            .expect("dev token request")
            .json()
            .await
            .expect("dev token json");
        r["token"].as_str().expect("token").to_owned()
    }

    pub async fn client(&self, sub: &str) -> Client {
        let token = self.token(sub, None).await;
        Client::connect(self.addr, &token, Codec::Json, None).await
    }

    pub async fn client_with_role(&self, sub: &str, role: &str) -> Client {
        let token = self.token(sub, Some(json!({ "*": role }))).await;
        Client::connect(self.addr, &token, Codec::Json, None).await
    }

    pub async fn shutdown(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Codec {
    Json,
    MsgPack,
}

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub struct Client {
    pub ws: Ws,
    pub codec: Codec,
    pub welcome: Value,
    next_id: u32,
}

/// How a connection ended, as the client saw it.
#[derive(Debug, PartialEq)]
pub enum Closed {
    Code(u16),
    NoCode,
}

impl Client {
    pub async fn connect(
        addr: std::net::SocketAddr,
        token: &str,
        codec: Codec,
        resume: Option<&str>,
    ) -> Client {
        let (ws, first) = Client::open(addr, token, codec, resume).await;
        let welcome = match first {
            Ok(v) => v,
            Err(c) => panic!("connection closed before welcome: {c:?}"),
        };
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        Client {
            ws,
            codec,
            welcome,
            next_id: 1,
        }
    }

    /// Opens a socket and returns the first message, or how the server closed it.
    pub async fn open(
        addr: std::net::SocketAddr,
        token: &str,
        codec: Codec,
        resume: Option<&str>,
    ) -> (Ws, Result<Value, Closed>) {
        let mut url = format!("ws://{addr}/v1/ws?token={token}");
        if let Some(r) = resume {
            url.push_str(&format!("&resume={r}"));
        }
        let mut req = url.into_client_request().expect("request");
        let proto = match codec {
            Codec::Json => "lockstep.v1.json",
            Codec::MsgPack => "lockstep.v1.msgpack",
        };
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", proto.parse().expect("header"));
        let (mut ws, resp) = tokio_tungstenite::connect_async(req)
            .await
            .expect("connect");
        if let Some(p) = resp.headers().get("sec-websocket-protocol") {
            assert_eq!(p, proto);
        }
        let first = read_value(&mut ws, codec).await;
        (ws, first)
    }

    pub fn session_id(&self) -> String {
        self.welcome["session_id"]
            .as_str()
            .expect("session_id")
            .to_owned()
    }

    pub fn resume_token(&self) -> String {
        self.welcome["resume_token"]
            .as_str()
            .expect("resume_token")
            .to_owned()
    }

    pub fn user_id(&self) -> String {
        self.welcome["user"]["id"]
            .as_str()
            .expect("user id")
            .to_owned()
    }

    /// Sends a message as this client's codec encodes it.
    pub async fn send(&mut self, msg: Value) {
        let frame = match self.codec {
            Codec::Json => Message::Text(msg.to_string().into()),
            Codec::MsgPack => {
                Message::Binary(rmp_serde::to_vec_named(&msg).expect("msgpack").into())
            }
        };
        self.ws.send(frame).await.expect("send");
    }

    pub async fn send_raw(&mut self, frame: Message) {
        self.ws.send(frame).await.expect("send raw");
    }

    /// Sends a request with a fresh id and returns the `reply` or `error` carrying that id,
    /// skipping other messages.
    pub async fn request(&mut self, mut msg: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        msg["id"] = json!(id);
        self.send(msg).await;
        self.recv_where(|v| (v["type"] == "reply" || v["type"] == "error") && v["id"] == json!(id))
            .await
    }

    pub async fn join(&mut self, room: &str) -> Value {
        let r = self.request(json!({"type": "join", "room": room})).await;
        assert_eq!(r["type"], "reply", "join {room}: {r}");
        r
    }

    /// The next message, or a panic after [`WAIT`].
    pub async fn recv(&mut self) -> Value {
        match tokio::time::timeout(WAIT, read_value(&mut self.ws, self.codec)).await {
            Ok(Ok(v)) => v,
            Ok(Err(c)) => panic!("connection closed: {c:?}"),
            Err(_) => panic!("no message within {WAIT:?}"),
        }
    }

    /// The next message matching `pred`, skipping others.
    pub async fn recv_where(&mut self, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, read_value(&mut self.ws, self.codec)).await {
                Ok(Ok(v)) if pred(&v) => return v,
                Ok(Ok(_)) => continue,
                Ok(Err(c)) => panic!("connection closed while waiting: {c:?}"),
                Err(_) => panic!("no matching message within {WAIT:?}"),
            }
        }
    }

    pub async fn recv_type(&mut self, ty: &str) -> Value {
        self.recv_where(|v| v["type"] == ty).await
    }

    /// Messages arriving within `d`, none expected to close the socket.
    pub async fn drain_for(&mut self, d: Duration) -> Vec<Value> {
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + d;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, read_value(&mut self.ws, self.codec)).await {
                Ok(Ok(v)) => out.push(v),
                Ok(Err(c)) => panic!("closed while draining: {c:?}"),
                Err(_) => return out,
            }
        }
    }

    /// Reads until the server closes; returns the close code.
    pub async fn closed(&mut self) -> Closed {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, read_value(&mut self.ws, self.codec)).await {
                Ok(Ok(_)) => continue,
                Ok(Err(c)) => return c,
                Err(_) => panic!("server did not close within {WAIT:?}"),
            }
        }
    }

    /// Closes like a browser tab that vanished: TCP drop without a close frame.
    pub fn drop_connection(self) {
        drop(self.ws);
    }

    pub async fn close_normally(mut self) {
        let _ = self.ws.close(None).await;
        // Let the server see the close frame before the test moves on.
        let _ = tokio::time::timeout(Duration::from_secs(1), self.ws.next()).await;
    }
}

impl Client {
    /// Wraps a socket opened with [`Client::open`] or [`Client::open_request`] whose first
    /// message was the `welcome`.
    pub fn from_parts(ws: Ws, codec: Codec, welcome: Value) -> Client {
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        Client {
            ws,
            codec,
            welcome,
            next_id: 1,
        }
    }

    /// Opens a socket for a prepared request (custom query or headers, e.g. no token or an
    /// `Authorization` header); returns the first message or how the server closed it.
    pub async fn open_request(
        mut req: tokio_tungstenite::tungstenite::handshake::client::Request,
        codec: Codec,
    ) -> (Ws, Result<Value, Closed>) {
        let proto = match codec {
            Codec::Json => "lockstep.v1.json",
            Codec::MsgPack => "lockstep.v1.msgpack",
        };
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", proto.parse().expect("header"));
        let (mut ws, _resp) = tokio_tungstenite::connect_async(req)
            .await
            .expect("connect");
        let first = read_value(&mut ws, codec).await;
        (ws, first)
    }

    /// A fresh request id (for messages sent with [`Client::send`] that need one).
    pub fn fresh_id(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// `ping` with a fresh id; waits for the `pong` carrying it (skipping other messages).
    pub async fn ping(&mut self) {
        let id = self.fresh_id();
        self.send(json!({"type": "ping", "id": id})).await;
        let pong = self
            .recv_where(|v| v["type"] == "pong" && v["id"] == json!(id))
            .await;
        assert_eq!(pong["type"], "pong");
    }

    /// A request expected to fail: returns the `error` frame, asserting its id and code.
    pub async fn expect_error(&mut self, msg: Value, code: &str) -> Value {
        let shown = msg.to_string();
        let r = self.request(msg).await;
        assert_eq!(r["type"], "error", "{shown} answered {r}");
        assert_eq!(r["code"], code, "{shown} answered {r}");
        assert!(
            r["message"].as_str().is_some_and(|m| !m.is_empty()),
            "error without a message: {r}"
        );
        r
    }

    /// The next message, or how the connection ended, within `d` (panics on timeout).
    pub async fn next_within(&mut self, d: Duration) -> Result<Value, Closed> {
        match tokio::time::timeout(d, read_value(&mut self.ws, self.codec)).await {
            Ok(r) => r,
            Err(_) => panic!("no message or close within {d:?}"),
        }
    }

    /// Reads (skipping messages) until the server closes, within `d`; returns how it closed
    /// and how many messages came before the close.
    pub async fn closed_within(&mut self, d: Duration) -> (Closed, usize) {
        read_until_closed(&mut self.ws, self.codec, d).await
    }
}

/// Reads (skipping messages) until the connection ends within `d`; returns how it ended and
/// how many messages were skipped.
pub async fn read_until_closed(ws: &mut Ws, codec: Codec, d: Duration) -> (Closed, usize) {
    let deadline = tokio::time::Instant::now() + d;
    let mut skipped = 0;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, read_value(ws, codec)).await {
            Ok(Ok(_)) => skipped += 1,
            Ok(Err(c)) => return (c, skipped),
            Err(_) => panic!("connection not closed within {d:?} ({skipped} messages read)"),
        }
    }
}

async fn read_value(ws: &mut Ws, codec: Codec) -> Result<Value, Closed> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                assert_eq!(codec, Codec::Json, "text frame on a msgpack session");
                return Ok(serde_json::from_str(&t).expect("server sent valid JSON"));
            }
            Some(Ok(Message::Binary(b))) => {
                assert_eq!(codec, Codec::MsgPack, "binary frame on a json session");
                return Ok(rmp_serde::from_slice(&b).expect("server sent valid msgpack"));
            }
            Some(Ok(Message::Close(Some(f)))) => return Err(Closed::Code(u16::from(f.code))),
            Some(Ok(Message::Close(None))) => return Err(Closed::NoCode),
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return Err(Closed::NoCode),
        }
    }
}

pub fn close_code(c: CloseCode) -> u16 {
    u16::from(c)
}

/// Parses Prometheus text and sums the samples named exactly `name` whose labels include every
/// pair of `labels`; `None` when no sample matched.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut sum = None;
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let (metric, label_text) = match series.split_once('{') {
            Some((m, rest)) => (m, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if metric != name {
            continue;
        }
        let parsed: Vec<(&str, &str)> = label_text
            .split(',')
            .filter(|kv| !kv.is_empty())
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.trim(), v.trim().trim_matches('"')))
            .collect();
        if labels.iter().all(|want| parsed.contains(want)) {
            let v: f64 = value.trim().parse().expect("numeric sample value");
            sum = Some(sum.unwrap_or(0.0) + v);
        }
    }
    sum
}
