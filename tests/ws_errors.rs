//! Bad input, limits and liveness over real sockets: every mistake is answered with an `error`
//! frame carrying a stable code (and the request's id), or with the documented close code, and
//! never disturbs the same connection's later requests or another client.
mod common;

use std::time::{Duration, Instant};

use common::{Client, Closed, Codec, Server, read_until_closed};
use futures_util::SinkExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// Generous bound for anything the server must do "soon" on a shared, noisy machine.
const LONG: Duration = Duration::from_secs(20);

async fn client_with_codec(server: &Server, sub: &str, codec: Codec) -> Client {
    let token = server.token(sub, None).await;
    Client::connect(server.addr, &token, codec, None).await
}

/// The next `error` frame (skipping anything else).
async fn next_error(c: &mut Client) -> Value {
    c.recv_type("error").await
}

/// Sends a raw frame that cannot be decoded; expects `malformed` without an id, then checks
/// that the connection still answers.
async fn expect_malformed(c: &mut Client, frame: Message) {
    let shown = format!("{frame:?}");
    c.send_raw(frame).await;
    let e = next_error(c).await;
    assert_eq!(e["code"], "malformed", "{shown} answered {e}");
    assert!(e.get("id").is_none(), "{shown}: no id can be known: {e}");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
    c.ping().await;
}

/// A request that must fail with `code`, its id echoed; the connection keeps working.
async fn expect_code(c: &mut Client, msg: Value, code: &str) {
    c.expect_error(msg, code).await;
    c.ping().await;
}

fn long_id(n: usize) -> String {
    "a".repeat(n)
}

