//! Who a connection or HTTP caller is: JWT verification into a [`Principal`] with room roles.
//!
//! Room patterns in the `rooms` claim are `type:id` (exact), `type:*` or `*`; the most specific
//! matching pattern decides the role, so `{"*": "owner", "scene:42": "viewer"}` makes the user a
//! viewer in `scene:42` only.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk};
use jsonwebtoken::{
    Algorithm, DecodingKey, EncodingKey, Header, Validation, decode, decode_header, encode,
    get_current_timestamp,
};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::config::Config;
use crate::engine::UserId;
use crate::error::ErrorCode;
use crate::names::Entity;

/// A member's role in a room, ordered: `viewer < commenter < editor < owner`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Viewer,
    Commenter,
    Editor,
    Owner,
}

/// A room pattern from the `rooms` claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoomPattern {
    Exact(String),
    Type(String),
    Any,
}

impl RoomPattern {
    pub fn parse(s: &str) -> Option<RoomPattern> {
        if s == "*" {
            return Some(RoomPattern::Any);
        }
        if let Some(ty) = s.strip_suffix(":*") {
            return Entity::parse(&format!("{ty}:x"))
                .ok()
                .map(|_| RoomPattern::Type(ty.to_owned()));
        }
        Entity::parse(s)
            .ok()
            .map(|_| RoomPattern::Exact(s.to_owned()))
    }

    /// How specific a match is (higher wins), or `None` when the pattern does not match.
    fn specificity(&self, room: &Entity) -> Option<u8> {
        match self {
            RoomPattern::Exact(r) if r == room.as_str() => Some(2),
            RoomPattern::Type(t) if t == room.entity_type() => Some(1),
            RoomPattern::Any => Some(0),
            _ => None,
        }
    }
}

/// An authenticated caller.
///
/// Identity (`user_id`, name, avatar, color) is fixed for a session's life; what the token
/// grants (roles, `exp`, `jti`) is replaced when the session refreshes its token
/// ([`set_grants`](Self::set_grants)), so every role check sees the newest token.
#[derive(Debug)]
pub struct Principal {
    pub user_id: UserId,
    pub name: Arc<str>,
    pub avatar: Option<Arc<str>>,
    pub color: Arc<str>,
    /// Authenticated with the admin/service token: owner everywhere, admin endpoints allowed.
    pub admin: bool,
    grants: std::sync::RwLock<Arc<Grants>>,
}

/// What a token grants, and until when.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Grants {
    pub rooms: Vec<(RoomPattern, Role)>,
    /// The token's `exp` (seconds since the epoch); `None` for the admin principal.
    pub exp: Option<u64>,
    /// The token's `jti`, if it has one (what an admin can revoke).
    pub jti: Option<Arc<str>>,
}

impl Clone for Principal {
    fn clone(&self) -> Self {
        Principal {
            user_id: self.user_id.clone(),
            name: self.name.clone(),
            avatar: self.avatar.clone(),
            color: self.color.clone(),
            admin: self.admin,
            grants: std::sync::RwLock::new(self.grants()),
        }
    }
}

impl Principal {
    pub fn new(
        user_id: UserId,
        name: Arc<str>,
        avatar: Option<Arc<str>>,
        color: Arc<str>,
        grants: Grants,
    ) -> Principal {
        Principal {
            user_id,
            name,
            avatar,
            color,
            admin: false,
            grants: std::sync::RwLock::new(Arc::new(grants)),
        }
    }

    /// The caller's role in `room`, or `None` when no pattern grants access.
    pub fn role_in(&self, room: &Entity) -> Option<Role> {
        if self.admin {
            return Some(Role::Owner);
        }
        self.grants()
            .rooms
            .iter()
            .filter_map(|(p, role)| p.specificity(room).map(|s| (s, *role)))
            .max_by_key(|(s, _)| *s)
            .map(|(_, role)| role)
    }

