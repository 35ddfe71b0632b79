//! Bounded state: presence state, selections and broadcast data are capped as encoded JSON,
//! rooms are capped in members, frames in nesting depth, and a room at every cap still sends
//! every joiner its whole snapshot, in both codecs.
mod common;

use common::redis::RedisServer;
use common::{Client, Codec, Server};
use serde_json::{Value, json};

async fn client(server: &Server, sub: &str, codec: Codec) -> Client {
    let token = server.token(sub, None).await;
    Client::connect(server.addr, &token, codec, None).await
}

/// A string of `n` U+0001 characters: `n` bytes in MessagePack, `6n + 2` as JSON.
fn control_chars(n: usize) -> Value {
    Value::String("\u{1}".repeat(n))
}

/// A value nested `depth` arrays deep.
fn nested(depth: usize) -> Value {
    (0..depth).fold(json!(1), |v, _| json!([v]))
}

/// Sends `join` and reads the whole `room.snapshot` (one frame, or pages `1..=pages`) and the
/// reply; returns the snapshot's members and the number of frames it came in.
async fn join_and_read_snapshot(
    c: &mut Client,
    room: &str,
    state: Option<Value>,
) -> (Vec<Value>, usize) {
    let id = c.fresh_id();
    let mut msg = json!({"type": "join", "id": id, "room": room});
    if let Some(s) = state {
        msg["state"] = s;
    }
    c.send(msg).await;
    let (mut members, mut frames) = (Vec::new(), 0);
    loop {
        let v = c
            .recv_where(|v| v["type"] == "room.snapshot" || v["type"] == "error")
            .await;
        assert_eq!(v["type"], "room.snapshot", "{v}");
        frames += 1;
        assert_eq!(v["room"], room);
        members.extend(v["members"].as_array().expect("members").iter().cloned());
        match (v.get("page"), v.get("pages")) {
            (None, None) => break,
            (Some(p), Some(n)) => {
                assert_eq!(p.as_u64(), Some(frames as u64), "pages arrive in order");
                if p == n {
                    break;
                }
            }
            _ => panic!("page and pages come together: {v}"),
        }
    }
    let r = c
        .recv_where(|v| (v["type"] == "reply" || v["type"] == "error") && v["id"] == json!(id))
        .await;
    assert_eq!(r["type"], "reply", "{r}");
    (members, frames)
}

/// A state six times larger as JSON than as MessagePack is refused (`too_large`, nothing
/// changed); a room filled to its members cap with max-size states of control characters from
/// MessagePack clients is still joined by a JSON and a MessagePack client, which each receive
/// every member (paged: the JSON snapshot is far larger than one frame may be).
#[tokio::test]
async fn a_room_at_every_cap_stays_joinable_by_both_codecs() {
    const CAP: usize = 42;
    let server = Server::start_with(|c| c.max_members_per_room = CAP).await;
    let room = "scene:full";
    let max_state = server
        .running
        .as_ref()
        .expect("running")
        .node
        .config
        .max_presence_state_bytes;
    // The largest state of U+0001 that fits as JSON: 6n + 2 <= max.
    let n = (max_state - 2) / 6;

    let mut big = client(&server, "big", Codec::MsgPack).await;
    // 60 KB in MessagePack (under the frame limit), 360 KB as JSON.
    let e = big
        .expect_error(
            json!({"type": "join", "room": room, "state": control_chars(60_000)}),
            "too_large",
        )
        .await;
    assert!(e["message"].as_str().unwrap().contains("JSON"), "{e}");
    // One byte over as JSON, though tiny in MessagePack.
    big.expect_error(
        json!({"type": "join", "room": room, "state": control_chars(n + 1)}),
        "too_large",
    )
    .await;

    let mut members = Vec::new();
    for i in 0..CAP - 2 {
        let mut c = client(&server, &format!("m{i}"), Codec::MsgPack).await;
        let r = c
            .request(json!({"type": "join", "room": room, "state": control_chars(n)}))
            .await;
        assert_eq!(r["type"], "reply", "member {i}: {r}");
        members.push(c);
    }
    // Updates past the cap are refused too, and leave the member as it was.
    members[0]
        .expect_error(
            json!({"type": "presence", "room": room, "state": control_chars(n + 1)}),
            "too_large",
        )
        .await;

    let mut json_client = client(&server, "json", Codec::Json).await;
    let (seen, frames) = join_and_read_snapshot(&mut json_client, room, None).await;
    assert_eq!(seen.len(), CAP - 1, "every member and the joiner");
    assert!(frames > 1, "a ~180 KB JSON snapshot comes in pages");
    for m in seen.iter().filter(|m| m["user_id"] != "json") {
        assert_eq!(m["state"], control_chars(n), "states arrive whole");
    }

    let mut mp_client = client(&server, "mp", Codec::MsgPack).await;
    let (seen, _) = join_and_read_snapshot(&mut mp_client, room, Some(control_chars(n))).await;
    assert_eq!(seen.len(), CAP);

    // Both joiners stay connected and served.
    json_client.ping().await;
    mp_client.ping().await;

    // The room is full now: a new session is refused with a stable code, a member is not.
    big.expect_error(json!({"type": "join", "room": room}), "room_full")
        .await;
    let r = members[1]
        .request(json!({"type": "join", "room": room}))
        .await;
    assert_eq!(r["type"], "reply", "a member may rejoin a full room: {r}");
    let r = members[2]
        .request(json!({"type": "leave", "room": room}))
        .await;
    assert_eq!(r["type"], "reply", "{r}");
    let r = big.request(json!({"type": "join", "room": room})).await;
    assert_eq!(r["type"], "reply", "a leave makes room: {r}");
}

