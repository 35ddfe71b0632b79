//! Awareness: the states of a document's clients, shared with the other nodes through the log's
//! awareness methods (pub/sub and a hash of current states with Redis), and the nulls sent for
//! a closed connection's clients.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use yrs::sync::Message;
use yrs::sync::awareness::{AwarenessUpdate, AwarenessUpdateEntry};

use super::*;

impl Registry {
    /// Queues awareness states for the other nodes (dropped, counted, when the queue is full).
    pub(super) fn share_awareness(&self, doc: &str, states: Vec<AwarenessState>) {
        if states.is_empty() {
            return;
        }
        if self.aw_queue.try_send((doc.to_owned(), states)).is_err() {
            self.counters
                .awareness_dropped
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Starts the tasks that share awareness with other nodes and apply theirs here.
    pub(super) fn spawn_awareness(self: &Arc<Self>, stop: CancellationToken) {
        if let Some(mut rx) = lock(&self.aw_rx).take() {
            let me = self.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                loop {
                    let (doc, states) = tokio::select! {
                        _ = stop.cancelled() => return,
                        got = rx.recv() => match got { Some(x) => x, None => return },
                    };
                    let r = me
                        .log
                        .publish_awareness(&doc, &states, &me.node_id, AWARENESS_TTL_MS)
                        .await;
                    if let Err(e) = r {
                        tracing::debug!(%doc, error = %e, "yjs: awareness not shared");
                    }
                }
            });
        }
        let Some(mut rx) = self.log.awareness_updates() else {
            return;
        };
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let got = tokio::select! {
                    _ = stop.cancelled() => return,
                    got = rx.recv() => got,
                };
                let a = match got {
                    Ok(a) => a,
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if a.origin_node == *me.node_id {
                    continue;
                }
                let Some(doc) = lock(&me.docs).get(&a.doc).cloned() else {
                    continue;
                };
                let mut s = lock(&doc.state);
                let taken = s.take_awareness(&a.states, None);
                if let Some(f) = awareness_frame(&taken) {
                    s.relay(f);
                }
            }
        });
    }
}

/// An awareness message of `states` (`None` when empty).
pub(super) fn awareness_frame(states: &[AwarenessState]) -> Option<Bytes> {
    if states.is_empty() {
        return None;
    }
    let clients = states
        .iter()
        .map(|s| {
            (
                ClientID::new(s.client),
                AwarenessUpdateEntry {
                    clock: s.clock,
                    json: Arc::from(s.json.as_str()),
                },
            )
        })
        .collect();
    Some(frame(Message::Awareness(AwarenessUpdate { clients })))
}

impl DocState {
    /// Applies awareness states newer than the ones known (y-protocols' rule: a higher clock,
    /// or the same clock going null); returns those taken. `conn`: the local connection they
    /// came from (its states go null when it closes), `None` for another node's.
    pub(super) fn take_awareness(
        &mut self,
        states: &[AwarenessState],
        conn: Option<u64>,
    ) -> Vec<AwarenessState> {
        let mut taken = Vec::new();
        for st in states {
            let id = ClientID::new(st.client);
            let newer = match self.awareness.get(&id) {
                None => st.json != "null",
                Some(a) => st.clock > a.clock || (st.clock == a.clock && st.json == "null"),
            };
            if !newer {
                continue;
            }
            if st.json == "null" {
                self.awareness.remove(&id);
            } else {
                self.awareness.insert(
                    id,
                    Aware {
                        clock: st.clock,
                        json: Arc::from(st.json.as_str()),
                        conn,
                    },
                );
            }
            taken.push(st.clone());
        }
        taken
    }
}