    /// What the current token grants.
    pub fn grants(&self) -> Arc<Grants> {
        self.grants
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Takes over what a newer token of the same user grants (a refresh or a resume).
    pub fn set_grants(&self, grants: Arc<Grants>) {
        *self.grants.write().unwrap_or_else(|p| p.into_inner()) = grants;
    }

    /// The admin/service principal. Its user id `admin` is reserved: no JWT may carry that
    /// `sub` (see [`RESERVED_SUB`]), so nobody can pass for the admin in audit records or
    /// lock holders.
    pub fn admin() -> Principal {
        Principal {
            user_id: Arc::from(RESERVED_SUB),
            name: Arc::from("admin"),
            avatar: None,
            color: Arc::from("#444444"),
            admin: true,
            grants: std::sync::RwLock::new(Arc::new(Grants {
                rooms: vec![(RoomPattern::Any, Role::Owner)],
                exp: None,
                jti: None,
            })),
        }
    }
}

/// The user id of the admin principal; refused as a JWT `sub`.
pub const RESERVED_SUB: &str = "admin";

/// A stable color per user when the token carries none: a hue from a hash of the user id.
pub fn color_for(user_id: &str) -> String {
    // FNV-1a: stable across processes and releases, unlike std's RandomState hasher.
    let mut h: u32 = 0x811c9dc5;
    for b in user_id.bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x01000193);
    }
    format!("hsl({}, 70%, 45%)", h % 360)
}

// ---------------------------------------------------------------------------------------------
// Verification: user JWTs, the admin token and dev-mode minting.
// ---------------------------------------------------------------------------------------------
//
// Key sources (exactly one, or none for dev mode):
//
// - `jwt_secret`: HS256 only.
// - `jwt_public_key`: a PEM public key (SPKI `PUBLIC KEY` or PKCS#1 `RSA PUBLIC KEY`); an RSA key
//   accepts RS256 only, an EC P-256 key ES256 only.
// - `jwt_jwks`: a JWKS file of RSA (RS256) and EC P-256 (ES256) keys, chosen by the token's `kid`
//   (a token without `kid` is accepted only when the set has exactly one usable key). Symmetric
//   (`oct`), encryption (`use: enc`) and other-algorithm keys are skipped with a warning.
// - none: dev mode, a random 32-byte HS256 secret generated in memory at start-up. Tokens minted
//   by one process do not verify in another (or after a restart).
//
// The token header's `alg` must be the one algorithm its key allows, so `none`, an HS256 token
// against a public key (algorithm confusion) or an RS256 token against an EC key are refused
// before any signature check. Key files are read once, at start-up: rotate keys by deploying a
// new file (a JWKS may hold the old and the new key side by side, told apart by `kid`).
//
// Time claims: `exp` is required, `nbf` is honoured when present, both with a leeway of
// [`LEEWAY_SECS`] (5 s) for clock skew. `iss` / `aud` are required and checked only when
// `jwt_issuer` / `jwt_audience` are configured; otherwise they are ignored.

/// Clock skew tolerated on `exp` and `nbf`, in seconds.
pub const LEEWAY_SECS: u64 = 5;
/// Lifetime of a token minted in dev mode.
pub const DEV_TOKEN_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// Longest token accepted, in bytes (a cheap guard before any decoding).
pub const MAX_TOKEN_BYTES: usize = 64 * 1024;
/// Most entries accepted in a token's `rooms` claim.
pub const MAX_ROOM_PATTERNS: usize = 1000;
/// Longest `sub` (user id), in characters.
pub const MAX_SUB_CHARS: usize = 128;
const MAX_NAME_CHARS: usize = 128;
const MAX_AVATAR_CHARS: usize = 2048;
const MAX_COLOR_CHARS: usize = 64;
/// Longest `jti` accepted, in bytes (it becomes a Redis key when revoked).
const MAX_JTI_BYTES: usize = 256;

/// Why a caller could not be authenticated, or why the authenticator could not be built.
///
/// Every message is safe to show to clients: it never contains a secret, a key or the token.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No token was presented (or an empty one).
    #[error("missing token")]
    Missing,
    /// The token's `exp` is more than [`LEEWAY_SECS`] in the past.
    #[error("token expired")]
    Expired,
    /// Bad signature, algorithm, key id, issuer, audience, `nbf`, or bad claims (the text says which).
    #[error("invalid token: {0}")]
    Invalid(String),
    /// A dev-token request with a bad `sub`, `name` or `rooms` (the text says which).
    #[error("bad token request: {0}")]
    BadRequest(String),
    /// The configured key material is unusable (start-up only).
    #[error("JWT configuration: {0}")]
    Config(String),
    /// `mint_dev_token` on a node that has a JWT key configured.
    #[error("tokens are minted only in dev mode (no JWT key configured)")]
    NotDevMode,
}

impl AuthError {
    /// The client error code for this failure: `unauthorized` (401 / close 4001) for token
    /// problems, `bad_request` for a bad dev-token request, `not_found` for the dev-token endpoint
    /// outside dev mode, `internal` for configuration problems.
    pub fn code(&self) -> ErrorCode {
        match self {
            AuthError::Missing | AuthError::Expired | AuthError::Invalid(_) => {
                ErrorCode::Unauthorized
            }
            AuthError::BadRequest(_) => ErrorCode::BadRequest,
            AuthError::NotDevMode => ErrorCode::NotFound,
            AuthError::Config(_) => ErrorCode::Internal,
        }
    }
}

