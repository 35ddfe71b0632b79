//! A TCP proxy in front of a test's private `redis-server`, to break the path between a client
//! and Redis in the ways real networks do:
//!
//! - **cut** ([`RedisProxy::arm`]): the first `EVALSHA` whose bytes contain a marker reaches
//!   Redis, and its connection to the client is cut as soon as Redis answers (a `NOSCRIPT`
//!   answer is passed on: fred loads the script and sends the call again, which is then cut);
//! - **blackhole** ([`RedisProxy::blackhole`]): nothing is forwarded in either direction and no
//!   connection is closed, as when a route or a firewall silently drops packets; new
//!   connections are accepted and left waiting. [`RedisProxy::restore`] forwards again.
#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct RedisProxy {
    pub port: u16,
    armed: Arc<Mutex<Option<Vec<u8>>>>,
    cuts: Arc<AtomicUsize>,
    blackholed: watch::Sender<bool>,
}

#[derive(Clone)]
struct Shared {
    armed: Arc<Mutex<Option<Vec<u8>>>>,
    cuts: Arc<AtomicUsize>,
    blackholed: watch::Receiver<bool>,
}

impl RedisProxy {
    /// Listens on a free port and forwards every connection to `redis_port`.
    pub async fn start(redis_port: u16) -> RedisProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = watch::channel(false);
        let shared = Shared {
            armed: Arc::default(),
            cuts: Arc::new(AtomicUsize::new(0)),
            blackholed: rx,
        };
        let proxy = RedisProxy {
            port,
            armed: shared.armed.clone(),
            cuts: shared.cuts.clone(),
            blackholed: tx,
        };
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let shared = shared.clone();
                tokio::spawn(async move {
                    // A connection made during a blackhole waits, open, for the way back.
                    let mut rx = shared.blackholed.clone();
                    if rx.wait_for(|b| !*b).await.is_err() {
                        return;
                    }
                    let Ok(server) = TcpStream::connect(("127.0.0.1", redis_port)).await else {
                        return;
                    };
                    pipe(client, server, shared).await;
                });
            }
        });
        proxy
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Cuts the next script call whose bytes contain `marker`.
    pub fn arm(&self, marker: &str) {
        *self.armed.lock().unwrap() = Some(marker.as_bytes().to_vec());
    }

    pub fn cuts(&self) -> usize {
        self.cuts.load(Ordering::SeqCst)
    }

    /// Stops forwarding, both ways, on every connection, without closing any.
    pub fn blackhole(&self) {
        self.blackholed.send_replace(true);
    }

    /// Forwards again (bytes held back meanwhile are delivered).
    pub fn restore(&self) {
        self.blackholed.send_replace(false);
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// Whether `needle` occurs in `hay` ending past `from` (in bytes not seen before).
fn ends_after(hay: &[u8], needle: &[u8], from: usize) -> bool {
    !needle.is_empty()
        && hay
            .windows(needle.len())
            .enumerate()
            .any(|(i, w)| w == needle && i + needle.len() > from)
}

async fn pipe(client: TcpStream, server: TcpStream, shared: Shared) {
    let Shared {
        armed,
        cuts,
        mut blackholed,
    } = shared;
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let mut cbuf = vec![0u8; 64 * 1024];
    let mut sbuf = vec![0u8; 64 * 1024];
    // The last bytes from the client, so a marker split over two reads is still seen.
    let mut window: Vec<u8> = Vec::new();
    let mut pending_cut = false;
    loop {
        // While blackholed nothing is read, so nothing moves; the sockets stay open.
        let open = !*blackholed.borrow_and_update();
        tokio::select! {
            changed = blackholed.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            n = cr.read(&mut cbuf), if open => {
                let n = match n { Ok(0) | Err(_) => return, Ok(n) => n };
                let old = window.len();
                window.extend_from_slice(&cbuf[..n]);
                if let Some(marker) = armed.lock().unwrap().as_ref()
                    && contains(&window, b"EVALSHA")
                    && ends_after(&window, marker, old)
                {
                    pending_cut = true;
                }
                let keep = window.len().saturating_sub(4096);
                window.drain(..keep);
                if sw.write_all(&cbuf[..n]).await.is_err() {
                    return;
                }
            }
            n = sr.read(&mut sbuf), if open => {
                let n = match n { Ok(0) | Err(_) => return, Ok(n) => n };
                if pending_cut {
                    if sbuf[..n].starts_with(b"-NOSCRIPT") {
                        // Passed on below; fred loads the script and sends the call again.
                    } else if armed.lock().unwrap().take().is_some() {
                        cuts.fetch_add(1, Ordering::SeqCst);
                        // The client loses the connection and the reply. The Redis side stays
                        // open a little (closing a socket with unread data resets it).
                        drop((cr, cw));
                        let _ = tokio::time::timeout(Duration::from_secs(2), async {
                            while matches!(sr.read(&mut sbuf).await, Ok(n) if n > 0) {}
                        })
                        .await;
                        return;
                    }
                    pending_cut = false;
                }
                if cw.write_all(&sbuf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}
