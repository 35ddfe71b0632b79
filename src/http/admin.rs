//! `POST /v1/admin/sessions/revoke {user_id | session_id | jti}` (admin token): ends the
//! matching sessions on every node at once, parked ones included (close 4013, locks released
//! as `revoked`), and refuses a revoked `jti` at connect, resume and refresh until its `exp`.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use serde::Deserialize;

use super::{ApiError, ApiJson, Authed};
use crate::audit::AuditKind;
use crate::error::ErrorCode;
use crate::node::Node;
use crate::node::lifetime::Revocation;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeBody {
    user_id: Option<String>,
    session_id: Option<String>,
    jti: Option<String>,
}

/// Longest id accepted in a revocation (each may become a Redis key or a log field).
const MAX_ID_BYTES: usize = 256;

pub async fn revoke_sessions(
    State(node): State<Arc<Node>>,
    caller: Authed,
    ApiJson(b): ApiJson<RevokeBody>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if !caller.0.admin {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            "revoking sessions needs the admin token",
        ));
    }
    let ok = |v: &Option<String>| {
        v.as_deref()
            .is_none_or(|s| !s.is_empty() && s.len() <= MAX_ID_BYTES)
    };
    if !(ok(&b.user_id) && ok(&b.session_id) && ok(&b.jti)) {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            format!("ids must be 1 to {MAX_ID_BYTES} bytes"),
        ));
    }
    let rev = Revocation {
        user_id: b.user_id,
        session_id: b.session_id,
        jti: b.jti,
        actor: caller.0.user_id.to_string(),
    };
    if rev.is_empty() {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            "give at least one of user_id, session_id, jti",
        ));
    }
    let mut r = node.audit_record(AuditKind::SessionRevoked);
    r.user_id = rev.user_id.as_deref().map(Arc::from);
    r.session_id = rev.session_id.as_deref().map(Arc::from);
    r.detail = serde_json::json!({ "actor": &rev.actor, "jti": &rev.jti });
    node.record(vec![r]).await;
    let ended_here = node.revoke(&rev).await?;
    Ok(Json(serde_json::json!({ "ended_here": ended_here })))
}
