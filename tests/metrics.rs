//! Metrics over real sockets: `/metrics` is valid Prometheus text, counters move exactly as a
//! scripted session predicts, a node with Redis and Postgres exposes every name documented in
//! `docs/operations.md` (and only those), Redis latency and errors are recorded, and the admin
//! listener serves metrics and probes, and the Yjs document and compaction series move.
mod common;
mod yjs_support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use common::Server;
use common::postgres::PostgresServer;
use common::redis::RedisServer;
use futures_util::{SinkExt, StreamExt};
use prometheus_parse::{LineInfo, SampleType, Scrape, Value as Parsed};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

type Labels = BTreeMap<String, String>;

/// One scrape, checked line by line: every series with its value, every family with its type.
struct Exposition {
    series: BTreeMap<(String, Labels), f64>,
    families: BTreeMap<String, String>,
}

impl Exposition {
    /// Sum of the samples named `name` whose labels include `want`.
    fn sum(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        self.series
            .iter()
            .filter(|((n, l), _)| {
                n == name
                    && want
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, v)| *v)
            .sum()
    }

    /// Whether a series named `name` with exactly these labels exists.
    fn has(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        let l: Labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.series.contains_key(&(name.to_owned(), l))
    }

    /// Counter series (and histogram `_count`s) that moved from `before` to here.
    fn moved_since(&self, before: &Exposition) -> BTreeMap<(String, Labels), f64> {
        let mut out = BTreeMap::new();
        for ((name, labels), v) in &self.series {
            let counted = self.families.get(name).is_some_and(|t| t == "counter")
                || (name.ends_with("_count")
                    && self
                        .families
                        .get(name.trim_end_matches("_count"))
                        .is_some_and(|t| t == "histogram"));
            if !counted {
                continue;
            }
            let was = before
                .series
                .get(&(name.clone(), labels.clone()))
                .copied()
                .unwrap_or(0.0);
            if *v != was {
                out.insert((name.clone(), labels.clone()), v - was);
            }
        }
        out
    }
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}

/// Parses `k="v",k2="v2"` strictly (valid names, quoted values with `\\`, `\"`, `\n` escapes).
fn parse_labels(text: &str, at: &str) -> Labels {
    let mut out = Labels::new();
    let mut rest = text;
    while !rest.is_empty() {
        let (key, after) = rest
            .split_once("=\"")
            .unwrap_or_else(|| panic!("label without =\"…\" at {at}"));
        let valid = key
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        assert!(valid, "bad label name {key:?} at {at}");
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c @ ('\\' | '"'))) => value.push(c),
                    other => panic!("bad escape {other:?} at {at}"),
                },
                Some((i, '"')) => break i,
                Some((_, c)) => value.push(c),
                None => panic!("unterminated label value at {at}"),
            }
        };
        assert!(
            out.insert(key.to_owned(), value).is_none(),
            "label {key} twice at {at}"
        );
        rest = &after[end + 1..];
        if let Some(r) = rest.strip_prefix(',') {
            assert!(!r.is_empty(), "trailing comma at {at}");
            rest = r;
        } else {
            assert!(rest.is_empty(), "junk after label value at {at}");
        }
    }
    out
}

