//! Traces over OTLP and JSON logs, checked on real `lockstep` processes: the `tracing`
//! subscriber is global, so each case runs the binary with its own environment.
//!
//! - OTLP: the node exports to a receiver this test runs (an axum server decoding the export
//!   requests with the official `opentelemetry-proto` messages). A real WebSocket session
//!   (join, lock.acquire, a denied acquire, release, close) and an HTTP API call must arrive as
//!   `session`, `request` and `audit.append` spans with their attributes, under a resource with
//!   `service.name` and `node_id`, flushed by the SIGTERM drain. With Postgres, the batches the
//!   node drains into it are `audit.drain` spans.
//! - JSON logs: every stdout/stderr line of a node run at `RUST_LOG=debug` is a JSON object,
//!   and a session's lines carry `session_id`, `user_id`, `room` and `node_id`.

mod common;

use std::collections::HashMap;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::cluster::{SECRET, token};
use common::{Client, Codec, free_port};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use serde_json::{Value, json};

/// A `lockstep` process with test settings plus `extra`; stdout and stderr captured to files.
struct Node {
    child: Child,
    port: u16,
    out: std::path::PathBuf,
    err: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Node {
    async fn start(node_id: &str, extra: &[(&str, String)]) -> Node {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let out = dir.path().join("stdout.log");
        let err = dir.path().join("stderr.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lockstep"));
        // Nothing inherited from the test's environment may switch exporters on or off.
        for (k, _) in std::env::vars() {
            if k.starts_with("OTEL_") || k.starts_with("LOCKSTEP_") || k == "RUST_LOG" {
                cmd.env_remove(k);
            }
        }
        cmd.env("LOCKSTEP_LISTEN", format!("127.0.0.1:{port}"))
            .env("LOCKSTEP_NODE_ID", node_id)
            .env("LOCKSTEP_JWT_SECRET", SECRET)
            .env("LOCKSTEP_DATA_DIR", dir.path().join("data"))
            .env("LOCKSTEP_DRAIN_TIMEOUT", "3s")
            .envs(extra.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(std::fs::File::create(&out).expect("stdout file"))
            .stderr(std::fs::File::create(&err).expect("stderr file"));
        let child = cmd.spawn().expect("spawn lockstep");
        let node = Node {
            child,
            port,
            out,
            err,
            _dir: dir,
        };
        node.wait_ready().await;
        node
    }

    fn addr(&self) -> std::net::SocketAddr {
        ([127, 0, 0, 1], self.port).into()
    }

    async fn wait_ready(&self) {
        let http = reqwest::Client::new();
        for _ in 0..300 {
            let url = format!("http://127.0.0.1:{}/readyz", self.port);
            if let Ok(r) = http.get(url).send().await
                && r.status().is_success()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("node did not become ready");
    }

    /// SIGTERM, then wait for the drain (and the span flush) to finish.
    async fn terminate(mut self) -> (String, String) {
        let pid = self.child.id().to_string();
        let ok = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -TERM");
        let mut exited = false;
        for _ in 0..200 {
            if let Ok(Some(status)) = self.child.try_wait() {
                assert!(status.success(), "lockstep exited with {status}");
                exited = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(exited, "lockstep did not exit within 10 s of SIGTERM");
        (
            std::fs::read_to_string(&self.out).expect("stdout"),
            std::fs::read_to_string(&self.err).expect("stderr"),
        )
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A session that joins, takes a lock, sees a second user denied, releases and closes.
/// Returns (alice's session id, bob's session id, the acquire's request id).
async fn scripted_session(addr: std::net::SocketAddr) -> (String, String, u32) {
    let mut alice = Client::connect(addr, &token("alice", None), Codec::Json, None).await;
    let mut bob = Client::connect(addr, &token("bob", None), Codec::Json, None).await;
    alice.join("scene:1").await;
    bob.join("scene:1").await;
    let granted = alice
        .request(json!({"type": "lock.acquire", "room": "scene:1",
            "resource": "segment:1-1", "action": "approve"}))
        .await;
    let acquire_id = granted["id"].as_u64().expect("reply id") as u32;
    let lock_token = granted["token"].as_u64().expect("granted token");
    bob.expect_error(
        json!({"type": "lock.acquire", "room": "scene:1", "resource": "segment:1-1",
            "action": "trim"}),
        "lock_held",
    )
    .await;
    alice
        .request(json!({"type": "lock.release", "room": "scene:1", "resource": "segment:1-1", "token": lock_token}))
        .await;
    let (a, b) = (alice.session_id(), bob.session_id());
    alice.close_normally().await;
    bob.close_normally().await;
    (a, b, acquire_id)
}

// ---- OTLP receiver ----

type Received = Arc<Mutex<Vec<ExportTraceServiceRequest>>>;

/// An OTLP/HTTP trace receiver on a free port: `POST /v1/traces` with a protobuf body.
async fn otlp_receiver() -> (u16, Received) {
    use axum::body::Bytes;
    use axum::http::{StatusCode, header};
    let received: Received = Arc::default();
    let store = received.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: Bytes| {
            let store = store.clone();
            async move {
                let ct = headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                if ct != "application/x-protobuf" {
                    return (StatusCode::UNSUPPORTED_MEDIA_TYPE, Vec::new());
                }
                match ExportTraceServiceRequest::decode(body) {
                    Ok(req) => {
                        store.lock().unwrap().push(req);
                        let ok = ExportTraceServiceResponse::default().encode_to_vec();
                        (StatusCode::OK, ok)
                    }
                    Err(_) => (StatusCode::BAD_REQUEST, Vec::new()),
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind receiver");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (port, received)
}

/// A received span with its resource attributes, attributes flattened to JSON values.
#[derive(Debug, Clone)]
struct Got {
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent: Vec<u8>,
    attrs: HashMap<String, Value>,
    resource: HashMap<String, Value>,
}

fn value(v: &Option<AnyValue>) -> Value {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => json!(s),
        Some(any_value::Value::IntValue(i)) => json!(i),
        Some(any_value::Value::BoolValue(b)) => json!(b),
        Some(any_value::Value::DoubleValue(d)) => json!(d),
        other => json!(format!("{other:?}")),
    }
}

fn attrs(kvs: &[KeyValue]) -> HashMap<String, Value> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), value(&kv.value)))
        .collect()
}

fn flatten(received: &Received) -> Vec<Got> {
    let mut out = Vec::new();
    for req in received.lock().unwrap().iter() {
        for rs in &req.resource_spans {
            let resource = rs
                .resource
                .as_ref()
                .map(|r| attrs(&r.attributes))
                .unwrap_or_default();
            for ss in &rs.scope_spans {
                for s in &ss.spans {
                    let s: &Span = s;
                    out.push(Got {
                        name: s.name.clone(),
                        trace_id: s.trace_id.clone(),
                        span_id: s.span_id.clone(),
                        parent: s.parent_span_id.clone(),
                        attrs: attrs(&s.attributes),
                        resource: resource.clone(),
                    });
                }
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_collector() {
    let (rport, received) = otlp_receiver().await;
    let node = Node::start(
        "trace-node-1",
        &[
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("http://127.0.0.1:{rport}"),
            ),
            ("OTEL_SERVICE_NAME", "lockstep-under-test".to_owned()),
            // The console shows warnings only: the OTLP layer has its own filter.
            ("RUST_LOG", "warn".to_owned()),
        ],
    )
    .await;
    let (alice, bob, acquire_id) = scripted_session(node.addr()).await;
    // One HTTP API call, authenticated.
    let status = reqwest::Client::new()
        .get(format!("http://{}/v1/locks?room=scene:1", node.addr()))
        .bearer_auth(token("carol", None))
        .send()
        .await
        .expect("GET /v1/locks")
        .status();
    assert_eq!(status, 200);
    // The sessions closed; SIGTERM drains and flushes the rest (the batch delay is 5 s).
    let (stdout, stderr) = node.terminate().await;
    let spans = flatten(&received);
    assert!(
        !spans.is_empty(),
        "no spans exported\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();

    for s in &spans {
        assert_eq!(s.resource["service.name"], "lockstep-under-test", "{s:?}");
        assert_eq!(s.resource["node_id"], "trace-node-1", "{s:?}");
    }
    assert!(
        !names.contains(&"node"),
        "the node span must not be exported"
    );

    let session = |id: &str| {
        spans
            .iter()
            .find(|s| s.name == "session" && s.attrs.get("session_id") == Some(&json!(id)))
            .unwrap_or_else(|| panic!("no session span for {id}: {names:?}"))
    };
    let a = session(&alice);
    assert_eq!(a.attrs["user_id"], "alice");
    assert_eq!(a.attrs["node_id"], "trace-node-1");
    assert_eq!(a.attrs["kind"], "new");
    assert_eq!(a.attrs["reason"], "client_closed");
    assert_eq!(a.attrs["codec"], "json");
    assert!(a.parent.is_empty(), "a session is the root of its trace");
    let b = session(&bob);
    assert_eq!(b.attrs["user_id"], "bob");

    let requests_of = |sess: &Got| -> Vec<Got> {
        spans
            .iter()
            .filter(|s| s.name == "request" && s.parent == sess.span_id)
            .cloned()
            .collect()
    };
    let alice_requests = requests_of(a);
    let acquire = alice_requests
        .iter()
        .find(|s| s.attrs.get("type") == Some(&json!("lock.acquire")))
        .unwrap_or_else(|| panic!("no lock.acquire request span: {alice_requests:?}"));
    assert_eq!(acquire.trace_id, a.trace_id);
    assert_eq!(acquire.attrs["id"], json!(acquire_id));
    assert_eq!(acquire.attrs["room"], "scene:1");
    assert_eq!(acquire.attrs["resource"], "segment:1-1");
    assert!(!acquire.attrs.contains_key("error"), "{acquire:?}");
    for ty in ["join", "lock.release"] {
        assert!(
            alice_requests
                .iter()
                .any(|s| s.attrs.get("type") == Some(&json!(ty))),
            "no {ty} request span under alice's session"
        );
    }
    let denied = requests_of(b)
        .into_iter()
        .find(|s| s.attrs.get("type") == Some(&json!("lock.acquire")))
        .expect("bob's acquire span");
    assert_eq!(denied.attrs["error"], "lock_held");

    // Audit batches: the grant's record is appended inside the acquire request.
    let appends: Vec<&Got> = spans.iter().filter(|s| s.name == "audit.append").collect();
    let under_acquire = appends
        .iter()
        .find(|s| s.parent == acquire.span_id)
        .unwrap_or_else(|| panic!("no audit.append span under the acquire: {appends:?}"));
    assert_eq!(under_acquire.attrs["sink"], "jsonl");
    assert_eq!(under_acquire.attrs["outcome"], "ok");
    assert!(under_acquire.attrs["records"].as_i64().unwrap_or(0) >= 1);

    // The HTTP API request.
    let http = spans
        .iter()
        .find(|s| s.name == "GET /v1/locks")
        .unwrap_or_else(|| panic!("no HTTP request span: {names:?}"));
    assert_eq!(http.attrs["http.route"], "/v1/locks");
    assert_eq!(http.attrs["http.response.status_code"], json!(200));
    assert_eq!(http.attrs["user_id"], "carol");
    assert_eq!(http.attrs["node_id"], "trace-node-1");
    // Probes are debug spans, not exported by default.
    assert!(!names.iter().any(|n| n.ends_with("/readyz")), "{names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_batches_drained_into_postgres_are_spans() {
    let pg = common::postgres::PostgresServer::start();
    let (rport, received) = otlp_receiver().await;
    let node = Node::start(
        "trace-node-pg",
        &[
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("http://127.0.0.1:{rport}"),
            ),
            ("LOCKSTEP_DATABASE_URL", pg.url()),
            ("RUST_LOG", "warn".to_owned()),
        ],
    )
    .await;
    scripted_session(node.addr()).await;
    // The records reach Postgres (the drainer tails the JSON-lines file) before the drain.
    let mut rows = 0;
    for _ in 0..100 {
        rows = pg
            .psql("SELECT count(*) FROM lockstep.audit_events WHERE kind = 'lock_acquired'")
            .trim()
            .parse::<i64>()
            .unwrap_or(0);
        if rows > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(rows, 1, "the grant never reached Postgres");
    let (stdout, stderr) = node.terminate().await;
    let spans = flatten(&received);
    let drains: Vec<&Got> = spans.iter().filter(|s| s.name == "audit.drain").collect();
    assert!(
        !drains.is_empty(),
        "no audit.drain span: {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        spans.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    let drained: i64 = drains
        .iter()
        .filter(|d| d.attrs["outcome"] == "ok")
        .map(|d| d.attrs["records"].as_i64().unwrap_or(0))
        .sum();
    for d in &drains {
        assert_eq!(d.attrs["source"], "jsonl_file", "{d:?}");
        assert!(d.parent.is_empty(), "a drain batch is a root span: {d:?}");
        assert_eq!(d.resource["node_id"], "trace-node-pg");
    }
    // Two sessions opened and closed, a grant, a denial and a release.
    assert!(drained >= 5, "drained records in ok spans: {drained}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_lines_carry_session_user_room_and_node() {
    let node = Node::start(
        "json-node-1",
        &[
            ("LOCKSTEP_LOG_FORMAT", "json".to_owned()),
            // Every crate at debug: all of it must come out as JSON lines.
            ("RUST_LOG", "debug".to_owned()),
        ],
    )
    .await;
    let (alice, bob, _) = scripted_session(node.addr()).await;
    let (stdout, stderr) = node.terminate().await;
    let mut lines = Vec::new();
    for (stream, text) in [("stdout", &stdout), ("stderr", &stderr)] {
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{stream} line is not JSON ({e}): {line}"));
            assert!(v.is_object(), "{stream} line is not a JSON object: {line}");
            for key in ["timestamp", "level", "target"] {
                assert!(v.get(key).is_some(), "{stream} line without {key}: {line}");
            }
            lines.push(v);
        }
    }
    assert!(lines.len() > 10, "too few log lines: {}", lines.len());

    // Bob's refused acquire is logged inside his request span.
    let refused = lines
        .iter()
        .find(|v| v["message"] == "request refused" && v["session_id"] == json!(bob))
        .unwrap_or_else(|| panic!("no 'request refused' line for bob:\n{stdout}"));
    assert_eq!(refused["user_id"], "bob");
    assert_eq!(refused["room"], "scene:1");
    assert_eq!(refused["resource"], "segment:1-1");
    assert_eq!(refused["node_id"], "json-node-1");
    assert_eq!(refused["type"], "lock.acquire");
    assert_eq!(refused["code"], "lock_held");
    assert_eq!(refused["span"], "request");

    // Every line of a session carries its user and node; lines inside a room request the room.
    let alice_lines: Vec<&Value> = lines
        .iter()
        .filter(|v| v["session_id"] == json!(alice))
        .collect();
    assert!(!alice_lines.is_empty(), "no lines for alice's session");
    for v in &alice_lines {
        assert_eq!(v["user_id"], "alice", "{v}");
        assert_eq!(v["node_id"], "json-node-1", "{v}");
        if v["span"] == "request" && v["type"] == "join" {
            assert_eq!(v["room"], "scene:1", "{v}");
        }
    }
    // Lines outside sessions still say which node wrote them (start-up, the drain).
    let listening = lines
        .iter()
        .find(|v| v["message"] == "lockstep listening")
        .expect("start-up line");
    assert_eq!(listening["span"], "node");
    assert_eq!(listening["node_id"], "json-node-1");
}
