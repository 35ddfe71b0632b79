//! The three wire protocols of `fanout`: connecting a member and joining its room, the cursor
//! frame it sends, and reading the send time back out of what it receives (a substring scan,
//! not a JSON parse: the driver's own CPU is part of the budget).

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::client::{self, ClientError, Target};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Which server the driver talks to.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// The lockstep gateway (`/v1/ws`, `lockstep.v1.json`).
    Lockstep,
    /// The bare relay (`bare-relay`): path = room, frames forwarded verbatim.
    Relay,
    /// A Socket.IO 4 server (`loadtest/socketio/server.js`), Engine.IO 4 over WebSocket.
    Socketio,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Lockstep => "lockstep",
            Protocol::Relay => "relay",
            Protocol::Socketio => "socketio",
        }
    }
}

pub fn room_name(proto: Protocol, n: usize) -> String {
    match proto {
        Protocol::Lockstep => format!("scene:fan-{n}"),
        Protocol::Relay | Protocol::Socketio => format!("fan-{n}"),
    }
}

/// Connects one member and joins it to `room`; returns once the server confirmed the join.
pub async fn open(
    proto: Protocol,
    target: &Target,
    room: &str,
    token: &str,
) -> Result<Ws, ClientError> {
    let base = target.ws_base();
    let url = match proto {
        Protocol::Lockstep => format!("{base}/v1/ws?token={token}"),
        Protocol::Relay => format!("{base}/{room}"),
        Protocol::Socketio => format!("{base}/socket.io/?EIO=4&transport=websocket"),
    };
    let mut req = url
        .into_client_request()
        .map_err(|e| ClientError::Connect(e.to_string()))?;
    if proto == Protocol::Lockstep {
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static(client::SUBPROTOCOL),
        );
    }
    // Nagle off: a latency benchmark must not wait for delayed ACKs on the driver's side.
    let (mut ws, _) =
        tokio_tungstenite::connect_async_with_config(req, Some(client::ws_config()), true)
            .await
            .map_err(|e| ClientError::Connect(e.to_string()))?;
    match proto {
        Protocol::Lockstep => {
            let welcome = next_text(&mut ws).await?;
            if !welcome.contains("\"welcome\"") {
                return Err(ClientError::Protocol(format!(
                    "expected welcome, got {welcome}"
                )));
            }
            let join = json!({"type": "join", "room": room, "id": 1});
            send(&mut ws, join.to_string()).await?;
            loop {
                let text = next_text(&mut ws).await?;
                let v: Value = serde_json::from_str(&text)
                    .map_err(|e| ClientError::Protocol(format!("bad JSON: {e}")))?;
                if v["id"].as_u64() != Some(1) {
                    continue; // room.snapshot, presence.join ...
                }
                if v["type"] == "reply" {
                    break;
                }
                let code = v["code"].as_str().unwrap_or("unknown");
                return Err(ClientError::Protocol(format!("join: {code}")));
            }
        }
        Protocol::Relay => {
            let text = next_text(&mut ws).await?;
            if text != "joined" {
                return Err(ClientError::Protocol(format!(
                    "expected joined, got {text}"
                )));
            }
        }
        Protocol::Socketio => {
            let open = next_text(&mut ws).await?;
            if !open.starts_with('0') {
                return Err(ClientError::Protocol(format!(
                    "expected EIO open, got {open}"
                )));
            }
            send(&mut ws, "40".into()).await?;
            wait_prefix(&mut ws, "40").await?;
            send(&mut ws, format!("421[\"join\",\"{room}\"]")).await?;
            wait_prefix(&mut ws, "431").await?;
        }
    }
    Ok(ws)
}

async fn send(ws: &mut Ws, text: String) -> Result<(), ClientError> {
    ws.send(Message::text(text))
        .await
        .map_err(|e| ClientError::Io(e.to_string()))
}