/// The token from an `Authorization` header value: `Bearer <token>` (scheme case-insensitive).
pub fn parse_bearer(header_value: &str) -> Option<&str> {
    let (scheme, token) = header_value.trim().split_once(char::is_whitespace)?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Verifies user JWTs and the admin token; mints tokens in dev mode.
///
/// Cheap to clone (one `Arc`) and safe to call from any number of tasks: verification takes no
/// lock and does no I/O.
#[derive(Clone)]
pub struct Authenticator {
    inner: Arc<Inner>,
}

struct Inner {
    keys: Keys,
    /// What verifies tokens, for logs (no secrets).
    description: String,
    /// Dev mode only: signs minted tokens with the in-memory secret.
    dev_signer: Option<EncodingKey>,
    issuer: Option<String>,
    audience: Option<String>,
    admin: Option<AdminToken>,
}

enum Keys {
    /// `jwt_secret` or the dev-mode secret: HS256.
    Secret(VerifyKey),
    /// `jwt_public_key`: RS256 or ES256.
    Public(VerifyKey),
    /// `jwt_jwks`: usable keys, each with its own algorithm.
    Jwks(Vec<VerifyKey>),
}

struct VerifyKey {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
    validation: Validation,
}

/// The admin token is compared as HMAC-SHA256 tags under a random per-process key, in constant
/// time: equal-length tags mean neither the content nor the length of the token leaks by timing.
struct AdminToken {
    mac_key: EncodingKey,
    tag: String,
}

impl AdminToken {
    fn new(token: &str) -> Result<AdminToken, AuthError> {
        let key_bytes: [u8; 32] = rand::random();
        let mac_key = EncodingKey::from_secret(&key_bytes);
        let tag = jsonwebtoken::crypto::sign(token.as_bytes(), &mac_key, Algorithm::HS256)
            .map_err(|_| AuthError::Config("cannot prepare the admin token".into()))?;
        Ok(AdminToken { mac_key, tag })
    }

    fn matches(&self, token: &str) -> bool {
        match jsonwebtoken::crypto::sign(token.as_bytes(), &self.mac_key, Algorithm::HS256) {
            Ok(tag) => tag.as_bytes().ct_eq(self.tag.as_bytes()).into(),
            Err(_) => false,
        }
    }
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("keys", &self.inner.description)
            .field("issuer", &self.inner.issuer)
            .field("audience", &self.inner.audience)
            .field("admin_token", &self.inner.admin.is_some())
            .finish()
    }
}

/// The claims lockstep reads; registered claims (`exp`, `nbf`, `iss`, `aud`) are checked by
/// jsonwebtoken's `Validation`. Unknown claims are ignored.
#[derive(Debug, Default, Serialize, Deserialize)]
struct UserClaims {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sub: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    avatar: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    color: Option<String>,
    /// Kept as JSON so a bad entry is reported by its pattern, not as a serde error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rooms: Option<serde_json::Value>,
    /// Checked by `Validation`; kept for the session's lifetime (minted tokens set their own).
    #[serde(default, skip_serializing)]
    exp: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    jti: Option<String>,
}

#[derive(Serialize)]
struct MintedClaims<'a> {
    #[serde(flatten)]
    user: &'a UserClaims,
    iat: u64,
    exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
}