/// Checks every line of a Prometheus text exposition (through prometheus-parse's line parser,
/// plus the rules it leaves out) and the histograms' consistency.
fn check_exposition(text: &str) -> Exposition {
    let mut families: BTreeMap<String, String> = BTreeMap::new();
    let mut helped: BTreeSet<String> = BTreeSet::new();
    let mut current: Option<(String, &'static str)> = None;
    let mut series = BTreeMap::new();
    assert!(text.ends_with('\n'), "exposition must end with a newline");
    for (n, line) in text.lines().enumerate() {
        let at = format!("line {}: {line:?}", n + 1);
        match LineInfo::parse(line) {
            LineInfo::Empty => panic!("empty {at}"),
            LineInfo::Ignored => panic!("not Prometheus text: {at}"),
            LineInfo::Doc { metric_name, doc } => {
                assert!(helped.insert(metric_name.to_owned()), "second HELP: {at}");
                assert!(!doc.trim().is_empty(), "empty HELP: {at}");
            }
            LineInfo::Type {
                metric_name,
                metric_alias,
                sample_type,
            } => {
                let family = metric_alias.unwrap_or(metric_name);
                let ty = match sample_type {
                    SampleType::Counter => "counter",
                    SampleType::Gauge => "gauge",
                    SampleType::Histogram => "histogram",
                    other => panic!("unexpected type {other:?}: {at}"),
                };
                assert!(helped.contains(&family), "TYPE before HELP: {at}");
                assert!(family.starts_with("lockstep_"), "foreign family: {at}");
                if ty == "counter" {
                    assert!(family.ends_with("_total"), "counter without _total: {at}");
                } else {
                    assert!(!family.ends_with("_total"), "{ty} named _total: {at}");
                }
                assert!(
                    families.insert(family.clone(), ty.to_owned()).is_none(),
                    "second TYPE: {at}"
                );
                current = Some((family, ty));
            }
            LineInfo::Sample {
                metric_name,
                labels,
                value,
                timestamp,
            } => {
                let (family, ty) = current.as_ref().expect("sample before any TYPE");
                let rebuilt = match labels {
                    Some(l) => format!("{metric_name}{{{l}}} {value}"),
                    None => format!("{metric_name} {value}"),
                };
                assert_eq!(rebuilt, line, "unexpected text on a sample line");
                assert!(timestamp.is_none(), "timestamp: {at}");
                let belongs = if *ty == "histogram" {
                    ["_bucket", "_sum", "_count"]
                        .iter()
                        .any(|s| metric_name == format!("{family}{s}"))
                } else {
                    metric_name == family
                };
                assert!(belongs, "sample outside its family {family}: {at}");
                let v = parse_value(value).unwrap_or_else(|| panic!("bad value: {at}"));
                let labels = parse_labels(labels.unwrap_or(""), &at);
                assert!(
                    labels.keys().all(|k| !k.starts_with("otel_")),
                    "scope label: {at}"
                );
                if metric_name.ends_with("_bucket") {
                    assert!(labels.contains_key("le"), "bucket without le: {at}");
                }
                if *ty == "counter" || metric_name.ends_with("_count") {
                    assert!(v.is_finite() && v >= 0.0, "bad counter value: {at}");
                }
                let key = (metric_name.to_owned(), labels);
                assert!(series.insert(key, v).is_none(), "duplicate series: {at}");
            }
        }
    }
    // Histograms, grouped by prometheus-parse: cumulative buckets ending in +Inf = _count.
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("parses");
    let mut histograms = 0;
    for s in &scrape.samples {
        let Parsed::Histogram(buckets) = &s.value else {
            continue;
        };
        histograms += 1;
        assert!(!buckets.is_empty());
        let mut last = (f64::NEG_INFINITY, 0.0);
        for b in buckets {
            assert!(b.less_than > last.0 && b.count >= last.1, "{}", s.metric);
            last = (b.less_than, b.count);
        }
        assert_eq!(last.0, f64::INFINITY, "{} has no +Inf bucket", s.metric);
        let labels: Labels = s
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let count = series
            .get(&(format!("{}_count", s.metric), labels))
            .unwrap_or_else(|| panic!("{} without _count", s.metric));
        assert_eq!(*count, last.1, "{}: +Inf bucket != _count", s.metric);
    }
    let declared = families.values().filter(|t| *t == "histogram").count();
    assert!(histograms >= declared, "a histogram family has no samples");
    Exposition { series, families }
}

async fn scrape(http: &reqwest::Client, url: &str) -> Exposition {
    let resp = http.get(url).send().await.expect("GET /metrics");
    assert_eq!(resp.status(), 200);
    let ct = resp.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    check_exposition(&resp.text().await.unwrap())
}

/// The metric names of the table in `docs/operations.md` (its first column).
fn documented_names() -> BTreeSet<String> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md"))
        .expect("docs/operations.md");
    let section = doc
        .split("\n## Metrics\n")
        .nth(1)
        .expect("a Metrics section")
        .split("\n## ")
        .next()
        .unwrap();
    let names: BTreeSet<String> = section
        .lines()
        .filter_map(|l| l.strip_prefix("| `lockstep_"))
        .map(|rest| format!("lockstep_{}", rest.split('`').next().unwrap()))
        .collect();
    assert!(names.len() >= 30, "table not found: {names:?}");
    names
}

