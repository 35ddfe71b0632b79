//! `scale`: the studio workload (issue 9, goal 5), one driver process's share of it.
//!
//! This process drives rooms `scene:scale-{first_room}` … `+rooms`, each with `members`
//! members; member `m` connects to `--url` number `m mod urls` (so with two nodes every room
//! is split over both) and joins its room. Then, each on its own random phase:
//! - members `0 .. cursor_senders` send a `cursor` at `cursor_hz` (`x` = µs since this
//!   process's epoch, so any receiver computes the delay; sender and receivers of a room are
//!   all in this process);
//! - every member sends `presence {room, focus}` every `presence_every_s` (the focus names the
//!   send time);
//! - members `members - editors .. members` (the editors) take a lock every `lock_every_s` on
//!   one of `lock_resources` resources of their room, never waiting, hold it `lock_hold_ms`
//!   and release it. `lock_held` is counted, not an error.
//!
//! Lost locks are checked against the driver's own view: a `lock.released` with a reason
//! other than `released` (`lost`, `expired`, `disconnected`, `forced`, …) reaching a holder
//! that has not released, a release the server refuses, or a grant on a resource whose
//! previous holder (per this process's map; a room's members are all in one process) never
//! released. Any `error` frame other than `lock_held`, a closed socket
//! or a missing answer is an error.
//!
//! Connections ramp up at `connect_rate` per second. The measured window is set by files
//! (`--ready-file` written when the ramp is over, window from `--go-file` to `--stop-file`),
//! so a script can align several driver processes and sample server CPU over the same window;
//! without them: `warmup_s`, then `duration_s`. The result (with raw histogram buckets) goes
//! to `--out`; `scale-merge` adds several up ([`report`]).

mod member;
mod report;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::{Semaphore, watch};

use crate::client::{Target, Tokens, run_prefix};
use crate::procfs;
use crate::stats;
use report::*;
pub use report::{MergeArgs, merge};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// The nodes' HTTP base URLs; member m of every room connects to the (m mod n)-th.
    #[arg(long = "url", required = true, num_args = 1)]
    pub urls: Vec<String>,
    /// HS256 secret shared by the nodes (`LOCKSTEP_JWT_SECRET`); without it dev tokens are
    /// minted from the first node.
    #[arg(long)]
    pub jwt_secret: Option<String>,
    /// Rooms this process drives.
    #[arg(long, default_value_t = 500)]
    pub rooms: usize,
    /// Index of its first room (another process takes the next ones).
    #[arg(long, default_value_t = 0)]
    pub first_room: usize,
    #[arg(long, default_value_t = 20)]
    pub members: usize,
    /// Members per room that send cursors (the first ones).
    #[arg(long, default_value_t = 4)]
    pub cursor_senders: usize,
    #[arg(long, default_value_t = 2.0)]
    pub cursor_hz: f64,
    /// Seconds between two focus changes of one member.
    #[arg(long, default_value_t = 10.0)]
    pub presence_every_s: f64,
    /// Members per room that take locks (the last ones).
    #[arg(long, default_value_t = 5)]
    pub editors: usize,
    /// Seconds between two lock cycles of one editor.
    #[arg(long, default_value_t = 30.0)]
    pub lock_every_s: f64,
    #[arg(long, default_value_t = 2000)]
    pub lock_hold_ms: u64,
    /// `ttl_ms` asked with each acquire (well above the hold time).
    #[arg(long, default_value_t = 15_000)]
    pub lock_ttl_ms: u64,
    /// Resources per room the editors pick from (`segment:s{room}-{k}`).
    #[arg(long, default_value_t = 8)]
    pub lock_resources: usize,
    /// New connections per second during the ramp (this process).
    #[arg(long, default_value_t = 400.0)]
    pub connect_rate: f64,
    /// Handshakes + joins in flight at once during the ramp.
    #[arg(long, default_value_t = 64)]
    pub connect_concurrency: usize,
    /// The ramp gives up (the rest of the connections are not attempted, and counted as
    /// `ramp:abandoned` errors) after this many seconds, or once more than 5 % of the
    /// connections (at least 50) failed: the size does not fit, and the window shows what did.
    #[arg(long, default_value_t = 120)]
    pub ramp_timeout_s: u64,
    /// Written (empty) when every connection has joined or failed.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
    /// The measured window starts when this file exists (else after `warmup_s`).
    #[arg(long)]
    pub go_file: Option<PathBuf>,
    /// … and ends when this one exists (else after `duration_s`).
    #[arg(long)]
    pub stop_file: Option<PathBuf>,
    #[arg(long, default_value_t = 5)]
    pub warmup_s: u64,
    #[arg(long, default_value_t = 60)]
    pub duration_s: u64,
    /// Where to write the mergeable result (raw histograms); stdout gets the summary too.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Deadline for a connect + join, and for a lock answer (seconds).
    #[arg(long, default_value_t = 10)]
    pub timeout_secs: u64,
}