impl Authenticator {
    /// Builds the authenticator from the JWT settings, reading a PEM or JWKS file once.
    ///
    /// With no key configured (dev mode) it generates a random 32-byte HS256 secret in memory.
    pub fn from_config(c: &Config) -> Result<Self, AuthError> {
        let issuer = c.jwt_issuer.clone().filter(|s| !s.is_empty());
        let audience = c.jwt_audience.clone().filter(|s| !s.is_empty());
        let validation = |alg| validation_for(alg, issuer.as_deref(), audience.as_deref());
        let configured = [
            c.jwt_secret.is_some(),
            c.jwt_public_key.is_some(),
            c.jwt_jwks.is_some(),
        ];
        if configured.iter().filter(|set| **set).count() > 1 {
            return Err(AuthError::Config(
                "set only one of jwt_secret, jwt_public_key, jwt_jwks".into(),
            ));
        }

        let mut dev_signer = None;
        let (keys, description) = if let Some(secret) = &c.jwt_secret {
            if secret.is_empty() {
                return Err(AuthError::Config("jwt_secret is empty".into()));
            }
            if secret.len() < 32 {
                tracing::warn!("jwt_secret is shorter than 32 bytes: use a long random secret");
            }
            let key = VerifyKey {
                kid: None,
                alg: Algorithm::HS256,
                key: DecodingKey::from_secret(secret.as_bytes()),
                validation: validation(Algorithm::HS256),
            };
            (
                Keys::Secret(key),
                "HS256 shared secret (jwt_secret)".to_owned(),
            )
        } else if let Some(path) = &c.jwt_public_key {
            let pem = read_key_file(path, "jwt_public_key")?;
            let (alg, key) = public_key_from_pem(&pem).map_err(|m| {
                AuthError::Config(format!("jwt_public_key {}: {m}", path.display()))
            })?;
            let key = VerifyKey {
                kid: None,
                alg,
                key,
                validation: validation(alg),
            };
            (
                Keys::Public(key),
                format!("{alg:?} public key ({})", path.display()),
            )
        } else if let Some(path) = &c.jwt_jwks {
            let text = read_key_file(path, "jwt_jwks")?;
            let keys = keys_from_jwks(&text)
                .map_err(|m| AuthError::Config(format!("jwt_jwks {}: {m}", path.display())))?;
            let list: Vec<String> = keys
                .iter()
                .map(|(kid, alg, _)| format!("{}={alg:?}", kid.as_deref().unwrap_or("(no kid)")))
                .collect();
            let description = format!("JWKS ({}): {}", path.display(), list.join(", "));
            let keys = keys
                .into_iter()
                .map(|(kid, alg, key)| VerifyKey {
                    kid,
                    alg,
                    key,
                    validation: validation(alg),
                })
                .collect();
            (Keys::Jwks(keys), description)
        } else {
            let secret: [u8; 32] = rand::random();
            dev_signer = Some(EncodingKey::from_secret(&secret));
            let key = VerifyKey {
                kid: None,
                alg: Algorithm::HS256,
                key: DecodingKey::from_secret(&secret),
                validation: validation(Algorithm::HS256),
            };
            (
                Keys::Secret(key),
                "dev mode: ephemeral in-memory HS256 secret".to_owned(),
            )
        };

        let admin = match c.admin_token.as_deref().filter(|t| !t.is_empty()) {
            Some(token) => {
                if token.len() < 16 {
                    tracing::warn!("admin_token is shorter than 16 bytes: use a long random token");
                }
                Some(AdminToken::new(token)?)
            }
            None => None,
        };

        Ok(Authenticator {
            inner: Arc::new(Inner {
                keys,
                description,
                dev_signer,
                issuer,
                audience,
                admin,
            }),
        })
    }

    /// Dev mode: no JWT key configured; tokens come from [`Authenticator::mint_dev_token`].
    pub fn is_dev(&self) -> bool {
        self.inner.dev_signer.is_some()
    }

    /// What verifies tokens, for the start-up log (never contains a secret).
    pub fn describe(&self) -> &str {
        &self.inner.description
    }

