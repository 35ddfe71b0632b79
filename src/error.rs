//! Client-visible error codes and WebSocket close codes.
//!
//! Codes are part of the wire contract: clients switch on them, so they never change meaning.
//! Close codes tell a client what to do without parsing text: `1009`, `1011`, `1012` and
//! `4008` mean "reconnect with your resume token", `4010` "reconnect as a new session" (the
//! old one ended), `4011` "another connection took this session over: do not reconnect this
//! one", and `4001`/`4009` "reconnecting as-is will fail again".

use serde::Serialize;

/// A stable, machine-readable error code sent in `error` frames and HTTP error bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame is not a JSON object / MessagePack map at all.
    Malformed,
    /// `type` names no message of the protocol.
    UnknownType,
    /// Missing or mistyped fields, bad entity names, values out of range.
    BadRequest,
    /// No, bad or expired credentials.
    Unauthorized,
    /// The user's role in the room does not allow this.
    Forbidden,
    /// The message names a room this session has not joined.
    NotInRoom,
    /// `join` beyond the per-session room limit.
    TooManyRooms,
    /// `lock.acquire` beyond the per-session limit of held locks and queued waits.
    TooManyLocks,
    /// Connection refused: the user already has the maximum number of sessions.
    TooManySessions,
    /// The session sends faster than its message budget; the message was dropped.
    RateLimited,
    /// A frame or HTTP body over the size limit.
    TooLarge,
    /// The lock is held by someone else (the frame names the holder).
    LockHeld,
    /// Release/extend with a token that is not the live holder's (stale or wrong).
    LockNotHeld,
    /// A queued acquire was not served before its `wait_timeout_ms`.
    WaitTimeout,
    /// `lock.cancel_wait` for a resource the session is not waiting on, or an unknown path.
    NotFound,
    /// An HTTP method the endpoint does not take.
    MethodNotAllowed,
    /// An engine (Redis, Postgres, audit log) is unavailable; retry later.
    Unavailable,
    /// A bug on our side; logged with details, never shown to clients.
    Internal,
    /// `join` of a room that already has `max_members_per_room` members.
    RoomFull,
}

impl ErrorCode {
    /// Every code, so metrics can expose each one's series from the start.
    pub const ALL: [ErrorCode; 19] = [
        ErrorCode::Malformed,
        ErrorCode::UnknownType,
        ErrorCode::BadRequest,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::NotInRoom,
        ErrorCode::TooManyRooms,
        ErrorCode::TooManyLocks,
        ErrorCode::TooManySessions,
        ErrorCode::RateLimited,
        ErrorCode::TooLarge,
        ErrorCode::LockHeld,
        ErrorCode::LockNotHeld,
        ErrorCode::WaitTimeout,
        ErrorCode::NotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
        ErrorCode::RoomFull,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Malformed => "malformed",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotInRoom => "not_in_room",
            ErrorCode::TooManyRooms => "too_many_rooms",
            ErrorCode::TooManyLocks => "too_many_locks",
            ErrorCode::TooManySessions => "too_many_sessions",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::LockHeld => "lock_held",
            ErrorCode::LockNotHeld => "lock_not_held",
            ErrorCode::WaitTimeout => "wait_timeout",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
            ErrorCode::RoomFull => "room_full",
        }
    }

    /// The HTTP status that carries this code in the REST API.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::Malformed | ErrorCode::UnknownType | ErrorCode::BadRequest => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden | ErrorCode::NotInRoom => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::LockHeld | ErrorCode::LockNotHeld => 409,
            ErrorCode::WaitTimeout => 408,
            ErrorCode::TooLarge => 413,
            ErrorCode::TooManyRooms
            | ErrorCode::TooManyLocks
            | ErrorCode::TooManySessions
            | ErrorCode::RateLimited
            | ErrorCode::RoomFull => 429,
            ErrorCode::Unavailable => 503,
            ErrorCode::Internal => 500,
        }
    }
}

/// WebSocket close codes used by the server.
pub mod close {
    /// The client closed normally; the session ends at once (no resume grace).
    pub const NORMAL: u16 = 1000;
    /// `/v1/yjs`: a malformed y-websocket message or Yjs update (never stored). Reconnecting
    /// resends the same state, so a client that keeps sending it keeps being closed.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// A frame exceeded the configured maximum frame size.
    pub const TOO_BIG: u16 = 1009;
    /// `/v1/yjs`: this node holds its maximum of documents, or the update log is unavailable;
    /// reconnect later (another node may have room).
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// `/v1/yjs`: the token gives no role in the document's room.
    pub const FORBIDDEN: u16 = 4003;
    /// `/v1/yjs`: the document has its maximum of clients on this node.
    pub const DOC_FULL: u16 = 4014;
    /// `/v1/yjs`: the update would take the document over its maximum size (not applied).
    pub const DOC_TOO_LARGE: u16 = 4015;
    /// `/v1/yjs`: the connection was writable only while its user held a lock (`?lock=`),
    /// and the lock was lost (released, expired, forced). The provider reconnects, resyncs
    /// from the server and, with the lock gone, is read-only.
    pub const LOCK_LOST: u16 = 4016;
    /// Server bug; reconnect with the resume token.
    pub const INTERNAL: u16 = 1011;
    /// The node is draining (SIGTERM); reconnect after `after_ms` from the `reconnect` frame.
    pub const SERVICE_RESTART: u16 = 1012;
    /// Bad, missing or expired token: get a new token before reconnecting.
    pub const UNAUTHORIZED: u16 = 4001;
    /// The outbound queue overflowed: the client reads too slowly. Reconnect with resume.
    pub const SLOW_CONSUMER: u16 = 4008;
    /// The user already has `max_sessions_per_user` sessions.
    pub const TOO_MANY_SESSIONS: u16 = 4009;
    /// The client missed `heartbeat_misses` pings; its session ended and its locks were released.
    pub const HEARTBEAT_TIMEOUT: u16 = 4010;
    /// A connection resuming this session replaced this socket.
    pub const TAKEN_OVER: u16 = 4011;
    /// The token's `exp` passed without an `auth.refresh`: the session ended (locks released
    /// as `disconnected`) and cannot be resumed. Reconnect with a new token.
    pub const TOKEN_EXPIRED: u16 = 4012;
    /// An admin revoked the session (or its token, or its user): it ended (locks released as
    /// `revoked`) and cannot be resumed; a revoked token is refused until its `exp`.
    pub const REVOKED: u16 = 4013;
}
