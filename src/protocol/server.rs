//! Messages the server sends. Built from borrowed engine data, encoded once per codec and
//! shared by every recipient of a fan-out.

use serde::Serialize;

use crate::engine::{LockInfo, Member, ReleaseReason};
use crate::error::ErrorCode;
use crate::names::Entity;

#[derive(Debug, Serialize)]
#[serde(tag = "type")]
pub enum ServerMessage<'a> {
    #[serde(rename = "welcome")]
    Welcome {
        session_id: &'a str,
        node_id: &'a str,
        user: UserView<'a>,
        heartbeat_ms: u64,
        /// The server's clock (ms), so clients can correct countdowns for skew.
        server_time: u64,
        resume_token: &'a str,
        /// True when `?resume=` restored an earlier session (same id, rooms and locks).
        resumed: bool,
    },
    #[serde(rename = "reply")]
    Reply(Reply<'a>),
    #[serde(rename = "error")]
    Error(ErrorFrame<'a>),
    #[serde(rename = "room.snapshot")]
    RoomSnapshot {
        room: &'a Entity,
        members: &'a [Member],
        locks: Vec<LockView<'a>>,
    },
    /// One page of a `room.snapshot` too large for one frame: pages `1..=pages` arrive in
    /// order, each with part of `members` and `locks`; the snapshot is complete at the last.
    #[serde(rename = "room.snapshot")]
    RoomSnapshotPage {
        room: &'a Entity,
        members: &'a [Member],
        locks: &'a [LockView<'a>],
        page: u32,
        pages: u32,
    },
    #[serde(rename = "presence.join")]
    PresenceJoin {
        room: &'a Entity,
        member: &'a Member,
    },
    #[serde(rename = "presence.update")]
    PresenceUpdate {
        room: &'a Entity,
        member: &'a Member,
    },
    #[serde(rename = "presence.leave")]
    PresenceLeave {
        room: &'a Entity,
        member: &'a Member,
    },
    #[serde(rename = "cursor")]
    Cursor {
        room: &'a Entity,
        user_id: &'a str,
        session_id: &'a str,
        x: f64,
        y: f64,
        #[serde(skip_serializing_if = "Option::is_none")]
        selection: Option<&'a serde_json::Value>,
    },
    #[serde(rename = "broadcast")]
    Broadcast {
        room: &'a Entity,
        event: &'a str,
        data: &'a serde_json::Value,
        from: From<'a>,
    },
    #[serde(rename = "lock.acquired")]
    LockAcquired {
        room: &'a Entity,
        resource: &'a Entity,
        holder: HolderView<'a>,
        action: &'a str,
        expires_at: u64,
    },
    #[serde(rename = "lock.released")]
    LockReleased {
        room: &'a Entity,
        resource: &'a Entity,
        reason: ReleaseReason,
    },
    #[serde(rename = "lock.granted")]
    LockGranted {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u32>,
        room: &'a Entity,
        resource: &'a Entity,
        token: u64,
        expires_at: u64,
    },
    #[serde(rename = "reconnect")]
    Reconnect { reason: &'a str, after_ms: u64 },
    /// The session's token expires at `expires_at` (ms), `in_ms` from now: send
    /// `auth.refresh` before, or the session ends with close code 4012.
    #[serde(rename = "auth.expiring")]
    AuthExpiring { expires_at: u64, in_ms: u64 },
    #[serde(rename = "pong")]
    Pong {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u32>,
    },
}

impl ServerMessage<'_> {
    /// The `type` string, for metrics labels.
    pub fn type_name(&self) -> &'static str {
        match self {
            ServerMessage::Welcome { .. } => "welcome",
            ServerMessage::Reply(_) => "reply",
            ServerMessage::Error(_) => "error",
            ServerMessage::RoomSnapshot { .. } | ServerMessage::RoomSnapshotPage { .. } => {
                "room.snapshot"
            }
            ServerMessage::PresenceJoin { .. } => "presence.join",
            ServerMessage::PresenceUpdate { .. } => "presence.update",
            ServerMessage::PresenceLeave { .. } => "presence.leave",
            ServerMessage::Cursor { .. } => "cursor",
            ServerMessage::Broadcast { .. } => "broadcast",
            ServerMessage::LockAcquired { .. } => "lock.acquired",
            ServerMessage::LockReleased { .. } => "lock.released",
            ServerMessage::LockGranted { .. } => "lock.granted",
            ServerMessage::Reconnect { .. } => "reconnect",
            ServerMessage::AuthExpiring { .. } => "auth.expiring",
            ServerMessage::Pong { .. } => "pong",
        }
    }
}

#[derive(Debug, Serialize)]
pub struct UserView<'a> {
    pub id: &'a str,
    pub name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub avatar: Option<&'a str>,
    pub color: &'a str,
}

#[derive(Debug, Serialize)]
pub struct From<'a> {
    pub user_id: &'a str,
    pub session_id: &'a str,
    pub name: &'a str,
}

/// The holder of a lock as others see it (no token).
#[derive(Debug, Clone, Serialize)]
pub struct HolderView<'a> {
    pub user_id: &'a str,
    pub name: &'a str,
    pub session_id: &'a str,
    pub action: &'a str,
    pub since: u64,
    pub expires_at: u64,
}

impl<'a> HolderView<'a> {
    pub fn of(lock: &'a LockInfo) -> Self {
        HolderView {
            user_id: &lock.holder.user_id,
            name: &lock.holder.name,
            session_id: &lock.holder.session_id,
            action: &lock.action,
            since: lock.since,
            expires_at: lock.expires_at,
        }
    }
}

/// A lock in a `room.snapshot`; `token` only in the snapshot sent to the holder's own session.
#[derive(Debug, Serialize)]
pub struct LockView<'a> {
    pub resource: &'a Entity,
    pub holder: HolderView<'a>,
    pub action: &'a str,
    pub expires_at: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<u64>,
}

impl<'a> LockView<'a> {
    /// A copy borrowing the same lock (views hold only references).
    pub fn reborrow(&self) -> LockView<'a> {
        LockView {
            resource: self.resource,
            holder: self.holder.clone(),
            action: self.action,
            expires_at: self.expires_at,
            token: self.token,
        }
    }

    pub fn of(lock: &'a LockInfo, viewer_session: &str) -> Self {
        LockView {
            resource: &lock.resource,
            holder: HolderView::of(lock),
            action: &lock.action,
            expires_at: lock.expires_at,
            token: (&*lock.holder.session_id == viewer_session).then_some(lock.token),
        }
    }
}

/// Success answer to a request that carried an `id`.
#[derive(Debug, Default, Serialize)]
pub struct Reply<'a> {
    pub id: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub room: Option<&'a Entity>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource: Option<&'a Entity>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
}

/// An `error` frame. Lock denials (`lock_held`) carry the holder and the expected wait.
#[derive(Debug, Serialize)]
pub struct ErrorFrame<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<u32>,
    pub code: ErrorCode,
    pub message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource: Option<&'a Entity>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub holder: Option<HolderView<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimated_wait_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<u32>,
}

impl<'a> ErrorFrame<'a> {
    pub fn new(id: Option<u32>, code: ErrorCode, message: &'a str) -> Self {
        ErrorFrame {
            id,
            code,
            message,
            resource: None,
            holder: None,
            estimated_wait_ms: None,
            queue_position: None,
        }
    }
}
