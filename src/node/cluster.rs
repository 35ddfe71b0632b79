//! Duties of a node that shares Redis with others: resync after lost events, presence
//! refresh and sweep, liveness.
//!
//! - **Resync.** The broker asks for one when events may be lost: a sequence gap in a room
//!   (`Room`) or a lagging reader / subscriber reconnect (`All`, also what a Redis restart looks
//!   like). For `All` the node first re-registers the presence of its sessions (an empty Redis
//!   lost them), then every local member gets a fresh `room.snapshot`, so no client keeps a
//!   stale view.
//! - **Presence.** Entries expire after `LOCKSTEP_PRESENCE_TTL` unless refreshed; the node
//!   refreshes its sessions' (and its bridged Yjs connections', see
//!   [`yjs_presence`](super::yjs_presence)) every third of that. Every node sweeps expired entries (those of
//!   a crashed node) and announces their `presence.leave`; a swept entry of a session that is
//!   alive here (a refresh came too late) is re-registered at once.
//! - **Liveness.** `node:<id>` is refreshed every second; nodes whose key expired are logged
//!   and dropped from the node list. Their locks lapse with their leases.

use std::sync::Arc;
use std::time::Duration;

use tracing::Instrument;

use super::engines::ClusterParts;
use super::{Node, every};
use crate::engine::RoomEventKind;
use crate::engine::redis::broker::Resync;
use crate::engine::redis::nodes::NodeRegistry;

const LIVENESS_TTL: Duration = Duration::from_secs(5);
const SWEEP_BATCH: usize = 256;

pub fn spawn(node: &Arc<Node>, parts: ClusterParts) {
    let ClusterParts {
        redis,
        registry,
        mut resync,
    } = parts;
    let resyncer = node.clone();
    tokio::spawn(
        async move {
            while let Some(r) = resync.recv().await {
                resync_views(&resyncer, r).await;
            }
        }
        .instrument(node.span()),
    );
    let refresh = node.config.presence_ttl / 3;
    every(node, refresh, |node| async move {
        refresh_presence(&node).await
    });
    every(node, Duration::from_secs(1), |node| async move {
        sweep_presence(&node).await
    });
    let registry = Arc::new(registry);
    let _ = node.revocations.set(registry.clone());
    spawn_revocation_listener(node, redis);
    let beat = registry.clone();
    every(node, Duration::from_secs(1), move |node| {
        let registry = beat.clone();
        async move { liveness(&node, &registry).await }
    });
    let leaving = node.clone();
    tokio::spawn(
        async move {
            leaving.stop_background.cancelled().await;
            if let Err(e) = registry.leave().await {
                tracing::debug!(error = %e, "could not remove the liveness key");
            }
        }
        .instrument(node.span()),
    );
}

/// Applies the admin revocations and takeover steps other nodes publish (this node's own
/// revocations were applied at once).
fn spawn_revocation_listener(node: &Arc<Node>, redis: crate::engine::redis::RedisTarget) {
    let span = node.span();
    let node = node.clone();
    tokio::spawn(
        async move {
            let (subscriber, mut rx) =
                match crate::engine::redis::nodes::listen_revocations(&redis).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot listen for session revocations");
                        return;
                    }
                };
            loop {
                let msg = tokio::select! {
                    _ = node.stop_background.cancelled() => break,
                    m = rx.recv() => m,
                };
                match msg {
                    Ok(m) => {
                        let Some(text) = m.value.as_str() else {
                            continue;
                        };
                        match serde_json::from_str::<super::lifetime::Broadcast>(&text) {
                            Ok(b) if *b.origin != *node.id => node.on_broadcast(b).await,
                            Ok(_) => {}
                            Err(e) => tracing::warn!(error = %e, "bad revocation message"),
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "revocation listener lagged");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                }
            }
            let _ = fred::interfaces::ClientLike::quit(&subscriber).await;
        }
        .instrument(span),
    );
}