/// `cursor` selections share the state cap and `broadcast` data has its own, both measured as
/// JSON; nothing past them reaches the room.
#[tokio::test]
async fn selections_and_broadcast_data_are_capped_as_json() {
    let server = Server::start().await;
    let cfg = server
        .running
        .as_ref()
        .expect("running")
        .node
        .config
        .clone();
    let mut a = client(&server, "a", Codec::MsgPack).await;
    let mut b = client(&server, "b", Codec::Json).await;
    a.join("scene:1").await;
    b.join("scene:1").await;
    let over_state = control_chars(cfg.max_presence_state_bytes / 6 + 1);
    a.expect_error(
        json!({"type": "cursor", "room": "scene:1", "x": 1, "y": 2, "selection": over_state}),
        "too_large",
    )
    .await;
    let over_data = control_chars(cfg.max_broadcast_bytes / 6 + 1);
    a.expect_error(
        json!({"type": "broadcast", "room": "scene:1", "event": "e", "data": over_data}),
        "too_large",
    )
    .await;
    // Within the caps both arrive; nothing oversize arrived before them.
    let ok_data = control_chars(cfg.max_broadcast_bytes / 6 - 1);
    a.send(json!({"type": "broadcast", "room": "scene:1", "event": "e", "data": ok_data}))
        .await;
    let got = b
        .recv_where(|v| v["type"] == "broadcast" || v["type"] == "cursor")
        .await;
    assert_eq!(got["type"], "broadcast");
    assert_eq!(got["data"], ok_data);
}

/// With Redis, a MessagePack state nested deeper than JSON reads back is refused at decode
/// time (`bad_request`, with the request id); a member with the deepest allowed state can
/// leave, and the others see it go.
#[tokio::test]
async fn deep_msgpack_state_is_refused_and_members_can_always_leave() {
    let redis = RedisServer::start();
    let url = redis.url();
    let server = Server::start_with(|c| c.redis_url = Some(url)).await;
    let mut watcher = client(&server, "watcher", Codec::Json).await;
    watcher.join("scene:deep").await;
    let mut deep = client(&server, "deep", Codec::MsgPack).await;
    let e = deep
        .expect_error(
            json!({"type": "join", "room": "scene:deep", "state": nested(200)}),
            "bad_request",
        )
        .await;
    assert!(e["message"].as_str().unwrap().contains("nested"), "{e}");
    // The frame itself is the first level: the state may nest 31 deep.
    let r = deep
        .request(json!({"type": "join", "room": "scene:deep", "state": nested(31)}))
        .await;
    assert_eq!(r["type"], "reply", "{r}");
    let j = watcher.recv_type("presence.join").await;
    assert_eq!(j["member"]["state"], nested(31));
    let r = deep
        .request(json!({"type": "leave", "room": "scene:deep"}))
        .await;
    assert_eq!(r["type"], "reply", "{r}");
    let l = watcher.recv_type("presence.leave").await;
    assert_eq!(l["member"]["user_id"], "deep");
}
