//! `fanout`: room fan-out throughput, end-to-end latency and what it costs the server, with
//! one workload spoken in three protocols so that lockstep, a Socket.IO 4 server and a bare
//! relay are measured by the same driver (`side-by-side.sh` runs them one after the other).
//!
//! The workload: `--rooms` × `--members` WebSockets, each joined to its room; every member
//! sends a cursor frame `--rate` times a second (first sends spread over one period, so the
//! load is even), carrying its send time in µs since one monotonic base of this process.
//! Every member that receives a cursor records `now - sent` (driver and servers share the
//! machine, so one clock serves both ends). With several `--url`s member i of every room
//! connects to node `i % N`, so most deliveries cross nodes.
//!
//! Phases: connect and join (not timed), `--warmup-secs` of load (not measured),
//! `--duration-secs` measured, then sending stops, `--drain-secs` for frames in flight, and
//! the sockets close. Deliveries and latencies count frames *received* during the measured
//! window (the CPU figures cover the same window); `delivery_ratio` counts the cursors *sent*
//! in the window that arrived before the drain ended, against sent × (members − 1), so
//! neither the window's edges nor a slow server's backlog blur it. CPU of the driver, of each
//! `--server-pid` and of `--redis-pid` is read from `/proc/PID/stat` at the window's two
//! ends, RSS at its end.
//!
//! Protocols (`--target`):
//! - `lockstep`: `GET /v1/ws` with `lockstep.v1.json`, `join` (waits for its `reply`), then
//!   `cursor {room, x: sent_us, y}`; the time comes back in the forwarded `cursor`'s `x`.
//!   lockstep coalesces cursors per (room, sender) in a receiver's queue while its writer is
//!   behind (latest wins), so `delivery_ratio` may be below 1 under overload: deliveries are
//!   what arrived, never what was sent.
//! - `socketio`: Engine.IO 4 over a plain WebSocket (`/socket.io/?EIO=4&transport=websocket`):
//!   `0{..}` open, `40` → `40{..}`, `421["join",room]` → ack `431[..]`, then
//!   `42["cursor",{room,t,y}]`; the server's `2` pings are answered with `3`.
//! - `relay`: the bare relay (`bare-relay` binary): `GET /<room>`, the server says `joined`,
//!   then every text frame `{"room","t","y"}` goes verbatim to the room's other members.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt, stream};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use crate::bench::round3;
use crate::client::{ClientError, Target, Tokens, run_prefix};
use crate::procfs;
use crate::stats::{self, ErrorCounts};

mod wire;

pub use wire::Protocol;
use wire::{Frame, Ws, cursor_frame, decode, open, room_name};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The server's protocol.
    #[arg(long, value_enum, default_value = "lockstep")]
    pub target: Protocol,
    /// HTTP base URL of a node (`http://127.0.0.1:8080`); repeat for several nodes: member i
    /// of every room connects to the (i mod N)-th.
    #[arg(long = "url", required = true)]
    pub urls: Vec<String>,
    /// lockstep only: sign HS256 tokens with the nodes' `LOCKSTEP_JWT_SECRET`; without it
    /// dev tokens are minted from the first node (dev mode).
    #[arg(long)]
    pub jwt_secret: Option<String>,
    /// Rooms.
    #[arg(long, default_value_t = 100)]
    pub rooms: usize,
    /// Members per room (one connection each; every member sends and receives).
    #[arg(long, default_value_t = 20)]
    pub members: usize,
    /// Cursor frames per second per member.
    #[arg(long, default_value_t = 2.0)]
    pub rate: f64,
    /// Seconds of load before the measured window.
    #[arg(long, default_value_t = 5.0)]
    pub warmup_secs: f64,
    /// Seconds measured.
    #[arg(long, default_value_t = 20.0)]
    pub duration_secs: f64,
    /// Seconds after the window for cursors sent in it to arrive (`delivery_ratio`).
    #[arg(long, default_value_t = 2.0)]
    pub drain_secs: f64,
    /// Connections being opened and joined at once.
    #[arg(long, default_value_t = 64)]
    pub connect_concurrency: usize,
    /// Deadline for connecting and joining one member (seconds).
    #[arg(long, default_value_t = 30)]
    pub timeout_secs: u64,
    /// A server process whose CPU (over the window) and RSS (at its end) are reported;
    /// repeat for several nodes.
    #[arg(long = "server-pid")]
    pub server_pids: Vec<u32>,
    /// The Redis process, whose CPU over the window is reported.
    #[arg(long)]
    pub redis_pid: Option<u32>,
}

// Phases, in order; members read them on every frame (one relaxed load).
const WARMUP: u8 = 0;
const MEASURE: u8 = 1;
const COOLDOWN: u8 = 2;
const DONE: u8 = 3;

