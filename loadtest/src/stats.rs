//! Latency histograms and error tallies, and their JSON form.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde_json::{Value, json};

/// Microsecond latencies from 1 µs to 10 minutes at 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("constant, valid bounds")
}

/// Records `elapsed` in µs (at least 1, saturating at the histogram's top).
pub fn record(h: &mut Histogram<u64>, elapsed: std::time::Duration) {
    let us = (elapsed.as_micros() as u64).clamp(1, h.high());
    h.saturating_record(us);
}

/// `{count, mean, p50, p90, p99, p999, max}` in µs; all zero when empty.
pub fn summary(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return json!({ "count": 0 });
    }
    json!({
        "count": h.len(),
        "mean": (h.mean() * 10.0).round() / 10.0,
        "p50": h.value_at_quantile(0.50),
        "p90": h.value_at_quantile(0.90),
        "p99": h.value_at_quantile(0.99),
        "p999": h.value_at_quantile(0.999),
        "max": h.max(),
    })
}

/// Errors counted by kind (`connect`, `timeout`, `closed`, `server:<code>`, ...).
#[derive(Debug, Default, Clone)]
pub struct ErrorCounts(BTreeMap<String, u64>);

impl ErrorCounts {
    pub fn add(&mut self, kind: impl Into<String>) {
        *self.0.entry(kind.into()).or_default() += 1;
    }

    pub fn merge(&mut self, other: &ErrorCounts) {
        for (k, v) in &other.0 {
            *self.0.entry(k.clone()).or_default() += v;
        }
    }

    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    pub fn to_json(&self) -> Value {
        json!(self.0)
    }
}
