//! What one `scale` driver process measured, in a form several processes can add up: counters,
//! error and lost-lock tallies, and latency histograms as raw `[value, count]` buckets (µs),
//! so `scale-merge` combines them exactly instead of averaging percentiles.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde_json::{Map, Value, json};

use crate::bench::round3;
use crate::stats;

/// Events counted by kind (`connect`, `server:<code>`, `released:expired`, ...).
pub type Tally = BTreeMap<String, u64>;

/// Adds one `kind` to `t`.
pub fn bump(t: &mut Tally, kind: impl Into<String>) {
    *t.entry(kind.into()).or_default() += 1;
}

/// The latency histograms, in this order everywhere.
pub const HISTS: [&str; 6] = [
    "cursor_cross_node",
    "cursor_same_node",
    "presence_cross_node",
    "presence_same_node",
    "lock_acquire",
    "lock_release",
];
pub const H_CURSOR_CROSS: usize = 0;
pub const H_CURSOR_SAME: usize = 1;
pub const H_PRESENCE_CROSS: usize = 2;
pub const H_PRESENCE_SAME: usize = 3;
pub const H_ACQUIRE: usize = 4;
pub const H_RELEASE: usize = 5;

/// Counters of the measured window, in this order everywhere.
pub const COUNTS: [&str; 11] = [
    "cursors_sent",
    "cursors_delivered",
    "presence_sent",
    "presence_delivered",
    "lock_acquires",
    "lock_grants",
    "lock_held",
    "lock_releases",
    "lock_events_delivered",
    "other_frames_delivered",
    "frames_delivered",
];
pub const C_CURSORS_SENT: usize = 0;
pub const C_CURSORS_DELIVERED: usize = 1;
pub const C_PRESENCE_SENT: usize = 2;
pub const C_PRESENCE_DELIVERED: usize = 3;
pub const C_ACQUIRES: usize = 4;
pub const C_GRANTS: usize = 5;
pub const C_HELD: usize = 6;
pub const C_RELEASES: usize = 7;
pub const C_LOCK_EVENTS: usize = 8;
pub const C_OTHER: usize = 9;
pub const C_FRAMES: usize = 10;

/// One process's share (or, after [`merge`], the sum of several).
pub struct Part {
    /// Connections this process meant to open and opened.
    pub planned: u64,
    pub connected: u64,
    pub rooms: u64,
    /// Seconds from the first connect to the last join answer.
    pub ramp_s: f64,
    /// Length of the measured window.
    pub window_s: f64,
    pub counts: [u64; COUNTS.len()],
    pub hists: Vec<Histogram<u64>>,
    /// Over the whole run (ramp, window and wind-down), not only the window.
    pub errors: Tally,
    /// Lost locks by how they were lost (`released:<reason>`, `overlap`), whole run.
    pub lost: Tally,
    /// The driver's own CPU (user + system) over the window, and its RSS at the end.
    pub driver_cpu_s: f64,
    pub driver_rss_kb: u64,
    pub processes: u64,
    /// The workload's parameters, as given (kept from the first part).
    pub workload: Value,
}

impl Part {
    pub fn empty() -> Part {
        Part {
            planned: 0,
            connected: 0,
            rooms: 0,
            ramp_s: 0.0,
            window_s: 0.0,
            counts: [0; COUNTS.len()],
            hists: HISTS.iter().map(|_| stats::new_histogram()).collect(),
            errors: Tally::new(),
            lost: Tally::new(),
            driver_cpu_s: 0.0,
            driver_rss_kb: 0,
            processes: 0,
            workload: Value::Null,
        }
    }

    /// The mergeable form (what a driver process writes to `--out`).
    pub fn to_raw(&self) -> Value {
        let hists: Map<String, Value> = HISTS
            .iter()
            .zip(&self.hists)
            .map(|(name, h)| {
                let buckets: Vec<[u64; 2]> = h
                    .iter_recorded()
                    .map(|v| [v.value_iterated_to(), v.count_at_value()])
                    .collect();
                ((*name).to_owned(), json!(buckets))
            })
            .collect();
        json!({
            "planned": self.planned,
            "connected": self.connected,
            "rooms": self.rooms,
            "ramp_s": round3(self.ramp_s),
            "window_s": round3(self.window_s),
            "counts": counts_json(&self.counts),
            "hist_buckets_us": hists,
            "errors": self.errors,
            "lost_locks": self.lost,
            "driver_cpu_s": round3(self.driver_cpu_s),
            "driver_rss_kb": self.driver_rss_kb,
            "processes": self.processes,
            "workload": self.workload,
        })
    }

    /// Reads what [`Part::to_raw`] wrote.
    pub fn from_raw(v: &Value) -> Result<Part> {
        let mut p = Part::empty();
        let u = |k: &str| v[k].as_u64().with_context(|| format!("{k} missing"));
        p.planned = u("planned")?;
        p.connected = u("connected")?;
        p.rooms = u("rooms")?;
        p.processes = u("processes")?;
        p.driver_rss_kb = u("driver_rss_kb")?;
        p.ramp_s = v["ramp_s"].as_f64().unwrap_or(0.0);
        p.window_s = v["window_s"].as_f64().unwrap_or(0.0);
        p.driver_cpu_s = v["driver_cpu_s"].as_f64().unwrap_or(0.0);
        for (i, name) in COUNTS.iter().enumerate() {
            p.counts[i] = v["counts"][name].as_u64().unwrap_or(0);
        }
        for (i, name) in HISTS.iter().enumerate() {
            let buckets = v["hist_buckets_us"][name]
                .as_array()
                .with_context(|| format!("hist_buckets_us.{name} missing"))?;
            for b in buckets {
                let (value, count) = (b[0].as_u64(), b[1].as_u64());
                let (Some(value), Some(count)) = (value, count) else {
                    anyhow::bail!("bad bucket {b} in {name}");
                };
                let h = &mut p.hists[i];
                let high = h.high();
                h.saturating_record_n(value.clamp(1, high), count);
            }
        }
        p.errors = tally(&v["errors"]);
        p.lost = tally(&v["lost_locks"]);
        p.workload = v["workload"].clone();
        Ok(p)
    }

