//! A small y-websocket client for the Yjs tests: a `yrs::Doc` synced over a real WebSocket to
//! `GET /v1/yjs/{room}`, speaking the same messages as the y-websocket JS provider.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message as Ws;
use yrs::sync::awareness::{AwarenessUpdate, AwarenessUpdateEntry};
use yrs::sync::{Message, SyncMessage};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{Doc, GetString, Map, MapRef, ReadTxn, StateVector, Text, TextRef, Transact, Update};

pub const WAIT: Duration = Duration::from_secs(20);

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub struct YClient {
    pub doc: Doc,
    pub text: TextRef,
    pub map: MapRef,
    socket: Socket,
    /// Awareness states seen: client id → JSON ("null" when removed).
    pub awareness: std::collections::HashMap<u64, String>,
    pub synced: bool,
    /// The close code, once the server closed.
    pub closed: Option<u16>,
}

impl YClient {
    /// Connects to `ws://{addr}/v1/yjs/{room}?token=…` and sends SyncStep1.
    pub async fn connect(addr: std::net::SocketAddr, room: &str, token: &str) -> YClient {
        YClient::connect_with(addr, room, token, None).await
    }

    /// [`connect`](Self::connect) with a local document state already in place (a provider
    /// reconnecting with edits the server may not have: they go out in its SyncStep2).
    pub async fn connect_with(
        addr: std::net::SocketAddr,
        room: &str,
        token: &str,
        state: Option<Vec<u8>>,
    ) -> YClient {
        let url = format!("ws://{addr}/v1/yjs/{room}?token={token}");
        let (socket, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("connect");
        let doc = Doc::new();
        let text = doc.get_or_insert_text("text");
        let map = doc.get_or_insert_map("map");
        if let Some(state) = state {
            let u = Update::decode_v1(&state).expect("state decodes");
            doc.transact_mut().apply_update(u).expect("state applies");
        }
        let mut c = YClient {
            doc,
            text,
            map,
            socket,
            awareness: Default::default(),
            synced: false,
            closed: None,
        };
        let sv = c.doc.transact().state_vector();
        c.send(Message::Sync(SyncMessage::SyncStep1(sv))).await;
        c
    }

    pub async fn send(&mut self, m: Message) {
        self.send_raw(m.encode_v1()).await;
    }

    pub async fn send_raw(&mut self, bytes: Vec<u8>) {
        let _ = self.socket.send(Ws::Binary(bytes.into())).await;
    }

    /// Applies `f` to the local doc and sends the resulting update.
    pub async fn edit(&mut self, f: impl FnOnce(&mut yrs::TransactionMut, &TextRef, &MapRef)) {
        let before = self.doc.transact().state_vector();
        {
            let mut txn = self.doc.transact_mut();
            f(&mut txn, &self.text, &self.map);
        }
        let update = self.doc.transact().encode_diff_v1(&before);
        self.send(Message::Sync(SyncMessage::Update(update))).await;
    }

    pub async fn insert(&mut self, s: &str) {
        let s = s.to_owned();
        self.edit(|txn, text, _| {
            let len = text.len(txn);
            text.insert(txn, len, &s);
        })
        .await;
    }

    pub async fn set_awareness(&mut self, clock: u32, json: &str) {
        let id = self.doc.client_id();
        let mut clients = std::collections::HashMap::new();
        clients.insert(
            id,
            AwarenessUpdateEntry {
                clock,
                json: json.into(),
            },
        );
        self.send(Message::Awareness(AwarenessUpdate { clients }))
            .await;
    }

    pub fn text(&self) -> String {
        self.text.get_string(&self.doc.transact())
    }

    pub fn map_get(&self, key: &str) -> Option<String> {
        let txn = self.doc.transact();
        self.map.get(&txn, key).map(|v| v.to_string(&txn))
    }

    pub fn state(&self) -> Vec<u8> {
        self.doc
            .transact()
            .encode_state_as_update_v1(&StateVector::default())
    }

    /// Handles one incoming frame, waiting up to `within`; false on timeout or close.
    pub async fn pump_once(&mut self, within: Duration) -> bool {
        let Ok(next) = tokio::time::timeout(within, self.socket.next()).await else {
            return false;
        };
        match next {
            Some(Ok(Ws::Binary(b))) => {
                let msg = Message::decode_v1(&b).expect("server message decodes");
                self.on_message(msg).await;
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

    async fn on_message(&mut self, msg: Message) {
        match msg {
            Message::Sync(SyncMessage::SyncStep1(sv)) => {
                let diff = self.doc.transact().encode_diff_v1(&sv);
                self.send(Message::Sync(SyncMessage::SyncStep2(diff))).await;
            }
            Message::Sync(SyncMessage::SyncStep2(u)) => {
                self.apply(&u);
                self.synced = true;
            }
            Message::Sync(SyncMessage::Update(u)) => self.apply(&u),
            Message::Awareness(a) => {
                for (id, e) in a.clients {
                    self.awareness.insert(id.get(), e.json.to_string());
                }
            }
            _ => {}
        }
    }

    fn apply(&mut self, u: &[u8]) {
        let update = Update::decode_v1(u).expect("server update decodes");
        self.doc
            .transact_mut()
            .apply_update(update)
            .expect("server update applies");
    }

    /// Pumps frames until `cond` holds; panics after `WAIT`.
    pub async fn until(&mut self, what: &str, cond: impl Fn(&YClient) -> bool) {
        let deadline = Instant::now() + WAIT;
        while !cond(self) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!("timed out waiting for {what}; text {:?}", self.text());
            }
            if !self.pump_once(left).await && self.closed.is_some() {
                panic!("closed ({:?}) while waiting for {what}", self.closed);
            }
        }
    }

    /// Pumps until the server closes the connection; returns its close code.
    pub async fn until_closed(&mut self) -> u16 {
        let deadline = Instant::now() + WAIT;
        while self.closed.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "timed out waiting for a close");
            self.pump_once(left).await;
        }
        self.closed.unwrap()
    }

    /// Pumps whatever arrives for `d` (nothing asserted).
    pub async fn drain_for(&mut self, d: Duration) {
        let deadline = Instant::now() + d;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || (!self.pump_once(left).await && self.closed.is_some()) {
                return;
            }
        }
    }
}
