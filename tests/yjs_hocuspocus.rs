//! `GET /v1/hocuspocus` on one embedded node: real sockets, a raw Hocuspocus v4 client built
//! on yrs that sends what `@hocuspocus/provider` 4.8 sends (auth message, then SyncStep1, per
//! document name, many documents on one socket).
mod common;
mod yjs_support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::Server;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message as Ws;
use yjs_support::{WAIT, YClient};
use yrs::encoding::read::{Cursor, Read};
use yrs::encoding::write::Write;
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{Doc, GetString, ReadTxn, StateVector, Text, TextRef, Transact, Update};

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One document as a provider holds it.
struct HDoc {
    doc: Doc,
    text: TextRef,
    /// `read-write` / `readonly` once authenticated.
    scope: Option<String>,
    denied: Option<String>,
    synced: bool,
    /// SyncStatus messages: saved, not saved.
    saved: usize,
    refused: usize,
    /// The reason of the server's Close message for this document.
    closed: Option<String>,
    awareness: HashMap<u64, String>,
}

impl HDoc {
    fn new() -> HDoc {
        let doc = Doc::new();
        let text = doc.get_or_insert_text("text");
        HDoc {
            doc,
            text,
            scope: None,
            denied: None,
            synced: false,
            saved: 0,
            refused: 0,
            closed: None,
            awareness: HashMap::new(),
        }
    }
}

struct HClient {
    socket: Socket,
    docs: HashMap<String, HDoc>,
    pings: usize,
    closed: Option<u16>,
}

fn addressed(address: &str, kind: u32, rest: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut v = Vec::new();
    v.write_string(address);
    v.write_var(kind);
    rest(&mut v);
    v
}

