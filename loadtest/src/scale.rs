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

mod report;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant as TokioInstant;

use crate::bench;
use crate::client::{ClientError, Conn, Target, Tokens, run_prefix};
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
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let gate = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));

    // The ramp runs on its own task so the progress below keeps ticking.
    let ramp = {
        let shared = shared.clone();
        let targets = targets.clone();
        let rate = args.connect_rate.max(1.0);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut handles = Vec::with_capacity(specs.len());
            for (spec, token) in specs.into_iter().zip(tokens) {
                tick.tick().await;
                let token = match token {
                    Ok(t) => t,
                    Err(e) => {
                        shared.error(e.kind());
                        shared.failed.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                };
                let permit = gate.clone().acquire_owned().await.expect("never closed");
                handles.push(tokio::spawn(member(
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
        if j + f >= n {
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

/// splitmix64: phases and resource picks, without a dependency.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A random point in `[0, period)`.
fn phase(seed: u64, period: Duration) -> Duration {
    let f = (mix(seed) >> 11) as f64 / (1u64 << 53) as f64;
    period.mul_f64(f)
}

/// Where an editor's lock cycle is.
enum Lock {
    /// Next acquire at this time.
    Idle(TokioInstant),
    Acquiring {
        id: u32,
        sent: Instant,
        resource: String,
    },
    Holding {
        resource: String,
        token: u64,
        until: TokioInstant,
    },
    Releasing {
        id: u32,
        sent: Instant,
    },
}

/// One member: connect and join (holding a ramp permit), then its schedule until `stop`.
async fn member(
    sh: Arc<Shared>,
    spec: Spec,
    target: Target,
    token: String,
    permit: OwnedSemaphorePermit,
    stop: watch::Receiver<bool>,
) {
    let a = &sh.args;
    let timeout = Duration::from_secs(a.timeout_secs.max(1));
    let room = format!("scene:scale-{}", spec.room);
    let joined = async {
        let mut conn = Conn::connect(&target, &token, timeout).await?;
        bench::join(&mut conn, &room, 1, timeout).await?;
        Ok::<_, ClientError>(conn)
    }
    .await;
    drop(permit);
    let conn = match joined {
        Ok(c) => {
            sh.joined.fetch_add(1, Ordering::Relaxed);
            c
        }
        Err(e) => {
            eprintln!("scale: {room} member {}: {e}", spec.member);
            sh.error(e.kind());
            sh.failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    if let Err(e) = member_loop(&sh, spec, &room, conn, stop, timeout).await {
        sh.error(e.kind());
    }
}

async fn member_loop(
    sh: &Shared,
    spec: Spec,
    room: &str,
    mut conn: Conn,
    mut stop: watch::Receiver<bool>,
    timeout: Duration,
) -> Result<(), ClientError> {
    let a = &sh.args;
    let seed = spec.global as u64;
    let now = TokioInstant::now();
    let cursor_every = Duration::from_secs_f64(1.0 / a.cursor_hz.max(0.001));
    let presence_every = Duration::from_secs_f64(a.presence_every_s.max(0.01));
    let lock_every = Duration::from_secs_f64(a.lock_every_s.max(0.01));
    let mut next_cursor =
        (spec.member < a.cursor_senders).then(|| now + phase(seed ^ 1, cursor_every));
    let mut next_presence = now + phase(seed ^ 2, presence_every);
    let editor = spec.member >= a.members - a.editors;
    let mut lock = editor.then(|| Lock::Idle(now + phase(seed ^ 3, lock_every)));
    let mut next_id: u32 = 1;
    let mut cycle: u64 = 0;
    let mut seq: u64 = 0;

    let due = |c: &Option<TokioInstant>, p: TokioInstant, l: &Option<Lock>| {
        let mut d = p;
        if let Some(c) = c {
            d = d.min(*c);
        }
        match l {
            Some(Lock::Idle(t)) => d = d.min(*t),
            Some(Lock::Holding { until, .. }) => d = d.min(*until),
            Some(Lock::Acquiring { sent, .. } | Lock::Releasing { sent, .. }) => {
                d = d.min(TokioInstant::from_std(*sent + timeout))
            }
            None => {}
        }
        d
    };
    let sleep = tokio::time::sleep_until(due(&next_cursor, next_presence, &lock));
    tokio::pin!(sleep);

    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            () = &mut sleep => {
                let now = TokioInstant::now();
                if let Some(t) = next_cursor.as_mut().filter(|t| **t <= now) {
                    let x = sh.now_us();
                    conn.send(&json!({ "type": "cursor", "room": room, "x": x, "y": spec.member }))
                        .await?;
                    sh.count(C_CURSORS_SENT);
                    *t += cursor_every;
                }
                if next_presence <= now {
                    seq += 1;
                    let focus = format!("segment:s{}-{}-{seq}-{}", spec.room, spec.member, sh.now_us());
                    conn.send(&json!({ "type": "presence", "room": room, "focus": focus })).await?;
                    sh.count(C_PRESENCE_SENT);
                    next_presence += presence_every;
                }
                if let Some(l) = lock.as_mut() {
                    step_lock(sh, spec, room, &mut conn, l, &mut next_id, &mut cycle, lock_every, timeout, now)
                        .await?;
                }
                sleep.as_mut().reset(due(&next_cursor, next_presence, &lock));
            }
            r = conn.recv() => {
                let frame = r?;
                let reset = on_frame(sh, spec, &frame, &mut lock, lock_every);
                if reset {
                    sleep.as_mut().reset(due(&next_cursor, next_presence, &lock));
                }
            }
        }
    }

    // Wind-down: a holder releases (unmeasured), so nobody hears `disconnected` for it.
    if let Some(Lock::Holding {
        resource, token, ..
    }) = &lock
    {
        forget(sh, resource, spec.global);
        let msg = json!({ "type": "lock.release", "id": 0x7fff_fff0u32, "room": room, "resource": resource, "token": token });
        if let Ok(crate::client::Answer::Err { code, .. }) = conn
            .request(&msg, 0x7fff_fff0, timeout, "lock.release")
            .await
        {
            sh.error(format!("server:{code}"));
        }
    }
    conn.close(Duration::from_secs(2)).await;
    Ok(())
}

/// Advances an editor's lock cycle when one of its times has come.
#[allow(clippy::too_many_arguments)]
async fn step_lock(
    sh: &Shared,
    spec: Spec,
    room: &str,
    conn: &mut Conn,
    l: &mut Lock,
    next_id: &mut u32,
    cycle: &mut u64,
    lock_every: Duration,
    timeout: Duration,
    now: TokioInstant,
) -> Result<(), ClientError> {
    let a = &sh.args;
    match l {
        Lock::Idle(t) if *t <= now => {
            *cycle += 1;
            let k = mix((spec.global as u64) << 20 ^ *cycle) % a.lock_resources as u64;
            let resource = format!("segment:s{}-{k}", spec.room);
            *next_id = next_id.wrapping_add(1).max(2);
            let msg = json!({
                "type": "lock.acquire", "id": *next_id, "room": room, "resource": resource,
                "action": "approve", "ttl_ms": a.lock_ttl_ms,
            });
            let sent = Instant::now();
            conn.send(&msg).await?;
            sh.count(C_ACQUIRES);
            *l = Lock::Acquiring {
                id: *next_id,
                sent,
                resource,
            };
        }
        Lock::Holding {
            resource,
            token,
            until,
        } if *until <= now => {
            forget(sh, resource, spec.global);
            *next_id = next_id.wrapping_add(1).max(2);
            let msg = json!({
                "type": "lock.release", "id": *next_id, "room": room, "resource": resource, "token": *token,
            });
            let sent = Instant::now();
            conn.send(&msg).await?;
            sh.count(C_RELEASES);
            *l = Lock::Releasing { id: *next_id, sent };
        }
        Lock::Acquiring { sent, .. } | Lock::Releasing { sent, .. }
            if now.into_std() >= *sent + timeout =>
        {
            sh.error(match l {
                Lock::Acquiring { .. } => "timeout:lock.acquire",
                _ => "timeout:lock.release",
            });
            *l = Lock::Idle(now + lock_every);
        }
        _ => {}
    }
    Ok(())
}

/// Drops `resource` from the driver's view if `who` holds it there.
fn forget(sh: &Shared, resource: &str, who: usize) {
    let mut held = sh.held.lock().unwrap_or_else(|e| e.into_inner());
    if held.get(resource) == Some(&who) {
        held.remove(resource);
    }
}

/// Handles one frame; true when the lock cycle moved (its next time changed).
fn on_frame(sh: &Shared, spec: Spec, f: &Value, lock: &mut Option<Lock>, every: Duration) -> bool {
    sh.count(C_FRAMES);
    let kind = f["type"].as_str().unwrap_or("");
    match kind {
        "cursor" => {
            sh.count(C_CURSORS_DELIVERED);
            let (Some(x), Some(from)) = (f["x"].as_f64(), member_of(f["user_id"].as_str())) else {
                sh.error("protocol:cursor");
                return false;
            };
            let us = sh.now_us().saturating_sub(x as u64);
            let cross = from % sh.args.urls.len() != spec.node;
            sh.record(if cross { H_CURSOR_CROSS } else { H_CURSOR_SAME }, us);
            false
        }
        "presence.update" => {
            let m = &f["member"];
            let from = member_of(m["user_id"].as_str());
            // segment:s{room}-{member}-{seq}-{µs}
            let at = m["focus"]
                .as_str()
                .and_then(|s| s.rsplit('-').next())
                .and_then(|s| s.parse::<u64>().ok());
            if let (Some(from), Some(at)) = (from, at)
                && from != spec.member
            {
                sh.count(C_PRESENCE_DELIVERED);
                let cross = from % sh.args.urls.len() != spec.node;
                let us = sh.now_us().saturating_sub(at);
                sh.record(
                    if cross {
                        H_PRESENCE_CROSS
                    } else {
                        H_PRESENCE_SAME
                    },
                    us,
                );
            } else {
                sh.count(C_OTHER);
            }
            false
        }
        "lock.acquired" | "lock.released" => {
            sh.count(C_LOCK_EVENTS);
            // A holder hearing its lock end for a reason other than its own release lost it.
            // (`released` is left out: the previous holder's release may reach the room after
            // this member's grant, which comes straight from its node.)
            if kind == "lock.released"
                && let Some(Lock::Holding { resource, .. }) = lock.as_ref()
                && f["resource"].as_str() == Some(resource)
                && f["reason"].as_str() != Some("released")
            {
                let why = f["reason"].as_str().unwrap_or("?");
                sh.lost(format!("released:{why}"));
                forget(sh, resource, spec.global);
                *lock = Some(Lock::Idle(TokioInstant::now() + every));
                return true;
            }
            false
        }
        "reply" | "error" => on_answer(sh, spec, f, lock, every),
        "reconnect" => {
            sh.error("server:reconnect");
            false
        }
        _ => {
            sh.count(C_OTHER);
            false
        }
    }
}

/// A `reply` or `error`: the answer to this member's lock request, or an error to count.
fn on_answer(sh: &Shared, spec: Spec, f: &Value, lock: &mut Option<Lock>, every: Duration) -> bool {
    let id = f["id"].as_u64();
    let code = f["code"].as_str();
    let Some(l) = lock.as_mut() else {
        if let Some(c) = code {
            sh.error(format!("server:{c}"));
        }
        return false;
    };
    match l {
        Lock::Acquiring {
            id: want,
            sent,
            resource,
        } if id == Some(u64::from(*want)) => {
            sh.record(H_ACQUIRE, sent.elapsed().as_micros() as u64);
            let next = TokioInstant::from_std(*sent) + every;
            match (code, f["token"].as_u64()) {
                (None, Some(token)) => {
                    sh.count(C_GRANTS);
                    let mut held = sh.held.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(prev) = held.insert(resource.clone(), spec.global)
                        && prev != spec.global
                    {
                        sh.lost("overlap:previous_holder_never_released");
                    }
                    drop(held);
                    let until = TokioInstant::now() + Duration::from_millis(sh.args.lock_hold_ms);
                    *l = Lock::Holding {
                        resource: std::mem::take(resource),
                        token,
                        until,
                    };
                }
                (Some("lock_held"), _) => {
                    sh.count(C_HELD);
                    *l = Lock::Idle(next);
                }
                (Some(c), _) => {
                    sh.error(format!("server:{c}"));
                    *l = Lock::Idle(next);
                }
                (None, None) => {
                    sh.error("protocol:grant_without_token");
                    *l = Lock::Idle(next);
                }
            }
            true
        }
        Lock::Releasing { id: want, sent } if id == Some(u64::from(*want)) => {
            sh.record(H_RELEASE, sent.elapsed().as_micros() as u64);
            if let Some(c) = code {
                // The server did not know us as the holder any more: the lock was lost.
                sh.error(format!("server:{c}"));
                sh.lost(format!("release_refused:{c}"));
            }
            // Cycles are every `every` from the acquire; the hold is much shorter.
            let hold = Duration::from_millis(sh.args.lock_hold_ms);
            *l = Lock::Idle(TokioInstant::now() + every.saturating_sub(hold));
            true
        }
        _ => {
            if let Some(c) = code {
                sh.error(format!("server:{c}"));
            }
            false
        }
    }
}

/// The member index in a user id `…-r{room}-m{member}`.
fn member_of(user_id: Option<&str>) -> Option<usize> {
    user_id?.rsplit("-m").next()?.parse().ok()
}
