//! The closed-loop harness shared by `locks` and `ping`: connect C clients, let each run a
//! [`Workload`] step by step (warm-up, then a measured phase that all clients start together),
//! and collect what they measured.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{StreamExt, stream};
use serde_json::json;
use tokio::sync::Barrier;

use crate::client::{Answer, ClientError, Conn, Target, Tokens};
use crate::stats::ErrorCounts;

/// Options every closed-loop benchmark takes.
#[derive(clap::Args, Debug, Clone)]
pub struct LoopArgs {
    /// The gateway's HTTP base URL. Repeat it to spread the clients over several nodes of
    /// one cluster: client i connects to the (i mod n)-th URL.
    #[arg(long = "url", default_value = "http://127.0.0.1:8080")]
    pub urls: Vec<String>,
    /// Sign HS256 user tokens with this secret (the gateway's `LOCKSTEP_JWT_SECRET`) instead
    /// of minting dev tokens over HTTP; needed whenever the gateway verifies JWTs.
    #[arg(long)]
    pub jwt_secret: Option<String>,
    /// Concurrent clients (one WebSocket session each, distinct users).
    #[arg(long, default_value_t = 20)]
    pub clients: usize,
    /// Measured iterations per client.
    #[arg(long, default_value_t = 2000)]
    pub iterations: u64,
    /// Unmeasured iterations per client before the measured phase.
    #[arg(long, default_value_t = 200)]
    pub warmup: u64,
    /// Per-client request rate limit (requests/s); 0 = closed loop, as fast as answers come.
    /// Useful against a server with its default 100 messages/s per session budget.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Deadline for any single answer (seconds); a client that hits it stops and is counted.
    #[arg(long, default_value_t = 10)]
    pub timeout_secs: u64,
}

impl LoopArgs {
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs.max(1))
    }

    /// The parsed `--url`s (at least one).
    pub fn targets(&self) -> anyhow::Result<Vec<Target>> {
        let t: Vec<Target> = self
            .urls
            .iter()
            .map(|u| Target::new(u))
            .collect::<anyhow::Result<_>>()?;
        anyhow::ensure!(!t.is_empty(), "no --url given");
        Ok(t)
    }

    /// Where tokens come from: signed locally with `--jwt-secret`, else the first node's
    /// `/v1/dev/token`.
    pub fn tokens(&self, targets: &[Target]) -> anyhow::Result<Tokens> {
        Tokens::new(&targets[0], self.jwt_secret.as_deref())
    }
}

/// One client's behaviour: a single step (e.g. acquire + release) per iteration.
pub trait Workload: Send + 'static {
    /// Runs one step; `measure` is false during warm-up. Server-side refusals are counted by
    /// the workload itself; an `Err` (timeout, closed socket) stops this client.
    fn step(
        &mut self,
        conn: &mut Conn,
        measure: bool,
    ) -> impl Future<Output = Result<(), ClientError>> + Send;
}

/// What one client did.
pub struct Driven<W> {
    pub workload: W,
    /// Start and end of its measured phase.
    pub start: Instant,
    pub end: Instant,
    /// Why it stopped early, if it did.
    pub aborted: Option<ClientError>,
    /// Frames it read that were not its own answers (room events).
    pub skipped: u64,
}

/// Connected clients with their index, and the errors met while connecting.
pub struct Connected {
    pub conns: Vec<(usize, Conn)>,
    pub errors: ErrorCounts,
    pub setup: Duration,
}