    /// Adds `other` to this one. Windows overlap (the processes measure at the same time), so
    /// the longer one is kept; CPU and RSS add up.
    pub fn merge(&mut self, other: &Part) {
        self.planned += other.planned;
        self.connected += other.connected;
        self.rooms += other.rooms;
        self.ramp_s = self.ramp_s.max(other.ramp_s);
        self.window_s = self.window_s.max(other.window_s);
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        for (a, b) in self.hists.iter_mut().zip(&other.hists) {
            // Same bounds on both sides: cannot fail; saturate rather than lose the run if not.
            let _ = a.add(b);
        }
        add_tally(&mut self.errors, &other.errors);
        add_tally(&mut self.lost, &other.lost);
        self.driver_cpu_s += other.driver_cpu_s;
        self.driver_rss_kb += other.driver_rss_kb;
        self.processes += other.processes;
        if self.workload.is_null() {
            self.workload = other.workload.clone();
        }
    }

    /// The readable result: percentiles (µs), rates per second of window, tallies.
    pub fn summary(&self) -> Value {
        let w = self.window_s.max(1e-9);
        let rate = |i: usize| round3(self.counts[i] as f64 / w);
        let latency: Map<String, Value> = HISTS
            .iter()
            .zip(&self.hists)
            .map(|(n, h)| ((*n).to_owned(), stats::summary(h)))
            .collect();
        json!({
            "mode": "scale",
            "processes": self.processes,
            "rooms": self.rooms,
            "connections_planned": self.planned,
            "connections": self.connected,
            "ramp_s": round3(self.ramp_s),
            "window_s": round3(self.window_s),
            "workload": self.workload,
            "counts": counts_json(&self.counts),
            "per_s": {
                "cursors_sent": rate(C_CURSORS_SENT),
                "cursor_deliveries": rate(C_CURSORS_DELIVERED),
                "presence_sent": rate(C_PRESENCE_SENT),
                "presence_deliveries": rate(C_PRESENCE_DELIVERED),
                "lock_acquires": rate(C_ACQUIRES),
                "lock_releases": rate(C_RELEASES),
                "lock_event_deliveries": rate(C_LOCK_EVENTS),
                "frames_delivered": rate(C_FRAMES),
            },
            "latency_us": latency,
            "errors_total": self.errors.values().sum::<u64>(),
            "errors": self.errors,
            "lost_locks_total": self.lost.values().sum::<u64>(),
            "lost_locks": self.lost,
            "driver_cpu_s": round3(self.driver_cpu_s),
            "driver_cpu_per_s": round3(self.driver_cpu_s / w),
            "driver_rss_kb": self.driver_rss_kb,
        })
    }
}

fn counts_json(c: &[u64; COUNTS.len()]) -> Value {
    let m: BTreeMap<&str, u64> = COUNTS.iter().copied().zip(c.iter().copied()).collect();
    json!(m)
}

fn tally(v: &Value) -> Tally {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default()
}

pub fn add_tally(a: &mut Tally, b: &Tally) {
    for (k, n) in b {
        *a.entry(k.clone()).or_default() += n;
    }
}

#[derive(clap::Args, Debug)]
pub struct MergeArgs {
    /// JSON files written by `scale --out` (one per driver process).
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

/// `scale-merge a.json b.json …`: the combined summary of several driver processes.
pub fn merge(args: MergeArgs) -> Result<Value> {
    let mut total = Part::empty();
    for f in &args.files {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        let v: Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", f.display()))?;
        let raw = v.get("raw").unwrap_or(&v);
        total.merge(&Part::from_raw(raw).with_context(|| format!("in {}", f.display()))?);
    }
    Ok(total.summary())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(lat_us: &[u64], cursors: u64, errors: &[(&str, u64)]) -> Part {
        let mut p = Part::empty();
        p.processes = 1;
        p.planned = 10;
        p.connected = 10;
        p.window_s = 30.0;
        p.counts[C_CURSORS_DELIVERED] = cursors;
        for &us in lat_us {
            p.hists[H_CURSOR_CROSS].record(us).unwrap();
        }
        for &(k, n) in errors {
            p.errors.insert(k.to_owned(), n);
        }
        p
    }

    #[test]
    fn raw_round_trip_and_merge_add_up_exactly() {
        let a = part(&[100, 200, 300], 5, &[("timeout:join", 2)]);
        let b = part(&[1_000, 50_000], 7, &[("timeout:join", 1), ("closed", 4)]);
        let mut total = Part::from_raw(&a.to_raw()).unwrap();
        total.merge(&Part::from_raw(&b.to_raw()).unwrap());
        assert_eq!(total.processes, 2);
        assert_eq!(total.connected, 20);
        assert_eq!(total.counts[C_CURSORS_DELIVERED], 12);
        assert_eq!(total.errors["timeout:join"], 3);
        assert_eq!(total.errors["closed"], 4);
        let h = &total.hists[H_CURSOR_CROSS];
        assert_eq!(h.len(), 5);
        assert_eq!(h.max(), h.highest_equivalent(50_000));
        let s = total.summary();
        assert_eq!(s["errors_total"], 7);
        assert_eq!(s["latency_us"]["cursor_cross_node"]["count"], 5);
        // 12 deliveries over the (shared) 30 s window.
        assert_eq!(s["per_s"]["cursor_deliveries"], 0.4);
    }
}
