//! `locks`: each client joins a room and loops `lock.acquire` + `lock.release` on its
//! resource, timing each round trip (send → matching `reply`/`error`).
//!
//! Without `--contended`, client c uses `segment:bench-{c % resources}`, so with
//! `resources >= clients` nobody contends and the numbers are the cost of a grant and a
//! release (including the `lock.acquired`/`lock.released` fan-out to the room). With
//! `--contended` everyone hammers `segment:bench-0`: most acquires are answered `lock_held`,
//! which are counted and timed separately.

use std::time::Instant;

use hdrhistogram::Histogram;
use serde_json::{Value, json};

use crate::bench::{self, LoopArgs, Workload, round3};
use crate::client::{Answer, ClientError, Conn, run_prefix};
use crate::stats::{self, ErrorCounts};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub common: LoopArgs,
    /// Distinct resources; client c locks `segment:bench-{c % resources}`.
    #[arg(long, default_value_t = 20)]
    pub resources: usize,
    /// All clients lock one resource (`segment:bench-0`) and count `lock_held` answers.
    #[arg(long)]
    pub contended: bool,
    /// Each client joins its own room `scene:bench-{c}` instead of the shared `scene:bench`,
    /// which removes the room fan-out of lock events from the measurement.
    #[arg(long)]
    pub room_per_client: bool,
    /// The `action` sent with each acquire.
    #[arg(long, default_value = "approve")]
    pub action: String,
}

/// One client's acquire/release loop and what it measured.
struct LockLoop {
    room: String,
    resource: String,
    action: String,
    timeout: std::time::Duration,
    next_id: u32,
    /// Every acquire answer (granted or denied).
    acquire: Histogram<u64>,
    granted: Histogram<u64>,
    denied: Histogram<u64>,
    release: Histogram<u64>,
    grants: u64,
    held: u64,
    errors: ErrorCounts,
}

impl LockLoop {
    fn id(&mut self) -> u32 {
        self.next_id = self.next_id.wrapping_add(1).max(2);
        self.next_id
    }

    async fn release(
        &mut self,
        conn: &mut Conn,
        token: u64,
        measure: bool,
    ) -> Result<(), ClientError> {
        let id = self.id();
        let msg = json!({
            "type": "lock.release", "id": id, "room": self.room, "resource": self.resource, "token": token
        });
        let t0 = Instant::now();
        let answer = conn.request(&msg, id, self.timeout, "lock.release").await?;
        let rtt = t0.elapsed();
        match answer {
            Answer::Ok(_) => {
                if measure {
                    stats::record(&mut self.release, rtt);
                }
            }
            Answer::Err { code, .. } => self.errors.add(format!("server:{code}")),
        }
        Ok(())
    }
}

impl Workload for LockLoop {
    async fn step(&mut self, conn: &mut Conn, measure: bool) -> Result<(), ClientError> {
        let id = self.id();
        let msg = json!({
            "type": "lock.acquire",
            "id": id,
            "room": self.room,
            "resource": self.resource,
            "action": self.action,
        });
        let t0 = Instant::now();
        let answer = conn.request(&msg, id, self.timeout, "lock.acquire").await?;
        let rtt = t0.elapsed();
        match answer {
            Answer::Ok(reply) => {
                if measure {
                    stats::record(&mut self.acquire, rtt);
                    stats::record(&mut self.granted, rtt);
                    self.grants += 1;
                }
                match reply["token"].as_u64() {
                    Some(token) => self.release(conn, token, measure).await?,
                    None => self.errors.add("protocol:reply_without_token"),
                }
            }
            Answer::Err { code, .. } if code == "lock_held" => {
                if measure {
                    stats::record(&mut self.acquire, rtt);
                    stats::record(&mut self.denied, rtt);
                    self.held += 1;
                }
            }
            Answer::Err { code, .. } => self.errors.add(format!("server:{code}")),
        }
        Ok(())
    }
}

pub async fn run(args: Args) -> anyhow::Result<Value> {
    let c = &args.common;
    let targets = c.targets()?;
    let tokens = c.tokens(&targets)?;
    let prefix = run_prefix("locks");
    let shared_room = !args.room_per_client;
    let room_of = move |i: usize| {
        if shared_room {
            "scene:bench".to_owned()
        } else {
            format!("scene:bench-{i}")
        }
    };
    eprintln!(
        "locks: connecting {} clients to {} node(s)",
        c.clients,
        targets.len()
    );
    let mut connected = bench::connect_clients(
        &targets,
        &tokens,
        c.clients,
        &prefix,
        Some(&room_of),
        c.timeout(),
    )
    .await?;
    if connected.conns.is_empty() {
        anyhow::bail!("no client connected: {}", connected.errors.to_json());
    }
    let resources = args.resources.max(1);
    eprintln!(
        "locks: {} connected; {} warm-up + {} measured iterations each",
        connected.conns.len(),
        c.warmup,
        c.iterations
    );
    let conns = std::mem::take(&mut connected.conns);
    let driven = bench::run_all(conns, c, |i| LockLoop {
        room: room_of(i),
        resource: if args.contended {
            "segment:bench-0".to_owned()
        } else {
            format!("segment:bench-{}", i % resources)
        },
        action: args.action.clone(),
        timeout: c.timeout(),
        next_id: 1,
        acquire: stats::new_histogram(),
        granted: stats::new_histogram(),
        denied: stats::new_histogram(),
        release: stats::new_histogram(),
        grants: 0,
        held: 0,
        errors: ErrorCounts::default(),
    })
    .await;

    let mut errors = ErrorCounts::default();
    let (mut out, elapsed) =
        bench::common_report(c.clients, targets.len(), &connected, &driven, &mut errors);
    let mut acquire = stats::new_histogram();
    let mut granted = stats::new_histogram();
    let mut denied = stats::new_histogram();
    let mut release = stats::new_histogram();
    let (mut grants, mut held) = (0, 0);
    for d in &driven {
        let w = &d.workload;
        acquire.add(&w.acquire)?;
        granted.add(&w.granted)?;
        denied.add(&w.denied)?;
        release.add(&w.release)?;
        grants += w.grants;
        held += w.held;
        errors.merge(&w.errors);
    }
    let per_s = |n: u64| {
        if elapsed > 0.0 {
            round3(n as f64 / elapsed)
        } else {
            0.0
        }
    };
    out.insert("mode".into(), json!("locks"));
    out.insert("contended".into(), json!(args.contended));
    out.insert("shared_room".into(), json!(shared_room));
    out.insert(
        "resources".into(),
        json!(if args.contended {
            1
        } else {
            resources.min(c.clients)
        }),
    );
    out.insert("iterations".into(), json!(c.iterations));
    out.insert("warmup".into(), json!(c.warmup));
    out.insert("acquires".into(), json!(acquire.len()));
    out.insert("granted".into(), json!(grants));
    out.insert("lock_held".into(), json!(held));
    out.insert("acquires_per_s".into(), json!(per_s(acquire.len())));
    out.insert("grants_per_s".into(), json!(per_s(grants)));
    out.insert(
        "requests_per_s".into(),
        json!(per_s(acquire.len() + release.len())),
    );
    out.insert("acquire_us".into(), stats::summary(&acquire));
    out.insert("acquire_granted_us".into(), stats::summary(&granted));
    out.insert("acquire_denied_us".into(), stats::summary(&denied));
    out.insert("release_us".into(), stats::summary(&release));
    out.insert("errors_total".into(), json!(errors.total()));
    out.insert("errors".into(), errors.to_json());
    Ok(Value::Object(out))
}
