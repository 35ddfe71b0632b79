//! The REST API: presence, locks, audit and admin endpoints.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};

use super::{ApiError, ApiJson, ApiQuery, Authed};
use crate::audit::{AuditPage, AuditQuery};
use crate::auth::Role;
use crate::engine::{LockInfo, LockKey, Member};
use crate::error::ErrorCode;
use crate::names::{Entity, valid_action};
use crate::node::Node;
use crate::node::locks::{AcquireParams, Caller as LockCaller};
use crate::protocol::server::{HolderView, LockView};

fn entity(s: &str) -> Result<Entity, ApiError> {
    Entity::parse(s).map_err(|e| ApiError::new(ErrorCode::BadRequest, e.to_string()))
}

async fn require_role(
    node: &Node,
    caller: &Authed,
    room: &Entity,
    min: Role,
    what: &str,
) -> Result<(), ApiError> {
    if caller.0.role_in(room) >= Some(min) {
        Ok(())
    } else {
        Err(node.forbidden(&caller.0, room, what).await.into())
    }
}

/// The room a lock request names; required by every HTTP lock endpoint (a lock is
/// identified by room and resource).
fn lock_key(room: Option<&str>, resource: &str) -> Result<LockKey, ApiError> {
    let room = room.ok_or_else(|| {
        ApiError::new(
            ErrorCode::BadRequest,
            "room is required: a lock is identified by its room and resource",
        )
    })?;
    Ok(LockKey::new(entity(room)?, entity(resource)?))
}

#[derive(Serialize)]
pub struct PresenceBody {
    entity: Entity,
    #[serde(skip_serializing_if = "Option::is_none")]
    room: Option<Entity>,
    members: Vec<Member>,
}

#[derive(Deserialize)]
pub struct PresenceQuery {
    room: Option<String>,
}

/// `GET /v1/presence/{type}/{id}[?room=]`. With `room`: the members of that room focused on
/// the entity (all its members when the entity is the room). Without: the entity is the room,
/// and the answer is its members. Either way the caller needs a role in the room whose members
/// are revealed, and only that room's members are: a viewer of `scene:1` cannot learn who
/// focuses on `segment:42-7` in `scene:42`.
pub async fn presence(
    State(node): State<Arc<Node>>,
    caller: Authed,
    Path((ty, id)): Path<(String, String)>,
    ApiQuery(q): ApiQuery<PresenceQuery>,
) -> Result<Json<PresenceBody>, ApiError> {
    let e = Entity::from_parts(&ty, &id)
        .map_err(|e| ApiError::new(ErrorCode::BadRequest, e.to_string()))?;
    let room = q.room.as_deref().map(entity).transpose()?;
    let in_room = room.clone().unwrap_or_else(|| e.clone());
    require_role(&node, &caller, &in_room, Role::Viewer, "reading presence").await?;
    let mut members = node
        .presence
        .members(&in_room)
        .await
        .map_err(crate::node::OpError::from)?;
    if in_room != e {
        members.retain(|m| m.focus.as_ref() == Some(&e));
    }
    Ok(Json(PresenceBody {
        entity: e,
        room,
        members,
    }))
}

#[derive(Deserialize)]
pub struct ListQuery {
    room: String,
}

#[derive(Serialize)]
pub struct LockList<'a> {
    room: &'a Entity,
    locks: Vec<LockView<'a>>,
    /// This node's clock (ms), so a client can show time left without trusting its own.
    server_time: u64,
}

/// `GET /v1/locks?room=`: the room's live locks (no tokens).
pub async fn list_locks(
    State(node): State<Arc<Node>>,
    caller: Authed,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let room = entity(&q.room)?;
    require_role(&node, &caller, &room, Role::Viewer, "listing locks").await?;
    let locks = node
        .locks
        .list_room(&room)
        .await
        .map_err(crate::node::OpError::from)?;
    let body = LockList {
        room: &room,
        locks: locks.iter().map(|l| LockView::of(l, "")).collect(),
        server_time: crate::engine::now_ms(),
    };
    Ok(Json(serde_json::to_value(body).unwrap_or_default()))
}

#[derive(Deserialize)]
pub struct AcquireBody {
    room: String,
    resource: String,
    action: String,
    ttl_ms: Option<u64>,
    #[serde(default)]
    wait: bool,
    /// Idempotency key: the same caller retrying with the same key gets the same grant.
    holder_key: Option<String>,
}

#[derive(Serialize)]
pub struct Granted<'a> {
    resource: &'a Entity,
    room: &'a Entity,
    token: u64,
    expires_at: u64,
}

impl<'a> Granted<'a> {
    fn of(l: &'a LockInfo) -> Self {
        Granted {
            resource: &l.resource,
            room: &l.room,
            token: l.token,
            expires_at: l.expires_at,
        }
    }
}