    /// Verifies a user JWT and turns its claims into a [`Principal`] (never an admin).
    pub fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::Invalid(format!(
                "token is longer than {MAX_TOKEN_BYTES} bytes"
            )));
        }
        let header = decode_header(token).map_err(|_| header_error(token))?;
        let key = self.key_for(&header)?;
        let data = decode::<UserClaims>(token, &key.key, &key.validation).map_err(jwt_error)?;
        principal_from_claims(&data.claims).map_err(AuthError::Invalid)
    }

    /// Authenticates an HTTP bearer token: the admin/service token gives [`Principal::admin`],
    /// anything else is verified as a user JWT.
    pub fn verify_bearer(&self, token: &str) -> Result<Principal, AuthError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        if self.is_admin_token(token) {
            return Ok(Principal::admin());
        }
        self.verify(token)
    }

    /// Whether `token` is the configured admin token (constant-time; false when none is set).
    pub fn is_admin_token(&self, token: &str) -> bool {
        self.inner
            .admin
            .as_ref()
            .is_some_and(|admin| admin.matches(token))
    }

    /// Mints an HS256 token for `sub` valid for [`DEV_TOKEN_TTL`] (dev mode only).
    ///
    /// `name` defaults to `sub`, `rooms` to `{"*": "editor"}`. The claims are checked exactly as
    /// [`Authenticator::verify`] checks them; `iss`/`aud` are set when configured.
    pub fn mint_dev_token(
        &self,
        sub: &str,
        name: Option<&str>,
        rooms: Option<BTreeMap<String, Role>>,
    ) -> Result<String, AuthError> {
        let signer = self
            .inner
            .dev_signer
            .as_ref()
            .ok_or(AuthError::NotDevMode)?;
        let rooms = rooms.unwrap_or_else(|| BTreeMap::from([("*".to_owned(), Role::Editor)]));
        let claims = UserClaims {
            sub: Some(sub.to_owned()),
            name: name.map(str::to_owned),
            avatar: None,
            color: None,
            rooms: Some(serde_json::Value::Object(
                rooms
                    .into_iter()
                    .map(|(pattern, role)| (pattern, serde_json::Value::from(role.as_str())))
                    .collect(),
            )),
            exp: None,
            // A token id, so an admin can revoke one dev token (`POST /v1/admin/sessions/revoke`).
            jti: Some(uuid::Uuid::new_v4().to_string()),
        };
        principal_from_claims(&claims).map_err(AuthError::BadRequest)?;
        let now = get_current_timestamp();
        let minted = MintedClaims {
            user: &claims,
            iat: now,
            exp: now + DEV_TOKEN_TTL.as_secs(),
            iss: self.inner.issuer.as_deref(),
            aud: self.inner.audience.as_deref(),
        };
        encode(&Header::new(Algorithm::HS256), &minted, signer)
            .map_err(|_| AuthError::Config("cannot sign the dev token".into()))
    }

    /// The key a token must be verified with, refusing any algorithm that key does not allow.
    fn key_for(&self, header: &Header) -> Result<&VerifyKey, AuthError> {
        let key = match &self.inner.keys {
            Keys::Secret(key) | Keys::Public(key) => key,
            Keys::Jwks(keys) => match header.kid.as_deref() {
                Some(kid) => keys
                    .iter()
                    .find(|k| k.kid.as_deref() == Some(kid))
                    .ok_or_else(|| AuthError::Invalid("unknown key id (kid)".into()))?,
                None => match keys.as_slice() {
                    [only] => only,
                    _ => {
                        return Err(AuthError::Invalid(
                            "token has no key id (kid) and the key set has several keys".into(),
                        ));
                    }
                },
            },
        };
        if header.alg != key.alg {
            return Err(AuthError::Invalid(format!(
                "algorithm {:?} is not accepted here (expected {:?})",
                header.alg, key.alg
            )));
        }
        Ok(key)
    }
}

impl Role {
    /// Parses a role name as written in the `rooms` claim (`viewer`, `commenter`, `editor`, `owner`).
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "viewer" => Some(Role::Viewer),
            "commenter" => Some(Role::Commenter),
            "editor" => Some(Role::Editor),
            "owner" => Some(Role::Owner),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Commenter => "commenter",
            Role::Editor => "editor",
            Role::Owner => "owner",
        }
    }
}

fn validation_for(alg: Algorithm, issuer: Option<&str>, audience: Option<&str>) -> Validation {
    let mut v = Validation::new(alg);
    v.leeway = LEEWAY_SECS;
    v.validate_exp = true;
    v.validate_nbf = true;
    let mut required = vec!["exp"];
    if let Some(iss) = issuer {
        v.set_issuer(&[iss]);
        required.push("iss");
    }
    match audience {
        Some(aud) => {
            v.set_audience(&[aud]);
            required.push("aud");
        }
        // jsonwebtoken rejects any `aud` when none is expected; the contract checks it only
        // when configured.
        None => v.validate_aud = false,
    }
    v.set_required_spec_claims(&required);
    v
}

fn read_key_file(path: &Path, setting: &str) -> Result<Vec<u8>, AuthError> {
    std::fs::read(path)
        .map_err(|e| AuthError::Config(format!("cannot read {setting} {}: {e}", path.display())))
}

