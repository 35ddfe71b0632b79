//! `bare-relay`: the floor for room fan-out on this stack (tokio + tokio-tungstenite), for
//! `lockstep-load fanout --target relay` and `side-by-side.sh`.
//!
//! A client connects to `ws://HOST:PORT/<room>`, is told `joined` once it is a member, and
//! every text or binary frame it sends goes verbatim to the other members of its room. Nothing
//! else: no auth, no parsing, no presence, no heartbeat of its own. Rooms are one `HashMap`
//! behind a `std::sync::Mutex` (held for a lookup and a `try_send` per member, never across
//! an `.await`); each connection is one task that reads its socket and writes what its bounded
//! queue holds, one `send` (write + flush) per frame. A full queue drops the frame and counts
//! it (printed every 10 s when it grew): a slow member cannot grow the relay's memory.
//! Socket buffers are 4 KiB, as in lockstep's WebSocket configuration.
//!
//! Usage: `bare-relay [LISTEN]` (or `RELAY_LISTEN`; default `127.0.0.1:9000`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Socket read and write buffers, as lockstep's.
const BUFFER: usize = 4 * 1024;
/// Frames waiting for one member's socket; past it new frames for that member are dropped.
const QUEUE: usize = 256;

/// Room name → (connection id, its queue) per member.
type RoomMap = HashMap<String, Vec<(u64, mpsc::Sender<Message>)>>;
type Rooms = Arc<Mutex<RoomMap>>;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let listen = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("RELAY_LISTEN").ok())
        .unwrap_or_else(|| "127.0.0.1:9000".into());
    let listener = TcpListener::bind(&listen).await?;
    eprintln!("bare-relay listening on {}", listener.local_addr()?);
    let rooms: Rooms = Arc::default();
    let dropped = Arc::new(AtomicU64::new(0));
    tokio::spawn(report_drops(dropped.clone()));
    let mut next_id = 0u64;
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                // Out of file descriptors, typically: back off instead of spinning.
                eprintln!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        next_id += 1;
        tokio::spawn(connection(tcp, next_id, rooms.clone(), dropped.clone()));
    }
}

async fn report_drops(dropped: Arc<AtomicU64>) {
    let mut seen = 0;
    loop {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let now = dropped.load(Ordering::Relaxed);
        if now != seen {
            eprintln!("frames dropped to full queues: {now}");
            seen = now;
        }
    }
}

async fn connection(tcp: TcpStream, id: u64, rooms: Rooms, dropped: Arc<AtomicU64>) {
    let _ = tcp.set_nodelay(true);
    let config = WebSocketConfig::default()
        .read_buffer_size(BUFFER)
        .write_buffer_size(BUFFER)
        .max_write_buffer_size(BUFFER + 1024 * 1024);
    let mut room = String::new();
    // The error type is tungstenite's callback contract, not ours to shrink.
    #[allow(clippy::result_large_err)]
    let path = |req: &Request, resp: Response| {
        room = req.uri().path().trim_start_matches('/').to_owned();
        Ok(resp)
    };
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async_with_config(tcp, path, Some(config)).await
    else {
        return;
    };
    let (tx, mut rx) = mpsc::channel(QUEUE);
    lock(&rooms).entry(room.clone()).or_default().push((id, tx));
    if ws.send(Message::text("joined")).await.is_ok() {
        loop {
            tokio::select! {
                msg = ws.next() => match msg {
                    Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => {
                        let rooms = lock(&rooms);
                        for (other, tx) in rooms.get(&room).into_iter().flatten() {
                            if *other != id && tx.try_send(m.clone()).is_err() {
                                dropped.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    // Pings are answered inside tungstenite.
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                    Some(Ok(Message::Close(_)) | Err(_)) | None => break,
                },
                Some(m) = rx.recv() => {
                    if ws.send(m).await.is_err() {
                        break;
                    }
                }
            }
        }
    }
    let mut rooms = lock(&rooms);
    if let Some(members) = rooms.get_mut(&room) {
        members.retain(|(other, _)| *other != id);
        if members.is_empty() {
            rooms.remove(&room);
        }
    }
}

fn lock(rooms: &Rooms) -> std::sync::MutexGuard<'_, RoomMap> {
    // A panic while holding the lock cannot leave the map half-updated in a way that matters
    // to a benchmark relay: keep serving.
    rooms.lock().unwrap_or_else(|e| e.into_inner())
}