async fn resync_views(node: &Node, r: Resync) {
    node.metrics.resync(matches!(r, Resync::All));
    // Lock events may be among the lost: lock-gated Yjs connections re-read their holders.
    node.yjs_locks.recheck_soon();
    match r {
        Resync::Room(room) => {
            for handle in node.hub.members_of(&room) {
                if let Err(e) = node.send_snapshot(&handle, &room).await {
                    tracing::warn!(error = %e, %room, "resync snapshot failed");
                }
            }
        }
        Resync::All => {
            reregister_presence(node).await;
            for handle in node.hub.attached() {
                for room in handle.rooms() {
                    if let Err(e) = node.send_snapshot(&handle, &room).await {
                        tracing::warn!(error = %e, %room, "resync snapshot failed");
                    }
                }
            }
        }
    }
}

/// Puts back the presence entries of this node's attached sessions that the store lost,
/// announcing each as a join (other nodes' snapshots may have been taken without it).
///
/// Parked sessions are never re-registered, here or by the refresh and sweep below: a parked
/// copy may be stale, its session resumed on another node and gone from rooms there (and
/// only the end of its grace tells this node). A parked session whose entry was lost shows
/// again when it resumes, as an attached session missing from the store.
async fn reregister_presence(node: &Node) {
    super::yjs_presence::relist_all(node).await;
    for handle in node.hub.attached() {
        for (room, member) in handle.members() {
            match node.presence.join(&room, member.clone()).await {
                Ok(None) => {
                    node.publish(&room, None, RoomEventKind::PresenceJoin(member))
                        .await;
                }
                Ok(Some(_)) => {}
                Err(e) => tracing::warn!(error = %e, %room, "presence re-registration failed"),
            }
        }
    }
}

async fn refresh_presence(node: &Node) {
    let ttl = node.config.presence_ttl.as_millis() as u64;
    super::yjs_presence::refresh(node, ttl).await;
    let entries: Vec<_> = node
        .hub
        .sessions()
        .iter()
        .flat_map(|h| h.rooms().into_iter().map(|r| (r, h.id.clone())))
        .collect();
    if entries.is_empty() {
        return;
    }
    let missing = match node.presence.refresh(&entries, ttl).await {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(error = %e, "presence refresh failed");
            return;
        }
    };
    // Alive here but gone from the store (swept after a stall, or an emptied Redis): put the
    // entry back and announce it, since others saw it leave.
    let attached = node.hub.attached();
    for (room, session) in missing {
        let Some(handle) = attached.iter().find(|h| h.id == session) else {
            continue;
        };
        let Some(member) = handle
            .members()
            .into_iter()
            .find(|(r, _)| *r == room)
            .map(|(_, m)| m)
        else {
            continue;
        };
        match node.presence.join(&room, member.clone()).await {
            Ok(_) => {
                node.publish(&room, None, RoomEventKind::PresenceJoin(member))
                    .await
            }
            Err(e) => tracing::warn!(error = %e, %room, "presence re-registration failed"),
        }
    }
}

async fn sweep_presence(node: &Node) {
    let swept = match node.presence.sweep(SWEEP_BATCH).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "presence sweep failed");
            return;
        }
    };
    for (room, member) in swept {
        // A bridged Yjs connection of this node, alive: listed again (as a session is below).
        if super::yjs_presence::relist_swept(node, &room, &member.session_id).await {
            continue;
        }
        let alive_here = node
            .hub
            .attached()
            .into_iter()
            .find(|h| h.id == member.session_id && h.is_joined(&room));
        if let Some(handle) = alive_here {
            // Our refresh came too late (Redis or this node stalled): the session is alive.
            let current = handle
                .members()
                .into_iter()
                .find(|(r, _)| *r == room)
                .map(|(_, m)| m);
            if let Some(m) = current
                && node.presence.join(&room, m).await.is_ok()
            {
                continue;
            }
        }
        node.publish(&room, None, RoomEventKind::PresenceLeave(member))
            .await;
    }
}

async fn liveness(node: &Node, registry: &NodeRegistry) {
    let status = serde_json::to_string(&node.status()).unwrap_or_else(|_| "1".into());
    if let Err(e) = registry
        .beat(LIVENESS_TTL.as_millis() as u64, &status)
        .await
    {
        tracing::warn!(error = %e, "liveness refresh failed");
        return;
    }
    match registry.reap_dead().await {
        Ok(dead) => {
            for id in dead {
                node.metrics.node_gone();
                tracing::warn!(
                    node = %id,
                    "node is gone: its locks lapse within the lease, its members leave within the presence ttl"
                );
            }
        }
        Err(e) => tracing::warn!(error = %e, "node sweep failed"),
    }
}
