//! A loaded document's own work: applying client frames, catching up with the log, and the
//! flusher that merges and appends queued updates (see the parent module for the design).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use yrs::encoding::read::Cursor;
use yrs::sync::{Message, SyncMessage};
use yrs::updates::decoder::{Decode, DecoderV1};
use yrs::{ReadTxn, StateVector, Transact};

use super::*;

impl LoadedDoc {
    pub(super) fn start_catch_up(self: &Arc<Self>, reg: &Arc<Registry>) {
        {
            let mut s = lock(&self.state);
            if s.catching_up {
                return;
            }
            s.catching_up = true;
        }
        reg.counters.rereads.fetch_add(1, Ordering::Relaxed);
        let me = self.clone();
        let reg = reg.clone();
        tokio::spawn(async move {
            while let Err(e) = me.catch_up(&reg).await {
                tracing::warn!(doc = %me.name, error = %e, "yjs: re-reading the log failed");
                if me.stop.is_cancelled() {
                    return;
                }
                tokio::time::sleep(APPEND_RETRY).await;
            }
        });
    }

    /// Reads the log after the last applied id until its end, then applies the buffered
    /// announcements and leaves the catching-up state. Returns how many entries it read.
    pub(super) async fn catch_up(&self, reg: &Registry) -> crate::engine::EngineResult<usize> {
        let mut read = 0;
        loop {
            let after = lock(&self.state).last;
            let page = reg.log.read_after(&self.name, after, PAGE).await?;
            let full = page.len() == PAGE;
            read += page.len();
            let mut s = lock(&self.state);
            for e in &page {
                s.apply_entry(e, true);
            }
            if full {
                continue;
            }
            let buffered = std::mem::take(&mut s.buffered);
            let mut gap = false;
            for a in buffered {
                if gap {
                    s.buffered.push(a);
                } else if !s.take(a, &reg.node_id, reg) {
                    gap = true;
                }
            }
            if !gap {
                s.catching_up = false;
                return Ok(read);
            }
        }
    }

    /// Handles one frame from connection `conn`. An `Err` closes that connection.
    pub fn handle(
        &self,
        reg: &Registry,
        conn: u64,
        writable: bool,
        data: &[u8],
    ) -> Result<(), Refusal> {
        let mut decoder = DecoderV1::new(Cursor::new(data));
        let msg = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            <Message as Decode>::decode(&mut decoder)
        }))
        .map_err(|_| Refusal::Malformed("undecodable message".into()))?
        .map_err(|e| Refusal::Malformed(e.to_string()))?;
        match msg {
            Message::Sync(SyncMessage::SyncStep1(sv)) => {
                let mut s = lock(&self.state);
                let diff = s.doc.transact().encode_diff_v1(&sv);
                s.send_to(conn, frame(Message::Sync(SyncMessage::SyncStep2(diff))));
            }
            Message::Sync(SyncMessage::SyncStep2(u)) | Message::Sync(SyncMessage::Update(u)) => {
                if !writable {
                    // y-websocket has no error message: the update is dropped, the client
                    // keeps its connection and receives everyone else's edits.
                    reg.counters
                        .refused_readonly
                        .fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                self.write(reg, u, None)?;
            }
            Message::Awareness(update) => {
                let states: Vec<AwarenessState> = update
                    .clients
                    .iter()
                    .map(|(id, e)| AwarenessState {
                        client: id.get(),
                        clock: e.clock,
                        json: e.json.to_string(),
                    })
                    .collect();
                let mut s = lock(&self.state);
                let taken = s.take_awareness(&states, Some(conn));
                // To everyone, the sender included: that echo is also what keeps the
                // y-websocket client's 30 s silence timer from firing (it renews its own
                // awareness every 15 s).
                s.relay(frame(Message::Awareness(update)));
                drop(s);
                reg.share_awareness(&self.name, taken);
            }
            Message::AwarenessQuery => {
                let mut s = lock(&self.state);
                if let Some(aw) = s.awareness_all() {
                    s.send_to(conn, aw);
                }
            }
            // Auth is the server's message; custom types are not ours: ignored.
            Message::Auth(_) | Message::Custom(..) => {}
        }
        Ok(())
    }

    /// Hocuspocus's "update saved" acknowledgement, `[SyncStatus = 8][varUint 1]` as a frame of
    /// the connection's queue: the Hocuspocus connection prefixes the document name to every
    /// queued frame, which makes it the provider's SyncStatus message.
    pub const ACK_FRAME: &'static [u8] = &[8, 1];

    /// [`handle`](Self::handle) for an editor's update (Update or SyncStep2 payload), for a
    /// connection that wants to know when it is safe: [`Self::ACK_FRAME`] is queued to `conn`
    /// once the update is in the log (at once when it holds nothing new).
    pub fn write_acked(&self, reg: &Registry, conn: u64, u: Vec<u8>) -> Result<(), Refusal> {
        self.write(reg, u, Some(conn))
    }

    /// Whether `update` holds nothing this document lacks (Yjs's `snapshotContainsUpdate`):
    /// a read-only client's SyncStep2 is acknowledged as saved when it does.
    pub fn contains_update(&self, update: &[u8]) -> Result<bool, Refusal> {
        let update = decode_update(update).map_err(Refusal::Malformed)?;
        let snapshot = lock(&self.state).doc.transact().snapshot();
        let inserted = update.insertions(true).iter().all(|(client, ranges)| {
            let known = snapshot.state_map.get(client);
            ranges.iter().all(|r| r.end <= known)
        });
        Ok(inserted && update.delete_set().diff(&snapshot.delete_set).is_empty())
    }

    /// The document's state vector (a Hocuspocus SyncStep1 answering the client's).
    pub fn state_vector(&self) -> StateVector {
        lock(&self.state).doc.transact().state_vector()
    }

    /// Validates and applies an editor's update, then queues it for the log; `ack`: the
    /// connection to send [`Self::ACK_FRAME`] once it is logged.
    fn write(&self, reg: &Registry, u: Vec<u8>, ack: Option<u64>) -> Result<(), Refusal> {
        if u.len() > reg.limits.max_update_bytes {
            return Err(Refusal::Malformed(format!(
                "update over {} bytes",
                reg.limits.max_update_bytes
            )));
        }
        let update = decode_update(&u).map_err(Refusal::Malformed)?;
        if update.is_empty() {
            // Every provider with nothing new answers the server's SyncStep1 with an empty
            // SyncStep2: not worth a log entry.
            if let Some(conn) = ack {
                lock(&self.state).send_to(conn, Bytes::from_static(Self::ACK_FRAME));
            }
            return Ok(());
        }
        let mut s = lock(&self.state);
        if s.size + u.len() > reg.limits.max_doc_bytes {
            return Err(Refusal::DocTooLarge(reg.limits.max_doc_bytes));
        }
        s.doc
            .transact_mut()
            .apply_update(update)
            .map_err(|e| Refusal::Malformed(e.to_string()))?;
        s.size += u.len();
        s.pending.push(u);
        s.acks.extend(ack);
        reg.counters.updates.fetch_add(1, Ordering::Relaxed);
        drop(s);
        self.flush.notify_one();
        Ok(())
    }

    /// The document's whole state as one v1 update (tests, snapshots).
    pub fn encode_state(&self) -> Vec<u8> {
        lock(&self.state)
            .doc
            .transact()
            .encode_state_as_update_v1(&StateVector::default())
    }

    /// The last log entry applied here.
    pub fn last_applied(&self) -> Option<EntryId> {
        lock(&self.state).last
    }
}

