//! Dispatch of decoded client messages to the node, and their replies and errors.

use std::sync::Arc;

use crate::engine::PresencePatch;
use crate::names::Entity;
use crate::node::locks::{AcquireParams, Caller};
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
                .map(|(lock, _)| {
                    session.send(&ServerMessage::Reply(Reply {
                        id,
                        room: Some(&lock.room),
                        resource: Some(&lock.resource),
                        token: Some(lock.token),
                        expires_at: Some(lock.expires_at),
                    }));
                })
        }
        ClientMessage::LockRelease(r) => node
            .release(Caller::Session(session), &r.resource, r.token, r.force)
            .await
            .map(|_| reply_resource(id, &r.resource, session)),
        ClientMessage::LockExtend(e) => node
            .extend(Caller::Session(session), &e.resource, e.token, e.ttl_ms)
            .await
            .map(|lock| {
                session.send(&ServerMessage::Reply(Reply {
                    id,
                    room: Some(&lock.room),
                    resource: Some(&lock.resource),
                    token: Some(lock.token),
                    expires_at: Some(lock.expires_at),
                }));
            }),
        ClientMessage::LockCancelWait(c) => node
            .cancel_wait(session, &c.resource)
            .await
            .map(|_| reply_resource(id, &c.resource, session)),
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

fn reply_resource(id: Option<u32>, resource: &Entity, session: &SessionHandle) {
    reply_with(id, session, None, Some(resource));
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