/// An RSA (RS256) or EC P-256 (ES256) public key from PEM; the text says why it is refused.
fn public_key_from_pem(pem: &[u8]) -> Result<(Algorithm, DecodingKey), String> {
    let text = String::from_utf8_lossy(pem);
    if text.contains("PRIVATE KEY") {
        return Err("the file holds a private key: give the public key \
                    (openssl pkey -in key.pem -pubout)"
            .into());
    }
    if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
        let jwk = Jwk::from_decoding_key(&key, Some(Algorithm::RS256))
            .map_err(|_| "malformed RSA public key".to_owned())?;
        return match &jwk.algorithm {
            AlgorithmParameters::RSA(p) => {
                let n = b64url(&p.n).map_err(|_| "malformed RSA modulus".to_owned())?;
                let e = b64url(&p.e).map_err(|_| "malformed RSA exponent".to_owned())?;
                check_rsa(&n, &e)?;
                Ok((Algorithm::RS256, key))
            }
            _ => Err("malformed RSA public key".into()),
        };
    }
    match DecodingKey::from_ec_pem(pem) {
        Ok(key) => {
            check_p256(&key)?;
            Ok((Algorithm::ES256, key))
        }
        Err(_) => Err("not an RSA or EC P-256 public key in PEM \
                       (expected 'PUBLIC KEY' or 'RSA PUBLIC KEY')"
            .into()),
    }
}

/// RS256 keys must have a 2048–4096-bit modulus (RFC 7518 §3.3 asks for at least 2048; the RSA
/// implementation refuses more than 4096) and an odd exponent the implementation accepts.
fn check_rsa(n: &[u8], e: &[u8]) -> Result<(), String> {
    let n = strip_leading_zeros(n);
    let bits = n.first().map_or(0, |top| {
        (n.len() - 1) * 8 + (8 - top.leading_zeros() as usize)
    });
    if bits < 2048 {
        return Err(format!(
            "RSA key has {bits} bits; at least 2048 are required"
        ));
    }
    if bits > 4096 {
        return Err(format!(
            "RSA key has {bits} bits; at most 4096 are supported"
        ));
    }
    let e = strip_leading_zeros(e);
    let exponent = if e.len() <= 5 {
        e.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
    } else {
        0
    };
    if exponent < 3 || exponent % 2 == 0 || exponent > (1 << 33) - 1 {
        return Err("RSA key has an unsupported public exponent".into());
    }
    Ok(())
}

/// ES256 keys must be uncompressed points on P-256.
fn check_p256(key: &DecodingKey) -> Result<(), String> {
    let point = key
        .try_get_as_bytes()
        .map_err(|_| "malformed EC public key".to_owned())?;
    if point.len() != 65 || point[0] != 4 {
        return Err("EC key is not on curve P-256 (ES256 requires P-256)".into());
    }
    // Building the verifier parses the point; an empty signature then simply fails to verify.
    jsonwebtoken::crypto::verify("", b"probe", key, Algorithm::ES256)
        .map(|_| ())
        .map_err(|_| "EC public key is not a valid P-256 point".into())
}

fn strip_leading_zeros(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|x| *x != 0).unwrap_or(b.len());
    &b[start..]
}

/// base64url as JWKs use it; padding, which some publishers add, is tolerated.
fn b64url(s: &str) -> Result<Vec<u8>, base64::DecodeError> {
    URL_SAFE_NO_PAD.decode(s.trim_end_matches('='))
}

/// Why one JWKS entry is not used: skipped (unsupported, with a warning) or refused (malformed).
enum JwkProblem {
    Skip(String),
    Bad(String),
}

/// The usable keys of a JWKS document: `(kid, algorithm, key)`.
fn keys_from_jwks(text: &[u8]) -> Result<Vec<(Option<String>, Algorithm, DecodingKey)>, String> {
    #[derive(Deserialize)]
    struct RawSet {
        keys: Vec<serde_json::Value>,
    }
    let set: RawSet = serde_json::from_slice(text)
        .map_err(|e| format!("not a JWKS document ({{\"keys\": [...]}}): {e}"))?;
    let mut keys: Vec<(Option<String>, Algorithm, DecodingKey)> = Vec::new();
    for (i, jwk) in set.keys.iter().enumerate() {
        let kid = jwk.get("kid").and_then(|k| k.as_str()).map(str::to_owned);
        let label = match &kid {
            Some(kid) => format!("key {kid:?}"),
            None => format!("key #{i} (no kid)"),
        };
        match key_from_jwk(jwk) {
            Ok((alg, key)) => {
                if kid.is_some() && keys.iter().any(|(k, _, _)| *k == kid) {
                    return Err(format!("{label} appears twice"));
                }
                keys.push((kid, alg, key));
            }
            Err(JwkProblem::Skip(why)) => tracing::warn!("jwt_jwks: skipping {label}: {why}"),
            Err(JwkProblem::Bad(why)) => return Err(format!("{label}: {why}")),
        }
    }
    if keys.is_empty() {
        return Err("no usable RS256 or ES256 signing key".into());
    }
    if keys.len() > 1 && keys.iter().any(|(kid, _, _)| kid.is_none()) {
        return Err("every key needs a kid when the set has more than one".into());
    }
    Ok(keys)
}