/// The next text frame (control frames skipped).
async fn next_text(ws: &mut Ws) -> Result<String, ClientError> {
    loop {
        match ws.next().await {
            None => return Err(ClientError::Closed("stream ended".into())),
            Some(Err(e)) => return Err(ClientError::Io(e.to_string())),
            Some(Ok(Message::Text(t))) => return Ok(t.as_str().to_owned()),
            Some(Ok(Message::Close(c))) => {
                let why = c
                    .map(|c| format!("{} {}", u16::from(c.code), c.reason))
                    .unwrap_or_else(|| "no close frame".into());
                return Err(ClientError::Closed(why));
            }
            Some(Ok(_)) => continue,
        }
    }
}

/// Reads Socket.IO packets until one starting with `prefix` (answering pings meanwhile).
async fn wait_prefix(ws: &mut Ws, prefix: &str) -> Result<(), ClientError> {
    loop {
        let text = next_text(ws).await?;
        if text.starts_with(prefix) {
            return Ok(());
        }
        if text == "2" {
            send(ws, "3".into()).await?;
        } else if text.starts_with("44") {
            return Err(ClientError::Protocol(format!("connect error: {text}")));
        }
    }
}

/// The cursor frame of one member, its send time in µs inside.
pub fn cursor_frame(proto: Protocol, room: &str, sent_us: u64, index: usize) -> String {
    match proto {
        Protocol::Lockstep => {
            format!(r#"{{"type":"cursor","room":"{room}","x":{sent_us},"y":{index}}}"#)
        }
        Protocol::Relay => format!(r#"{{"room":"{room}","t":{sent_us},"y":{index}}}"#),
        Protocol::Socketio => {
            format!(r#"42["cursor",{{"room":"{room}","t":{sent_us},"y":{index}}}]"#)
        }
    }
}

pub enum Frame {
    /// A cursor with this send time (µs).
    Cursor(u64),
    /// Engine.IO ping: answer `3`.
    Ping,
    /// Anything else the server may send (presence, snapshots, acks).
    Other,
    /// A cursor frame without a readable time.
    Bad,
}

/// Finds the send time without a JSON parse: the driver's own CPU is part of the budget.
pub fn decode(proto: Protocol, text: &str) -> Frame {
    let (is_cursor, key) = match proto {
        Protocol::Lockstep => (text.contains(r#""type":"cursor""#), r#""x":"#),
        Protocol::Relay => (true, r#""t":"#),
        Protocol::Socketio => {
            if text == "2" {
                return Frame::Ping;
            }
            (text.starts_with(r#"42["cursor""#), r#""t":"#)
        }
    };
    if !is_cursor {
        return Frame::Other;
    }
    match number_after(text, key) {
        Some(us) => Frame::Cursor(us),
        None => Frame::Bad,
    }
}

/// The number right after `key` (`"x":1234` or `"x":1234.0`), as an integer.
fn number_after(text: &str, key: &str) -> Option<u64> {
    let at = text.find(key)? + key.len();
    let rest = &text[at..];
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-')))
        .unwrap_or(rest.len());
    let v: f64 = rest[..end].parse().ok()?;
    (v.is_finite() && v >= 0.0).then_some(v as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_time_back_from_each_protocol() {
        let lockstep = r#"{"type":"cursor","room":"scene:fan-1","user_id":"u","session_id":"s","x":123456.0,"y":3.0}"#;
        assert!(matches!(
            decode(Protocol::Lockstep, lockstep),
            Frame::Cursor(123456)
        ));
        let presence = r#"{"type":"presence.join","room":"scene:fan-1"}"#;
        assert!(matches!(decode(Protocol::Lockstep, presence), Frame::Other));
        let sio = cursor_frame(Protocol::Socketio, "fan-1", 42, 3);
        assert!(matches!(
            decode(Protocol::Socketio, &sio),
            Frame::Cursor(42)
        ));
        assert!(matches!(decode(Protocol::Socketio, "2"), Frame::Ping));
        let relay = cursor_frame(Protocol::Relay, "fan-1", 7, 0);
        assert!(matches!(decode(Protocol::Relay, &relay), Frame::Cursor(7)));
        assert!(matches!(
            decode(Protocol::Relay, r#"{"t":"x"}"#),
            Frame::Bad
        ));
    }
}