/// Latencies a member buffers before taking the shared histogram's lock.
const FLUSH_EVERY: usize = 256;

/// What every member task shares.
struct Shared {
    proto: Protocol,
    /// The clock of every timestamp on the wire.
    base: Instant,
    phase: AtomicU8,
    /// Latencies (µs) of cursors received in the measured window.
    hist: Mutex<Histogram<u64>>,
    deliveries: AtomicU64,
    /// Cursors sent in the measured window.
    sent: AtomicU64,
    /// The window in `now_us` time, `[start, end)`; end is `u64::MAX` until it closes.
    window_us: [AtomicU64; 2],
    /// Cursors sent in the window that arrived (whenever, until the drain ends).
    arrived: AtomicU64,
    /// Frames received that were not a cursor (presence, snapshots, pings...).
    other_frames: AtomicU64,
    errors: Mutex<ErrorCounts>,
}

impl Shared {
    fn now_us(&self) -> u64 {
        self.base.elapsed().as_micros() as u64
    }

    fn phase(&self) -> u8 {
        self.phase.load(Ordering::Relaxed)
    }

    fn error(&self, kind: impl Into<String>) {
        self.errors.lock().expect("not poisoned").add(kind);
    }
}

/// One joined member.
struct Member {
    ws: Ws,
    /// The room name as this protocol spells it.
    room: String,
    /// Index over all members: spreads first sends over a period.
    global: usize,
    /// Index in the room: the `y` of its cursors.
    index: usize,
}

pub async fn run(args: Args) -> anyhow::Result<Value> {
    anyhow::ensure!(
        args.rooms > 0 && args.members > 1,
        "want rooms ≥ 1 and members ≥ 2"
    );
    anyhow::ensure!(args.rate > 0.0, "--rate must be positive");
    let targets: Vec<Target> = args
        .urls
        .iter()
        .map(|u| Target::new(u))
        .collect::<anyhow::Result<_>>()?;
    let total = args.rooms * args.members;
    let timeout = Duration::from_secs(args.timeout_secs.max(1));
    let shared = Arc::new(Shared {
        proto: args.target,
        base: Instant::now(),
        phase: AtomicU8::new(WARMUP),
        hist: Mutex::new(stats::new_histogram()),
        deliveries: AtomicU64::new(0),
        sent: AtomicU64::new(0),
        window_us: [AtomicU64::new(u64::MAX), AtomicU64::new(u64::MAX)],
        arrived: AtomicU64::new(0),
        other_frames: AtomicU64::new(0),
        errors: Mutex::new(ErrorCounts::default()),
    });

    // Tokens first (lockstep only): signed locally, or minted from the first node.
    let prefix = run_prefix("fanout");
    // `None`: no token could be had for that member (counted already).
    let tokens: Vec<Option<String>> = if args.target == Protocol::Lockstep {
        let minter = Tokens::new(&targets[0], args.jwt_secret.as_deref())?;
        let subs = (0..total)
            .map(|g| format!("{prefix}-r{}-m{}", g / args.members, g % args.members))
            .collect();
        minter
            .mint_all(subs, args.connect_concurrency)
            .await
            .into_iter()
            .map(|t| match t {
                Ok(t) => Some(t),
                Err(e) => {
                    shared.error(e.kind());
                    None
                }
            })
            .collect()
    } else {
        vec![Some(String::new()); total]
    };

    eprintln!(
        "fanout/{}: opening {total} connections ({} rooms × {}) over {} node(s)",
        args.target.name(),
        args.rooms,
        args.members,
        targets.len()
    );
    let opened = Instant::now();
    let members: Vec<Member> = stream::iter(tokens.into_iter().enumerate())
        .map(|(global, token)| {
            let room_no = global / args.members;
            let index = global % args.members;
            let target = targets[index % targets.len()].clone();
            let proto = args.target;
            async move {
                let token = token?;
                let room = room_name(proto, room_no);
                match tokio::time::timeout(timeout, open(proto, &target, &room, &token)).await {
                    Ok(Ok(ws)) => Some(Ok(Member {
                        ws,
                        room,
                        global,
                        index,
                    })),
                    Ok(Err(e)) => {
                        if global == 0 {
                            eprintln!("fanout: member 0: {e}");
                        }
                        Some(Err(e.kind()))
                    }
                    Err(_) => Some(Err("timeout:join".to_owned())),
                }
            }
        })
        .buffer_unordered(args.connect_concurrency.max(1))
        .filter_map(|r| {
            let r = match r {
                Some(Ok(m)) => Some(m),
                Some(Err(kind)) => {
                    shared.error(kind);
                    None
                }
                None => None,
            };
            std::future::ready(r)
        })
        .collect()
        .await;
    let joined = members.len();
    eprintln!(
        "fanout/{}: {joined}/{total} joined in {:.1}s; {}s warm-up, {}s measured",
        args.target.name(),
        opened.elapsed().as_secs_f64(),
        args.warmup_secs,
        args.duration_secs
    );
    anyhow::ensure!(
        joined > 0,
        "no member could connect and join: {}",
        shared.errors.lock().expect("not poisoned").to_json()
    );

    // Load: every member sends from `start + its offset` on.
    let period = Duration::from_secs_f64(1.0 / args.rate);
    let start = Instant::now() + Duration::from_millis(100);
    let (stop_tx, stop_rx) = watch::channel(false);
    let tasks: Vec<_> = members
        .into_iter()
        .map(|m| {
            // Golden-ratio offsets: spread evenly over one period whatever the count.
            let frac = (m.global as f64 * 0.618_033_988_749_895).fract();
            let first = start + period.mul_f64(frac);
            tokio::spawn(member_loop(
                m,
                shared.clone(),
                first,
                period,
                stop_rx.clone(),
            ))
        })
        .collect();

    tokio::time::sleep_until((start + Duration::from_secs_f64(args.warmup_secs)).into()).await;
    let before = Sample::take(&args);
    let window_start = Instant::now();
    shared.window_us[0].store(shared.now_us(), Ordering::SeqCst);
    shared.phase.store(MEASURE, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs_f64(args.duration_secs)).await;
    shared.window_us[1].store(shared.now_us(), Ordering::SeqCst);
    shared.phase.store(COOLDOWN, Ordering::SeqCst);
    let window = window_start.elapsed().as_secs_f64();
    let after = Sample::take(&args);
    let server_rss: Vec<Option<procfs::Memory>> = args
        .server_pids
        .iter()
        .map(|&p| procfs::memory(Some(p)).ok())
        .collect();

    // Let frames in flight land (only for `arrived`), then close everything.
    tokio::time::sleep(Duration::from_secs_f64(args.drain_secs.max(0.0))).await;
    shared.phase.store(DONE, Ordering::Relaxed);
    let _ = stop_tx.send(true);
    for t in tasks {
        if t.await.is_err() {
            shared.error("task_panicked");
        }
    }

    Ok(report(
        &args,
        &shared,
        joined,
        total,
        window,
        &before,
        &after,
        &server_rss,
    ))
}

