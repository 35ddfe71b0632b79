//! `crossnode`: what a second node costs. Run against two gateway nodes sharing one Redis
//! (`LOCKSTEP_REDIS_URL`, a shared `LOCKSTEP_JWT_SECRET`):
//!
//! - `cursor` / `presence`: `--pairs` senders and `--listeners` passive members on the first
//!   `--url` (node A), `--pairs` receivers on the second (node B), all in one room
//!   (`scene:crossnode`). Sender i sends a `cursor` (`x` = its sequence number, `y` = i) or a
//!   `presence` focus change (`focus: segment:cn-{i}-{seq}`); every passive member that gets
//!   the resulting `cursor` / `presence.update` looks up when that (sender, seq) was sent and
//!   records the delay. Receivers on B give the cross-node latency, listeners on A the
//!   same-node latency (in Redis mode a node's own events also go through Redis pub/sub).
//!   Sender i sends its next message only once receiver i has the previous one (one in flight
//!   per sender, so latest-wins cursor coalescing never drops a measured message on its way to
//!   B), optionally paced with `--rate`. Senders read their sockets too, but record nothing:
//!   a member that is busy sending would add its own delay.
//! - `locks`: the `locks` benchmark with its clients spread over the `--url`s (two or more).
//! - `set`: the floor a Redis-backed lock cannot beat: closed-loop `SET key val NX PX ttl`
//!   followed by `DEL key`, straight to Redis over a plain RESP connection per client.
//!
//! Latencies are taken with one process-wide monotonic clock, so sender and receiver times
//! compare directly (client and nodes run on one machine).

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufStream};
use tokio::net::TcpStream;
use tokio::sync::{Barrier, mpsc, oneshot, watch};

use crate::bench::{self, round3};
use crate::client::{ClientError, Conn, Target, Tokens, run_prefix};
use crate::locks;
use crate::stats::{self, ErrorCounts};

/// The room every fan-out client joins.
const ROOM: &str = "scene:crossnode";

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub measure: Measure,
}

#[derive(clap::Subcommand, Debug)]
pub enum Measure {
    /// `cursor` on node A → `cursor` frame on node B.
    Cursor(FanArgs),
    /// `presence {room, focus}` on node A → `presence.update` on node B.
    Presence(FanArgs),
    /// `lock.acquire` + `lock.release` loops with the clients spread over the nodes.
    Locks(locks::Args),
    /// `SET key val NX PX ttl` + `DEL key` round trips straight to Redis.
    Set(SetArgs),
}

#[derive(clap::Args, Debug, Clone)]
pub struct FanArgs {
    /// Node A (senders), then node B (receivers): exactly two HTTP base URLs.
    #[arg(long = "url", required = true, num_args = 1)]
    pub urls: Vec<String>,
    /// HS256 secret shared by the nodes (`LOCKSTEP_JWT_SECRET`); without it dev tokens are
    /// minted from node A, which only works when both nodes run without a JWT verifier.
    #[arg(long)]
    pub jwt_secret: Option<String>,
    /// Sender/receiver pairs: `pairs` senders on A and `pairs` receivers on B.
    #[arg(long, default_value_t = 10)]
    pub pairs: usize,
    /// Passive members on A, for the same-node figures; default: as many as `pairs`.
    #[arg(long)]
    pub listeners: Option<usize>,
    /// Measured messages per sender.
    #[arg(long, default_value_t = 1000)]
    pub iterations: u64,
    /// Unmeasured messages per sender first.
    #[arg(long, default_value_t = 100)]
    pub warmup: u64,
    /// Messages per second per sender (still one in flight); 0 = next as soon as the
    /// partner received the previous one.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Deadline for one message to reach the sender's partner (seconds); a sender that hits
    /// it stops and is counted.
    #[arg(long, default_value_t = 10)]
    pub timeout_secs: u64,
}