/// `POST /v1/locks/acquire` → `{token, expires_at}` or 409 `lock_held` with the holder.
pub async fn acquire(
    State(node): State<Arc<Node>>,
    caller: Authed,
    ApiJson(b): ApiJson<AcquireBody>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if !valid_action(&b.action) {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            "action must match [a-z][a-z0-9_.-]{0,31}",
        ));
    }
    if b.ttl_ms == Some(0) {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            "ttl_ms must be positive",
        ));
    }
    if let Some(k) = &b.holder_key
        && Entity::from_parts("k", k).is_err()
    {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            "holder_key must match [A-Za-z0-9._~-]{1,128}",
        ));
    }
    let params = AcquireParams {
        room: entity(&b.room)?,
        resource: entity(&b.resource)?,
        action: Arc::from(b.action),
        ttl_ms: b.ttl_ms,
        wait: b.wait,
        wait_timeout_ms: None,
        request_id: None,
    };
    let who = LockCaller::Http {
        principal: &caller.0,
        holder_key: b.holder_key.as_deref(),
    };
    let (lock, _) = node.acquire(who, params).await?;
    Ok(Json(
        serde_json::to_value(Granted::of(&lock)).unwrap_or_default(),
    ))
}

#[derive(Deserialize)]
pub struct TokenBody {
    room: Option<String>,
    resource: String,
    token: u64,
    ttl_ms: Option<u64>,
}

/// `POST /v1/locks/release {room, resource, token}`.
pub async fn release(
    State(node): State<Arc<Node>>,
    caller: Authed,
    ApiJson(b): ApiJson<TokenBody>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let key = lock_key(b.room.as_deref(), &b.resource)?;
    let who = LockCaller::Http {
        principal: &caller.0,
        holder_key: None,
    };
    node.release(who, &key, Some(b.token), false).await?;
    Ok(Json(
        serde_json::json!({ "released": true, "room": key.room, "resource": key.resource }),
    ))
}

/// `POST /v1/locks/extend {room, resource, token, ttl_ms}`.
pub async fn extend(
    State(node): State<Arc<Node>>,
    caller: Authed,
    ApiJson(b): ApiJson<TokenBody>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let key = lock_key(b.room.as_deref(), &b.resource)?;
    let ttl_ms = b
        .ttl_ms
        .filter(|t| *t > 0)
        .ok_or_else(|| ApiError::new(ErrorCode::BadRequest, "ttl_ms (positive) is required"))?;
    let who = LockCaller::Http {
        principal: &caller.0,
        holder_key: None,
    };
    let lock = node.extend(who, &key, b.token, ttl_ms).await?;
    Ok(Json(
        serde_json::to_value(Granted::of(&lock)).unwrap_or_default(),
    ))
}

/// `POST /v1/locks/validate {room, resource, token}` → `{valid, holder?}`: whether `token`
/// is the live holder of the lock now (hold limit and lease, by the lock store's clock). The
/// caller needs a role in `room` (viewer or above, or the admin token). A token is ordering,
/// not a capability: apps check `holder.user_id` too (docs/fencing.md).
pub async fn validate(
    State(node): State<Arc<Node>>,
    caller: Authed,
    ApiJson(b): ApiJson<TokenBody>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let key = lock_key(b.room.as_deref(), &b.resource)?;
    let (valid, current) = node.validate(&caller.0, &key, b.token).await?;
    let mut body = serde_json::json!({ "valid": valid });
    if let Some(lock) = &current {
        body["holder"] = serde_json::to_value(HolderView::of(lock)).unwrap_or_default();
    }
    Ok(Json(body))
}

/// `GET /v1/audit?resource=&room=&user_id=&actor=&kind=&since=&until=&before=&limit=`: the
/// admin token reads everything; an owner of a room reads that room's records (`room=` is
/// then required), which is what the operator console needs with an owner's token.
pub async fn audit(
    State(node): State<Arc<Node>>,
    caller: Authed,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> Result<Json<AuditPage>, ApiError> {
    if !caller.0.admin {
        let Some(room) = q.room.as_deref() else {
            return Err(ApiError::new(
                ErrorCode::Forbidden,
                "the audit log needs the admin token, or room= naming a room you own",
            ));
        };
        require_role(
            &node,
            &caller,
            &entity(room)?,
            Role::Owner,
            "reading the audit log",
        )
        .await?;
    }
    node.audit.query(&q).await.map(Json).map_err(|e| match e {
        crate::audit::AuditError::BadQuery(m) => ApiError::new(ErrorCode::BadRequest, m),
        crate::audit::AuditError::Unavailable(m) => ApiError::new(ErrorCode::Unavailable, m),
    })
}

#[derive(Deserialize)]
pub struct ForceBody {
    room: Option<String>,
    resource: String,
}

/// `POST /v1/admin/locks/release {room, resource}`: force-release (admin token, or an owner
/// of `room`); the audit record names the caller as `actor`.
pub async fn admin_release(
    State(node): State<Arc<Node>>,
    caller: Authed,
    ApiJson(b): ApiJson<ForceBody>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let key = lock_key(b.room.as_deref(), &b.resource)?;
    let who = LockCaller::Http {
        principal: &caller.0,
        holder_key: None,
    };
    node.release(who, &key, None, true).await?;
    Ok(Json(serde_json::json!({
        "released": true, "room": key.room, "resource": key.resource, "reason": "forced"
    })))
}