/// Merges and appends a document's queued updates, one batch at a time.
pub(super) async fn flusher(reg: Arc<Registry>, doc: Arc<LoadedDoc>) {
    loop {
        tokio::select! {
            _ = doc.stop.cancelled() => return,
            _ = doc.flush.notified() => {}
        }
        tokio::time::sleep(BATCH_WINDOW).await;
        let (batch, mut acks) = {
            let mut s = lock(&doc.state);
            s.flushing = true;
            (std::mem::take(&mut s.pending), std::mem::take(&mut s.acks))
        };
        if batch.is_empty() {
            lock(&doc.state).flushing = false;
            continue;
        }
        let merged = if batch.len() == 1 {
            batch.into_iter().next().unwrap_or_default()
        } else {
            match yrs::merge_updates_v1(&batch) {
                Ok(m) => m,
                Err(e) => {
                    // Each was decoded on receipt, so this is not expected; append them one
                    // by one rather than lose them.
                    tracing::error!(doc = %doc.name, error = %e, "yjs: merge failed");
                    let mut s = lock(&doc.state);
                    for u in batch.iter().skip(1) {
                        s.pending.push(u.clone());
                    }
                    // Acknowledged only once all of them are logged.
                    s.acks.append(&mut acks);
                    drop(s);
                    doc.flush.notify_one();
                    batch[0].clone()
                }
            }
        };
        loop {
            match reg.log.append(&doc.name, &merged, &reg.node_id).await {
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(doc = %doc.name, error = %e, "yjs: append failed, retrying");
                    tokio::time::sleep(APPEND_RETRY).await;
                }
            }
        }
        reg.counters.appends.fetch_add(1, Ordering::Relaxed);
        reg.counters
            .appended_bytes
            .fetch_add(merged.len() as u64, Ordering::Relaxed);
        let mut s = lock(&doc.state);
        s.relay(frame(Message::Sync(SyncMessage::Update(merged))));
        for conn in acks {
            s.send_to(conn, Bytes::from_static(LoadedDoc::ACK_FRAME));
        }
        s.flushing = false;
    }
}