/// A WebSocket client that keeps an account of every byte and message it exchanged.
struct Tracked {
    ws: common::Ws,
    next_id: u32,
    sent_bytes: usize,
    /// (type, frame length) of every message received.
    got: Vec<(String, usize)>,
}

impl Tracked {
    async fn connect(addr: SocketAddr, token: &str) -> Tracked {
        let mut req = format!("ws://{addr}/v1/ws?token={token}")
            .into_client_request()
            .unwrap();
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            "lockstep.v1.json".parse().unwrap(),
        );
        let (ws, _) = tokio_tungstenite::connect_async(req)
            .await
            .expect("connect");
        let mut t = Tracked {
            ws,
            next_id: 1,
            sent_bytes: 0,
            got: Vec::new(),
        };
        t.recv_until(|v| v["type"] == "welcome").await;
        t
    }

    async fn send(&mut self, msg: Value) {
        let text = msg.to_string();
        self.sent_bytes += text.len();
        self.ws
            .send(Message::Text(text.into()))
            .await
            .expect("send");
    }

    /// The next frame, recorded; `None` after `wait` without one.
    async fn next(&mut self, wait: Duration) -> Option<Value> {
        loop {
            let frame = match tokio::time::timeout(wait, self.ws.next()).await {
                Err(_) => return None,
                Ok(f) => f,
            };
            match frame {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(&t).expect("JSON");
                    let ty = v["type"].as_str().expect("type").to_owned();
                    self.got.push((ty, t.len()));
                    return Some(v);
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("unexpected frame or close: {other:?}"),
            }
        }
    }

    async fn recv_until(&mut self, pred: impl Fn(&Value) -> bool) -> Value {
        loop {
            match self.next(common::WAIT).await {
                Some(v) if pred(&v) => return v,
                Some(_) => {}
                None => panic!("no matching message within {:?}", common::WAIT),
            }
        }
    }

    /// Sends `msg` with a fresh id and returns its `reply` or `error`.
    async fn request(&mut self, mut msg: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        msg["id"] = json!(id);
        self.send(msg).await;
        self.recv_until(|v| (v["type"] == "reply" || v["type"] == "error") && v["id"] == id)
            .await
    }

    /// Pings, then reads everything still coming (cursors are written after other messages).
    async fn settle(&mut self) {
        let id = self.next_id;
        self.next_id += 1;
        self.send(json!({"type": "ping", "id": id})).await;
        self.recv_until(|v| v["type"] == "pong" && v["id"] == id)
            .await;
        while self.next(Duration::from_millis(300)).await.is_some() {}
    }

    async fn close(mut self) {
        self.ws.close(None).await.expect("close");
        while let Ok(Some(Ok(_))) = tokio::time::timeout(common::WAIT, self.ws.next()).await {}
    }

    fn count(&self, ty: &str) -> usize {
        self.got.iter().filter(|(t, _)| t == ty).count()
    }
}

