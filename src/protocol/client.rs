//! Messages a client sends, and their decoding with stable error codes.
//!
//! Decoding is two passes over the frame: a cheap peek at `type` and `id` (borrowed, no
//! allocation for plain strings), then the typed body. That lets every error carry the
//! request's `id` and tell "unknown type" from "bad fields" without building a value tree.

use std::borrow::Cow;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

use crate::error::ErrorCode;
use crate::names::{Entity, valid_action};

/// A decoded client frame: the optional request id and the message.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub id: Option<u32>,
    pub message: ClientMessage,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ClientMessage {
    Join(Join),
    Leave(Leave),
    Presence(PresenceMsg),
    Cursor(CursorMsg),
    Broadcast(BroadcastMsg),
    LockAcquire(LockAcquire),
    LockRelease(LockRelease),
    LockExtend(LockExtend),
    LockCancelWait(LockCancelWait),
    Settings(SettingsMsg),
    Ping,
    /// `auth.refresh {token}`: a newer token of the same user; roles are re-evaluated.
    AuthRefresh(AuthRefresh),
}

impl ClientMessage {
    /// The `type` string, for metrics labels and logs.
    pub fn type_name(&self) -> &'static str {
        match self {
            ClientMessage::Join(_) => "join",
            ClientMessage::Leave(_) => "leave",
            ClientMessage::Presence(_) => "presence",
            ClientMessage::Cursor(_) => "cursor",
            ClientMessage::Broadcast(_) => "broadcast",
            ClientMessage::LockAcquire(_) => "lock.acquire",
            ClientMessage::LockRelease(_) => "lock.release",
            ClientMessage::LockExtend(_) => "lock.extend",
            ClientMessage::LockCancelWait(_) => "lock.cancel_wait",
            ClientMessage::Settings(_) => "settings",
            ClientMessage::Ping => "ping",
            ClientMessage::AuthRefresh(_) => "auth.refresh",
        }
    }

    /// The room the message is about, if it names one (for spans and logs).
    pub fn room(&self) -> Option<&Entity> {
        match self {
            ClientMessage::Join(Join { room, .. })
            | ClientMessage::Leave(Leave { room, .. })
            | ClientMessage::Presence(PresenceMsg { room, .. })
            | ClientMessage::Cursor(CursorMsg { room, .. })
            | ClientMessage::Broadcast(BroadcastMsg { room, .. })
            | ClientMessage::LockAcquire(LockAcquire { room, .. }) => Some(room),
            ClientMessage::LockRelease(LockRelease { room, .. })
            | ClientMessage::LockExtend(LockExtend { room, .. })
            | ClientMessage::LockCancelWait(LockCancelWait { room, .. }) => room.as_ref(),
            _ => None,
        }
    }

    /// The locked resource the message is about, if any (for spans and logs).
    pub fn resource(&self) -> Option<&Entity> {
        match self {
            ClientMessage::LockAcquire(LockAcquire { resource, .. })
            | ClientMessage::LockRelease(LockRelease { resource, .. })
            | ClientMessage::LockExtend(LockExtend { resource, .. })
            | ClientMessage::LockCancelWait(LockCancelWait { resource, .. }) => Some(resource),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Join {
    pub room: Entity,
    #[serde(default)]
    pub state: Option<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Leave {
    pub room: Entity,
}

/// `focus`/`state` absent: unchanged; `null`: cleared; a value: set.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PresenceMsg {
    pub room: Entity,
    #[serde(default, deserialize_with = "present")]
    pub focus: Option<Option<Entity>>,
    #[serde(default, deserialize_with = "present")]
    pub state: Option<Option<serde_json::Value>>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CursorMsg {
    pub room: Entity,
    pub x: f64,
    pub y: f64,
    #[serde(default)]
    pub selection: Option<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BroadcastMsg {
    pub room: Entity,
    pub event: Arc<str>,
    #[serde(default)]
    pub data: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct LockAcquire {
    pub room: Entity,
    pub resource: Entity,
    pub action: Arc<str>,
    #[serde(default)]
    pub ttl_ms: Option<u64>,
    #[serde(default)]
    pub wait: bool,
    #[serde(default)]
    pub wait_timeout_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct LockRelease {
    /// The room the lock belongs to (locks are identified by room and resource). May be
    /// omitted when this session holds exactly one lock on `resource`.
    #[serde(default)]
    pub room: Option<Entity>,
    pub resource: Entity,
    /// Required unless `force` is set.
    #[serde(default)]
    pub token: Option<u64>,
    /// Owners (and admins) may release someone else's lock; recorded as `forced`.
    #[serde(default)]
    pub force: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct LockExtend {
    /// As in [`LockRelease`].
    #[serde(default)]
    pub room: Option<Entity>,
    pub resource: Entity,
    pub token: u64,
    pub ttl_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct LockCancelWait {
    /// May be omitted when this session waits for exactly one lock on `resource`.
    #[serde(default)]
    pub room: Option<Entity>,
    pub resource: Entity,
}

#[derive(Clone, PartialEq, Deserialize)]
pub struct AuthRefresh {
    pub token: String,
}

/// Never prints the token (request logs show messages).
impl std::fmt::Debug for AuthRefresh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuthRefresh { .. }")
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SettingsMsg {
    pub share_cursor: bool,
}

/// Distinguishes an absent field (`None`) from an explicit `null` (`Some(None)`).
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// Why a frame could not be decoded; becomes an `error` frame with `code`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct DecodeError {
    pub id: Option<u32>,
    pub code: ErrorCode,
    pub message: String,
}

impl DecodeError {
    fn new(id: Option<u32>, code: ErrorCode, message: impl Into<String>) -> Self {
        DecodeError {
            id,
            code,
            message: message.into(),
        }
    }
}

/// The first pass: only `type` and `id`, everything else skipped.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type", borrow, default)]
    ty: Option<Cow<'a, str>>,
    #[serde(default)]
    id: Option<u32>,
}

/// A serialization format's "deserialize this whole frame as `T`".
pub trait Format {
    fn from_slice<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, String>;
    /// True when the frame is an object/map at all (so a failed envelope is `bad_request`,
    /// not `malformed`).
    fn is_object(bytes: &[u8]) -> bool;
}

/// Limits that are not expressible in serde attributes.
const MAX_EVENT_NAME: usize = 64;

/// The request `id` of a frame, if its envelope can be read (for errors found before decoding).
pub fn peek_id<F: Format>(bytes: &[u8]) -> Option<u32> {
    F::from_slice::<Envelope<'_>>(bytes).ok().and_then(|e| e.id)
}

/// Decodes one client frame in format `F`.
pub fn decode<F: Format>(bytes: &[u8]) -> Result<Request, DecodeError> {
    let env: Envelope<'_> = match F::from_slice(bytes) {
        Ok(env) => env,
        Err(e) if F::is_object(bytes) && F::from_slice::<serde::de::IgnoredAny>(bytes).is_ok() => {
            return Err(DecodeError::new(
                None,
                ErrorCode::BadRequest,
                format!("bad envelope: {e}"),
            ));
        }
        Err(e) => {
            return Err(DecodeError::new(
                None,
                ErrorCode::Malformed,
                format!("malformed frame: {e}"),
            ));
        }
    };
    let id = env.id;
    if !F::is_object(bytes) {
        return Err(DecodeError::new(
            id,
            ErrorCode::Malformed,
            "a frame must be one object",
        ));
    }
    let ty = env
        .ty
        .ok_or_else(|| DecodeError::new(id, ErrorCode::BadRequest, "missing field `type`"))?;
    let message = parse_body::<F>(bytes, &ty).map_err(|(code, m)| DecodeError::new(id, code, m))?;
    validate(&message).map_err(|m| DecodeError::new(id, ErrorCode::BadRequest, m))?;
    Ok(Request { id, message })
}

/// The second pass: the typed body for a known `type`.
fn parse_body<F: Format>(bytes: &[u8], ty: &str) -> Result<ClientMessage, (ErrorCode, String)> {
    fn body<F: Format, T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
        F::from_slice(bytes)
    }
    let r = match ty {
        "join" => body::<F, _>(bytes).map(ClientMessage::Join),
        "leave" => body::<F, _>(bytes).map(ClientMessage::Leave),
        "presence" => body::<F, _>(bytes).map(ClientMessage::Presence),
        "cursor" => body::<F, _>(bytes).map(ClientMessage::Cursor),
        "broadcast" => body::<F, _>(bytes).map(ClientMessage::Broadcast),
        "lock.acquire" => body::<F, _>(bytes).map(ClientMessage::LockAcquire),
        "lock.release" => body::<F, _>(bytes).map(ClientMessage::LockRelease),
        "lock.extend" => body::<F, _>(bytes).map(ClientMessage::LockExtend),
        "lock.cancel_wait" => body::<F, _>(bytes).map(ClientMessage::LockCancelWait),
        "settings" => body::<F, _>(bytes).map(ClientMessage::Settings),
        "ping" => Ok(ClientMessage::Ping),
        "auth.refresh" => body::<F, _>(bytes).map(ClientMessage::AuthRefresh),
        other => {
            let shown: String = other.chars().take(64).collect();
            return Err((
                ErrorCode::UnknownType,
                format!("unknown message type {shown:?}"),
            ));
        }
    };
    r.map_err(|e| (ErrorCode::BadRequest, format!("bad {ty}: {e}")))
}

fn validate(m: &ClientMessage) -> Result<(), String> {
    match m {
        ClientMessage::LockAcquire(a) if !valid_action(&a.action) => {
            Err("action must match [a-z][a-z0-9_.-]{0,31}".into())
        }
        ClientMessage::LockAcquire(a) if a.ttl_ms == Some(0) => {
            Err("ttl_ms must be positive".into())
        }
        ClientMessage::LockExtend(e) if e.ttl_ms == 0 => Err("ttl_ms must be positive".into()),
        ClientMessage::Broadcast(b) if b.event.is_empty() || b.event.len() > MAX_EVENT_NAME => {
            Err(format!("event must be 1 to {MAX_EVENT_NAME} bytes"))
        }
        ClientMessage::Cursor(c) if !c.x.is_finite() || !c.y.is_finite() => {
            Err("x and y must be finite numbers".into())
        }
        _ => Ok(()),
    }
}