/// Everything the member tasks share: the clock, the window flag, the tallies.
struct Shared {
    args: Args,
    epoch: Instant,
    measuring: AtomicBool,
    counts: [AtomicU64; COUNTS.len()],
    hists: Mutex<Vec<hdrhistogram::Histogram<u64>>>,
    errors: Mutex<Tally>,
    lost: Mutex<Tally>,
    /// resource → member (global index) that holds it, per the driver's own view.
    held: Mutex<HashMap<String, usize>>,
    joined: AtomicUsize,
    failed: AtomicUsize,
    /// Connections the ramp gave up on before trying them.
    abandoned: AtomicUsize,
}

impl Shared {
    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    fn count(&self, i: usize) {
        if self.measuring.load(Ordering::Relaxed) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    fn record(&self, h: usize, us: u64) {
        if self.measuring.load(Ordering::Relaxed) {
            let mut hs = self.hists.lock().unwrap_or_else(|e| e.into_inner());
            let high = hs[h].high();
            hs[h].saturating_record(us.clamp(1, high));
        }
    }

    fn error(&self, kind: impl Into<String>) {
        bump(
            &mut self.errors.lock().unwrap_or_else(|e| e.into_inner()),
            kind,
        );
    }

    fn lost(&self, kind: impl Into<String>) {
        bump(
            &mut self.lost.lock().unwrap_or_else(|e| e.into_inner()),
            kind,
        );
    }
}

/// Who a member is.
#[derive(Clone, Copy)]
struct Spec {
    room: usize,
    member: usize,
    /// Index into the URLs (the node).
    node: usize,
    global: usize,
}

pub async fn run(args: Args) -> anyhow::Result<Value> {
    anyhow::ensure!(args.members >= 2, "--members must be at least 2");
    anyhow::ensure!(
        args.cursor_senders <= args.members && args.editors <= args.members,
        "--cursor-senders and --editors must not exceed --members"
    );
    anyhow::ensure!(
        args.lock_resources >= 1,
        "--lock-resources must be at least 1"
    );
    let targets: Vec<Target> = args
        .urls
        .iter()
        .map(|u| Target::new(u))
        .collect::<anyhow::Result<_>>()?;
    let tokens = Tokens::new(&targets[0], args.jwt_secret.as_deref())?;
    let n = args.rooms * args.members;
    let limit = procfs::fd_limit() as usize;
    anyhow::ensure!(
        n + 64 < limit,
        "{n} connections do not fit the open-files limit {limit}: split them over more processes"
    );
    let prefix = run_prefix("scale");
    let specs: Vec<Spec> = (0..n)
        .map(|i| {
            let (r, m) = (i / args.members, i % args.members);
            Spec {
                room: args.first_room + r,
                member: m,
                node: m % targets.len(),
                global: i,
            }
        })
        .collect();
    let subs = specs
        .iter()
        .map(|s| format!("{prefix}-r{}-m{}", s.room, s.member))
        .collect();
    let tokens = tokens.mint_all(subs, 32).await;

    let shared = Arc::new(Shared {
        args: args.clone(),
        epoch: Instant::now(),
        measuring: AtomicBool::new(false),
        counts: std::array::from_fn(|_| AtomicU64::new(0)),
        hists: Mutex::new(HISTS.iter().map(|_| stats::new_histogram()).collect()),
        errors: Mutex::new(Tally::new()),
        lost: Mutex::new(Tally::new()),
        held: Mutex::new(HashMap::new()),
        joined: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        abandoned: AtomicUsize::new(0),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let gate = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));

    // The ramp runs on its own task so the progress below keeps ticking.
    let ramp = {
        let shared = shared.clone();
        let targets = targets.clone();
        let rate = args.connect_rate.max(1.0);
        let deadline = Instant::now() + Duration::from_secs(args.ramp_timeout_s);
        let give_up = (n / 20).max(50);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut handles = Vec::with_capacity(specs.len());
            let total = specs.len();
            for (i, (spec, token)) in specs.into_iter().zip(tokens).enumerate() {
                tick.tick().await;
                let failed = shared.failed.load(Ordering::Relaxed);
                if failed > give_up || Instant::now() > deadline {
                    let rest = total - i;
                    eprintln!(
                        "scale: ramp abandoned after {i} of {total} connections ({failed} failed)"
                    );
                    *shared
                        .errors
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .entry("ramp:abandoned".into())
                        .or_default() += rest as u64;
                    shared.abandoned.store(rest, Ordering::Relaxed);
                    break;
                }
                let token = match token {
                    Ok(t) => t,
                    Err(e) => {
                        shared.error(e.kind());
                        shared.failed.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                };
                let permit = gate.clone().acquire_owned().await.expect("never closed");
                handles.push(tokio::spawn(member::member(
                    shared.clone(),
                    spec,
                    targets[spec.node].clone(),
                    token,
                    permit,
                    stop_rx.clone(),
                )));
            }
            handles
        })
    };
    let started = Instant::now();
    let mut last_note = Instant::now();
    loop {
        let (j, f) = (
            shared.joined.load(Ordering::Relaxed),
            shared.failed.load(Ordering::Relaxed),
        );
        if j + f + shared.abandoned.load(Ordering::Relaxed) >= n {
            break;
        }
        if last_note.elapsed() >= Duration::from_secs(5) {
            eprintln!("scale: ramp {j}/{n} joined, {f} failed");
            last_note = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let handles = ramp.await?;
    let ramp_s = started.elapsed().as_secs_f64();
    let joined = shared.joined.load(Ordering::Relaxed);
    eprintln!(
        "scale: rooms {}..{}: {joined}/{n} joined in {ramp_s:.1} s",
        args.first_room,
        args.first_room + args.rooms
    );
    if let Some(f) = &args.ready_file {
        std::fs::write(f, b"")?;
    }

    match &args.go_file {
        Some(f) => wait_for(f).await,
        None => tokio::time::sleep(Duration::from_secs(args.warmup_s)).await,
    }
    let cpu0 = self_cpu_s();
    let t0 = Instant::now();
    shared.measuring.store(true, Ordering::Relaxed);
    match &args.stop_file {
        Some(f) => wait_for(f).await,
        None => tokio::time::sleep(Duration::from_secs(args.duration_s)).await,
    }
    shared.measuring.store(false, Ordering::Relaxed);
    let window_s = t0.elapsed().as_secs_f64();
    let cpu = self_cpu_s() - cpu0;
    let rss = procfs::memory(None).map(|m| m.rss_kb).unwrap_or(0);

    // Wind down: holders release, everyone closes.
    let _ = stop_tx.send(true);
    for h in handles {
        if let Err(e) = h.await {
            eprintln!("scale: member task failed: {e}");
            shared.error("driver:panic");
        }
    }

    let mut part = Part::empty();
    part.planned = n as u64;
    part.connected = joined as u64;
    part.rooms = args.rooms as u64;
    part.ramp_s = ramp_s;
    part.window_s = window_s;
    part.processes = 1;
    part.driver_cpu_s = cpu;
    part.driver_rss_kb = rss;
    for (i, c) in shared.counts.iter().enumerate() {
        part.counts[i] = c.load(Ordering::Relaxed);
    }
    part.hists = std::mem::take(&mut *shared.hists.lock().unwrap_or_else(|e| e.into_inner()));
    part.errors = shared
        .errors
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    part.lost = shared
        .lost
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    part.workload = json!({
        "members_per_room": args.members,
        "cursor_senders_per_room": args.cursor_senders,
        "cursor_hz": args.cursor_hz,
        "presence_every_s": args.presence_every_s,
        "editors_per_room": args.editors,
        "lock_every_s": args.lock_every_s,
        "lock_hold_ms": args.lock_hold_ms,
        "lock_resources_per_room": args.lock_resources,
        "nodes": targets.len(),
    });
    let raw = part.to_raw();
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_vec(&raw)?)?;
    }
    let mut summary = part.summary();
    summary["raw"] = raw;
    Ok(summary)
}

async fn wait_for(f: &Path) {
    while !f.exists() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// This process's user + system CPU seconds so far.
fn self_cpu_s() -> f64 {
    // SAFETY: `ru` is a valid, writable rusage for the duration of the call.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0.0;
    }
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}