#[derive(clap::Args, Debug, Clone)]
pub struct SetArgs {
    /// The Redis the nodes share (`redis://host:port`; no auth, no TLS).
    #[arg(long)]
    pub redis_url: String,
    /// Concurrent clients, one TCP connection and one key each.
    #[arg(long, default_value_t = 20)]
    pub clients: usize,
    /// Measured SET NX + DEL pairs per client.
    #[arg(long, default_value_t = 2000)]
    pub iterations: u64,
    /// Unmeasured pairs per client first.
    #[arg(long, default_value_t = 200)]
    pub warmup: u64,
    /// `PX` of the SET, like a lock's TTL.
    #[arg(long, default_value_t = 30_000)]
    pub ttl_ms: u64,
    /// Deadline for one reply (seconds).
    #[arg(long, default_value_t = 10)]
    pub timeout_secs: u64,
}

pub async fn run(args: Args) -> anyhow::Result<Value> {
    match args.measure {
        Measure::Cursor(a) => fan(a, Kind::Cursor).await,
        Measure::Presence(a) => fan(a, Kind::Presence).await,
        Measure::Locks(a) => {
            anyhow::ensure!(
                a.common.urls.len() >= 2,
                "crossnode locks wants two or more --url (one per node)"
            );
            let mut out = locks::run(a).await?;
            out["crossnode"] = json!(true);
            Ok(out)
        }
        Measure::Set(a) => set(a).await,
    }
}

// ---------------------------------------------------------------------------------------------
// cursor / presence fan-out

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Cursor,
    Presence,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Cursor => "cursor",
            Kind::Presence => "presence",
        }
    }
}

/// When sender i sent its message `seq` (set just before the send).
struct SendTimes {
    slots: Vec<Vec<OnceLock<Instant>>>,
}

impl SendTimes {
    fn sent_at(&self, sender: usize, seq: u64) -> Option<Instant> {
        self.slots.get(sender)?.get(seq as usize)?.get().copied()
    }
}

/// What one member recorded.
struct Seen {
    /// Latencies of messages from senders on the other node.
    cross: Histogram<u64>,
    /// Latencies of messages from senders on the same node (listeners only).
    same: Histogram<u64>,
    /// Frames of the measured kind that named no known (sender, seq).
    unmatched: u64,
    errors: ErrorCounts,
    /// Why it stopped early, if it did.
    aborted: Option<ClientError>,
}

impl Seen {
    fn new() -> Seen {
        Seen {
            cross: stats::new_histogram(),
            same: stats::new_histogram(),
            unmatched: 0,
            errors: ErrorCounts::default(),
            aborted: None,
        }
    }
}

/// The static part of every member's loop.
struct Shared {
    kind: Kind,
    prefix: String,
    warmup: u64,
    times: SendTimes,
}

impl Shared {
    /// `(sender index, seq)` of a frame of the measured kind from one of our senders.
    fn decode(&self, frame: &Value) -> Option<(usize, u64)> {
        match self.kind {
            Kind::Cursor => {
                if frame["type"] != "cursor" {
                    return None;
                }
                let sender = sender_index(&self.prefix, frame["user_id"].as_str()?)?;
                let seq = frame["x"].as_f64()?;
                Some((sender, seq as u64))
            }
            Kind::Presence => {
                if frame["type"] != "presence.update" {
                    return None;
                }
                let member = &frame["member"];
                let sender = sender_index(&self.prefix, member["user_id"].as_str()?)?;
                // segment:cn-{i}-{seq}
                let focus = member["focus"].as_str()?;
                let seq = focus.rsplit('-').next()?.parse().ok()?;
                Some((sender, seq))
            }
        }
    }