impl HClient {
    async fn connect(server: &Server) -> HClient {
        let url = format!("ws://{}/v1/hocuspocus", server.addr);
        let (socket, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("connect");
        HClient {
            socket,
            docs: HashMap::new(),
            pings: 0,
            closed: None,
        }
    }

    async fn send_raw(&mut self, bytes: Vec<u8>) {
        let _ = self.socket.send(Ws::Binary(bytes.into())).await;
    }

    /// What a provider does on open: its auth message, then SyncStep1.
    async fn open(&mut self, address: &str, token: &str) {
        self.docs.insert(address.to_owned(), HDoc::new());
        self.send_auth(address, token).await;
        let sv = self.docs[address].doc.transact().state_vector().encode_v1();
        self.send_raw(addressed(address, 0, |v| {
            v.write_var(0u32);
            v.write_buf(&sv);
        }))
        .await;
    }

    async fn send_auth(&mut self, address: &str, token: &str) {
        self.send_raw(addressed(address, 2, |v| {
            v.write_var(0u32);
            v.write_string(token);
            v.write_string("4.8.0");
        }))
        .await;
    }

    async fn insert(&mut self, address: &str, s: &str) {
        let d = &self.docs[address];
        let before = d.doc.transact().state_vector();
        {
            let mut txn = d.doc.transact_mut();
            let len = d.text.len(&txn);
            d.text.insert(&mut txn, len, s);
        }
        let update = d.doc.transact().encode_diff_v1(&before);
        self.send_raw(addressed(address, 0, |v| {
            v.write_var(2u32);
            v.write_buf(&update);
        }))
        .await;
    }

    async fn set_awareness(&mut self, address: &str, clock: u32, json: &str) {
        let id = self.docs[address].doc.client_id().get();
        let mut update = Vec::new();
        update.write_var(1u32);
        update.write_var(id);
        update.write_var(clock);
        update.write_string(json);
        self.send_raw(addressed(address, 1, |v| v.write_buf(&update)))
            .await;
    }

    fn text(&self, address: &str) -> String {
        let d = &self.docs[address];
        d.text.get_string(&d.doc.transact())
    }

    async fn pump_once(&mut self, within: Duration) -> bool {
        let Ok(next) = tokio::time::timeout(within, self.socket.next()).await else {
            return false;
        };
        match next {
            Some(Ok(Ws::Binary(b))) => {
                self.on_frame(&b).await;
                true
            }
            Some(Ok(Ws::Close(frame))) => {
                self.closed = Some(frame.map_or(1005, |f| u16::from(f.code)));
                false
            }
            Some(Ok(_)) => true,
            Some(Err(_)) | None => {
                self.closed.get_or_insert(1006);
                false
            }
        }
    }

    async fn on_frame(&mut self, b: &[u8]) {
        if b == [9] {
            self.pings += 1;
            self.send_raw(vec![10]).await;
            return;
        }
        let mut c = Cursor::new(b);
        let address = c.read_string().expect("address").to_owned();
        let kind: u32 = c.read_var().expect("type");
        let mut reply = None;
        let d = self
            .docs
            .get_mut(&address)
            .unwrap_or_else(|| panic!("a frame for {address:?}, which is not open"));
        match kind {
            0 => match c.read_var::<u32>().expect("sync type") {
                0 => {
                    let sv = StateVector::decode_v1(c.read_buf().unwrap()).unwrap();
                    let diff = d.doc.transact().encode_diff_v1(&sv);
                    reply = Some(addressed(&address, 0, |v| {
                        v.write_var(1u32);
                        v.write_buf(&diff);
                    }));
                }
                step => {
                    let u = Update::decode_v1(c.read_buf().unwrap()).expect("update decodes");
                    d.doc.transact_mut().apply_update(u).expect("applies");
                    if step == 1 {
                        d.synced = true;
                    }
                }
            },
            1 => {
                let buf = c.read_buf().unwrap().to_vec();
                let mut a = Cursor::new(&buf);
                let n: u32 = a.read_var().unwrap();
                for _ in 0..n {
                    let id: u64 = a.read_var().unwrap();
                    let _clock: u32 = a.read_var().unwrap();
                    let json = a.read_string().unwrap().to_owned();
                    d.awareness.insert(id, json);
                }
            }
            2 => match c.read_var::<u32>().unwrap() {
                1 => d.denied = Some(c.read_string().unwrap().to_owned()),
                2 => d.scope = Some(c.read_string().unwrap().to_owned()),
                other => panic!("auth sub-type {other}"),
            },
            7 => d.closed = Some(c.read_string().unwrap().to_owned()),
            8 => match c.read_var::<u32>().unwrap() {
                1 => d.saved += 1,
                _ => d.refused += 1,
            },
            other => panic!("unexpected message type {other}"),
        }
        if let Some(r) = reply {
            self.send_raw(r).await;
        }
    }

    async fn until(&mut self, what: &str, cond: impl Fn(&HClient) -> bool) {
        let deadline = Instant::now() + WAIT;
        while !cond(self) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "timed out waiting for {what}");
            if !self.pump_once(left).await && self.closed.is_some() {
                panic!("closed ({:?}) while waiting for {what}", self.closed);
            }
        }
    }

    async fn until_closed(&mut self) -> u16 {
        let deadline = Instant::now() + WAIT;
        while self.closed.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "timed out waiting for a close");
            self.pump_once(left).await;
        }
        self.closed.unwrap()
    }

    async fn drain_for(&mut self, d: Duration) {
        let deadline = Instant::now() + d;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || (!self.pump_once(left).await && self.closed.is_some()) {
                return;
            }
        }
    }
}