/// Gets tokens for `n` users `{prefix}-{i}`, connects client i to `targets[i % targets.len()]`
/// and, when `room` gives one, joins it to `room(i)` and waits for the join reply.
pub async fn connect_clients(
    targets: &[Target],
    minter: &Tokens,
    n: usize,
    prefix: &str,
    room: Option<&(dyn Fn(usize) -> String + Sync)>,
    timeout: Duration,
) -> anyhow::Result<Connected> {
    anyhow::ensure!(!targets.is_empty(), "no target to connect to");
    let started = Instant::now();
    let subs = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    let tokens = minter.mint_all(subs, 32).await;
    let mut errors = ErrorCounts::default();
    let jobs: Vec<(usize, String, Option<String>)> = tokens
        .into_iter()
        .enumerate()
        .filter_map(|(i, t)| match t {
            Ok(t) => Some((i, t, room.map(|r| r(i)))),
            Err(e) => {
                eprintln!("client {i}: {e}");
                errors.add(e.kind());
                None
            }
        })
        .collect();
    let results: Vec<(usize, Result<Conn, ClientError>)> = stream::iter(jobs)
        .map(|(i, token, room)| async move {
            let target = &targets[i % targets.len()];
            let r = async {
                let mut conn = Conn::connect(target, &token, timeout).await?;
                if let Some(room) = room {
                    join(&mut conn, &room, 1, timeout).await?;
                }
                Ok(conn)
            }
            .await;
            (i, r)
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let mut conns = Vec::with_capacity(n);
    for (i, r) in results {
        match r {
            Ok(c) => conns.push((i, c)),
            Err(e) => {
                eprintln!("client {i}: {e}");
                errors.add(e.kind());
            }
        }
    }
    conns.sort_by_key(|(i, _)| *i);
    Ok(Connected {
        conns,
        errors,
        setup: started.elapsed(),
    })
}

/// Joins `room` with request id `id`; a server `error` becomes `ClientError::Protocol`.
pub async fn join(
    conn: &mut Conn,
    room: &str,
    id: u32,
    timeout: Duration,
) -> Result<(), ClientError> {
    let msg = json!({ "type": "join", "id": id, "room": room });
    match conn.request(&msg, id, timeout, "join").await? {
        Answer::Ok(_) => Ok(()),
        Answer::Err { code, frame } => Err(ClientError::Protocol(format!(
            "join {room} refused ({code}): {}",
            frame["message"]
        ))),
    }
}

/// Runs `make(i)`'s workload on every connection: warm-up, a barrier, the measured phase, a
/// barrier (so nobody's leaving disturbs the others' measurement), then close.
pub async fn run_all<W, F>(conns: Vec<(usize, Conn)>, args: &LoopArgs, make: F) -> Vec<Driven<W>>
where
    W: Workload,
    F: Fn(usize) -> W,
{
    let barrier = Arc::new(Barrier::new(conns.len()));
    let mut handles = Vec::with_capacity(conns.len());
    for (i, conn) in conns {
        let w = make(i);
        let barrier = barrier.clone();
        let args = args.clone();
        handles.push(tokio::spawn(drive(conn, w, args, barrier)));
    }
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        match h.await {
            Ok(d) => out.push(d),
            // A panicking client is a bug in this tool; it must not hide the others' results.
            Err(e) => eprintln!("client task failed: {e}"),
        }
    }
    out
}

async fn drive<W: Workload>(
    mut conn: Conn,
    mut w: W,
    args: LoopArgs,
    barrier: Arc<Barrier>,
) -> Driven<W> {
    let mut pacer = (args.rate > 0.0).then(|| {
        let mut t = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate));
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    let mut aborted = None;
    for _ in 0..args.warmup {
        if let Some(p) = pacer.as_mut() {
            p.tick().await;
        }
        if let Err(e) = w.step(&mut conn, false).await {
            aborted = Some(e);
            break;
        }
    }
    barrier.wait().await;
    let start = Instant::now();
    if aborted.is_none() {
        for _ in 0..args.iterations {
            if let Some(p) = pacer.as_mut() {
                p.tick().await;
            }
            if let Err(e) = w.step(&mut conn, true).await {
                aborted = Some(e);
                break;
            }
        }
    }
    let end = Instant::now();
    barrier.wait().await;
    let skipped = conn.skipped;
    conn.close(Duration::from_secs(2)).await;
    Driven {
        workload: w,
        start,
        end,
        aborted,
        skipped,
    }
}

/// Fields every closed-loop result has: client and node counts, wall time of the measured phase,
/// errors (setup and run), aborted clients and skipped event frames.
pub fn common_report<W>(
    requested: usize,
    nodes: usize,
    connected: &Connected,
    driven: &[Driven<W>],
    errors: &mut ErrorCounts,
) -> (serde_json::Map<String, serde_json::Value>, f64) {
    errors.merge(&connected.errors);
    let mut aborted = 0;
    for d in driven {
        if let Some(e) = &d.aborted {
            eprintln!("client stopped early: {e}");
            errors.add(e.kind());
            aborted += 1;
        }
    }
    let start = driven.iter().map(|d| d.start).min();
    let end = driven.iter().map(|d| d.end).max();
    let elapsed = match (start, end) {
        (Some(s), Some(e)) => e.duration_since(s).as_secs_f64(),
        _ => 0.0,
    };
    let mut m = serde_json::Map::new();
    m.insert("clients".into(), json!(requested));
    m.insert("nodes".into(), json!(nodes));
    m.insert("clients_connected".into(), json!(driven.len()));
    m.insert("clients_aborted".into(), json!(aborted));
    m.insert(
        "setup_s".into(),
        json!(round3(connected.setup.as_secs_f64())),
    );
    m.insert("elapsed_s".into(), json!(round3(elapsed)));
    m.insert(
        "event_frames_received".into(),
        json!(driven.iter().map(|d| d.skipped).sum::<u64>()),
    );
    (m, elapsed)
}

pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