fn key_from_jwk(jwk: &serde_json::Value) -> Result<(Algorithm, DecodingKey), JwkProblem> {
    let field = |name: &str| jwk.get(name).and_then(|v| v.as_str());
    let required = |name: &str| {
        let value = field(name).ok_or_else(|| JwkProblem::Bad(format!("missing '{name}'")))?;
        b64url(value).map_err(|_| JwkProblem::Bad(format!("'{name}' is not base64url")))
    };
    if let Some(usage) = field("use")
        && usage != "sig"
    {
        return Err(JwkProblem::Skip(format!("use is {usage:?}, not \"sig\"")));
    }
    let (alg, key) = match field("kty") {
        Some("RSA") => {
            let (n, e) = (required("n")?, required("e")?);
            check_rsa(&n, &e).map_err(JwkProblem::Bad)?;
            (
                Algorithm::RS256,
                DecodingKey::from_rsa_raw_components(&n, &e),
            )
        }
        Some("EC") => {
            if field("crv") != Some("P-256") {
                return Err(JwkProblem::Skip(
                    "EC curve is not P-256 (only ES256 is supported)".into(),
                ));
            }
            let (x, y) = (required("x")?, required("y")?);
            if x.len() != 32 || y.len() != 32 {
                return Err(JwkProblem::Bad("P-256 coordinates must be 32 bytes".into()));
            }
            let point: Vec<u8> = [&[4u8][..], &x, &y].concat();
            let key = DecodingKey::from_ec_der(&point);
            check_p256(&key).map_err(JwkProblem::Bad)?;
            (Algorithm::ES256, key)
        }
        Some("oct") => {
            return Err(JwkProblem::Skip(
                "symmetric keys are not accepted from a JWKS".into(),
            ));
        }
        Some(other) => {
            return Err(JwkProblem::Skip(format!(
                "key type {other:?} is not supported"
            )));
        }
        None => return Err(JwkProblem::Bad("missing 'kty'".into())),
    };
    match field("alg") {
        Some(declared) if declared != format!("{alg:?}") => Err(JwkProblem::Skip(format!(
            "alg {declared:?} is not supported (this key type allows {alg:?})"
        ))),
        _ => Ok((alg, key)),
    }
}

/// A safe explanation for a token whose header does not parse (`alg: none` lands here: the
/// library knows no such algorithm).
fn header_error(token: &str) -> AuthError {
    let alg = token
        .split('.')
        .next()
        .and_then(|h| b64url(h).ok())
        .and_then(|h| serde_json::from_slice::<serde_json::Value>(&h).ok())
        .and_then(|h| h.get("alg").and_then(|a| a.as_str()).map(str::to_owned));
    match alg {
        Some(alg) if alg.eq_ignore_ascii_case("none") => {
            AuthError::Invalid("unsigned tokens (alg none) are not accepted".into())
        }
        Some(alg) => AuthError::Invalid(format!(
            "algorithm {:?} is not supported",
            alg.chars().take(16).collect::<String>()
        )),
        None => AuthError::Invalid("malformed token".into()),
    }
}

fn jwt_error(e: jsonwebtoken::errors::Error) -> AuthError {
    use jsonwebtoken::errors::ErrorKind as K;
    let message = match e.kind() {
        K::ExpiredSignature => return AuthError::Expired,
        K::ImmatureSignature => "token is not valid yet (nbf)".to_owned(),
        K::InvalidSignature => "bad signature".to_owned(),
        K::InvalidIssuer => "wrong issuer (iss)".to_owned(),
        K::InvalidAudience => "wrong audience (aud)".to_owned(),
        K::InvalidAlgorithm | K::MissingAlgorithm => "algorithm not accepted".to_owned(),
        K::MissingRequiredClaim(claim) => format!("missing claim '{claim}'"),
        K::InvalidClaimFormat(claim) => format!("claim '{claim}' has a bad format"),
        K::Json(err) => format!("malformed claims: {err}"),
        _ => "malformed token".to_owned(),
    };
    AuthError::Invalid(message)
}