// ---------------------------------------------------------------------------------------------
// the load

/// One member: sends a cursor every `period` from `first` on while the phase is warm-up or
/// measure, and reads everything the server sends until `stop`.
async fn member_loop(
    mut m: Member,
    sh: Arc<Shared>,
    first: Instant,
    period: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut lat: Vec<u64> = Vec::with_capacity(FLUSH_EVERY);
    let mut deliveries = 0u64;
    let mut arrived = 0u64;
    let mut sent = 0u64;
    let mut other = 0u64;
    let mut next = first;
    let mut sending = true;
    let sleep = tokio::time::sleep_until(next.into());
    tokio::pin!(sleep);
    let failure: Option<String> = loop {
        tokio::select! {
            _ = &mut sleep, if sending => {
                let phase = sh.phase();
                if phase >= COOLDOWN {
                    sending = false;
                    continue;
                }
                let frame = cursor_frame(sh.proto, &m.room, sh.now_us(), m.index);
                if let Err(e) = m.ws.send(Message::text(frame)).await {
                    break Some(format!("send:{}", ClientError::Io(e.to_string()).kind()));
                }
                if phase == MEASURE {
                    sent += 1;
                }
                next += period;
                // A driver that fell more than a period behind does not burst to catch up.
                let now = Instant::now();
                if next + period < now {
                    next = now;
                }
                sleep.as_mut().reset(next.into());
            }
            msg = m.ws.next() => {
                let text = match msg {
                    None => break Some("closed".into()),
                    Some(Err(e)) => break Some(ClientError::Io(e.to_string()).kind()),
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Close(_))) => break Some("closed".into()),
                    Some(Ok(_)) => continue,
                };
                match decode(sh.proto, text.as_str()) {
                    Frame::Cursor(sent_us) => {
                        if sent_us >= sh.window_us[0].load(Ordering::Relaxed)
                            && sent_us < sh.window_us[1].load(Ordering::Relaxed)
                        {
                            arrived += 1;
                        }
                        if sh.phase() == MEASURE {
                            deliveries += 1;
                            lat.push(sh.now_us().saturating_sub(sent_us));
                            if lat.len() >= FLUSH_EVERY {
                                flush(&sh, &mut lat);
                            }
                        }
                    }
                    Frame::Ping => {
                        if let Err(e) = m.ws.send(Message::text("3")).await {
                            break Some(format!("send:{}", ClientError::Io(e.to_string()).kind()));
                        }
                    }
                    Frame::Other => other += 1,
                    Frame::Bad => break Some("protocol".into()),
                }
            }
            _ = stop.changed() => break None,
        }
    };
    flush(&sh, &mut lat);
    sh.deliveries.fetch_add(deliveries, Ordering::Relaxed);
    sh.sent.fetch_add(sent, Ordering::Relaxed);
    sh.arrived.fetch_add(arrived, Ordering::Relaxed);
    sh.other_frames.fetch_add(other, Ordering::Relaxed);
    match failure {
        // A socket lost after the measured window does not count against the server.
        Some(kind) if sh.phase() < DONE => sh.error(kind),
        Some(_) => {}
        None => {
            let _ = tokio::time::timeout(Duration::from_secs(2), m.ws.close(None)).await;
        }
    }
}

