//! A lockstep client: tokens (dev-token minting over HTTP, or HS256 JWTs signed locally with
//! the gateway's shared secret) and a JSON WebSocket session with request/answer matching by
//! `id`.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt, stream};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The JSON subprotocol the gateway speaks.
pub const SUBPROTOCOL: &str = "lockstep.v1.json";

/// Client-side socket buffers. tungstenite's 128 KiB default read buffer would cost the load
/// generator itself ~1.3 GB at 10k connections; frames here are small, and buffers grow for
/// larger ones.
pub const CLIENT_BUFFER: usize = 4 * 1024;

/// The client socket configuration every subcommand uses: [`CLIENT_BUFFER`]-sized buffers.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(CLIENT_BUFFER)
        .write_buffer_size(CLIENT_BUFFER)
        .max_write_buffer_size(CLIENT_BUFFER + 1024 * 1024)
}

/// Why one client operation failed; `kind()` is the key it is counted under.
#[derive(Debug)]
pub enum ClientError {
    /// HTTP request for a token failed (connect, status, body).
    Token(String),
    /// TCP connect or WebSocket handshake failed.
    Connect(String),
    /// No answer within the deadline.
    Timeout(&'static str),
    /// The server closed the socket (close code and reason) or the stream ended.
    Closed(String),
    /// A transport error while reading or writing.
    Io(String),
    /// A frame that is not what the protocol promises.
    Protocol(String),
}

impl ClientError {
    /// The label errors are counted under.
    pub fn kind(&self) -> String {
        match self {
            ClientError::Token(_) => "token".into(),
            ClientError::Connect(_) => "connect".into(),
            ClientError::Timeout(what) => format!("timeout:{what}"),
            ClientError::Closed(_) => "closed".into(),
            ClientError::Io(_) => "io".into(),
            ClientError::Protocol(_) => "protocol".into(),
        }
    }
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Token(m) => write!(f, "token: {m}"),
            ClientError::Connect(m) => write!(f, "connect: {m}"),
            ClientError::Timeout(w) => write!(f, "timed out waiting for {w}"),
            ClientError::Closed(m) => write!(f, "closed: {m}"),
            ClientError::Io(m) => write!(f, "io: {m}"),
            ClientError::Protocol(m) => write!(f, "protocol: {m}"),
        }
    }
}

impl std::error::Error for ClientError {}

/// Where the gateway is: its HTTP base URL (`http://127.0.0.1:8080`).
#[derive(Debug, Clone)]
pub struct Target {
    base: String,
}

impl Target {
    pub fn new(url: &str) -> anyhow::Result<Target> {
        let base = url.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            anyhow::bail!("--url must be http:// or https:// (got {url})");
        }
        Ok(Target { base })
    }

    fn ws_url(&self, token: &str) -> String {
        format!("{}/v1/ws?token={token}", self.ws_base())
    }

    /// The base URL with `ws://` / `wss://` instead of `http://` / `https://`.
    pub fn ws_base(&self) -> String {
        self.base.replacen("http", "ws", 1)
    }

    fn token_url(&self) -> String {
        format!("{}/v1/dev/token", self.base)
    }
}

/// Mints dev-mode tokens (`POST /v1/dev/token`), editor in every room.
#[derive(Clone)]
pub struct TokenMinter {
    http: reqwest::Client,
    target: Target,
}

impl TokenMinter {
    pub fn new(target: &Target) -> anyhow::Result<TokenMinter> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(64)
            .build()?;
        Ok(TokenMinter {
            http,
            target: target.clone(),
        })
    }

    /// One token for user `sub`.
    pub async fn mint(&self, sub: &str) -> Result<String, ClientError> {
        let body = json!({ "sub": sub, "name": sub, "rooms": { "*": "editor" } });
        let resp = self
            .http
            .post(self.target.token_url())
            .json(&body)
            .send()
            .await
            .map_err(|e| ClientError::Token(e.to_string()))?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            return Err(ClientError::Token(format!("{status}: {text}")));
        }
        let v: Value = resp
            .json()
            .await
            .map_err(|e| ClientError::Token(e.to_string()))?;
        v["token"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| ClientError::Token(format!("no token in {v}")))
    }

    /// Tokens for `subs`, at most `concurrency` requests in flight; order kept.
    pub async fn mint_all(
        &self,
        subs: Vec<String>,
        concurrency: usize,
    ) -> Vec<Result<String, ClientError>> {
        stream::iter(subs)
            .map(|sub| {
                let me = self.clone();
                async move { me.mint(&sub).await }
            })
            .buffered(concurrency.max(1))
            .collect()
            .await
    }
}

/// Where session tokens come from.
#[derive(Clone)]
pub enum Tokens {
    /// `POST /v1/dev/token` on the gateway (dev mode: no JWT verifier configured).
    Dev(TokenMinter),
    /// HS256 JWTs signed here with the gateway's `LOCKSTEP_JWT_SECRET`; a gateway with a
    /// verifier has no `/v1/dev/token`. Every node sharing the secret accepts them.
    Jwt(Arc<jsonwebtoken::EncodingKey>),
}

impl Tokens {
    /// Signs JWTs with `secret` when given, otherwise mints dev tokens from `target`.
    pub fn new(target: &Target, jwt_secret: Option<&str>) -> anyhow::Result<Tokens> {
        Ok(match jwt_secret {
            Some(s) if !s.is_empty() => Tokens::Jwt(Arc::new(
                jsonwebtoken::EncodingKey::from_secret(s.as_bytes()),
            )),
            _ => Tokens::Dev(TokenMinter::new(target)?),
        })
    }

