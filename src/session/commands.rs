//! Dispatch of decoded client messages to the node, and their replies and errors.

use std::sync::Arc;

use crate::engine::{LockInfo, LockKey, PresencePatch};
use crate::names::Entity;
use crate::node::locks::{AcquireParams, Caller, resolve_key};
use crate::node::{Node, OpError};
use crate::protocol::client::ClientMessage;
use crate::protocol::server::{ErrorFrame, HolderView, Reply};
use crate::protocol::{Request, ServerMessage};
use crate::session::handle::SessionHandle;

/// Executes one request and queues its reply or error.
pub async fn handle(node: &Node, session: &Arc<SessionHandle>, req: Request) {
    let id = req.id;
    let result = match req.message {
        ClientMessage::Join(j) => node
            .join(session, &j.room, j.state)
            .await
            .map(|_| reply_room(id, &j.room, session)),
        ClientMessage::Leave(l) => node
            .leave(session, &l.room)
            .await
            .map(|_| reply_room(id, &l.room, session)),
        ClientMessage::Presence(p) => {
            let patch = PresencePatch {
                focus: p.focus,
                state: p.state,
            };
            node.update_presence(session, &p.room, patch)
                .await
                .map(|_| reply(id, session))
        }
        ClientMessage::Cursor(c) => node
            .cursor(session, &c.room, c.x, c.y, c.selection)
            .await
            .map(|_| reply(id, session)),
        ClientMessage::Broadcast(b) => node
            .broadcast(session, &b.room, b.event, b.data)
            .await
            .map(|_| reply(id, session)),
        ClientMessage::LockAcquire(a) => {
            let params = AcquireParams {
                room: a.room,
                resource: a.resource,
                action: a.action,
                ttl_ms: a.ttl_ms,
                wait: a.wait,
                wait_timeout_ms: a.wait_timeout_ms,
                request_id: id,
            };
            node.acquire(Caller::Session(session), params)
                .await
                .map(|(lock, _)| reply_grant(id, &lock, session))
        }
        ClientMessage::LockRelease(r) => match resolve_key(session, r.room.as_ref(), &r.resource) {
            Ok(key) => node
                .release(Caller::Session(session), &key, r.token, r.force)
                .await
                .map(|_| reply_lock(id, &key, session)),
            Err(e) => Err(e),
        },
        ClientMessage::LockExtend(e) => match resolve_key(session, e.room.as_ref(), &e.resource) {
            Ok(key) => {
                node.extend(Caller::Session(session), &key, e.token, e.ttl_ms)
                    .await
            }
            Err(e) => Err(e),
        }
        .map(|lock| reply_grant(id, &lock, session)),
        ClientMessage::LockCancelWait(c) => {
            match resolve_key(session, c.room.as_ref(), &c.resource) {
                Ok(key) => node
                    .cancel_wait(session, &key)
                    .await
                    .map(|_| reply_lock(id, &key, session)),
                Err(e) => Err(e),
            }
        }
        ClientMessage::Settings(s) => {
            session.set_share_cursor(s.share_cursor);
            reply(id, session);
            Ok(())
        }
        ClientMessage::Ping => {
            session.send(&ServerMessage::Pong { id });
            Ok(())
        }
        ClientMessage::AuthRefresh(r) => node.refresh_auth(session, &r.token).await.map(|exp| {
            session.send(&ServerMessage::Reply(Reply {
                id,
                expires_at: Some(exp),
                ..Reply::default()
            }));
        }),
    };
    if let Err(e) = result {
        // Inside the request span: the line carries session, user, room and node.
        tracing::debug!(code = e.code().as_str(), error = %e, "request refused");
        send_error(node, session, id, &e);
    }
}

/// Answers a request that carried an id (messages without one get no reply on success).
fn reply_with(
    id: Option<u32>,
    session: &SessionHandle,
    room: Option<&Entity>,
    resource: Option<&Entity>,
) {
    if id.is_some() {
        session.send(&ServerMessage::Reply(Reply {
            id,
            room,
            resource,
            ..Reply::default()
        }));
    }
}

fn reply(id: Option<u32>, session: &SessionHandle) {
    reply_with(id, session, None, None);
}

fn reply_room(id: Option<u32>, room: &Entity, session: &SessionHandle) {
    reply_with(id, session, Some(room), None);
}

/// The reply to an acquire or extend: the lock with its token and end.
fn reply_grant(id: Option<u32>, lock: &LockInfo, session: &SessionHandle) {
    session.send(&ServerMessage::Reply(Reply {
        id,
        room: Some(&lock.room),
        resource: Some(&lock.resource),
        token: Some(lock.token),
        expires_at: Some(lock.expires_at),
    }));
}

fn reply_lock(id: Option<u32>, key: &LockKey, session: &SessionHandle) {
    reply_with(id, session, Some(&key.room), Some(&key.resource));
}

/// Sends an operation error; `lock_held` carries the holder and the expected wait.
pub fn send_error(node: &Node, session: &SessionHandle, id: Option<u32>, e: &OpError) {
    let message = e.to_string();
    let mut frame = ErrorFrame::new(id, e.code(), &message);
    if let OpError::LockHeld(d) = e {
        frame.resource = Some(&d.current.resource);
        frame.holder = Some(HolderView::of(&d.current));
        frame.estimated_wait_ms = Some(d.estimated_wait_ms);
        frame.queue_position = d.queue_position;
    }
    node.metrics.client_error(e.code().as_str());
    crate::session::record_error(e.code());
    session.send(&ServerMessage::Error(frame));
}