fn flush(sh: &Shared, lat: &mut Vec<u64>) {
    if lat.is_empty() {
        return;
    }
    let mut h = sh.hist.lock().expect("not poisoned");
    let high = h.high();
    for &us in lat.iter() {
        h.saturating_record(us.clamp(1, high));
    }
    lat.clear();
}

// ---------------------------------------------------------------------------------------------
// CPU and the report

/// CPU seconds of the driver, each server and Redis at one instant.
struct Sample {
    driver: f64,
    servers: Vec<Option<f64>>,
    redis: Option<f64>,
}

impl Sample {
    fn take(args: &Args) -> Sample {
        Sample {
            driver: procfs::cpu_seconds(None).unwrap_or(0.0),
            servers: args
                .server_pids
                .iter()
                .map(|&p| procfs::cpu_seconds(Some(p)).ok())
                .collect(),
            redis: args
                .redis_pid
                .and_then(|p| procfs::cpu_seconds(Some(p)).ok()),
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn report(
    args: &Args,
    sh: &Shared,
    joined: usize,
    total: usize,
    window: f64,
    before: &Sample,
    after: &Sample,
    server_rss: &[Option<procfs::Memory>],
) -> Value {
    let deliveries = sh.deliveries.load(Ordering::Relaxed);
    let sent = sh.sent.load(Ordering::Relaxed);
    let expected = sent * (args.members as u64 - 1);
    let arrived = sh.arrived.load(Ordering::Relaxed);
    let hist = sh.hist.lock().expect("not poisoned");
    let errors = sh.errors.lock().expect("not poisoned");
    let servers: Vec<Value> = args
        .server_pids
        .iter()
        .enumerate()
        .map(|(i, pid)| {
            let cpu = match (before.servers[i], after.servers[i]) {
                (Some(a), Some(b)) => Some(round3(b - a)),
                _ => None,
            };
            let mem = server_rss[i];
            json!({
                "pid": pid,
                "cpu_s": cpu,
                "rss_kb": mem.map(|m| m.rss_kb),
                "hwm_kb": mem.map(|m| m.hwm_kb),
            })
        })
        .collect();
    let server_cpu: f64 = before
        .servers
        .iter()
        .zip(&after.servers)
        .filter_map(|(a, b)| Some(b.as_ref()? - a.as_ref()?))
        .sum();
    let redis_cpu = match (before.redis, after.redis) {
        (Some(a), Some(b)) => Some(round3(b - a)),
        _ => None,
    };
    let driver_cpu = after.driver - before.driver;
    let per_cpu = (server_cpu > 0.0).then(|| (deliveries as f64 / server_cpu).round());
    json!({
        "benchmark": "fanout",
        "target": args.target.name(),
        "urls": args.urls,
        "nodes": args.urls.len(),
        "rooms": args.rooms,
        "members": args.members,
        "connections": total,
        "joined": joined,
        "rate_hz": args.rate,
        "warmup_s": args.warmup_secs,
        "window_s": round3(window),
        "sent": sent,
        "expected_deliveries": expected,
        "deliveries": deliveries,
        "deliveries_per_s": (deliveries as f64 / window).round(),
        "arrived": arrived,
        "drain_s": args.drain_secs,
        "delivery_ratio": if expected > 0 { round3(arrived as f64 / expected as f64) } else { 0.0 },
        "latency_us": stats::summary(&hist),
        "other_frames": sh.other_frames.load(Ordering::Relaxed),
        "errors": errors.to_json(),
        "errors_total": errors.total(),
        "driver_cpu_s": round3(driver_cpu),
        "servers": servers,
        "server_cpu_s": round3(server_cpu),
        "server_rss_kb": server_rss.iter().map(|m| m.map(|m| m.rss_kb)).collect::<Vec<_>>(),
        "redis_cpu_s": redis_cpu,
        "deliveries_per_server_cpu_s": per_cpu,
    })
}