    /// Handles one frame read by a member at `place`. Returns `(sender, seq)` of a message of
    /// the measured kind.
    fn observe(&self, frame: &Value, place: Place, seen: &mut Seen) -> Option<(usize, u64)> {
        if frame["type"] == "error" {
            seen.errors
                .add(format!("server:{}", frame["code"].as_str().unwrap_or("?")));
            return None;
        }
        let at = Instant::now();
        let (sender, seq) = self.decode(frame)?;
        let Some(sent) = self.times.sent_at(sender, seq) else {
            seen.unmatched += 1;
            return None;
        };
        if seq >= self.warmup {
            let delay = at.saturating_duration_since(sent);
            match place {
                // Senders are all on A.
                Place::ListenerA => stats::record(&mut seen.same, delay),
                Place::ReceiverB => stats::record(&mut seen.cross, delay),
                Place::Sender => {}
            }
        }
        Some((sender, seq))
    }
}

/// Who is reading.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Place {
    /// A sender on A (busy sending: records nothing).
    Sender,
    /// A passive member on A.
    ListenerA,
    /// A passive member on B.
    ReceiverB,
}

fn listener_name(prefix: &str, i: usize) -> String {
    format!("{prefix}-l{i}")
}

fn sender_name(prefix: &str, i: usize) -> String {
    format!("{prefix}-a{i}")
}

fn receiver_name(prefix: &str, i: usize) -> String {
    format!("{prefix}-b{i}")
}

fn sender_index(prefix: &str, user_id: &str) -> Option<usize> {
    user_id
        .strip_prefix(prefix)?
        .strip_prefix("-a")?
        .parse()
        .ok()
}

fn message(kind: Kind, i: usize, seq: u64) -> Value {
    match kind {
        // No `id`: fire and forget, as a browser sends cursors (no `reply` comes back).
        Kind::Cursor => json!({ "type": "cursor", "room": ROOM, "x": seq, "y": i }),
        Kind::Presence => {
            json!({ "type": "presence", "room": ROOM, "focus": format!("segment:cn-{i}-{seq}") })
        }
    }
}

