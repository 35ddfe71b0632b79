//! `idle`: open N sessions, join each to `scene:{i % rooms}`, then hold them all idle and
//! report how much the server's resident memory grew per connection.
//!
//! The server's RSS (`VmRSS` of `--server-pid`) is sampled before the first connection, after
//! every connection has joined and `--settle-secs` have passed (the headline number), and
//! again at the end of `--hold-secs`. Every held connection keeps reading (and discarding)
//! what the server sends, as a real client would: joining a room of m members fans a
//! `presence.join` out to the m-1 others, so the ramp-up costs O(m²) frames per room.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::{StreamExt, stream};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::bench::{join, round3};
use crate::client::{ClientError, Conn, Target, Tokens, run_prefix};
use crate::procfs;
use crate::stats::{self, ErrorCounts};

/// File descriptors kept free for the HTTP client, stdio and the runtime.
const FD_RESERVE: u64 = 100;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The gateway's HTTP base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Connections to open and hold (one process holds < 20k: see the open-files limit).
    #[arg(long, default_value_t = 10_000)]
    pub connections: usize,
    /// Rooms to spread them over (`scene:{i % rooms}`); ~100 members a room is typical.
    #[arg(long, default_value_t = 100)]
    pub rooms: usize,
    /// The server's process id, whose `/proc/PID/status` is sampled.
    #[arg(long)]
    pub server_pid: u32,
    /// How long to hold the connections after the settled sample (seconds).
    #[arg(long, default_value_t = 10)]
    pub hold_secs: u64,
    /// Pause between the last join and the headline RSS sample (seconds).
    #[arg(long, default_value_t = 5)]
    pub settle_secs: u64,
    /// Connection attempts (connect + welcome + join) in flight at once.
    #[arg(long, default_value_t = 200)]
    pub concurrency: usize,
    /// Sign HS256 user tokens with this secret (the gateway's `LOCKSTEP_JWT_SECRET`) instead
    /// of minting dev tokens over HTTP.
    #[arg(long)]
    pub jwt_secret: Option<String>,
    /// Token requests in flight at once.
    #[arg(long, default_value_t = 32)]
    pub mint_concurrency: usize,
    /// Deadline for one connection's connect + welcome + join (seconds).
    #[arg(long, default_value_t = 60)]
    pub timeout_secs: u64,
}

/// Counters shared by all holder tasks.
#[derive(Default)]
struct Held {
    /// Connections joined and not (yet) lost.
    live: AtomicUsize,
    /// Frames read while held (presence fan-out of later joins, mostly).
    frames: AtomicU64,
}

