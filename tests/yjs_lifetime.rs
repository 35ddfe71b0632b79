//! The token lifetime of `/v1/yjs` connections: a connection authorized by a token ends at
//! that token's `exp` (4012) and when an admin revokes its user or its `jti` (4013, from any
//! node's revoke endpoint); the revoked token is then refused at connect. Real node, real
//! sockets, HS256 tokens signed here so the test picks `exp` and `jti`.
mod common;
mod yjs_support;

use std::time::Instant;

use common::Server;
use serde_json::{Value, json};
use yjs_support::YClient;

const SECRET: &str = common::cluster::SECRET;
const ADMIN: &str = "admin-token-for-yjs-lifetime-0123";
const ROOM: &str = "scene:5";

async fn server() -> Server {
    Server::start_with(|c| {
        c.jwt_secret = Some(SECRET.into());
        c.admin_token = Some(ADMIN.into());
    })
    .await
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

fn jwt(sub: &str, exp: u64, jti: &str) -> String {
    let claims = json!({"sub": sub, "name": sub, "rooms": {"*": "editor"}, "exp": exp, "jti": jti});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign")
}

async fn revoke(server: &Server, body: Value) -> Value {
    let r = server
        .http
        .post(server.url("/v1/admin/sessions/revoke"))
        .bearer_auth(ADMIN)
        .json(&body)
        .send()
        .await
        .expect("revoke request");
    assert!(r.status().is_success(), "{}", r.status());
    r.json().await.expect("revoke json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_yjs_connection_ends_at_its_tokens_exp_with_4012() {
    let server = server().await;
    // Whole seconds: `exp` is in seconds, so this one ends 2–3 s from now.
    let exp = now_s() + 3;
    let mut c = YClient::connect(server.addr, ROOM, &jwt("ann", exp, "a-1")).await;
    c.until("synced", |c| c.synced).await;
    c.insert("before exp").await;
    c.until("own edit back", |c| c.text() == "before exp").await;
    let t = Instant::now();
    assert_eq!(c.until_closed().await, 4012);
    println!("closed {:?} after the wait started", t.elapsed());
    // A connection with a longer-lived token on the same document is untouched.
    let mut other = YClient::connect(server.addr, ROOM, &jwt("bob", now_s() + 3600, "b-1")).await;
    other.until("synced", |c| c.synced).await;
    assert_eq!(other.text(), "before exp");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_user_or_a_jti_closes_their_yjs_connections_with_4013() {
    let server = server().await;
    let exp = now_s() + 3600;
    let mut ann1 = YClient::connect(server.addr, ROOM, &jwt("ann", exp, "a-1")).await;
    let mut ann2 = YClient::connect(server.addr, "scene:6", &jwt("ann", exp, "a-2")).await;
    let mut bob = YClient::connect(server.addr, ROOM, &jwt("bob", exp, "b-1")).await;
    for c in [&mut ann1, &mut ann2, &mut bob] {
        c.until("synced", |c| c.synced).await;
    }

    let r = revoke(&server, json!({"jti": "a-1"})).await;
    assert_eq!(ann1.until_closed().await, 4013, "{r}");
    // Only that token's connection.
    ann2.insert("ann still edits").await;
    ann2.until("ann2's edit", |c| c.text() == "ann still edits")
        .await;
    // A revoked token is refused at connect.
    let mut again = YClient::connect(server.addr, ROOM, &jwt("ann", exp, "a-1")).await;
    assert_eq!(again.until_closed().await, 4013);

    revoke(&server, json!({"user_id": "ann"})).await;
    assert_eq!(ann2.until_closed().await, 4013);
    bob.insert("bob unaffected").await;
    bob.until("bob's edit", |c| c.text().contains("bob unaffected"))
        .await;
    assert!(bob.closed.is_none());
}