fn key(name: &str, labels: &[(&str, &str)]) -> (String, Labels) {
    (
        name.to_owned(),
        labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

/// Polls `/metrics` until `ok` holds (or panics after `within`).
async fn scrape_until(
    http: &reqwest::Client,
    url: &str,
    within: Duration,
    ok: impl Fn(&Exposition) -> bool,
) -> Exposition {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let e = scrape(http, url).await;
        if ok(&e) {
            return e;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exposition_is_valid_prometheus_text_from_start_up() {
    let server = Server::start().await;
    let url = server.url("/metrics");
    let fresh = scrape(&server.http, &url).await;
    // Present at zero before anything happened.
    for (name, labels) in [
        ("lockstep_sessions", vec![]),
        ("lockstep_draining", vec![]),
        ("lockstep_rooms", vec![]),
        ("lockstep_outbound_queue_bytes", vec![]),
        ("lockstep_lock_waiters", vec![]),
        ("lockstep_audit_queue_records", vec![]),
        ("lockstep_joins_total", vec![]),
        ("lockstep_received_bytes_total", vec![]),
        ("lockstep_sent_bytes_total", vec![]),
        ("lockstep_heartbeat_misses_total", vec![]),
        ("lockstep_sessions_opened_total", vec![("kind", "resumed")]),
        (
            "lockstep_sessions_closed_total",
            vec![("reason", "slow_consumer")],
        ),
        ("lockstep_lock_outcomes_total", vec![("outcome", "denied")]),
        (
            "lockstep_client_errors_total",
            vec![("code", "unavailable")],
        ),
        ("lockstep_yjs_document_bytes", vec![]),
        ("lockstep_yjs_document_bytes_max", vec![]),
        ("lockstep_yjs_log_entries", vec![]),
        ("lockstep_yjs_log_entries_max", vec![]),
        ("lockstep_yjs_compaction_lag_seconds", vec![]),
        (
            "lockstep_yjs_compactions_total",
            vec![("outcome", "skipped_held")],
        ),
    ] {
        assert!(
            fresh.has(name, &labels),
            "{name}{labels:?} missing at start"
        );
        assert_eq!(fresh.sum(name, &labels), 0.0, "{name}");
    }
    assert_eq!(fresh.families["lockstep_sessions"], "gauge");
    assert_eq!(fresh.families["lockstep_outbound_queue_bytes"], "gauge");

    // With traffic: a histogram, labelled series, gauges that moved.
    let mut c = server.client("alice").await;
    c.join("scene:1").await;
    let r = c
        .request(json!({"type":"lock.acquire","room":"scene:1","resource":"segment:1-1","action":"trim"}))
        .await;
    assert_eq!(r["type"], "reply", "{r}");
    let busy = scrape(&server.http, &url).await;
    assert_eq!(
        busy.families["lockstep_lock_acquire_duration_seconds"],
        "histogram"
    );
    assert_eq!(
        busy.sum("lockstep_lock_acquire_duration_seconds_count", &[]),
        1.0
    );
    assert_eq!(busy.sum("lockstep_sessions", &[]), 1.0);
    assert_eq!(busy.sum("lockstep_rooms", &[]), 1.0);
    assert_eq!(busy.sum("lockstep_lock_waiters", &[]), 0.0);

    // A second session queues for the lock: the waiters gauge counts it.
    let mut w = server.client("bob").await;
    w.join("scene:1").await;
    let r = w
        .request(json!({"type":"lock.acquire","room":"scene:1","resource":"segment:1-1","action":"trim","wait":true}))
        .await;
    assert_eq!(r["code"], "lock_held", "{r}");
    let waiting = scrape(&server.http, &url).await;
    assert_eq!(waiting.sum("lockstep_lock_waiters", &[]), 1.0);
    assert_eq!(
        waiting.sum("lockstep_lock_outcomes_total", &[("outcome", "queued")]),
        1.0
    );
    w.close_normally().await;
    c.close_normally().await;
    scrape_until(&server.http, &url, common::WAIT, |e| {
        e.sum("lockstep_lock_waiters", &[]) == 0.0 && e.sum("lockstep_sessions", &[]) == 0.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missed_heartbeats_are_counted() {
    let server = Server::start_with(|c| {
        c.heartbeat_interval = Duration::from_millis(100);
        c.heartbeat_misses = 3;
    })
    .await;
    let url = server.url("/metrics");
    let token = server.token("sleepy", None).await;
    // Connected, then silent: the socket is never read again, so not even pongs go back.
    let silent = Tracked::connect(server.addr, &token).await;
    let m = scrape_until(&server.http, &url, common::WAIT, |e| {
        e.sum("lockstep_heartbeat_timeouts_total", &[]) == 1.0
    })
    .await;
    assert_eq!(m.sum("lockstep_heartbeat_misses_total", &[]), 3.0);
    assert_eq!(
        m.sum("lockstep_sessions_closed_total", &[("reason", "heartbeat")]),
        1.0
    );
    assert_eq!(m.sum("lockstep_sessions_closed_total", &[]), 1.0);
    assert_eq!(m.sum("lockstep_sessions", &[]), 0.0);
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scripted_session_moves_counters_exactly() {
    const CURSORS: usize = 40;
    let server = Server::start().await;
    let url = server.url("/metrics");
    let (ta, tb) = (
        server.token("alice", None).await,
        server.token("bob", None).await,
    );
    let before = scrape(&server.http, &url).await;

    let mut alice = Tracked::connect(server.addr, &ta).await;
    let mut bob = Tracked::connect(server.addr, &tb).await;
    let r = alice.request(json!({"type":"join","room":"scene:1"})).await;
    assert_eq!(r["type"], "reply", "{r}");
    let r = bob.request(json!({"type":"join","room":"scene:1"})).await;
    assert_eq!(r["type"], "reply", "{r}");
    alice
        .recv_until(|v| v["type"] == "presence.join" && v["member"]["user_id"] == "bob")
        .await;
    let mid = scrape(&server.http, &url).await;
    assert_eq!(mid.sum("lockstep_rooms", &[]), 1.0);
    assert_eq!(
        mid.sum("lockstep_sessions", &[]) - before.sum("lockstep_sessions", &[]),
        2.0
    );

    // Cursors with 3-digit coordinates: every cursor frame bob gets has the same length.
    for i in 0..CURSORS {
        alice
            .send(json!({"type":"cursor","room":"scene:1","x":100 + i,"y":200 + i}))
            .await;
    }
    alice.settle().await;
    bob.settle().await;

    let acquire =
        json!({"type":"lock.acquire","room":"scene:1","resource":"segment:1-1","action":"approve"});
    let granted = alice.request(acquire.clone()).await;
    assert_eq!(granted["type"], "reply", "{granted}");
    let token = granted["token"].as_u64().expect("token");
    let denied = bob.request(acquire).await;
    assert_eq!(denied["code"], "lock_held", "{denied}");
    let bad = bob
        .request(json!({"type":"join","room":"Not A Room!"}))
        .await;
    assert_eq!(bad["type"], "error", "{bad}");
    let bad_code = bad["code"].as_str().unwrap().to_owned();
    let r = alice
        .request(
            json!({"type":"lock.release","room":"scene:1","resource":"segment:1-1","token":token}),
        )
        .await;
    assert_eq!(r["type"], "reply", "{r}");
    let r = alice
        .request(json!({"type":"leave","room":"scene:1"}))
        .await;
    assert_eq!(r["type"], "reply", "{r}");
    bob.recv_until(|v| v["type"] == "presence.leave" && v["member"]["user_id"] == "alice")
        .await;
    alice.settle().await;
    bob.settle().await;

    // Everything the clients sent and got, before they close.
    let received_bytes = alice.sent_bytes + bob.sent_bytes;
    let mut got_by_type: BTreeMap<String, f64> = BTreeMap::new();
    let mut got_bytes = 0;
    let mut cursor_len = None;
    for (ty, len) in alice.got.iter().chain(bob.got.iter()) {
        *got_by_type.entry(ty.clone()).or_default() += 1.0;
        got_bytes += len;
        if ty == "cursor" {
            assert!(cursor_len.is_none_or(|l| l == *len), "cursor frames differ");
            cursor_len = Some(*len);
        }
    }
    let bob_cursors = bob.count("cursor");
    assert!(bob_cursors >= 1, "bob got no cursor at all");
    assert_eq!(alice.count("cursor"), 0, "own cursors are not echoed");
    // What the script implies for the deterministic ones.
    for (who, c) in [("alice", &alice), ("bob", &bob)] {
        assert_eq!(c.count("welcome"), 1, "{who}");
        assert_eq!(c.count("lock.acquired"), 1, "{who}");
        assert_eq!(c.count("lock.released"), 1, "{who}");
        assert_eq!(c.count("room.snapshot"), 1, "{who}");
    }
    assert_eq!(bob.count("error"), 2);
    assert_eq!(alice.count("error"), 0);
    assert_eq!(alice.count("pong") + bob.count("pong"), 4);
    let pings = 4.0;

    alice.close().await;
    bob.close().await;
    let base_sessions = before.sum("lockstep_sessions", &[]);
    let after = scrape_until(&server.http, &url, common::WAIT, |e| {
        e.sum("lockstep_sessions", &[]) == base_sessions
    })
    .await;
    assert_eq!(after.sum("lockstep_rooms", &[]), 0.0);

    let dropped = (CURSORS - bob_cursors) as f64;
    let mut expected: BTreeMap<(String, Labels), f64> = BTreeMap::new();
    let mut expect = |name: &str, labels: &[(&str, &str)], n: f64| {
        if n != 0.0 {
            *expected.entry(key(name, labels)).or_default() += n;
        }
    };
    expect("lockstep_sessions_opened_total", &[("kind", "new")], 2.0);
    expect(
        "lockstep_sessions_closed_total",
        &[("reason", "client")],
        2.0,
    );
    expect("lockstep_joins_total", &[], 2.0);
    let received = "lockstep_messages_received_total";
    expect(received, &[("type", "join")], 2.0);
    expect(received, &[("type", "cursor")], CURSORS as f64);
    expect(received, &[("type", "lock.acquire")], 2.0);
    expect(received, &[("type", "lock.release")], 1.0);
    expect(received, &[("type", "leave")], 1.0);
    expect(received, &[("type", "ping")], pings);
    expect(received, &[("type", "invalid")], 1.0);
    expect("lockstep_received_bytes_total", &[], received_bytes as f64);
    for (ty, n) in &got_by_type {
        let extra = if ty == "cursor" { dropped } else { 0.0 };
        expect("lockstep_messages_sent_total", &[("type", ty)], n + extra);
    }
    let cursor_len = cursor_len.unwrap() as f64;
    expect(
        "lockstep_sent_bytes_total",
        &[],
        got_bytes as f64 + dropped * cursor_len,
    );
    expect("lockstep_cursor_dropped_total", &[], dropped);
    expect(
        "lockstep_lock_outcomes_total",
        &[("outcome", "granted")],
        1.0,
    );
    expect(
        "lockstep_lock_outcomes_total",
        &[("outcome", "denied")],
        1.0,
    );
    expect(
        "lockstep_lock_outcomes_total",
        &[("outcome", "released")],
        1.0,
    );
    expect("lockstep_lock_acquire_duration_seconds_count", &[], 2.0);
    expect(
        "lockstep_client_errors_total",
        &[("code", "lock_held")],
        1.0,
    );
    expect("lockstep_client_errors_total", &[("code", &bad_code)], 1.0);

    let moved = after.moved_since(&before);
    let show = |m: &BTreeMap<(String, Labels), f64>| {
        m.iter()
            .map(|((n, l), v)| format!("{n}{l:?} {v}"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    eprintln!("counters moved by the script:\n{}", show(&moved));
    assert_eq!(
        moved,
        expected,
        "\nmoved:\n{}\n\nexpected:\n{}",
        show(&moved),
        show(&expected)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_and_postgres_every_documented_name_is_exposed() {
    let pg = PostgresServer::start();
    let mut redis = RedisServer::start();
    let (redis_url, pg_url) = (redis.url(), pg.url());
    let mut server = Server::start_with(|c| {
        c.redis_url = Some(redis_url);
        c.database_url = Some(pg_url);
        c.yjs_compact_max_age = Duration::from_millis(200);
    })
    .await;
    let url = server.url("/metrics");
    // An edit of a Yjs document, compacted within a second or so, makes the compaction
    // histogram appear.
    let token = server.token("yann", None).await;
    let mut y = yjs_support::YClient::connect(server.addr, "scene:70", &token).await;
    y.until("synced", |c| c.synced).await;
    y.insert("compact me").await;
    // A lock makes the acquire histogram appear; its audit record, drained into Postgres, the
    // batch histogram.
    let mut c = server.client("alice").await;
    c.join("scene:7").await;
    let r = c
        .request(json!({"type":"lock.acquire","room":"scene:7","resource":"segment:7-1","action":"trim"}))
        .await;
    assert_eq!(r["type"], "reply", "{r}");

    let documented = documented_names();
    let all = scrape_until(&server.http, &url, Duration::from_secs(15), |e| {
        documented.iter().all(|n| e.families.contains_key(n))
    })
    .await;
    let exposed: BTreeSet<String> = all.families.keys().cloned().collect();
    eprintln!(
        "exposed families:\n{}",
        all.families
            .iter()
            .map(|(n, t)| format!("{n} {t}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(
        exposed,
        documented,
        "exposed but not documented: {:?}; documented but not exposed: {:?}",
        exposed.difference(&documented).collect::<Vec<_>>(),
        documented.difference(&exposed).collect::<Vec<_>>()
    );
    for op in [
        "lock_acquire",
        "presence_join",
        "publish",
        "node_beat",
        "audit_append",
    ] {
        assert!(
            all.sum(
                "lockstep_redis_command_duration_seconds_count",
                &[("op", op)]
            ) >= 1.0,
            "no Redis call recorded for {op}"
        );
        assert!(
            all.has("lockstep_redis_errors_total", &[("op", op)]),
            "no error series for {op}"
        );
    }
    assert_eq!(all.sum("lockstep_redis_errors_total", &[]), 0.0);
    drop(y);

    // Redis gone: the node's own duties (reaping, the audit writer, liveness beats) fail and
    // are counted; failed calls are timed too.
    redis.kill();
    let failing = scrape_until(&server.http, &url, Duration::from_secs(30), |e| {
        e.sum("lockstep_redis_errors_total", &[]) > 0.0
    })
    .await;
    let count = "lockstep_redis_command_duration_seconds_count";
    for ((name, labels), errors) in &failing.series {
        if name != "lockstep_redis_errors_total" || *errors == 0.0 {
            continue;
        }
        let op = labels["op"].as_str();
        assert!(
            failing.sum(count, &[("op", op)]) >= all.sum(count, &[("op", op)]) + errors,
            "{op}: {errors} failures not timed"
        );
    }
    drop(c);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_serves_metrics_and_probes() {
    let mut server =
        Server::start_with(|c| c.metrics_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0))))
            .await;
    let admin = server
        .running
        .as_ref()
        .unwrap()
        .metrics_addr
        .expect("admin listener bound");
    assert_ne!(admin, server.addr);
    let http = &server.http;
    let on_admin = format!("http://{admin}/metrics");
    let m = scrape(http, &on_admin).await;
    assert!(m.has("lockstep_sessions", &[]));
    // Still on the main listener too.
    scrape(http, &server.url("/metrics")).await;
    let get = |path: &str| http.get(format!("http://{admin}{path}")).send();
    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    assert_eq!(get("/readyz").await.unwrap().status(), 200);
    // Only operations: the API is not on the admin port.
    assert_eq!(get("/v1/locks?room=scene:1").await.unwrap().status(), 404);
    assert_eq!(get("/v1/ws").await.unwrap().status(), 404);

    // HTTP errors on the main listener are counted by code.
    let before = m.sum("lockstep_client_errors_total", &[("code", "unauthorized")]);
    let r = http.get(server.url("/v1/locks?room=scene:1")).send().await;
    assert_eq!(r.unwrap().status(), 401);
    let m = scrape(http, &on_admin).await;
    assert_eq!(
        m.sum("lockstep_client_errors_total", &[("code", "unauthorized")]),
        before + 1.0
    );

    // Draining: readiness fails and the gauge says so, on the admin port.
    assert_eq!(m.sum("lockstep_draining", &[]), 0.0);
    server.running.as_ref().unwrap().node.drain().await;
    assert_eq!(get("/readyz").await.unwrap().status(), 503);
    let m = scrape(http, &on_admin).await;
    assert_eq!(m.sum("lockstep_draining", &[]), 1.0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn yjs_document_log_and_compaction_series_move() {
    // Compacted by length only (5 entries), so the log can be watched growing first.
    let server = Server::start_with(|c| {
        c.yjs_compact_entries = 5;
        c.yjs_compact_max_age = Duration::from_secs(3600);
        c.yjs_unload_grace = Duration::from_millis(500);
    })
    .await;
    let url = server.url("/metrics");
    let http = &server.http;
    let fresh = scrape(http, &url).await;
    for name in [
        "lockstep_yjs_documents",
        "lockstep_yjs_document_bytes",
        "lockstep_yjs_document_bytes_max",
        "lockstep_yjs_log_entries",
        "lockstep_yjs_log_entries_max",
        "lockstep_yjs_compaction_lag_seconds",
        "lockstep_yjs_compactions_total",
    ] {
        assert_eq!(
            fresh.families[name],
            if name.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            }
        );
        assert_eq!(fresh.sum(name, &[]), 0.0, "{name} at start");
    }
    for outcome in [
        "compacted",
        "nothing_new",
        "skipped_held",
        "stale",
        "failed",
    ] {
        assert!(
            fresh.has("lockstep_yjs_compactions_total", &[("outcome", outcome)]),
            "{outcome}"
        );
    }

    let token = server.token("yann", None).await;
    let mut a = yjs_support::YClient::connect(server.addr, "scene:71", &token).await;
    let mut b = yjs_support::YClient::connect(server.addr, "scene:72", &token).await;
    a.until("synced", |c| c.synced).await;
    b.until("synced", |c| c.synced).await;
    // Three entries in one document's log, one in the other's (each edit its own append).
    for (i, (on_a, s)) in [
        (true, "one "),
        (true, "two "),
        (false, "bee"),
        (true, "three"),
    ]
    .into_iter()
    .enumerate()
    {
        let c = if on_a { &mut a } else { &mut b };
        c.insert(s).await;
        scrape_until(http, &url, common::WAIT, |e| {
            e.sum("lockstep_yjs_appends_total", &[]) == (i + 1) as f64
        })
        .await;
    }
    let growing = scrape_until(http, &url, common::WAIT, |e| {
        e.sum("lockstep_yjs_log_entries", &[]) == 4.0
            && e.sum("lockstep_yjs_compaction_lag_seconds", &[]) > 0.0
    })
    .await;
    assert_eq!(growing.sum("lockstep_yjs_documents", &[]), 2.0);
    assert_eq!(growing.sum("lockstep_yjs_log_entries_max", &[]), 3.0);
    let bytes = growing.sum("lockstep_yjs_document_bytes", &[]);
    let bytes_max = growing.sum("lockstep_yjs_document_bytes_max", &[]);
    assert!(bytes > bytes_max && bytes_max > 0.0, "{bytes} {bytes_max}");
    assert_eq!(
        bytes,
        growing.sum("lockstep_yjs_appended_bytes_total", &[]),
        "a fresh document is the updates it was built from"
    );
    assert_eq!(growing.sum("lockstep_yjs_compactions_total", &[]), 0.0);
    // The lag is the age of the first entry: it grows while nothing is compacted.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let older = scrape(http, &url).await;
    let lag = |e: &Exposition| e.sum("lockstep_yjs_compaction_lag_seconds", &[]);
    assert!(
        lag(&older) >= lag(&growing) + 1.0,
        "{} then {}",
        lag(&growing),
        lag(&older)
    );

    // Two more entries take scene:71 to 5: compacted; scene:72 (1 entry) is not due.
    a.insert(" four").await;
    scrape_until(http, &url, common::WAIT, |e| {
        e.sum("lockstep_yjs_appends_total", &[]) == 5.0
    })
    .await;
    a.insert(" five").await;
    let compacted = scrape_until(http, &url, common::WAIT, |e| {
        e.sum(
            "lockstep_yjs_compactions_total",
            &[("outcome", "compacted")],
        ) == 1.0
            && e.sum("lockstep_yjs_log_entries", &[]) == 1.0
    })
    .await;
    assert_eq!(compacted.sum("lockstep_yjs_log_entries_max", &[]), 1.0);
    assert_eq!(
        compacted.sum("lockstep_yjs_compaction_seconds_count", &[]),
        1.0
    );
    assert_eq!(
        compacted.families["lockstep_yjs_compaction_seconds"],
        "histogram"
    );
    assert!(
        lag(&compacted) > 0.0 && lag(&compacted) < lag(&older) + 10.0,
        "scene:72's entry is still waiting: {}",
        lag(&compacted)
    );
    // Still loaded: the size measure does not shrink with the log.
    assert!(compacted.sum("lockstep_yjs_document_bytes", &[]) >= bytes);

    // The other document's last client leaves: once unloaded, its entry no longer counts.
    drop(b);
    let settled = scrape_until(http, &url, Duration::from_secs(60), |e| {
        e.sum("lockstep_yjs_documents", &[]) == 1.0 && e.sum("lockstep_yjs_log_entries", &[]) == 0.0
    })
    .await;
    assert_eq!(lag(&settled), 0.0);
    assert_eq!(
        settled.sum("lockstep_yjs_compactions_total", &[("outcome", "failed")]),
        0.0
    );
    drop(a);
}