async fn fan(args: FanArgs, kind: Kind) -> anyhow::Result<Value> {
    anyhow::ensure!(
        args.urls.len() == 2,
        "{} wants exactly two --url: node A (senders), then node B (receivers)",
        kind.name()
    );
    anyhow::ensure!(args.pairs >= 1, "--pairs must be at least 1");
    let targets: Vec<Target> = args
        .urls
        .iter()
        .map(|u| Target::new(u))
        .collect::<anyhow::Result<_>>()?;
    let tokens = Tokens::new(&targets[0], args.jwt_secret.as_deref())?;
    let timeout = Duration::from_secs(args.timeout_secs.max(1));
    let pairs = args.pairs;
    let listeners = args.listeners.unwrap_or(pairs);
    let total = args.warmup + args.iterations;
    let prefix = run_prefix("crossnode");
    let started = Instant::now();

    // Receivers on B and listeners on A first, then senders on A: everyone is in the room
    // before anything is sent.
    let mut errors = ErrorCounts::default();
    let mut receivers = Vec::with_capacity(pairs);
    let mut listening = Vec::with_capacity(listeners);
    let mut senders = Vec::with_capacity(pairs);
    for (node, names, out) in [
        (
            &targets[1],
            (0..pairs)
                .map(|i| receiver_name(&prefix, i))
                .collect::<Vec<_>>(),
            &mut receivers,
        ),
        (
            &targets[0],
            (0..listeners).map(|i| listener_name(&prefix, i)).collect(),
            &mut listening,
        ),
        (
            &targets[0],
            (0..pairs).map(|i| sender_name(&prefix, i)).collect(),
            &mut senders,
        ),
    ] {
        for (i, token) in tokens.mint_all(names, 32).await.into_iter().enumerate() {
            let r = async {
                let token = token?;
                let mut conn = Conn::connect(node, &token, timeout).await?;
                bench::join(&mut conn, ROOM, 1, timeout).await?;
                Ok::<_, ClientError>(conn)
            }
            .await;
            match r {
                Ok(c) => out.push(c),
                Err(e) => {
                    eprintln!("{}: client {i}: {e}", kind.name());
                    errors.add(e.kind());
                }
            }
        }
    }
    anyhow::ensure!(
        receivers.len() == pairs && senders.len() == pairs && listening.len() == listeners,
        "{} of {} clients connected: {}",
        receivers.len() + senders.len() + listening.len(),
        2 * pairs + listeners,
        errors.to_json()
    );
    let setup = started.elapsed();
    eprintln!(
        "{}: {pairs} senders and {listeners} listeners on {}, {pairs} receivers on {} joined {ROOM}",
        kind.name(),
        args.urls[0],
        args.urls[1]
    );

    let shared = Arc::new(Shared {
        kind,
        prefix: prefix.clone(),
        warmup: args.warmup,
        times: SendTimes {
            slots: (0..pairs)
                .map(|_| (0..total).map(|_| OnceLock::new()).collect())
                .collect(),
        },
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let barrier = Arc::new(Barrier::new(pairs));

    let mut acks = Vec::with_capacity(pairs);
    let mut recv_tasks = Vec::with_capacity(pairs);
    for (i, conn) in receivers.into_iter().enumerate() {
        let (tx, rx) = mpsc::unbounded_channel();
        acks.push(rx);
        recv_tasks.push(tokio::spawn(member(
            conn,
            shared.clone(),
            Place::ReceiverB,
            Some((i, tx)),
            stop_rx.clone(),
        )));
    }
    for conn in listening {
        recv_tasks.push(tokio::spawn(member(
            conn,
            shared.clone(),
            Place::ListenerA,
            None,
            stop_rx.clone(),
        )));
    }
    let mut send_tasks = Vec::with_capacity(pairs);
    let mut done = Vec::with_capacity(pairs);
    for ((i, conn), ack) in senders.into_iter().enumerate().zip(acks) {
        let (done_tx, done_rx) = oneshot::channel();
        done.push(done_rx);
        let links = SenderLinks {
            ack,
            done: done_tx,
            barrier: barrier.clone(),
            stop: stop_rx.clone(),
        };
        send_tasks.push(tokio::spawn(sender(
            conn,
            i,
            links,
            shared.clone(),
            args.clone(),
        )));
    }

    // Senders report when they have sent everything, then keep reading until `stop`.
    for d in done {
        let _ = d.await;
    }
    // Let the last fan-out arrive everywhere, then stop every reader.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = stop_tx.send(true);
    let mut seen = Vec::with_capacity(2 * pairs + listeners);
    let mut first_start: Option<Instant> = None;
    let mut last_end: Option<Instant> = None;
    for t in send_tasks {
        match t.await {
            Ok((s, start, end)) => {
                first_start = Some(first_start.map_or(start, |f| f.min(start)));
                last_end = Some(last_end.map_or(end, |l| l.max(end)));
                seen.push(s);
            }
            Err(e) => eprintln!("sender task failed: {e}"),
        }
    }
    for t in recv_tasks {
        match t.await {
            Ok(s) => seen.push(s),
            Err(e) => eprintln!("receiver task failed: {e}"),
        }
    }

    let mut cross = stats::new_histogram();
    let mut same = stats::new_histogram();
    let mut unmatched = 0;
    let mut aborted = 0;
    for s in &seen {
        cross.add(&s.cross)?;
        same.add(&s.same)?;
        unmatched += s.unmatched;
        errors.merge(&s.errors);
        if let Some(e) = &s.aborted {
            eprintln!("client stopped early: {e}");
            errors.add(e.kind());
            aborted += 1;
        }
    }
    let elapsed = match (first_start, last_end) {
        (Some(s), Some(e)) => e.duration_since(s).as_secs_f64(),
        _ => 0.0,
    };
    let measured = pairs as u64 * args.iterations;
    Ok(json!({
        "mode": "crossnode",
        "measure": kind.name(),
        "pairs": pairs,
        "listeners": listeners,
        "room_members": 2 * pairs + listeners,
        "iterations": args.iterations,
        "warmup": args.warmup,
        "rate_per_sender": args.rate,
        "setup_s": round3(setup.as_secs_f64()),
        "elapsed_s": round3(elapsed),
        "messages_sent": measured,
        "messages_per_s": if elapsed > 0.0 { round3(measured as f64 / elapsed) } else { 0.0 },
        // Every measured message should reach all `pairs` receivers on B and all `listeners`
        // on A: a `count` below that means coalesced (latest-wins cursors) or lost.
        "deliveries_cross_expected": measured * pairs as u64,
        "deliveries_same_expected": measured * listeners as u64,
        "cross_node_us": stats::summary(&cross),
        "same_node_us": stats::summary(&same),
        "unmatched_frames": unmatched,
        "clients_aborted": aborted,
        "errors_total": errors.total(),
        "errors": errors.to_json(),
    }))
}

/// How a sender is tied to the rest of the run.
struct SenderLinks {
    /// Seqs of this sender's messages as its partner receives them.
    ack: mpsc::UnboundedReceiver<u64>,
    /// Told when the last message has arrived.
    done: oneshot::Sender<()>,
    /// All senders start together.
    barrier: Arc<Barrier>,
    /// Stop reading.
    stop: watch::Receiver<bool>,
}

/// A sender on A: waits for every sender to be ready, then sends `warmup + iterations`
/// messages, each once its partner (receiver i on B) has the previous one, reading its own
/// socket all along (it gets the other senders' messages, and records none of them).
async fn sender(
    mut conn: Conn,
    i: usize,
    links: SenderLinks,
    shared: Arc<Shared>,
    args: FanArgs,
) -> (Seen, Instant, Instant) {
    let SenderLinks {
        mut ack,
        done,
        barrier,
        mut stop,
    } = links;
    let mut seen = Seen::new();
    let timeout = Duration::from_secs(args.timeout_secs.max(1));
    let mut pacer = (args.rate > 0.0).then(|| {
        let mut t = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate));
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    barrier.wait().await;
    let start = Instant::now();
    let total = args.warmup + args.iterations;
    'outer: for seq in 0..total {
        if let Some(p) = pacer.as_mut() {
            // Keep reading while waiting for the tick.
            let tick = p.tick();
            tokio::pin!(tick);
            loop {
                tokio::select! {
                    _ = &mut tick => break,
                    f = conn.recv() => match f {
                        Ok(f) => { shared.observe(&f, Place::Sender, &mut seen); }
                        Err(e) => { seen.aborted = Some(e); break 'outer; }
                    },
                }
            }
        }
        let _ = shared.times.slots[i][seq as usize].set(Instant::now());
        if let Err(e) = conn.send(&message(shared.kind, i, seq)).await {
            seen.aborted = Some(e);
            break;
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                a = ack.recv() => match a {
                    Some(s) if s >= seq => break,
                    Some(_) => {}
                    None => { seen.aborted = Some(ClientError::Closed("partner gone".into())); break 'outer; }
                },
                f = conn.recv() => match f {
                    Ok(f) => { shared.observe(&f, Place::Sender, &mut seen); }
                    Err(e) => { seen.aborted = Some(e); break 'outer; }
                },
                _ = &mut deadline => {
                    seen.aborted = Some(ClientError::Timeout("partner receipt"));
                    break 'outer;
                }
            }
        }
    }
    let end = Instant::now();
    let _ = done.send(());
    // Keep reading (the others may still be sending) until everyone is done.
    let _ = drain(
        &mut conn,
        &shared,
        Place::Sender,
        &mut seen,
        None,
        &mut stop,
    )
    .await;
    conn.close(Duration::from_secs(2)).await;
    (seen, start, end)
}

/// A member that only reads (receivers on B, listeners on A): records every measured message and tells
/// its partner sender when that sender's message arrived.
async fn member(
    mut conn: Conn,
    shared: Arc<Shared>,
    place: Place,
    partner: Option<(usize, mpsc::UnboundedSender<u64>)>,
    mut stop: watch::Receiver<bool>,
) -> Seen {
    let mut seen = Seen::new();
    if let Err(e) = drain(&mut conn, &shared, place, &mut seen, partner, &mut stop).await {
        seen.aborted = Some(e);
    }
    conn.close(Duration::from_secs(2)).await;
    seen
}

async fn drain(
    conn: &mut Conn,
    shared: &Shared,
    place: Place,
    seen: &mut Seen,
    partner: Option<(usize, mpsc::UnboundedSender<u64>)>,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), ClientError> {
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        tokio::select! {
            _ = stop.changed() => return Ok(()),
            f = conn.recv() => {
                let f = f?;
                if let Some((sender, seq)) = shared.observe(&f, place, seen)
                    && let Some((me, tx)) = &partner
                    && *me == sender
                {
                    let _ = tx.send(seq);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// SET NX + DEL straight to Redis

/// One client's SET NX / DEL loop.
struct SetLoop {
    set: Histogram<u64>,
    del: Histogram<u64>,
    /// SETs answered nil (key still there): must stay 0, each key has one client.
    not_set: u64,
    errors: ErrorCounts,
    aborted: Option<String>,
    start: Instant,
    end: Instant,
}

async fn set(args: SetArgs) -> anyhow::Result<Value> {
    let addr = redis_addr(&args.redis_url)?;
    let timeout = Duration::from_secs(args.timeout_secs.max(1));
    let prefix = run_prefix("setnx");
    let barrier = Arc::new(Barrier::new(args.clients));
    let mut tasks = Vec::with_capacity(args.clients);
    for i in 0..args.clients {
        let stream = TcpStream::connect(&addr).await?;
        stream.set_nodelay(true)?;
        let mut io = BufStream::new(stream);
        let key = format!("lockstep-load:{prefix}:{i}");
        let barrier = barrier.clone();
        let args = args.clone();
        let prefix = prefix.clone();
        tasks.push(tokio::spawn(async move {
            let mut l = SetLoop {
                set: stats::new_histogram(),
                del: stats::new_histogram(),
                not_set: 0,
                errors: ErrorCounts::default(),
                aborted: None,
                start: Instant::now(),
                end: Instant::now(),
            };
            let ttl = args.ttl_ms.to_string();
            for n in 0..args.warmup {
                if let Err(e) = set_del(&mut io, &key, &value(&prefix, i, n), &ttl, timeout).await {
                    l.aborted = Some(e);
                    break;
                }
            }
            barrier.wait().await;
            l.start = Instant::now();
            if l.aborted.is_none() {
                for n in 0..args.iterations {
                    let val = value(&prefix, i, args.warmup + n);
                    match set_del(&mut io, &key, &val, &ttl, timeout).await {
                        Ok((r, d, set_t, del_t)) => {
                            match r {
                                Reply::Simple(s) if s == "OK" => {}
                                Reply::Nil => l.not_set += 1,
                                other => l.errors.add(format!("set:{other:?}")),
                            }
                            if !matches!(d, Reply::Int(_)) {
                                l.errors.add(format!("del:{d:?}"));
                            }
                            stats::record(&mut l.set, set_t);
                            stats::record(&mut l.del, del_t);
                        }
                        Err(e) => {
                            l.aborted = Some(e);
                            break;
                        }
                    }
                }
            }
            l.end = Instant::now();
            barrier.wait().await;
            l
        }));
    }
    let mut set_h = stats::new_histogram();
    let mut del_h = stats::new_histogram();
    let mut errors = ErrorCounts::default();
    let (mut not_set, mut aborted) = (0, 0);
    let (mut first, mut last): (Option<Instant>, Option<Instant>) = (None, None);
    for t in tasks {
        let l = t.await?;
        set_h.add(&l.set)?;
        del_h.add(&l.del)?;
        errors.merge(&l.errors);
        not_set += l.not_set;
        if let Some(e) = l.aborted {
            eprintln!("set client stopped early: {e}");
            errors.add("io");
            aborted += 1;
        }
        first = Some(first.map_or(l.start, |f| f.min(l.start)));
        last = Some(last.map_or(l.end, |x| x.max(l.end)));
    }
    let elapsed = match (first, last) {
        (Some(s), Some(e)) => e.duration_since(s).as_secs_f64(),
        _ => 0.0,
    };
    Ok(json!({
        "mode": "crossnode",
        "measure": "set",
        "clients": args.clients,
        "iterations": args.iterations,
        "warmup": args.warmup,
        "ttl_ms": args.ttl_ms,
        "elapsed_s": round3(elapsed),
        "sets_per_s": if elapsed > 0.0 { round3(set_h.len() as f64 / elapsed) } else { 0.0 },
        "set_nx_us": stats::summary(&set_h),
        "del_us": stats::summary(&del_h),
        "set_not_set": not_set,
        "clients_aborted": aborted,
        "errors_total": errors.total(),
        "errors": errors.to_json(),
    }))
}

/// A value about the size of a lock holder's token.
fn value(prefix: &str, client: usize, n: u64) -> String {
    format!("{prefix}-{client}-{n}")
}

/// `SET key val NX PX ttl`, then `DEL key`: both replies and both round-trip times.
async fn set_del(
    io: &mut BufStream<TcpStream>,
    key: &str,
    val: &str,
    ttl: &str,
    timeout: Duration,
) -> Result<(Reply, Reply, Duration, Duration), String> {
    let t0 = Instant::now();
    let r = resp(io, &["SET", key, val, "NX", "PX", ttl], timeout).await?;
    let t1 = Instant::now();
    let d = resp(io, &["DEL", key], timeout).await?;
    let t2 = Instant::now();
    Ok((r, d, t1 - t0, t2 - t1))
}

/// `host:port` of a `redis://host:port[/db]` URL.
fn redis_addr(url: &str) -> anyhow::Result<String> {
    let rest = url
        .strip_prefix("redis://")
        .ok_or_else(|| anyhow::anyhow!("--redis-url must be redis://host:port (got {url})"))?;
    let hostport = rest.split('/').next().unwrap_or_default();
    anyhow::ensure!(
        !hostport.contains('@'),
        "--redis-url with credentials is not supported"
    );
    Ok(if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:6379")
    })
}

/// The RESP replies this loop can get (unexpected ones are tallied by their `Debug` form).
#[derive(Debug)]
#[allow(dead_code)]
enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Nil,
    Bulk(Vec<u8>),
}

/// Sends one command and reads its reply.
async fn resp(
    io: &mut BufStream<TcpStream>,
    args: &[&str],
    timeout: Duration,
) -> Result<Reply, String> {
    let mut cmd = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        cmd.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        cmd.extend_from_slice(a.as_bytes());
        cmd.extend_from_slice(b"\r\n");
    }
    let work = async {
        io.write_all(&cmd).await.map_err(|e| e.to_string())?;
        io.flush().await.map_err(|e| e.to_string())?;
        let mut line = String::new();
        let n = io.read_line(&mut line).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("redis closed the connection".to_owned());
        }
        let line = line.trim_end_matches("\r\n");
        let (tag, body) = line.split_at(1.min(line.len()));
        match tag {
            "+" => Ok(Reply::Simple(body.to_owned())),
            "-" => Ok(Reply::Error(body.to_owned())),
            ":" => body.parse().map(Reply::Int).map_err(|e| e.to_string()),
            "$" => {
                let len: i64 = body
                    .parse()
                    .map_err(|e: std::num::ParseIntError| e.to_string())?;
                if len < 0 {
                    return Ok(Reply::Nil);
                }
                let mut buf = vec![0; len as usize + 2];
                io.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
                buf.truncate(len as usize);
                Ok(Reply::Bulk(buf))
            }
            _ => Err(format!("unexpected RESP reply {line:?}")),
        }
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| "timed out waiting for redis".to_owned())?
}