fn synced(address: &str) -> impl Fn(&HClient) -> bool + '_ {
    move |c| c.docs[address].synced && c.docs[address].scope.is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_per_document_read_write_readonly_and_denied_on_one_socket() {
    let server = Server::start().await;
    let token = server
        .token(
            "mixed",
            Some(json!({"scene:1": "editor", "scene:2": "viewer", "scene:3": "owner"})),
        )
        .await;
    let mut c = HClient::connect(&server).await;
    c.open("scene:1", &token).await;
    c.open("scene:2", &token).await;
    c.open("scene:3", &token).await;
    c.open("scene:4", &token).await;
    c.open("not a name!", &token).await;
    c.open("scene:5", "not-a-token").await;
    c.open("scene:6", "").await;
    c.until("every answer", |c| {
        c.docs
            .values()
            .all(|d| d.scope.is_some() || d.denied.is_some())
    })
    .await;
    let scope = |n: &str| c.docs[n].scope.clone();
    assert_eq!(scope("scene:1").as_deref(), Some("read-write"));
    assert_eq!(scope("scene:2").as_deref(), Some("readonly"));
    assert_eq!(scope("scene:3").as_deref(), Some("read-write"));
    let denied = |n: &str| c.docs[n].denied.clone().unwrap_or_default();
    assert_eq!(denied("scene:4"), "no role in this room");
    assert!(denied("not a name!").starts_with("bad document name"));
    assert!(!denied("scene:5").is_empty());
    assert!(
        denied("scene:6").contains("missing"),
        "{}",
        denied("scene:6")
    );

    // The socket stays open for the authorized documents, which sync and take edits.
    c.until("scene:1 synced", synced("scene:1")).await;
    c.until("scene:2 synced", synced("scene:2")).await;
    c.insert("scene:1", "hello").await;
    c.until("the edit saved", |c| c.docs["scene:1"].saved >= 2)
        .await;
    assert!(c.closed.is_none());
    // A refused document's later messages are dropped, not queued forever nor answered.
    for i in 0..300 {
        c.set_awareness("scene:4", i + 1, "{}").await;
    }
    let mut y = YClient::connect(server.addr, "scene:1", &token).await;
    y.until("the y-websocket client sees the Hocuspocus edit", |y| {
        y.text() == "hello"
    })
    .await;
    c.drain_for(Duration::from_millis(200)).await;
    assert!(c.closed.is_none(), "closed with {:?}", c.closed);
    assert!(c.docs["scene:4"].scope.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_documents_on_one_socket_converge_and_stay_apart() {
    let server = Server::start().await;
    let ta = server.token("alice", None).await;
    let tb = server.token("bob", None).await;
    let mut a = HClient::connect(&server).await;
    let mut b = HClient::connect(&server).await;
    for n in ["scene:10", "scene:11"] {
        a.open(n, &ta).await;
        b.open(n, &tb).await;
    }
    for n in ["scene:10", "scene:11"] {
        a.until("a synced", synced(n)).await;
        b.until("b synced", synced(n)).await;
    }
    a.insert("scene:10", "a10 ").await;
    b.insert("scene:11", "b11 ").await;
    a.insert("scene:11", "a11 ").await;
    b.insert("scene:10", "b10 ").await;
    for n in ["scene:10", "scene:11"] {
        a.until("both edits", |c| c.text(n).len() == 8).await;
        b.until("both edits", |c| c.text(n).len() == 8).await;
        assert_eq!(a.text(n), b.text(n));
    }
    assert!(a.text("scene:10").contains("a10") && a.text("scene:10").contains("b10"));
    assert!(!a.text("scene:10").contains("11"), "{}", a.text("scene:10"));
    assert!(!a.text("scene:11").contains("10"), "{}", a.text("scene:11"));
    // Every update was acknowledged once logged (plus the SyncStep2 of the initial sync).
    a.until("acks", |c| {
        c.docs["scene:10"].saved >= 2 && c.docs["scene:11"].saved >= 2
    })
    .await;

    // A late y-websocket joiner on the same document gets the same state.
    let mut y = YClient::connect(server.addr, "scene:11", &ta).await;
    y.until("synced", |y| y.synced).await;
    assert_eq!(y.text(), a.text("scene:11"));

    // Awareness reaches the other socket, and goes null when the document is closed (7).
    a.set_awareness("scene:10", 1, r#"{"user":"alice"}"#).await;
    let a_id = a.docs["scene:10"].doc.client_id().get();
    b.until("alice's awareness", |c| {
        c.docs["scene:10"].awareness.get(&a_id).map(String::as_str) == Some(r#"{"user":"alice"}"#)
    })
    .await;
    a.send_raw(addressed("scene:10", 7, |_| {})).await;
    b.until("alice's awareness gone", |c| {
        c.docs["scene:10"].awareness.get(&a_id).map(String::as_str) == Some("null")
    })
    .await;
    // Only that document: scene:11 still syncs on the same socket.
    b.insert("scene:11", "more").await;
    a.until("scene:11 still live", |c| {
        c.text("scene:11").ends_with("more")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_readonly_update_is_refused_and_never_stored() {
    let server = Server::start().await;
    let te = server.token("ed", None).await;
    let tv = server
        .token("vic", Some(json!({"scene:20": "viewer"})))
        .await;
    let mut ed = HClient::connect(&server).await;
    let mut vic = HClient::connect(&server).await;
    ed.open("scene:20", &te).await;
    vic.open("scene:20", &tv).await;
    ed.until("ed synced", synced("scene:20")).await;
    vic.until("vic synced", synced("scene:20")).await;
    // The viewer's SyncStep2 held nothing new: saved, like the Hocuspocus server says.
    vic.until("vic's sync acknowledged", |c| c.docs["scene:20"].saved == 1)
        .await;
    assert_eq!(vic.docs["scene:20"].scope.as_deref(), Some("readonly"));

    vic.insert("scene:20", "EVIL").await;
    vic.until("refused", |c| c.docs["scene:20"].refused == 1)
        .await;
    ed.insert("scene:20", "good").await;
    vic.until("ed's edit reaches the viewer", |c| {
        c.text("scene:20").contains("good")
    })
    .await;
    assert!(!ed.text("scene:20").contains("EVIL"));

    // A reconnecting viewer whose SyncStep2 carries its local edit: refused too.
    let mut vic2 = HClient::connect(&server).await;
    vic2.open("scene:20", &tv).await;
    vic2.insert("scene:20", "EVIL2").await;
    vic2.until("synced", synced("scene:20")).await;
    vic2.until("both refused", |c| c.docs["scene:20"].refused == 2)
        .await;
    assert_eq!(vic2.docs["scene:20"].saved, 0);

    let mut late = YClient::connect(server.addr, "scene:20", &te).await;
    late.until("synced", |y| y.synced).await;
    assert_eq!(late.text(), "good");
    let metrics = server.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("lockstep_yjs_readonly_refused_total") && l.ends_with(" 3")),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_message_closes_the_socket_with_1007() {
    let server = Server::start().await;
    let t = server.token("one", None).await;
    let mut good = HClient::connect(&server).await;
    good.open("scene:30", &t).await;
    good.until("synced", synced("scene:30")).await;

    // An Update whose payload is not a Yjs update.
    let mut bad = HClient::connect(&server).await;
    bad.open("scene:30", &t).await;
    bad.until("synced", synced("scene:30")).await;
    bad.send_raw(addressed("scene:30", 0, |v| {
        v.write_var(2u32);
        v.write_buf([0xffu8; 5]);
    }))
    .await;
    assert_eq!(bad.until_closed().await, 1007);

    // A frame that is not a Hocuspocus message at all (its address runs past its end).
    let mut bad = HClient::connect(&server).await;
    bad.send_raw(vec![40, b's']).await;
    assert_eq!(bad.until_closed().await, 1007);

    // The others are not affected, and nothing of it was stored.
    good.insert("scene:30", "fine").await;
    good.until("own edit saved", |c| c.docs["scene:30"].saved >= 2)
        .await;
    let mut late = YClient::connect(server.addr, "scene:30", &t).await;
    late.until("synced", |y| y.synced).await;
    assert_eq!(late.text(), "fine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_refuse_one_document_not_the_socket() {
    let server = Server::start_with(|c| c.yjs_max_clients_per_doc = 1).await;
    let t = server.token("lim", None).await;
    let mut c = HClient::connect(&server).await;
    c.open("scene:40", &t).await;
    c.until("synced", synced("scene:40")).await;
    // The same document under a second address (a provider's session id): the document
    // has its one client on this node.
    c.open("scene:40\0second", &t).await;
    c.until("refused", |c| c.docs["scene:40\0second"].denied.is_some())
        .await;
    assert!(
        c.docs["scene:40\0second"]
            .denied
            .as_deref()
            .unwrap()
            .contains("maximum of 1 clients"),
        "{:?}",
        c.docs["scene:40\0second"].denied
    );

    // 64 documents per socket (the refused one counts: its address stays known); the 65th
    // is refused, the socket stays.
    for i in 0..62 {
        c.open(&format!("scene:{}", 100 + i), &t).await;
    }
    c.until("63 open", |c| {
        c.docs.values().filter(|d| d.scope.is_some()).count() == 63
    })
    .await;
    c.open("scene:999", &t).await;
    c.until("the 65th refused", |c| c.docs["scene:999"].denied.is_some())
        .await;
    assert!(
        c.docs["scene:999"]
            .denied
            .as_deref()
            .unwrap()
            .contains("64")
    );
    c.insert("scene:40", "still").await;
    c.until("saved", |c| c.docs["scene:40"].saved >= 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_before_auth_are_bounded() {
    let server = Server::start().await;
    let mut c = HClient::connect(&server).await;
    // Never authenticated: its messages wait, and there may not be more than 256 of them.
    c.docs.insert("scene:50".into(), HDoc::new());
    for i in 0..300 {
        c.set_awareness("scene:50", i + 1, "{}").await;
    }
    assert_eq!(c.until_closed().await, 1008);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_socket_gets_pings_and_stays_open() {
    let server = Server::start().await;
    let t = server.token("idle", None).await;
    let mut c = HClient::connect(&server).await;
    c.open("scene:60", &t).await;
    c.until("synced", synced("scene:60")).await;
    // Nothing to send for 10 s: a Ping within the next 5 (answered with Pong by the client).
    c.drain_for(Duration::from_secs(16)).await;
    assert!(c.pings >= 1, "no ping in 16 s");
    assert!(c.closed.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_node_closes_with_1012() {
    let mut server = Server::start().await;
    let t = server.token("d", None).await;
    let mut c = HClient::connect(&server).await;
    c.open("scene:70", &t).await;
    c.until("synced", synced("scene:70")).await;
    let (_, code) = tokio::join!(server.shutdown(), c.until_closed());
    assert_eq!(code, 1012);
}

/// A document open on a Hocuspocus socket is its user's member of the document's room (the
/// presence bridge of `/v1/yjs`), one per document; closing the document (7) is its leave,
/// while the socket and its other document stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_open_document_is_a_presence_member_until_it_is_closed() {
    let server = Server::start().await;
    let mut watcher = server.client("watcher").await;
    watcher.join("scene:30").await;
    let ta = server.token("alice", None).await;
    let mut a = HClient::connect(&server).await;
    a.open("scene:30", &ta).await;
    a.open("scene:31", &ta).await;
    a.until("synced", synced("scene:30")).await;
    a.until("synced", synced("scene:31")).await;
    let joined = watcher.recv_type("presence.join").await;
    assert_eq!(joined["room"], "scene:30", "{joined}");
    assert_eq!(joined["member"]["user_id"], "alice", "{joined}");
    assert_eq!(joined["member"]["state"], json!({"via": "yjs"}), "{joined}");
    let sid = joined["member"]["session_id"].as_str().unwrap().to_owned();

    a.send_raw(addressed("scene:30", 7, |_| {})).await;
    let left = watcher.recv_type("presence.leave").await;
    assert_eq!(left["member"]["session_id"], sid.as_str(), "{left}");
    // scene:31 is still open on the same socket, and still listed.
    let r: serde_json::Value = server
        .http
        .get(server.url("/v1/presence/scene/31"))
        .bearer_auth(&ta)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let users: Vec<&str> = r["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["user_id"].as_str())
        .collect();
    assert_eq!(users, ["alice"], "{r}");
}

/// A document's token revoked by an admin ends the socket with 4013 (noticed on the socket's
/// 5 s tick); the provider reconnects and authenticates every document again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_documents_token_ends_the_socket_with_4013() {
    const ADMIN: &str = "admin-token-for-hocuspocus-0123";
    let server = Server::start_with(|c| {
        c.jwt_secret = Some(common::cluster::SECRET.into());
        c.admin_token = Some(ADMIN.into());
    })
    .await;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let claims =
        json!({"sub": "ann", "name": "ann", "rooms": {"*": "editor"}, "exp": exp, "jti": "h-1"});
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(common::cluster::SECRET.as_bytes()),
    )
    .unwrap();
    let mut a = HClient::connect(&server).await;
    a.open("scene:40", &token).await;
    a.until("synced", synced("scene:40")).await;
    let r = server
        .http
        .post(server.url("/v1/admin/sessions/revoke"))
        .bearer_auth(ADMIN)
        .json(&json!({"jti": "h-1"}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    assert_eq!(a.until_closed().await, 4013);
}