pub async fn run(args: Args) -> anyhow::Result<Value> {
    let limit = procfs::fd_limit();
    let n = args.connections;
    if n as u64 + FD_RESERVE > limit {
        anyhow::bail!(
            "{n} connections need more open files than this process may have ({limit}); \
             split the load over several processes"
        );
    }
    let target = Target::new(&args.url)?;
    let rooms = args.rooms.max(1);
    let timeout = Duration::from_secs(args.timeout_secs.max(1));
    let mut errors = ErrorCounts::default();

    let before = procfs::memory(Some(args.server_pid))?;
    eprintln!("idle: server RSS before: {} KiB", before.rss_kb);

    // 1. Tokens, one user per connection (the server caps sessions per user).
    let t = Instant::now();
    let prefix = run_prefix("idle");
    let minter = Tokens::new(&target, args.jwt_secret.as_deref())?;
    let subs = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    let tokens = minter.mint_all(subs, args.mint_concurrency).await;
    drop(minter);
    let mint_s = t.elapsed().as_secs_f64();
    eprintln!("idle: {n} tokens in {mint_s:.1}s");

    // 2. Connect and join, bounded in flight; each joined connection is handed to its own
    // holder task at once so it keeps reading while the others ramp up.
    let held = Arc::new(Held::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let progress = Arc::new(AtomicUsize::new(0));
    let t = Instant::now();
    let jobs = tokens.into_iter().enumerate();
    let results: Vec<_> = stream::iter(jobs)
        .map(|(i, token)| {
            let target = target.clone();
            let held = held.clone();
            let stop = stop_rx.clone();
            let progress = progress.clone();
            async move {
                let token = token?;
                let t0 = Instant::now();
                let mut conn = Conn::connect(&target, &token, timeout).await?;
                join(&mut conn, &format!("scene:{}", i % rooms), 1, timeout).await?;
                let took = t0.elapsed();
                held.live.fetch_add(1, Ordering::Relaxed);
                let handle = tokio::spawn(hold(conn, stop, held));
                let done = progress.fetch_add(1, Ordering::Relaxed) + 1;
                if done.is_multiple_of(1000) {
                    eprintln!("idle: {done} joined");
                }
                Ok::<_, ClientError>((took, handle))
            }
        })
        .buffer_unordered(args.concurrency.max(1))
        .collect()
        .await;
    let connect_s = t.elapsed().as_secs_f64();
    let mut connect_join = stats::new_histogram();
    let mut holders = Vec::with_capacity(n);
    for r in results {
        match r {
            Ok((took, handle)) => {
                stats::record(&mut connect_join, took);
                holders.push(handle);
            }
            Err(e) => {
                if errors.total() < 10 {
                    eprintln!("idle: connection failed: {e}");
                }
                errors.add(e.kind());
            }
        }
    }
    let joined = holders.len();
    eprintln!(
        "idle: {joined}/{n} joined in {connect_s:.1}s; settling {}s",
        args.settle_secs
    );

    // 3. Settle, sample, hold, sample.
    tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
    let after = procfs::memory(Some(args.server_pid))?;
    let live_after = held.live.load(Ordering::Relaxed);
    eprintln!(
        "idle: server RSS after: {} KiB with {live_after} live; holding {}s",
        after.rss_kb, args.hold_secs
    );
    tokio::time::sleep(Duration::from_secs(args.hold_secs)).await;
    let end = procfs::memory(Some(args.server_pid))?;
    let live_end = held.live.load(Ordering::Relaxed);
    let client_mem = procfs::memory(None).ok();

    // 4. Close everything (normal close), bounded in time.
    let _ = stop_tx.send(true);
    let closing = async {
        for h in holders {
            match h.await {
                Ok(Some(e)) => errors.add(format!("lost:{}", e.kind())),
                Ok(None) => {}
                Err(_) => errors.add("panic"),
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(60), closing)
        .await
        .is_err()
    {
        errors.add("close_timeout");
    }

    let per_conn = |mem: procfs::Memory, live: usize| -> f64 {
        if live == 0 {
            return 0.0;
        }
        let grown = mem.rss_kb as f64 - before.rss_kb as f64;
        (grown * 1024.0 / live as f64).round()
    };
    Ok(json!({
        "mode": "idle",
        "connections": n,
        "joined": joined,
        "rooms": rooms,
        "members_per_room": (n as f64 / rooms as f64).ceil(),
        "live_after_settle": live_after,
        "live_at_end": live_end,
        "rss_before_kb": before.rss_kb,
        "rss_after_kb": after.rss_kb,
        "rss_end_kb": end.rss_kb,
        "server_peak_rss_kb": end.hwm_kb,
        "per_connection_bytes": per_conn(after, live_after),
        "per_connection_bytes_end": per_conn(end, live_end),
        "mint_s": round3(mint_s),
        "connect_s": round3(connect_s),
        "connects_per_s": if connect_s > 0.0 { round3(joined as f64 / connect_s) } else { 0.0 },
        "connect_join_us": stats::summary(&connect_join),
        "settle_s": args.settle_secs,
        "hold_s": args.hold_secs,
        "frames_received_while_held": held.frames.load(Ordering::Relaxed),
        "client_rss_kb": client_mem.map(|m| m.rss_kb),
        "errors_total": errors.total(),
        "errors": errors.to_json(),
    }))
}

/// Keeps one joined connection open, reading and discarding frames, until `stop` turns
/// true; then closes it normally. Returns the error if the server dropped it first.
async fn hold(
    mut conn: Conn,
    mut stop: watch::Receiver<bool>,
    held: Arc<Held>,
) -> Option<ClientError> {
    let r = conn
        .drain_until(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await;
    match r {
        Ok(frames) => {
            held.frames.fetch_add(frames, Ordering::Relaxed);
            conn.close(Duration::from_secs(10)).await;
            None
        }
        Err(e) => {
            held.live.fetch_sub(1, Ordering::Relaxed);
            Some(e)
        }
    }
}