/// Every decode and validation error the protocol names, in one codec. `bob` shares the room
/// and must be unaffected.
async fn decode_errors(codec: Codec) {
    let server = Server::start().await;
    let mut alice = client_with_codec(&server, "alice", codec).await;
    let mut bob = server.client("bob").await;
    alice.join("scene:1").await;
    bob.join("scene:1").await;

    // Frames that are no object/map at all.
    match codec {
        Codec::Json => {
            expect_malformed(&mut alice, Message::Text("{not json".into())).await;
            expect_malformed(&mut alice, Message::Text("[1,2]".into())).await;
            expect_malformed(&mut alice, Message::Text(r#"["ping"]"#.into())).await;
            expect_malformed(&mut alice, Message::Text(r#""ping""#.into())).await;
            expect_malformed(&mut alice, Message::Text("42".into())).await;
            expect_malformed(&mut alice, Message::Text("".into())).await;
        }
        Codec::MsgPack => {
            // 0xc1 is never used in MessagePack.
            expect_malformed(&mut alice, Message::Binary(vec![0xc1].into())).await;
            // An array [1, 2, 3].
            expect_malformed(&mut alice, Message::Binary(vec![0x93, 1, 2, 3].into())).await;
            // A map announcing one entry and ending.
            expect_malformed(&mut alice, Message::Binary(vec![0x81].into())).await;
            // The array ["ping"].
            let arr = rmp_serde::to_vec_named(&json!(["ping"])).unwrap();
            expect_malformed(&mut alice, Message::Binary(arr.into())).await;
            expect_malformed(&mut alice, Message::Binary(Vec::new().into())).await;
        }
    }

    // Unknown type: the id is echoed.
    let e = alice
        .expect_error(json!({"type": "nope"}), "unknown_type")
        .await;
    assert!(e["id"].is_u64(), "{e}");
    alice.ping().await;
    expect_code(
        &mut alice,
        json!({"type": "lock.steal", "resource": "segment:1"}),
        "unknown_type",
    )
    .await;

    // Missing fields.
    expect_code(&mut alice, json!({"note": "no type"}), "bad_request").await;
    expect_code(&mut alice, json!({"type": "join"}), "bad_request").await;
    expect_code(
        &mut alice,
        json!({"type": "cursor", "room": "scene:1", "x": 1}),
        "bad_request",
    )
    .await;
    expect_code(
        &mut alice,
        json!({"type": "lock.acquire", "room": "scene:1", "resource": "segment:1"}),
        "bad_request",
    )
    .await;
    expect_code(
        &mut alice,
        json!({"type": "lock.extend", "room": "scene:1", "resource": "segment:1", "token": 1}),
        "bad_request",
    )
    .await;

    // Wrong field types.
    expect_code(
        &mut alice,
        json!({"type": "lock.release", "room": "scene:1", "resource": "segment:1", "token": "7"}),
        "bad_request",
    )
    .await;
    expect_code(
        &mut alice,
        json!({"type": "join", "room": 42}),
        "bad_request",
    )
    .await;
    expect_code(
        &mut alice,
        json!({"type": "cursor", "room": "scene:1", "x": "left", "y": 0}),
        "bad_request",
    )
    .await;
    expect_code(
        &mut alice,
        json!({"type": "settings", "share_cursor": "no"}),
        "bad_request",
    )
    .await;
    expect_code(
        &mut alice,
        json!({"type": "lock.acquire", "room": "scene:1", "resource": "segment:1", "action": "approve", "ttl_ms": -5}),
        "bad_request",
    )
    .await;
    expect_code(
        &mut alice,
        json!({"type": "lock.acquire", "room": "scene:1", "resource": "segment:1", "action": "approve", "ttl_ms": 0}),
        "bad_request",
    )
    .await;

    // An id that is not a u32 cannot be echoed, but the frame still gets an error.
    alice
        .send(json!({"type": "join", "room": "scene:1", "id": "seven"}))
        .await;
    let e = next_error(&mut alice).await;
    assert_eq!(e["code"], "bad_request", "{e}");
    assert!(e.get("id").is_none(), "{e}");
    alice.ping().await;

    // Bad entity names, as a room and as a resource.
    let too_long = format!("scene:{}", long_id(129));
    for bad in [
        "Scene:1",
        "scene",
        "scene:a b",
        too_long.as_str(),
        "scene:",
        ":1",
        "1scene:1",
        "scene:1:2",
    ] {
        expect_code(
            &mut alice,
            json!({"type": "join", "room": bad}),
            "bad_request",
        )
        .await;
        expect_code(
            &mut alice,
            json!({"type": "lock.acquire", "room": "scene:1", "resource": bad, "action": "approve"}),
            "bad_request",
        )
        .await;
        expect_code(
            &mut alice,
            json!({"type": "presence", "room": "scene:1", "focus": bad}),
            "bad_request",
        )
        .await;
    }
    // The longest valid id (128) is fine.
    let longest = format!("scene:{}", long_id(128));
    alice.join(&longest).await;
    alice
        .request(json!({"type": "leave", "room": longest}))
        .await;

    // Bad actions.
    for bad in ["Approve!", "", "approve now", &"a".repeat(33), "1approve"] {
        expect_code(
            &mut alice,
            json!({"type": "lock.acquire", "room": "scene:1", "resource": "segment:1", "action": bad}),
            "bad_request",
        )
        .await;
    }

    // Messages for a room this session has not joined.
    for msg in [
        json!({"type": "cursor", "room": "scene:2", "x": 0.1, "y": 0.2}),
        json!({"type": "presence", "room": "scene:2", "focus": "segment:2-1"}),
        json!({"type": "broadcast", "room": "scene:2", "event": "typing", "data": {}}),
        json!({"type": "lock.acquire", "room": "scene:2", "resource": "segment:2-1", "action": "approve"}),
        json!({"type": "leave", "room": "scene:2"}),
    ] {
        expect_code(&mut alice, msg, "not_in_room").await;
    }

    // Cancelling a wait that does not exist.
    expect_code(
        &mut alice,
        json!({"type": "lock.cancel_wait", "room": "scene:1", "resource": "segment:1-1"}),
        "not_found",
    )
    .await;

    // After all that, alice still works in her room and bob saw none of it.
    let r = alice
        .request(json!({"type": "broadcast", "room": "scene:1", "event": "still-here", "data": {"n": 1}}))
        .await;
    assert_eq!(r["type"], "reply", "{r}");
    let b = bob.recv_type("broadcast").await;
    assert_eq!(b["event"], "still-here", "{b}");
    assert_eq!(b["from"]["user_id"], "alice", "{b}");
    let leftovers = bob.drain_for(Duration::from_millis(200)).await;
    assert!(
        leftovers.iter().all(|m| m["type"] != "error"),
        "bob got errors meant for alice: {leftovers:?}"
    );
    bob.ping().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decode_errors_json() {
    decode_errors(Codec::Json).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decode_errors_msgpack() {
    decode_errors(Codec::MsgPack).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_beyond_the_room_limit_is_refused() {
    let server = Server::start_with(|c| c.max_rooms_per_session = 2).await;
    let mut alice = server.client("alice").await;
    alice.join("scene:1").await;
    alice.join("scene:2").await;
    let e = alice
        .expect_error(json!({"type": "join", "room": "scene:3"}), "too_many_rooms")
        .await;
    assert!(e["id"].is_u64(), "{e}");
    alice.ping().await;
    // Joining a room already joined is not a new room.
    alice.join("scene:1").await;
    // After leaving one, another can be joined.
    let r = alice
        .request(json!({"type": "leave", "room": "scene:1"}))
        .await;
    assert_eq!(r["type"], "reply", "{r}");
    alice.join("scene:3").await;
    alice
        .expect_error(json!({"type": "join", "room": "scene:4"}), "too_many_rooms")
        .await;
    // Another session of the same user has its own budget.
    let mut alice2 = server.client("alice").await;
    alice2.join("scene:4").await;
    alice2.join("scene:5").await;
    alice.ping().await;
}

async fn oversize_frame_closes_with_1009(codec: Codec) {
    let server = Server::start_with(|c| c.max_frame_bytes = 1024).await;
    let mut alice = client_with_codec(&server, "alice", codec).await;
    let mut bob = server.client("bob").await;
    alice.join("scene:1").await;
    bob.join("scene:1").await;

    // Just under the limit is fine.
    let ok =
        json!({"type": "broadcast", "room": "scene:1", "event": "big", "data": "x".repeat(800)});
    let r = alice.request(ok).await;
    assert_eq!(r["type"], "reply", "{r}");
    bob.recv_type("broadcast").await;

    let big =
        json!({"type": "broadcast", "room": "scene:1", "event": "huge", "data": "x".repeat(4096)});
    let frame = match codec {
        Codec::Json => Message::Text(big.to_string().into()),
        Codec::MsgPack => Message::Binary(rmp_serde::to_vec_named(&big).unwrap().into()),
    };
    assert!(match &frame {
        Message::Text(t) => t.len() > 4096,
        Message::Binary(b) => b.len() > 4096,
        _ => false,
    });
    alice.send_raw(frame).await;
    let (how, _) = alice.closed_within(LONG).await;
    assert_eq!(
        how,
        Closed::Code(1009),
        "oversize frame must close with 1009"
    );

    // Bob is unaffected and never saw the huge broadcast.
    bob.ping().await;
    let seen = bob.drain_for(Duration::from_millis(300)).await;
    assert!(
        seen.iter().all(|m| m["event"] != "huge"),
        "the oversize frame was executed: {seen:?}"
    );
    let mut carol = server.client("carol").await;
    carol.join("scene:1").await;
    let j = bob.recv_type("presence.join").await;
    assert_eq!(j["member"]["user_id"], "carol");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_frame_closes_with_1009_json() {
    oversize_frame_closes_with_1009(Codec::Json).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_frame_closes_with_1009_msgpack() {
    oversize_frame_closes_with_1009(Codec::MsgPack).await;
}

/// A message split into frames that are each under the limit is still limited as a whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_fragmented_message_closes_with_1009() {
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

    let server = Server::start_with(|c| c.max_frame_bytes = 1024).await;
    let mut alice = server.client("alice").await;
    let mut bob = server.client("bob").await;
    alice.join("scene:1").await;
    bob.join("scene:1").await;
    let text =
        json!({"type": "broadcast", "room": "scene:1", "event": "huge", "data": "x".repeat(4096)})
            .to_string();
    let chunks: Vec<&[u8]> = text.as_bytes().chunks(700).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let opcode = if i == 0 {
            OpCode::Data(Data::Text)
        } else {
            OpCode::Data(Data::Continue)
        };
        let frame = Frame::message(chunk.to_vec(), opcode, i + 1 == chunks.len());
        // The server may close before the last fragment; later sends may fail.
        if alice.ws.send(Message::Frame(frame)).await.is_err() {
            break;
        }
    }
    let (how, _) = alice.closed_within(LONG).await;
    assert_eq!(how, Closed::Code(1009));
    bob.ping().await;
    let seen = bob.drain_for(Duration::from_millis(300)).await;
    assert!(seen.iter().all(|m| m["event"] != "huge"), "{seen:?}");
}

/// Reads until the error carrying `marker` (an exempt `lock.cancel_wait` sent last, so every
/// earlier message has been processed), returning everything before it.
async fn read_until_marker(c: &mut Client, marker: u32) -> Vec<Value> {
    let mut out = Vec::new();
    let deadline = Instant::now() + LONG;
    loop {
        assert!(Instant::now() < deadline, "marker {marker} never answered");
        let v = c.recv().await;
        if v["id"] == json!(marker) {
            assert_eq!(v["code"], "not_found", "marker answer: {v}");
            return out;
        }
        out.push(v);
    }
}

/// Sends `lock.cancel_wait` (exempt from the rate limit, answered `not_found`) as a marker.
async fn send_marker(c: &mut Client) -> u32 {
    let id = c.fresh_id();
    c.send(json!({"type": "lock.cancel_wait", "room": "scene:1", "resource": "segment:marker", "id": id}))
        .await;
    id
}

async fn rate_limited_server() -> Server {
    Server::start_with(|c| {
        c.messages_per_second = 5;
        c.message_burst = 5;
    })
    .await
}

/// Once the budget refills, pings are answered again (a dropped request with an id is
/// answered `rate_limited`, so this never waits on silence).
async fn ping_until_answered(c: &mut Client) {
    let deadline = Instant::now() + LONG;
    loop {
        assert!(Instant::now() < deadline, "pings never answered again");
        let id = c.fresh_id();
        c.send(json!({"type": "ping", "id": id})).await;
        let v = c
            .recv_where(|v| v["id"] == json!(id) && (v["type"] == "pong" || v["type"] == "error"))
            .await;
        if v["type"] == "pong" {
            return;
        }
        assert_eq!(v["code"], "rate_limited", "{v}");
        // Still over budget: give the bucket (5/s) time to refill a token.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A flood of id-less messages is dropped beyond the budget and told so, but the errors are
/// capped at one per second so a flood is not amplified; the connection stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_of_idless_messages_is_limited_with_capped_errors() {
    let server = rate_limited_server().await;
    let mut alice = server.client("alice").await;
    let mut bob = server.client("bob").await;
    let started = Instant::now();
    for _ in 0..50 {
        alice.send(json!({"type": "ping"})).await;
    }
    let marker = send_marker(&mut alice).await;
    let got = read_until_marker(&mut alice, marker).await;
    let elapsed = started.elapsed().as_secs_f64();

    assert!(
        got.iter()
            .all(|v| v["type"] == "pong" || v["type"] == "error"),
        "unexpected messages: {got:?}"
    );
    let pongs = got.iter().filter(|v| v["type"] == "pong").count();
    let errors: Vec<&Value> = got.iter().filter(|v| v["type"] == "error").collect();
    assert!(
        errors.iter().all(|e| e["code"] == "rate_limited"),
        "{errors:?}"
    );
    assert!(errors.iter().all(|e| e.get("id").is_none()), "{errors:?}");
    assert!(
        !errors.is_empty(),
        "a flood must be told it is rate limited"
    );
    // At most one error per second (+1 for the window boundary).
    let max_errors = 1 + elapsed.floor() as usize;
    assert!(
        errors.len() <= max_errors,
        "{} rate_limited errors in {elapsed:.2}s (cap 1/s): {errors:?}",
        errors.len()
    );
    assert!(pongs >= 5, "the burst must pass: {pongs} pongs");
    assert!(pongs < 50, "nothing was dropped");
    assert!(
        (pongs as f64) <= 5.0 + 5.0 * elapsed + 1.0,
        "{pongs} pongs in {elapsed:.2}s exceed burst 5 + 5/s"
    );

    ping_until_answered(&mut alice).await;
    // Bob has his own budget.
    for _ in 0..3 {
        bob.ping().await;
    }
}

/// A flood of requests: each one is answered exactly once, with its reply or with a
/// `rate_limited` error carrying its id (no client waits forever for a dropped request).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_of_requests_answers_each_one() {
    let server = rate_limited_server().await;
    let mut alice = server.client("alice").await;
    let started = Instant::now();
    let mut ids = Vec::new();
    for _ in 0..50 {
        let id = alice.fresh_id();
        ids.push(id);
        alice.send(json!({"type": "ping", "id": id})).await;
    }
    let marker = send_marker(&mut alice).await;
    let got = read_until_marker(&mut alice, marker).await;
    let elapsed = started.elapsed().as_secs_f64();

    let mut answered: Vec<u32> = Vec::new();
    let mut pongs = 0;
    for v in &got {
        let id = v["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("answer without id: {v}")) as u32;
        match v["type"].as_str() {
            Some("pong") => pongs += 1,
            Some("error") => assert_eq!(v["code"], "rate_limited", "{v}"),
            _ => panic!("unexpected message {v}"),
        }
        answered.push(id);
    }
    assert_eq!(answered, ids, "every request answered once, in order");
    assert!(pongs >= 5, "the burst must pass: {pongs} pongs");
    assert!(pongs < 50, "nothing was dropped");
    assert!(
        (pongs as f64) <= 5.0 + 5.0 * elapsed + 1.0,
        "{pongs} pongs in {elapsed:.2}s exceed burst 5 + 5/s"
    );
    ping_until_answered(&mut alice).await;
}

/// `lock.release` (like `leave` and `lock.cancel_wait`) is not held back by a flood of other
/// messages: releases have their own budget, because dropping one would keep a resource locked
/// for everyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_release_is_not_held_back_by_a_flood() {
    let server = rate_limited_server().await;
    let mut alice = server.client("alice").await;
    let mut bob = server.client("bob").await;
    alice.join("scene:1").await;
    bob.join("scene:1").await;
    let r = alice
        .request(json!({"type": "lock.acquire", "room": "scene:1", "resource": "segment:1-1", "action": "approve"}))
        .await;
    assert_eq!(r["type"], "reply", "{r}");
    let token = r["token"].as_u64().expect("token");
    bob.recv_type("lock.acquired").await;

    for _ in 0..20 {
        let id = alice.fresh_id();
        alice.send(json!({"type": "ping", "id": id})).await;
    }
    let release_id = alice.fresh_id();
    alice
        .send(json!({"type": "lock.release", "room": "scene:1", "resource": "segment:1-1", "token": token, "id": release_id}))
        .await;
    let mut after = Vec::new();
    for _ in 0..20 {
        let id = alice.fresh_id();
        after.push(id);
        alice.send(json!({"type": "ping", "id": id})).await;
    }
    let marker = send_marker(&mut alice).await;
    let got = read_until_marker(&mut alice, marker).await;
    let answer = got
        .iter()
        .find(|v| v["id"] == json!(release_id))
        .unwrap_or_else(|| panic!("lock.release got no answer: {got:?}"));
    assert_eq!(
        answer["type"], "reply",
        "lock.release must not be rate limited: {answer}"
    );
    let answered_after = got
        .iter()
        .filter(|v| v["type"] == "pong" && after.iter().any(|id| v["id"] == json!(id)))
        .count();
    assert!(
        answered_after < after.len(),
        "the budget was not spent around the release, so this test proved nothing"
    );
    let rel = bob.recv_type("lock.released").await;
    assert_eq!(rel["resource"], "segment:1-1");
    assert_eq!(rel["reason"], "released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_per_user_are_limited() {
    let server = Server::start_with(|c| c.max_sessions_per_user = 2).await;
    let mut a1 = server.client("alice").await;
    let _a2 = server.client("alice").await;
    let token = server.token("alice", None).await;
    for codec in [Codec::Json, Codec::MsgPack] {
        let (mut ws, first) = Client::open(server.addr, &token, codec, None).await;
        let first = first.unwrap_or_else(|c| panic!("closed without an error frame: {c:?}"));
        assert_eq!(first["type"], "error", "{first}");
        assert_eq!(first["code"], "too_many_sessions", "{first}");
        let (how, _) = read_until_closed(&mut ws, codec, LONG).await;
        assert_eq!(how, Closed::Code(4009), "{codec:?}");
    }
    // Other users are not affected, nor are alice's open sessions.
    let mut bob = server.client("bob").await;
    bob.ping().await;
    a1.ping().await;

    // When one of alice's sessions ends, she may open another.
    a1.close_normally().await;
    let deadline = Instant::now() + LONG;
    loop {
        let (ws, first) = Client::open(server.addr, &token, Codec::Json, None).await;
        match first {
            Ok(v) if v["type"] == "welcome" => {
                let mut c = Client::from_parts(ws, Codec::Json, v);
                c.ping().await;
                break;
            }
            Ok(v) => assert_eq!(v["code"], "too_many_sessions", "{v}"),
            Err(c) => panic!("closed without an error frame: {c:?}"),
        }
        assert!(
            Instant::now() < deadline,
            "the closed session still counts against the limit"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sums the samples of `name` whose labels include `labels`.
async fn metric(server: &Server, name: &str) -> f64 {
    let text = server
        .http
        .get(server.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    common::metric_sum(&text, name, &[]).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_closed_with_4008() {
    let server = Server::start_with(|c| {
        c.max_frame_bytes = 1024;
        c.max_queue_bytes = 2048;
        c.messages_per_second = 1_000_000;
        c.message_burst = 1_000_000;
    })
    .await;
    let mut slow = server.client("slow").await;
    let mut flooder = server.client("flooder").await;
    slow.join("scene:1").await;
    flooder.join("scene:1").await;
    // From here on `slow` never reads until the flood is over.
    let payload = "p".repeat(450);
    let started = Instant::now();
    let mut sent = 0u64;
    loop {
        for _ in 0..100 {
            flooder
                .send(json!({"type": "broadcast", "room": "scene:1", "event": "flood", "data": payload}))
                .await;
            sent += 1;
        }
        if metric(&server, "lockstep_slow_consumer_disconnects_total").await >= 1.0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "{sent} broadcasts of ~500 bytes did not overflow a 2 KiB queue"
        );
    }
    // The flooder is fine.
    flooder.ping().await;
    // The slow client gets what was already on the wire, then 4008.
    let (how, before) = slow.closed_within(LONG).await;
    assert_eq!(
        how,
        Closed::Code(4008),
        "slow consumer after {before} buffered messages ({sent} sent)"
    );
    flooder.ping().await;
    let r = flooder
        .request(json!({"type": "broadcast", "room": "scene:1", "event": "after", "data": null}))
        .await;
    assert_eq!(r["type"], "reply", "{r}");
}

/// Reads `c` until `want` all matched (in any order), within `LONG`.
async fn recv_all(c: &mut Client, want: &[&dyn Fn(&Value) -> bool]) -> Vec<Value> {
    let mut found: Vec<Option<Value>> = vec![None; want.len()];
    let deadline = Instant::now() + LONG;
    while found.iter().any(Option::is_none) {
        assert!(Instant::now() < deadline, "only found {found:?}");
        let v = c.recv().await;
        for (i, pred) in want.iter().enumerate() {
            if found[i].is_none() && pred(&v) {
                found[i] = Some(v.clone());
            }
        }
    }
    found.into_iter().map(Option::unwrap).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_client_loses_session_and_locks_on_heartbeat_timeout() {
    let server = Server::start_with(|c| {
        c.heartbeat_interval = Duration::from_millis(200);
        c.heartbeat_misses = 2;
    })
    .await;
    let mut silent = server.client("silent").await;
    assert_eq!(silent.welcome["heartbeat_ms"], 200);
    let mut watcher = server.client("watcher").await;
    silent.join("scene:1").await;
    watcher.join("scene:1").await;
    let r = silent
        .request(json!({"type": "lock.acquire", "room": "scene:1", "resource": "segment:1-1", "action": "approve"}))
        .await;
    assert_eq!(r["type"], "reply", "{r}");
    let silent_session = silent.session_id();
    // `silent` stops reading: tungstenite answers pings only while it is polled.
    let started = Instant::now();
    let got = recv_all(
        &mut watcher,
        &[
            &|v: &Value| v["type"] == "presence.leave" && v["member"]["user_id"] == "silent",
            &|v: &Value| v["type"] == "lock.released" && v["resource"] == "segment:1-1",
        ],
    )
    .await;
    assert_eq!(got[0]["member"]["session_id"], json!(silent_session));
    assert_eq!(got[1]["reason"], "disconnected", "{}", got[1]);
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "ended before two heartbeat intervals could pass: {:?}",
        started.elapsed()
    );
    // The lock is free for others now.
    let r = watcher
        .request(json!({"type": "lock.acquire", "room": "scene:1", "resource": "segment:1-1", "action": "trim"}))
        .await;
    assert_eq!(r["type"], "reply", "{r}");
}

/// A client that stopped reading and comes back finds out why its session ended: the pings it
/// missed, then close 4010. (tungstenite answers the buffered pings as it reads them, so the
/// server must finish the closing handshake instead of dropping the TCP connection at once.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_timeout_is_closed_with_4010() {
    let server = Server::start_with(|c| {
        c.heartbeat_interval = Duration::from_millis(200);
        c.heartbeat_misses = 2;
    })
    .await;
    let mut silent = server.client("silent").await;
    let mut watcher = server.client("watcher").await;
    silent.join("scene:1").await;
    watcher.join("scene:1").await;
    // Wait (reading the watcher only) until the server has ended the silent session.
    let leave = watcher.recv_type("presence.leave").await;
    assert_eq!(leave["member"]["user_id"], "silent");
    // The client comes back a moment later, well within the server's 2 s close timeout. (This
    // pause only makes a missing closing handshake visible; a server that waits for the
    // client's close reply passes with or without it.)
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (how, _) = silent.closed_within(LONG).await;
    assert_eq!(how, Closed::Code(4010));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_client_survives_heartbeats() {
    let server = Server::start_with(|c| {
        c.heartbeat_interval = Duration::from_millis(200);
        c.heartbeat_misses = 2;
    })
    .await;
    let mut alice = server.client("alice").await;
    let mut bob = server.client("bob").await;
    alice.join("scene:1").await;
    bob.join("scene:1").await;
    // Over ten heartbeat intervals with nothing sent, only reads (which answer pings).
    let (seen_a, seen_b) = tokio::join!(
        alice.drain_for(Duration::from_millis(2500)),
        bob.drain_for(Duration::from_millis(2500))
    );
    for seen in [seen_a, seen_b] {
        assert!(
            seen.iter().all(|m| m["type"] != "presence.leave"),
            "a reading client was dropped: {seen:?}"
        );
    }
    alice.ping().await;
    bob.ping().await;
    let r = alice
        .request(json!({"type": "broadcast", "room": "scene:1", "event": "alive", "data": null}))
        .await;
    assert_eq!(r["type"], "reply", "{r}");
    assert_eq!(bob.recv_type("broadcast").await["event"], "alive");
}