/// Checks the lockstep claims and builds the principal; the text says which claim is wrong.
fn principal_from_claims(c: &UserClaims) -> Result<Principal, String> {
    let sub = c.sub.as_deref().ok_or("missing claim 'sub'")?;
    if sub == RESERVED_SUB {
        return Err(format!(
            "'sub' {RESERVED_SUB:?} is reserved for the admin token"
        ));
    }
    let sub_chars = sub.chars().count();
    if sub_chars == 0 || sub_chars > MAX_SUB_CHARS || sub.chars().any(char::is_control) {
        return Err(format!(
            "'sub' must be 1 to {MAX_SUB_CHARS} characters without control characters"
        ));
    }
    let text = |claim: &str,
                value: &Option<String>,
                max: usize|
     -> Result<Option<Arc<str>>, String> {
        match value.as_deref() {
            None | Some("") => Ok(None),
            Some(v) if v.chars().count() > max || v.chars().any(char::is_control) => Err(format!(
                "'{claim}' must be at most {max} characters without control characters"
            )),
            Some(v) => Ok(Some(Arc::from(v))),
        }
    };
    let name = text("name", &c.name, MAX_NAME_CHARS)?.unwrap_or_else(|| Arc::from(sub));
    let avatar = text("avatar", &c.avatar, MAX_AVATAR_CHARS)?;
    let color = match text("color", &c.color, MAX_COLOR_CHARS)? {
        // Colors end up in style attributes of UIs: letters, digits and `#(),.% -` only.
        Some(color)
            if !color
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || "#(),.% -".contains(ch)) =>
        {
            return Err("'color' may only contain letters, digits, spaces and #(),.%-".into());
        }
        Some(color) => color,
        None => Arc::from(color_for(sub)),
    };
    let rooms = match &c.rooms {
        None | Some(serde_json::Value::Null) => Vec::new(),
        Some(serde_json::Value::Object(map)) => {
            if map.len() > MAX_ROOM_PATTERNS {
                return Err(format!("'rooms' has more than {MAX_ROOM_PATTERNS} entries"));
            }
            let mut rooms = Vec::with_capacity(map.len());
            for (pattern, role) in map {
                let shown: String = pattern.chars().take(64).collect();
                let parsed = RoomPattern::parse(pattern).ok_or_else(|| {
                    format!("room pattern {shown:?} is invalid (use 'type:id', 'type:*' or '*')")
                })?;
                let role = role.as_str().and_then(Role::parse).ok_or_else(|| {
                    format!(
                        "role for room pattern {shown:?} must be one of viewer, commenter, editor, owner"
                    )
                })?;
                rooms.push((parsed, role));
            }
            rooms
        }
        Some(_) => return Err("'rooms' must be an object mapping room patterns to roles".into()),
    };
    let jti = match c.jti.as_deref() {
        None | Some("") => None,
        Some(j) if j.len() > MAX_JTI_BYTES || j.chars().any(char::is_control) => {
            return Err(format!(
                "'jti' must be at most {MAX_JTI_BYTES} bytes without control characters"
            ));
        }
        Some(j) => Some(Arc::from(j)),
    };
    Ok(Principal::new(
        Arc::from(sub),
        name,
        avatar,
        color,
        Grants {
            rooms,
            exp: c.exp,
            jti,
        },
    ))
}

#[cfg(test)]
mod role_tests {
    use super::*;

    fn principal(rooms: &[(&str, Role)]) -> Principal {
        Principal::new(
            "u".into(),
            "U".into(),
            None,
            "red".into(),
            Grants {
                rooms: rooms
                    .iter()
                    .map(|(p, r)| (RoomPattern::parse(p).unwrap(), *r))
                    .collect(),
                exp: None,
                jti: None,
            },
        )
    }

    #[test]
    fn most_specific_pattern_wins() {
        let p = principal(&[
            ("*", Role::Owner),
            ("scene:*", Role::Editor),
            ("scene:42", Role::Viewer),
        ]);
        let e = |s| Entity::parse(s).unwrap();
        assert_eq!(p.role_in(&e("scene:42")), Some(Role::Viewer));
        assert_eq!(p.role_in(&e("scene:43")), Some(Role::Editor));
        assert_eq!(p.role_in(&e("story:1")), Some(Role::Owner));
        assert_eq!(
            principal(&[("scene:1", Role::Editor)]).role_in(&e("scene:2")),
            None
        );
    }

    #[test]
    fn roles_are_ordered() {
        assert!(
            Role::Viewer < Role::Commenter
                && Role::Commenter < Role::Editor
                && Role::Editor < Role::Owner
        );
    }

    #[test]
    fn bad_patterns_are_refused() {
        assert!(RoomPattern::parse("Scene:*").is_none());
        assert!(RoomPattern::parse("scene").is_none());
        assert_eq!(
            RoomPattern::parse("scene:*"),
            Some(RoomPattern::Type("scene".into()))
        );
    }
}
