//! The operator console's read endpoints against real servers: `GET /v1/admin/rooms`,
//! `GET /v1/admin/nodes`, and who may read presence, locks and the audit trail — embedded
//! (one node, memory engines, JSON-lines audit) and with a private Redis and two nodes.
mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::cluster::{Gateway, token as signed};
use common::redis::RedisServer;
use common::{Client, Codec, Server};
use reqwest::StatusCode;
use serde_json::{Value, json};

const ADMIN: &str = "test-admin-token-0123456789";

async fn get(http: &reqwest::Client, url: String, bearer: Option<&str>) -> (StatusCode, Value) {
    let mut req = http.get(url);
    if let Some(t) = bearer {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn post(
    http: &reqwest::Client,
    url: String,
    bearer: &str,
    body: Value,
) -> (StatusCode, Value) {
    let resp = http
        .post(url)
        .bearer_auth(bearer)
        .json(&body)
        .send()
        .await
        .expect("request");
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Pages through `GET /v1/admin/rooms` (alternating between `bases`, to show the cursor is
/// not tied to a node) and returns every room with how often it was listed and its counts.
async fn all_rooms(
    http: &reqwest::Client,
    bases: &[String],
    bearer: &str,
    limit: usize,
) -> BTreeMap<String, (usize, u64, u64)> {
    let mut seen: BTreeMap<String, (usize, u64, u64)> = BTreeMap::new();
    let mut cursor: Option<String> = None;
    for page in 0.. {
        assert!(page < 1000, "the listing does not terminate");
        let mut url = format!("{}/v1/admin/rooms?limit={limit}", bases[page % bases.len()]);
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={}", urlencode(c)));
        }
        let (status, body) = get(http, url, Some(bearer)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(body["server_time"].as_u64().is_some(), "{body}");
        for r in body["rooms"].as_array().expect("rooms") {
            let e = seen
                .entry(r["room"].as_str().unwrap().to_owned())
                .or_default();
            e.0 += 1;
            e.1 = r["members"].as_u64().unwrap();
            e.2 = r["locks"].as_u64().unwrap();
        }
        match body["next"].as_str() {
            Some(n) => cursor = Some(n.to_owned()),
            None => break,
        }
    }
    seen
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn http_lock(http: &reqwest::Client, base: &str, bearer: &str, room: &str, res: &str) -> u64 {
    let (s, b) = post(
        http,
        format!("{base}/v1/locks/acquire"),
        bearer,
        json!({"room": room, "resource": res, "action": "approve", "ttl_ms": 600_000}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    b["token"].as_u64().expect("token")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_listing_authorization_and_audit() {
    let mut server = Server::start_with(|c| c.admin_token = Some(ADMIN.to_owned())).await;
    let http = server.http.clone();
    let base = server.url("");

    // scene:1 and scene:2 have a member; scene:2 also a WebSocket lock; story:9 only HTTP locks.
    let ws_token = server.token("alice", None).await;
    let mut alice = Client::connect(server.addr, &ws_token, Codec::Json, None).await;
    alice.join("scene:1").await;
    alice.join("scene:2").await;
    let r = alice
        .request(json!({"type":"lock.acquire","room":"scene:2","resource":"segment:2-1","action":"trim"}))
        .await;
    assert!(r["token"].as_u64().is_some(), "{r}");
    let editor = server.token("ed", None).await;
    http_lock(&http, &base, &editor, "story:9", "beat:1").await;
    http_lock(&http, &base, &editor, "story:9", "beat:2").await;

    let rooms = all_rooms(&http, std::slice::from_ref(&base), ADMIN, 50).await;
    let expect: BTreeMap<String, (usize, u64, u64)> = [
        ("scene:1".to_owned(), (1, 1, 0)),
        ("scene:2".to_owned(), (1, 1, 1)),
        ("story:9".to_owned(), (1, 0, 2)),
    ]
    .into();
    assert_eq!(rooms, expect);
    // One room per page: still each room once, and the listing ends.
    assert_eq!(
        all_rooms(&http, std::slice::from_ref(&base), ADMIN, 1).await,
        expect
    );

    // Owners see the rooms they own: by exact pattern (looked up) or by type (scanned).
    let owner2 = server
        .token("o2", Some(json!({"scene:2": "owner", "*": "editor"})))
        .await;
    let seen = all_rooms(&http, std::slice::from_ref(&base), &owner2, 50).await;
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["scene:2"]);
    let scenes = server.token("os", Some(json!({"scene:*": "owner"}))).await;
    let seen = all_rooms(&http, std::slice::from_ref(&base), &scenes, 1).await;
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["scene:1", "scene:2"]);
    // Anybody else: 403; no token: 401; a made-up cursor or a bad limit: 400.
    let url = format!("{base}/v1/admin/rooms");
    assert_eq!(
        get(&http, url.clone(), Some(&editor)).await.0,
        StatusCode::FORBIDDEN
    );
    let (s, b) = get(&http, url.clone(), None).await;
    assert_eq!(
        (s, b["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("unauthorized"))
    );
    let (s, b) = get(&http, format!("{url}?cursor=x.y"), Some(ADMIN)).await;
    assert_eq!(
        (s, b["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("bad_request"))
    );
    assert_eq!(
        get(&http, format!("{url}?limit=0"), Some(ADMIN)).await.0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        get(&http, format!("{url}?limit=201"), Some(ADMIN)).await.0,
        StatusCode::BAD_REQUEST
    );

    // Nodes: just this one, with alice's session; admin token only.
    let (s, b) = get(&http, format!("{base}/v1/admin/nodes"), Some(ADMIN)).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let nodes = b["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 1, "{b}");
    assert_eq!(nodes[0]["node_id"], b["node_id"]);
    assert_eq!(
        (nodes[0]["attached"].as_u64(), nodes[0]["parked"].as_u64()),
        (Some(1), Some(0))
    );
    assert_eq!(nodes[0]["draining"], false);
    assert_eq!(
        get(&http, format!("{base}/v1/admin/nodes"), Some(&owner2))
            .await
            .0,
        StatusCode::FORBIDDEN
    );

    // What the console reads of a room: presence and locks, with the admin token or an owner's.
    for t in [ADMIN, owner2.as_str()] {
        let (s, b) = get(&http, format!("{base}/v1/presence/scene/2"), Some(t)).await;
        assert_eq!(s, StatusCode::OK, "{b}");
        assert_eq!(b["members"][0]["user_id"], "alice");
        let (s, b) = get(&http, format!("{base}/v1/locks?room=scene:2"), Some(t)).await;
        assert_eq!(s, StatusCode::OK, "{b}");
        assert_eq!(b["locks"][0]["holder"]["user_id"], "alice");
        assert_eq!(b["locks"][0]["action"], "trim");
        assert!(b["locks"][0].get("token").is_none(), "{b}");
        assert!(b["server_time"].as_u64().is_some(), "{b}");
    }

    // An owner force-releases; the audit names it as the actor. Owners read the audit of
    // their rooms only, with room= given.
    let (s, b) = post(
        &http,
        format!("{base}/v1/admin/locks/release"),
        &owner2,
        json!({"room": "scene:2", "resource": "segment:2-1"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let audit = format!("{base}/v1/audit?room=scene:2&kind=lock_forced");
    let (s, b) = get(&http, audit.clone(), Some(&owner2)).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let rec = &b["records"][0];
    assert_eq!(
        (rec["actor"]["user_id"].as_str(), rec["user_id"].as_str()),
        (Some("o2"), Some("alice"))
    );
    assert_eq!(
        get(&http, audit.clone(), Some(ADMIN)).await.1["records"][0]["id"],
        rec["id"]
    );
    let forbidden = [
        format!("{base}/v1/audit"),
        format!("{base}/v1/audit?room=scene:1"),
        format!("{base}/v1/audit?resource=segment:2-1"),
    ];
    for url in forbidden {
        assert_eq!(
            get(&http, url, Some(&owner2)).await.0,
            StatusCode::FORBIDDEN
        );
    }
    assert_eq!(
        get(&http, audit, Some(&editor)).await.0,
        StatusCode::FORBIDDEN
    );

    // Audit paging from the JSON-lines file: `next` as `before` walks back without overlap.
    let mut ids = Vec::new();
    let mut before: Option<String> = None;
    loop {
        let mut url = format!("{base}/v1/audit?limit=2");
        if let Some(b) = &before {
            url.push_str(&format!("&before={b}"));
        }
        let (s, b) = get(&http, url, Some(ADMIN)).await;
        assert_eq!(s, StatusCode::OK, "{b}");
        ids.extend(
            b["records"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["id"].as_str().unwrap().to_owned()),
        );
        match b["next"].as_str() {
            Some(n) => before = Some(n.to_owned()),
            None => break,
        }
        assert!(ids.len() < 1000);
    }
    let distinct: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len(), "a record was listed twice");
    assert!(ids.len() >= 5, "{ids:?}");

    // The console page itself: served with a strict content security policy.
    let resp = http.get(format!("{base}/admin")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let csp = resp.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(csp.contains("connect-src 'self'"), "{csp}");
    assert!(resp.text().await.unwrap().contains("/v1/admin/rooms"));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_listing_is_cluster_wide_and_pages_every_room_once() {
    let redis = RedisServer::start();
    let a = Gateway::start(&redis.url(), "node-a", &[]).await;
    let b = Gateway::start(&redis.url(), "node-b", &[]).await;
    let http = reqwest::Client::new();
    let bases = [a.url(""), b.url("")];

    // Members on both nodes; 40 lock-only rooms, some with locks in many shards; one room
    // with both members and locks.
    let mut on_a = Client::connect(a.addr(), &signed("ann", None), Codec::Json, None).await;
    let mut on_b = Client::connect(b.addr(), &signed("bob", None), Codec::Json, None).await;
    let mut on_b2 = Client::connect(b.addr(), &signed("bea", None), Codec::Json, None).await;
    on_a.join("scene:1").await;
    on_b.join("scene:1").await;
    on_b2.join("scene:2").await;
    let editor = signed("ed", None);
    let mut expect: BTreeMap<String, (usize, u64, u64)> = BTreeMap::new();
    expect.insert("scene:1".into(), (1, 2, 0));
    expect.insert("scene:2".into(), (1, 1, 3));
    for i in 0..3 {
        http_lock(
            &http,
            &bases[i % 2],
            &editor,
            "scene:2",
            &format!("segment:{i}"),
        )
        .await;
    }
    for r in 0..40 {
        let locks = if r % 7 == 0 { 9 } else { 1 };
        for i in 0..locks {
            http_lock(
                &http,
                &bases[r % 2],
                &editor,
                &format!("story:{r}"),
                &format!("beat:{i}"),
            )
            .await;
        }
        expect.insert(format!("story:{r}"), (1, 0, locks as u64));
    }
    for limit in [1, 7, 200] {
        let seen = all_rooms(&http, &bases, ADMIN, limit).await;
        assert_eq!(seen, expect, "limit {limit}");
    }

    // An owner of `scene:*` sees the scenes only, scanned and filtered.
    let scenes = signed("os", Some(json!({"scene:*": "owner"})));
    let seen = all_rooms(&http, &bases, &scenes, 5).await;
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["scene:1", "scene:2"]);
    let viewer = signed("v", Some(json!({"*": "viewer"})));
    assert_eq!(
        get(&http, format!("{}/v1/admin/rooms", bases[0]), Some(&viewer))
            .await
            .0,
        StatusCode::FORBIDDEN
    );

    // Nodes: both, from either node, with their session counts (beats are every second).
    let mut last = Value::Null;
    let mut ok = false;
    for _ in 0..100 {
        let (s, body) = get(&http, format!("{}/v1/admin/nodes", bases[0]), Some(ADMIN)).await;
        assert_eq!(s, StatusCode::OK, "{body}");
        let counts: Vec<(String, u64)> = body["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                (
                    n["node_id"].as_str().unwrap().to_owned(),
                    n["attached"].as_u64().unwrap(),
                )
            })
            .collect();
        last = body;
        if counts == [("node-a".to_owned(), 1), ("node-b".to_owned(), 2)] {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "node listing never showed both nodes' sessions: {last}");
    assert_eq!(last["node_id"], "node-a");
    assert_eq!(
        get(&http, format!("{}/v1/admin/nodes", bases[1]), Some(&scenes))
            .await
            .0,
        StatusCode::FORBIDDEN
    );
    drop((on_a, on_b, on_b2));
}
