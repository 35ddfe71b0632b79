//! `ping`: the bare round trip (`ping` → `pong`) through the same harness as `locks`, so a
//! lock's latency can be read against the cost of any request at all.

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
    /// Join `scene:bench` first (as `locks` does); by default clients join nothing.
    #[arg(long)]
    pub join: bool,
}

struct PingLoop {
    timeout: std::time::Duration,
    next_id: u32,
    rtt: Histogram<u64>,
    errors: ErrorCounts,
}

impl Workload for PingLoop {
    async fn step(&mut self, conn: &mut Conn, measure: bool) -> Result<(), ClientError> {
        self.next_id = self.next_id.wrapping_add(1).max(2);
        let id = self.next_id;
        let msg = json!({ "type": "ping", "id": id });
        let t0 = Instant::now();
        let answer = conn.request(&msg, id, self.timeout, "pong").await?;
        let rtt = t0.elapsed();
        match answer {
            Answer::Ok(_) => {
                if measure {
                    stats::record(&mut self.rtt, rtt);
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
    let prefix = run_prefix("ping");
    let room_of = |_: usize| "scene:bench".to_owned();
    let room: Option<&(dyn Fn(usize) -> String + Sync)> =
        if args.join { Some(&room_of) } else { None };
    eprintln!(
        "ping: connecting {} clients to {} node(s)",
        c.clients,
        targets.len()
    );
    let mut connected =
        bench::connect_clients(&targets, &tokens, c.clients, &prefix, room, c.timeout()).await?;
    if connected.conns.is_empty() {
        anyhow::bail!("no client connected: {}", connected.errors.to_json());
    }
    let conns = std::mem::take(&mut connected.conns);
    let driven = bench::run_all(conns, c, |_| PingLoop {
        timeout: c.timeout(),
        next_id: 1,
        rtt: stats::new_histogram(),
        errors: ErrorCounts::default(),
    })
    .await;

    let mut errors = ErrorCounts::default();
    let (mut out, elapsed) =
        bench::common_report(c.clients, targets.len(), &connected, &driven, &mut errors);
    let mut rtt = stats::new_histogram();
    for d in &driven {
        rtt.add(&d.workload.rtt)?;
        errors.merge(&d.workload.errors);
    }
    let per_s = if elapsed > 0.0 {
        round3(rtt.len() as f64 / elapsed)
    } else {
        0.0
    };
    out.insert("mode".into(), json!("ping"));
    out.insert("joined".into(), json!(args.join));
    out.insert("iterations".into(), json!(c.iterations));
    out.insert("warmup".into(), json!(c.warmup));
    out.insert("pings".into(), json!(rtt.len()));
    out.insert("pings_per_s".into(), json!(per_s));
    out.insert("rtt_us".into(), stats::summary(&rtt));
    out.insert("errors_total".into(), json!(errors.total()));
    out.insert("errors".into(), errors.to_json());
    Ok(Value::Object(out))
}