    /// Tokens for `subs`, at most `concurrency` HTTP requests in flight; order kept.
    pub async fn mint_all(
        &self,
        subs: Vec<String>,
        concurrency: usize,
    ) -> Vec<Result<String, ClientError>> {
        match self {
            Tokens::Dev(m) => m.mint_all(subs, concurrency).await,
            Tokens::Jwt(key) => subs.iter().map(|s| sign_jwt(key, s)).collect(),
        }
    }
}

/// `{sub, name, rooms: {"*": "editor"}, exp: now + 24 h}`, HS256.
fn sign_jwt(key: &jsonwebtoken::EncodingKey, sub: &str) -> Result<String, ClientError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let claims = json!({
        "sub": sub,
        "name": sub,
        "rooms": { "*": "editor" },
        "exp": now + 24 * 3600,
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        key,
    )
    .map_err(|e| ClientError::Token(format!("signing a JWT: {e}")))
}

/// A server answer to a request with an `id`.
#[derive(Debug)]
pub enum Answer {
    /// `reply` or `pong`.
    Ok(Value),
    /// `error` with its `code`.
    Err { code: String, frame: Value },
}

/// One WebSocket session speaking `lockstep.v1.json`.
pub struct Conn {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// The `welcome` frame.
    pub welcome: Value,
    /// Frames read that were not the answer being waited for (presence, lock events...).
    pub skipped: u64,
}

impl Conn {
    /// Connects, checks the subprotocol and reads `welcome`, all within `deadline`.
    pub async fn connect(
        target: &Target,
        token: &str,
        deadline: Duration,
    ) -> Result<Conn, ClientError> {
        tokio::time::timeout(deadline, Self::connect_inner(target, token))
            .await
            .map_err(|_| ClientError::Timeout("welcome"))?
    }

    async fn connect_inner(target: &Target, token: &str) -> Result<Conn, ClientError> {
        let mut req = target
            .ws_url(token)
            .into_client_request()
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static(SUBPROTOCOL),
        );
        let config = ws_config();
        // Nagle off: latency measurements must not wait for delayed ACKs on our side.
        let (ws, _resp) = tokio_tungstenite::connect_async_with_config(req, Some(config), true)
            .await
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        let mut conn = Conn {
            ws,
            welcome: Value::Null,
            skipped: 0,
        };
        let first = conn.recv().await?;
        if first["type"] != "welcome" {
            return Err(ClientError::Protocol(format!(
                "expected welcome, got {first}"
            )));
        }
        conn.welcome = first;
        Ok(conn)
    }

    /// Sends one JSON object as a text frame.
    pub async fn send(&mut self, msg: &Value) -> Result<(), ClientError> {
        self.ws
            .send(Message::text(msg.to_string()))
            .await
            .map_err(|e| ClientError::Io(e.to_string()))
    }

    /// The next JSON frame (control frames are handled by tungstenite and skipped here).
    pub async fn recv(&mut self) -> Result<Value, ClientError> {
        loop {
            let msg = match self.ws.next().await {
                None => return Err(ClientError::Closed("stream ended".into())),
                Some(Err(e)) => return Err(ClientError::Io(e.to_string())),
                Some(Ok(m)) => m,
            };
            let text = match msg {
                Message::Text(t) => t,
                Message::Close(c) => {
                    let why = c
                        .map(|c| format!("{} {}", u16::from(c.code), c.reason))
                        .unwrap_or_else(|| "no close frame".into());
                    return Err(ClientError::Closed(why));
                }
                Message::Binary(_) => {
                    return Err(ClientError::Protocol(
                        "binary frame on the JSON protocol".into(),
                    ));
                }
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
            };
            return serde_json::from_str(text.as_str())
                .map_err(|e| ClientError::Protocol(format!("bad JSON: {e}")));
        }
    }

    /// Sends `msg` (which must carry `"id": id`) and waits up to `deadline` for its `reply`,
    /// `pong` or `error`; other frames in between are counted in `skipped`.
    pub async fn request(
        &mut self,
        msg: &Value,
        id: u32,
        deadline: Duration,
        what: &'static str,
    ) -> Result<Answer, ClientError> {
        self.send(msg).await?;
        tokio::time::timeout(deadline, self.wait_answer(id))
            .await
            .map_err(|_| ClientError::Timeout(what))?
    }

    async fn wait_answer(&mut self, id: u32) -> Result<Answer, ClientError> {
        loop {
            let frame = self.recv().await?;
            if frame["id"].as_u64() != Some(u64::from(id)) {
                self.skipped += 1;
                continue;
            }
            match frame["type"].as_str() {
                Some("reply" | "pong") => return Ok(Answer::Ok(frame)),
                Some("error") => {
                    let code = frame["code"].as_str().unwrap_or("unknown").to_owned();
                    return Ok(Answer::Err { code, frame });
                }
                _ => self.skipped += 1,
            }
        }
    }

    /// Reads and discards frames until `stop` resolves; `Err` if the socket dies first.
    /// Returns the number of frames read.
    pub async fn drain_until(
        &mut self,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<u64, ClientError> {
        tokio::pin!(stop);
        let mut frames = 0;
        loop {
            tokio::select! {
                _ = &mut stop => return Ok(frames),
                r = self.recv() => { r?; frames += 1; }
            }
        }
    }

    /// Sends a normal close (1000) and waits briefly for the server's close; best effort.
    pub async fn close(mut self, deadline: Duration) {
        let _ = tokio::time::timeout(deadline, async {
            if self.ws.close(None).await.is_ok() {
                while let Some(Ok(_)) = self.ws.next().await {}
            }
        })
        .await;
    }
}

/// A prefix for user ids that is unique per run, so runs never collide on the server's
/// sessions-per-user limit (sessions of a previous run may still be in their resume grace).
pub fn run_prefix(kind: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "load-{kind}-{}-{:x}",
        std::process::id(),
        nanos % 0xffff_ffff
    )
}
