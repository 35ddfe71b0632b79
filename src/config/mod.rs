//! Every setting: its flag, environment name, file key, default and validation.
//!
//! Precedence: command-line flag > `LOCKSTEP_*` environment variable > config file
//! (`--config`/`LOCKSTEP_CONFIG`, TOML with the same keys in snake_case) > default.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

mod redis;
pub use redis::{DEFAULT_LOCK_REPLICA_TIMEOUT, LockReplicas, MAX_LOCK_REPLICAS, RedisTls};

/// A duration written the human way (`30s`, `1m30s`, `250ms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = humantime::DurationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        humantime::parse_duration(s).map(HumanDuration)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Parser)]
#[command(name = "lockstep", version, about = "Real-time collaboration gateway")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// TOML file with settings (same names as the flags, in snake_case).
    #[arg(long, env = "LOCKSTEP_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub settings: Settings,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway (the default).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
}

/// Settings as given (all optional); [`Config`] is what is left after defaults.
#[derive(Debug, Default, Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Address to listen on.
    #[arg(long, env = "LOCKSTEP_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Separate admin listener serving `/metrics`, `/healthz` and `/readyz` (they stay on the
    /// main listener too); unset: none.
    #[arg(long, env = "LOCKSTEP_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Redis URL; unset: embedded in-process engines (single node).
    #[arg(long, env = "LOCKSTEP_REDIS_URL")]
    pub redis_url: Option<String>,
    /// Postgres URL for audit records; unset: JSON-lines file in the data directory.
    /// TLS comes from the URL's libpq parameters: `sslmode` (`disable`, `prefer`, `require`,
    /// `verify-ca`, `verify-full`), `sslrootcert`, `sslcert`, `sslkey`.
    #[arg(long, env = "LOCKSTEP_DATABASE_URL")]
    pub database_url: Option<String>,
    // TLS to Redis (`rediss://` URLs): one block, see docs/configuration.md.
    /// PEM file of CA certificates trusted for `rediss://`; unset: the system's roots.
    #[arg(long, env = "LOCKSTEP_REDIS_TLS_CA")]
    pub redis_tls_ca: Option<PathBuf>,
    /// PEM client certificate (chain) for mutual TLS to Redis; needs `redis_tls_key`.
    #[arg(long, env = "LOCKSTEP_REDIS_TLS_CERT")]
    pub redis_tls_cert: Option<PathBuf>,
    /// PEM private key of `redis_tls_cert`.
    #[arg(long, env = "LOCKSTEP_REDIS_TLS_KEY")]
    pub redis_tls_key: Option<PathBuf>,
    /// Accept any Redis server certificate (no chain, no host name check). For tests only;
    /// logged as a warning at start.
    #[arg(long, env = "LOCKSTEP_REDIS_TLS_INSECURE")]
    pub redis_tls_insecure: Option<bool>,
    /// With a database: delete audit records older than this (`lockstep.prune_audit`, run by
    /// every node every 10 minutes); unset or `0s`: keep them forever.
    #[arg(long, env = "LOCKSTEP_AUDIT_RETENTION")]
    pub audit_retention: Option<HumanDuration>,
    /// How long a lock's fencing counter (Redis fence key, `lockstep.fences` row) is kept
    /// after its last grant. Tokens are seeded from the clock in µs, so a counter idle longer
    /// restarts above its old value anyway (see docs/fencing.md, "Retention"). Must exceed
    /// `lock_max_ttl`.
    #[arg(long, env = "LOCKSTEP_FENCE_RETENTION")]
    pub fence_retention: Option<HumanDuration>,
    // --- Replicated grants (issue 12, item 1) ---
    /// Redis replicas that must acknowledge a grant (`WAIT`) before anyone learns its token:
    /// `auto` (1 for `redis-sentinel://` and `redis-cluster://` URLs, 0 for a standalone
    /// `redis://`/`rediss://`) or a number. Ignored without Redis. See docs/fencing.md.
    #[arg(long, env = "LOCKSTEP_LOCK_REPLICAS")]
    pub lock_replicas: Option<LockReplicas>,
    /// How long a grant waits for those acknowledgements before it is withdrawn (`unavailable`).
    #[arg(long, env = "LOCKSTEP_LOCK_REPLICA_TIMEOUT")]
    pub lock_replica_timeout: Option<HumanDuration>,
    // --- end replicated grants ---
    /// Directory for the JSON-lines audit log.
    #[arg(long, env = "LOCKSTEP_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// This node's id; unset: hostname plus a random suffix.
    #[arg(long, env = "LOCKSTEP_NODE_ID")]
    pub node_id: Option<String>,
    /// HS256 shared secret for user JWTs.
    #[arg(long, env = "LOCKSTEP_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// PEM file with an RS256 or ES256 public key for user JWTs.
    #[arg(long, env = "LOCKSTEP_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<PathBuf>,
    /// JWKS file with RS256/ES256 keys, chosen by the token's `kid`.
    #[arg(long, env = "LOCKSTEP_JWT_JWKS")]
    pub jwt_jwks: Option<PathBuf>,
    /// Required `iss` claim.
    #[arg(long, env = "LOCKSTEP_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Required `aud` claim.
    #[arg(long, env = "LOCKSTEP_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Bearer token for admin and service calls (admin endpoints, any room as owner).
    #[arg(long, env = "LOCKSTEP_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// How often the server pings each session.
    #[arg(long, env = "LOCKSTEP_HEARTBEAT_INTERVAL")]
    pub heartbeat_interval: Option<HumanDuration>,
    /// Silent intervals after which a session is dead.
    #[arg(long, env = "LOCKSTEP_HEARTBEAT_MISSES")]
    pub heartbeat_misses: Option<u32>,
    /// Hold limit of a lock when the request gives no `ttl_ms`.
    #[arg(long, env = "LOCKSTEP_LOCK_DEFAULT_TTL")]
    pub lock_default_ttl: Option<HumanDuration>,
    /// Largest hold limit a request may ask for (larger ones are clamped).
    #[arg(long, env = "LOCKSTEP_LOCK_MAX_TTL")]
    pub lock_max_ttl: Option<HumanDuration>,
    /// Lease of a WebSocket-held lock, renewed by its node while the session lives.
    #[arg(long, env = "LOCKSTEP_LOCK_LEASE")]
    pub lock_lease: Option<HumanDuration>,
    /// With Redis: how long a member stays present without its node refreshing it (a crashed
    /// node's members leave after this).
    #[arg(long, env = "LOCKSTEP_PRESENCE_TTL")]
    pub presence_ttl: Option<HumanDuration>,
    /// How long a disconnected session keeps its presence and locks for a resume.
    #[arg(long, env = "LOCKSTEP_RESUME_GRACE")]
    pub resume_grace: Option<HumanDuration>,
    /// How long a draining node waits for its sessions to close before exiting.
    #[arg(long, env = "LOCKSTEP_DRAIN_TIMEOUT")]
    pub drain_timeout: Option<HumanDuration>,
    /// Largest accepted frame (bytes); larger ones close the connection with 1009.
    #[arg(long, env = "LOCKSTEP_MAX_FRAME_BYTES")]
    pub max_frame_bytes: Option<usize>,
    /// Rooms one session may have joined at once.
    #[arg(long, env = "LOCKSTEP_MAX_ROOMS_PER_SESSION")]
    pub max_rooms_per_session: Option<usize>,
    /// Locks one session may hold plus waits it may have queued, together.
    #[arg(long, env = "LOCKSTEP_MAX_LOCKS_PER_SESSION")]
    pub max_locks_per_session: Option<usize>,
    /// Sustained messages per second per session (token bucket refill rate).
    #[arg(long, env = "LOCKSTEP_MESSAGES_PER_SECOND")]
    pub messages_per_second: Option<u32>,
    /// Burst size of the per-session message budget.
    #[arg(long, env = "LOCKSTEP_MESSAGE_BURST")]
    pub message_burst: Option<u32>,
    /// Concurrent sessions one user may have on a node.
    #[arg(long, env = "LOCKSTEP_MAX_SESSIONS_PER_USER")]
    pub max_sessions_per_user: Option<usize>,
    /// Outbound bytes queued for one session before it is disconnected as a slow consumer.
    #[arg(long, env = "LOCKSTEP_MAX_QUEUE_BYTES")]
    pub max_queue_bytes: Option<usize>,
    /// Largest presence `state` (and cursor `selection`), measured as encoded JSON (bytes).
    #[arg(long, env = "LOCKSTEP_MAX_PRESENCE_STATE_BYTES")]
    pub max_presence_state_bytes: Option<usize>,
    /// Largest `broadcast` `data`, measured as encoded JSON (bytes).
    #[arg(long, env = "LOCKSTEP_MAX_BROADCAST_BYTES")]
    pub max_broadcast_bytes: Option<usize>,
    /// Members one room may have (across all nodes); further joins get `room_full`.
    #[arg(long, env = "LOCKSTEP_MAX_MEMBERS_PER_ROOM")]
    pub max_members_per_room: Option<usize>,
    /// Largest Yjs update (one y-websocket message) a client may send (bytes; close 1009).
    #[arg(long, env = "LOCKSTEP_YJS_MAX_UPDATE_BYTES")]
    pub yjs_max_update_bytes: Option<usize>,
    /// Largest Yjs document, as the bytes of the updates it holds (close 4015).
    #[arg(long, env = "LOCKSTEP_YJS_MAX_DOC_BYTES")]
    pub yjs_max_doc_bytes: Option<usize>,
    /// Yjs documents loaded on one node at once (close 1013 beyond).
    #[arg(long, env = "LOCKSTEP_YJS_MAX_DOCS")]
    pub yjs_max_docs: Option<usize>,
    /// Connections to one Yjs document on one node (close 4014 beyond).
    #[arg(long, env = "LOCKSTEP_YJS_MAX_CLIENTS_PER_DOC")]
    pub yjs_max_clients_per_doc: Option<usize>,
    /// How long a Yjs document with no local connection stays loaded.
    #[arg(long, env = "LOCKSTEP_YJS_UNLOAD_GRACE")]
    pub yjs_unload_grace: Option<HumanDuration>,
    /// Compact a loaded Yjs document once its update log holds this many entries.
    #[arg(long, env = "LOCKSTEP_YJS_COMPACT_ENTRIES")]
    pub yjs_compact_entries: Option<u64>,
    /// Compact a loaded Yjs document with any log entries this long after its last round.
    #[arg(long, env = "LOCKSTEP_YJS_COMPACT_MAX_AGE")]
    pub yjs_compact_max_age: Option<HumanDuration>,
    /// How long an HTTP client may take to send a request's headers, and then its body (each);
    /// also closes idle keep-alive connections after this long.
    #[arg(long, env = "LOCKSTEP_HTTP_READ_TIMEOUT")]
    pub http_read_timeout: Option<HumanDuration>,
    /// Sustained HTTP API requests per second per client IP (token bucket refill rate).
    #[arg(long, env = "LOCKSTEP_HTTP_REQUESTS_PER_SECOND_PER_IP")]
    pub http_requests_per_second_per_ip: Option<u32>,
    /// Sustained HTTP API requests per second per authenticated user.
    #[arg(long, env = "LOCKSTEP_HTTP_REQUESTS_PER_SECOND_PER_USER")]
    pub http_requests_per_second_per_user: Option<u32>,
    /// Burst size of the per-IP and per-user HTTP budgets.
    #[arg(long, env = "LOCKSTEP_HTTP_BURST")]
    pub http_burst: Option<u32>,
    /// Trust the left-most `X-Forwarded-For` address as the client IP (only behind a proxy
    /// that sets it; otherwise clients could pick their own rate-limit bucket).
    #[arg(long, env = "LOCKSTEP_TRUST_FORWARDED_FOR")]
    pub trust_forwarded_for: Option<bool>,
    /// HTTP lock acquisitions one user may make per minute.
    #[arg(long, env = "LOCKSTEP_MAX_HTTP_LOCKS_PER_USER")]
    pub max_http_locks_per_user: Option<u32>,
    /// `text` (default) or `json` log lines.
    #[arg(long, env = "LOCKSTEP_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// The settings in force, with defaults applied and validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub metrics_listen: Option<SocketAddr>,
    pub redis_url: Option<String>,
    pub database_url: Option<String>,
    pub redis_tls: RedisTls,
    pub audit_retention: Option<Duration>,
    pub fence_retention: Duration,
    // --- Replicated grants (issue 12, item 1); resolve with `Config::lock_replicas_required` ---
    pub lock_replicas: LockReplicas,
    pub lock_replica_timeout: Duration,
    // --- end replicated grants ---
    pub data_dir: PathBuf,
    pub node_id: String,
    pub jwt_secret: Option<String>,
    pub jwt_public_key: Option<PathBuf>,
    pub jwt_jwks: Option<PathBuf>,
    pub jwt_issuer: Option<String>,
    pub jwt_audience: Option<String>,
    pub admin_token: Option<String>,
    pub heartbeat_interval: Duration,
    pub heartbeat_misses: u32,
    pub lock_default_ttl: Duration,
    pub lock_max_ttl: Duration,
    pub lock_lease: Duration,
    pub presence_ttl: Duration,
    pub resume_grace: Duration,
    pub drain_timeout: Duration,
    pub max_frame_bytes: usize,
    pub max_rooms_per_session: usize,
    pub max_locks_per_session: usize,
    pub messages_per_second: u32,
    pub message_burst: u32,
    pub max_sessions_per_user: usize,
    pub max_queue_bytes: usize,
    pub max_presence_state_bytes: usize,
    pub max_broadcast_bytes: usize,
    pub max_members_per_room: usize,
    pub yjs_max_update_bytes: usize,
    pub yjs_max_doc_bytes: usize,
    pub yjs_max_docs: usize,
    pub yjs_max_clients_per_doc: usize,
    pub yjs_unload_grace: Duration,
    pub yjs_compact_entries: u64,
    pub yjs_compact_max_age: Duration,
    pub http_read_timeout: Duration,
    pub http_requests_per_second_per_ip: u32,
    pub http_requests_per_second_per_user: u32,
    pub http_burst: u32,
    pub trust_forwarded_for: bool,
    pub max_http_locks_per_user: u32,
    pub log_format: LogFormat,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("bad config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("invalid setting {name}: {reason}")]
    Invalid { name: &'static str, reason: String },
}

impl Settings {
    /// Fills every setting missing here from `other` (a lower-precedence source).
    fn or(self, other: Settings) -> Settings {
        Settings {
            listen: self.listen.or(other.listen),
            metrics_listen: self.metrics_listen.or(other.metrics_listen),
            redis_url: self.redis_url.or(other.redis_url),
            database_url: self.database_url.or(other.database_url),
            redis_tls_ca: self.redis_tls_ca.or(other.redis_tls_ca),
            redis_tls_cert: self.redis_tls_cert.or(other.redis_tls_cert),
            redis_tls_key: self.redis_tls_key.or(other.redis_tls_key),
            redis_tls_insecure: self.redis_tls_insecure.or(other.redis_tls_insecure),
            audit_retention: self.audit_retention.or(other.audit_retention),
            fence_retention: self.fence_retention.or(other.fence_retention),
            // --- Replicated grants ---
            lock_replicas: self.lock_replicas.or(other.lock_replicas),
            lock_replica_timeout: self.lock_replica_timeout.or(other.lock_replica_timeout),
            // --- end replicated grants ---
            data_dir: self.data_dir.or(other.data_dir),
            node_id: self.node_id.or(other.node_id),
            jwt_secret: self.jwt_secret.or(other.jwt_secret),
            jwt_public_key: self.jwt_public_key.or(other.jwt_public_key),
            jwt_jwks: self.jwt_jwks.or(other.jwt_jwks),
            jwt_issuer: self.jwt_issuer.or(other.jwt_issuer),
            jwt_audience: self.jwt_audience.or(other.jwt_audience),
            admin_token: self.admin_token.or(other.admin_token),
            heartbeat_interval: self.heartbeat_interval.or(other.heartbeat_interval),
            heartbeat_misses: self.heartbeat_misses.or(other.heartbeat_misses),
            lock_default_ttl: self.lock_default_ttl.or(other.lock_default_ttl),
            lock_max_ttl: self.lock_max_ttl.or(other.lock_max_ttl),
            lock_lease: self.lock_lease.or(other.lock_lease),
            presence_ttl: self.presence_ttl.or(other.presence_ttl),
            resume_grace: self.resume_grace.or(other.resume_grace),
            drain_timeout: self.drain_timeout.or(other.drain_timeout),
            max_frame_bytes: self.max_frame_bytes.or(other.max_frame_bytes),
            max_rooms_per_session: self.max_rooms_per_session.or(other.max_rooms_per_session),
            max_locks_per_session: self.max_locks_per_session.or(other.max_locks_per_session),
            messages_per_second: self.messages_per_second.or(other.messages_per_second),
            message_burst: self.message_burst.or(other.message_burst),
            max_sessions_per_user: self.max_sessions_per_user.or(other.max_sessions_per_user),
            max_queue_bytes: self.max_queue_bytes.or(other.max_queue_bytes),
            max_presence_state_bytes: self
                .max_presence_state_bytes
                .or(other.max_presence_state_bytes),
            max_broadcast_bytes: self.max_broadcast_bytes.or(other.max_broadcast_bytes),
            max_members_per_room: self.max_members_per_room.or(other.max_members_per_room),
            yjs_max_update_bytes: self.yjs_max_update_bytes.or(other.yjs_max_update_bytes),
            yjs_max_doc_bytes: self.yjs_max_doc_bytes.or(other.yjs_max_doc_bytes),
            yjs_max_docs: self.yjs_max_docs.or(other.yjs_max_docs),
            yjs_max_clients_per_doc: self
                .yjs_max_clients_per_doc
                .or(other.yjs_max_clients_per_doc),
            yjs_unload_grace: self.yjs_unload_grace.or(other.yjs_unload_grace),
            yjs_compact_entries: self.yjs_compact_entries.or(other.yjs_compact_entries),
            yjs_compact_max_age: self.yjs_compact_max_age.or(other.yjs_compact_max_age),
            http_read_timeout: self.http_read_timeout.or(other.http_read_timeout),
            http_requests_per_second_per_ip: self
                .http_requests_per_second_per_ip
                .or(other.http_requests_per_second_per_ip),
            http_requests_per_second_per_user: self
                .http_requests_per_second_per_user
                .or(other.http_requests_per_second_per_user),
            http_burst: self.http_burst.or(other.http_burst),
            trust_forwarded_for: self.trust_forwarded_for.or(other.trust_forwarded_for),
            max_http_locks_per_user: self
                .max_http_locks_per_user
                .or(other.max_http_locks_per_user),
            log_format: self.log_format.or(other.log_format),
        }
    }
}

impl Config {
    /// The document layer's limits (`LOCKSTEP_YJS_*`).
    pub fn yjs_limits(&self) -> crate::yjs::docs::Limits {
        crate::yjs::docs::Limits {
            max_update_bytes: self.yjs_max_update_bytes,
            max_doc_bytes: self.yjs_max_doc_bytes,
            max_docs: self.yjs_max_docs,
            max_clients: self.yjs_max_clients_per_doc,
            unload_grace: self.yjs_unload_grace,
            ..Default::default()
        }
    }

    /// The compactor's thresholds (`LOCKSTEP_YJS_COMPACT_*`) over its defaults for this node.
    pub fn yjs_compactor(&self) -> crate::yjs::compact::CompactorConfig {
        crate::yjs::compact::CompactorConfig {
            max_entries: self.yjs_compact_entries,
            max_age: self.yjs_compact_max_age,
            ..crate::yjs::compact::CompactorConfig::for_node(&self.node_id)
        }
    }

    /// Resolves flags and environment (already merged by clap) over the optional config file.
    pub fn load(
        cli_settings: Settings,
        file: Option<&std::path::Path>,
    ) -> Result<Config, ConfigError> {
        let from_file = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                toml::from_str(&text).map_err(|source| ConfigError::Parse {
                    path: path.to_owned(),
                    source,
                })?
            }
            None => Settings::default(),
        };
        Config::from_settings(cli_settings.or(from_file))
    }

    pub fn from_settings(s: Settings) -> Result<Config, ConfigError> {
        let d = |v: Option<HumanDuration>, default: Duration| v.map(|h| h.0).unwrap_or(default);
        let frame_bytes = s.max_frame_bytes.unwrap_or(64 * 1024);
        let config = Config {
            listen: s
                .listen
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 8080))),
            metrics_listen: s.metrics_listen,
            redis_url: s.redis_url.filter(|u| !u.is_empty()),
            database_url: s.database_url.filter(|u| !u.is_empty()),
            // An empty path (an env var set to "") means unset, as for the URLs.
            redis_tls: RedisTls {
                ca: s.redis_tls_ca.filter(|p| !p.as_os_str().is_empty()),
                cert: s.redis_tls_cert.filter(|p| !p.as_os_str().is_empty()),
                key: s.redis_tls_key.filter(|p| !p.as_os_str().is_empty()),
                insecure: s.redis_tls_insecure.unwrap_or(false),
            },
            audit_retention: s.audit_retention.map(|h| h.0).filter(|d| !d.is_zero()),
            fence_retention: d(s.fence_retention, Duration::from_secs(7 * 24 * 3600)),
            // --- Replicated grants ---
            lock_replicas: s.lock_replicas.unwrap_or(LockReplicas::Auto),
            lock_replica_timeout: d(s.lock_replica_timeout, DEFAULT_LOCK_REPLICA_TIMEOUT),
            // --- end replicated grants ---
            data_dir: s.data_dir.unwrap_or_else(|| PathBuf::from("data")),
            node_id: s.node_id.unwrap_or_else(default_node_id),
            jwt_secret: s.jwt_secret.filter(|v| !v.is_empty()),
            jwt_public_key: s.jwt_public_key,
            jwt_jwks: s.jwt_jwks,
            jwt_issuer: s.jwt_issuer,
            jwt_audience: s.jwt_audience,
            admin_token: s.admin_token.filter(|v| !v.is_empty()),
            heartbeat_interval: d(s.heartbeat_interval, Duration::from_secs(30)),
            heartbeat_misses: s.heartbeat_misses.unwrap_or(3),
            lock_default_ttl: d(s.lock_default_ttl, Duration::from_secs(60)),
            lock_max_ttl: d(s.lock_max_ttl, Duration::from_secs(30 * 60)),
            lock_lease: d(s.lock_lease, Duration::from_secs(10)),
            presence_ttl: d(s.presence_ttl, Duration::from_secs(15)),
            resume_grace: d(s.resume_grace, Duration::from_secs(15)),
            drain_timeout: d(s.drain_timeout, Duration::from_secs(10)),
            max_frame_bytes: frame_bytes,
            max_rooms_per_session: s.max_rooms_per_session.unwrap_or(32),
            max_locks_per_session: s.max_locks_per_session.unwrap_or(64),
            messages_per_second: s.messages_per_second.unwrap_or(100),
            message_burst: s.message_burst.unwrap_or(200),
            max_sessions_per_user: s.max_sessions_per_user.unwrap_or(16),
            max_queue_bytes: s.max_queue_bytes.unwrap_or(1024 * 1024),
            // Unset, they follow a small frame limit down (so lowering only the frame limit
            // stays a valid configuration); set, they are validated against it.
            max_presence_state_bytes: s
                .max_presence_state_bytes
                .unwrap_or((4 * 1024).min(frame_bytes / 4)),
            max_broadcast_bytes: s
                .max_broadcast_bytes
                .unwrap_or((16 * 1024).min(frame_bytes / 2)),
            max_members_per_room: s.max_members_per_room.unwrap_or(500),
            yjs_max_update_bytes: s.yjs_max_update_bytes.unwrap_or(1024 * 1024),
            yjs_max_doc_bytes: s.yjs_max_doc_bytes.unwrap_or(32 * 1024 * 1024),
            yjs_max_docs: s.yjs_max_docs.unwrap_or(2000),
            yjs_max_clients_per_doc: s.yjs_max_clients_per_doc.unwrap_or(200),
            yjs_unload_grace: d(s.yjs_unload_grace, Duration::from_secs(30)),
            yjs_compact_entries: s.yjs_compact_entries.unwrap_or(500),
            yjs_compact_max_age: d(s.yjs_compact_max_age, Duration::from_secs(30)),
            http_read_timeout: d(s.http_read_timeout, Duration::from_secs(10)),
            http_requests_per_second_per_ip: s.http_requests_per_second_per_ip.unwrap_or(100),
            http_requests_per_second_per_user: s.http_requests_per_second_per_user.unwrap_or(20),
            http_burst: s.http_burst.unwrap_or(200),
            trust_forwarded_for: s.trust_forwarded_for.unwrap_or(false),
            max_http_locks_per_user: s.max_http_locks_per_user.unwrap_or(60),
            log_format: s.log_format.unwrap_or(LogFormat::Text),
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |name, reason: &str| {
            Err(ConfigError::Invalid {
                name,
                reason: reason.to_owned(),
            })
        };
        self.redis_tls.validate(self.redis_url.as_deref())?;
        if self.heartbeat_interval < Duration::from_millis(10) {
            return invalid("heartbeat_interval", "must be at least 10ms");
        }
        if self.heartbeat_misses == 0 {
            return invalid("heartbeat_misses", "must be at least 1");
        }
        if self.lock_max_ttl.is_zero() || self.lock_default_ttl.is_zero() {
            return invalid("lock_max_ttl", "lock TTLs must be positive");
        }
        if self.lock_default_ttl > self.lock_max_ttl {
            return invalid("lock_default_ttl", "must not exceed lock_max_ttl");
        }
        // A live lock's counter must outlive it: a lock lives at most `lock_max_ttl` from its
        // last grant or extend.
        if self.fence_retention <= self.lock_max_ttl
            || self.fence_retention < Duration::from_secs(1)
        {
            return invalid(
                "fence_retention",
                "must exceed lock_max_ttl (and be at least 1s)",
            );
        }
        // --- Replicated grants ---
        // WAIT takes whole milliseconds and blocks a pooled connection that long; past the
        // command timeout fred would give up on it first.
        if self.lock_replica_timeout < Duration::from_millis(10)
            || self.lock_replica_timeout > Duration::from_secs(4)
        {
            return invalid("lock_replica_timeout", "must be between 10ms and 4s");
        }
        if let LockReplicas::Count(n) = self.lock_replicas
            && n > MAX_LOCK_REPLICAS
        {
            return invalid("lock_replicas", "must be auto or a number up to 16");
        }
        // --- end replicated grants ---
        if self.presence_ttl < Duration::from_millis(300) {
            return invalid("presence_ttl", "must be at least 300ms");
        }
        if self.lock_lease < Duration::from_millis(100) {
            return invalid("lock_lease", "must be at least 100ms");
        }
        if self.max_frame_bytes < 256 {
            return invalid("max_frame_bytes", "must be at least 256");
        }
        if self.messages_per_second == 0 || self.message_burst == 0 {
            return invalid("messages_per_second", "rate and burst must be positive");
        }
        if self
            .audit_retention
            .is_some_and(|r| r < Duration::from_secs(60))
        {
            return invalid(
                "audit_retention",
                "must be at least 1m (or 0s to keep forever)",
            );
        }
        let l = self.listen;
        if self.metrics_listen.is_some_and(|m| {
            m.port() != 0
                && m.port() == l.port()
                && (m.ip() == l.ip() || m.ip().is_unspecified() || l.ip().is_unspecified())
        }) {
            return invalid(
                "metrics_listen",
                "must use another port than listen (it is a separate listener)",
            );
        }
        if self.max_queue_bytes < self.max_frame_bytes {
            return invalid("max_queue_bytes", "must be at least max_frame_bytes");
        }
        // A member (state plus identity) must fit one snapshot page (max_frame_bytes / 2)
        // even re-encoded as MessagePack, which can be about twice its JSON size (floats).
        if self.max_presence_state_bytes == 0
            || self.max_presence_state_bytes > self.max_frame_bytes / 4
        {
            return invalid(
                "max_presence_state_bytes",
                "must be positive and at most max_frame_bytes / 4",
            );
        }
        if self.max_broadcast_bytes == 0 || self.max_broadcast_bytes > self.max_frame_bytes / 2 {
            return invalid(
                "max_broadcast_bytes",
                "must be positive and at most max_frame_bytes / 2",
            );
        }
        if self.max_members_per_room == 0 {
            return invalid("max_members_per_room", "must be at least 1");
        }
        for (name, v) in [
            ("yjs_max_update_bytes", self.yjs_max_update_bytes),
            ("yjs_max_doc_bytes", self.yjs_max_doc_bytes),
            ("yjs_max_docs", self.yjs_max_docs),
            ("yjs_max_clients_per_doc", self.yjs_max_clients_per_doc),
        ] {
            if v == 0 {
                return invalid(name, "must be at least 1");
            }
        }
        if self.yjs_compact_entries == 0 {
            return invalid("yjs_compact_entries", "must be at least 1");
        }
        if self.yjs_compact_max_age < Duration::from_millis(100) {
            return invalid("yjs_compact_max_age", "must be at least 100ms");
        }
        if self.http_read_timeout < Duration::from_millis(100) {
            return invalid("http_read_timeout", "must be at least 100ms");
        }
        if self.http_requests_per_second_per_ip == 0
            || self.http_requests_per_second_per_user == 0
            || self.http_burst == 0
        {
            return invalid("http_burst", "HTTP rates and burst must be positive");
        }
        if self.max_http_locks_per_user == 0 {
            return invalid("max_http_locks_per_user", "must be at least 1");
        }
        if [
            self.jwt_secret.is_some(),
            self.jwt_public_key.is_some(),
            self.jwt_jwks.is_some(),
        ]
        .iter()
        .filter(|set| **set)
        .count()
            > 1
        {
            return invalid(
                "jwt_secret",
                "set only one of jwt_secret, jwt_public_key, jwt_jwks",
            );
        }
        Ok(())
    }

    // --- Replicated grants ---
    /// Replicas that must acknowledge each grant: `lock_replicas` with `auto` resolved from the
    /// Redis URL's scheme (Sentinel and Cluster deployments have replicas by construction; a
    /// plain URL may be a lone server, where WAIT could never be satisfied). 0 without Redis.
    pub fn lock_replicas_required(&self) -> u32 {
        let Some(url) = self.redis_url.as_deref() else {
            return 0;
        };
        match self.lock_replicas {
            LockReplicas::Count(n) => n,
            LockReplicas::Auto => {
                let scheme = url.split_once("://").map(|(s, _)| s).unwrap_or("");
                u32::from(
                    // redis-, rediss- (TLS), valkey-, valkeys-: the deployment is the suffix.
                    scheme.ends_with("-sentinel") || scheme.ends_with("-cluster"),
                )
            }
        }
    }
    // --- end replicated grants ---

    /// Dev mode: no JWT key configured. Tokens are minted by `POST /v1/dev/token`.
    pub fn dev_mode(&self) -> bool {
        self.jwt_secret.is_none() && self.jwt_public_key.is_none() && self.jwt_jwks.is_none()
    }

    /// A configuration for tests: loopback on a free port, fast timers, temp data dir.
    pub fn for_tests(data_dir: PathBuf) -> Config {
        let mut c = Config::from_settings(Settings::default()).expect("defaults are valid"); // ok: constant input
        c.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        c.data_dir = data_dir;
        c.node_id = "test-node".into();
        // Tests open many connections and mint many tokens from one address in a burst; the
        // tests of the HTTP throttles set their own limits.
        c.http_requests_per_second_per_ip = 100_000;
        c.http_requests_per_second_per_user = 100_000;
        c.http_burst = 100_000;
        c.max_http_locks_per_user = 100_000;
        c
    }
}

fn default_node_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".to_owned());
    let suffix: u32 = rand::random();
    format!("{host}-{:06x}", suffix & 0xff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_contract() {
        let c = Config::from_settings(Settings::default()).unwrap();
        assert_eq!(c.listen.port(), 8080);
        assert_eq!(c.heartbeat_interval, Duration::from_secs(30));
        assert_eq!(c.heartbeat_misses, 3);
        assert_eq!(c.lock_max_ttl, Duration::from_secs(1800));
        assert_eq!(c.fence_retention, Duration::from_secs(7 * 24 * 3600));
        let short = Settings {
            fence_retention: Some(HumanDuration(Duration::from_secs(60))),
            ..Settings::default()
        };
        assert!(
            Config::from_settings(short).is_err(),
            "a fence retention within lock_max_ttl is refused"
        );
        assert_eq!(c.resume_grace, Duration::from_secs(15));
        assert!(c.dev_mode());
    }

    #[test]
    fn yjs_compactor_thresholds_are_settings() {
        let c = Config::from_settings(Settings::default()).unwrap();
        let compactor = c.yjs_compactor();
        assert_eq!(compactor.max_entries, 500);
        assert_eq!(compactor.max_age, Duration::from_secs(30));
        assert_eq!(compactor.holder_key, format!("yjs-compactor:{}", c.node_id));
        let file: Settings =
            toml::from_str("yjs_compact_entries = 50\nyjs_compact_max_age = \"2s\"\n").unwrap();
        let c = Config::from_settings(file).unwrap().yjs_compactor();
        assert_eq!((c.max_entries, c.max_age), (50, Duration::from_secs(2)));
        for bad in ["yjs_compact_entries = 0", "yjs_compact_max_age = \"10ms\""] {
            let s: Settings = toml::from_str(bad).unwrap();
            assert!(Config::from_settings(s).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn flags_win_over_file() {
        let file: Settings =
            toml::from_str("heartbeat_interval = \"5s\"\nheartbeat_misses = 7\n").unwrap();
        let flags = Settings {
            heartbeat_misses: Some(2),
            ..Settings::default()
        };
        let c = Config::from_settings(flags.or(file)).unwrap();
        assert_eq!(c.heartbeat_interval, Duration::from_secs(5));
        assert_eq!(c.heartbeat_misses, 2);
    }

    #[test]
    fn rejects_inconsistent_values() {
        let s = Settings {
            lock_default_ttl: Some("2h".parse().unwrap()),
            ..Settings::default()
        };
        assert!(matches!(
            Config::from_settings(s),
            Err(ConfigError::Invalid { .. })
        ));
        let short = Settings {
            audit_retention: Some("30s".parse().unwrap()),
            ..Settings::default()
        };
        assert!(Config::from_settings(short).is_err());
        let forever = Settings {
            audit_retention: Some("0s".parse().unwrap()),
            ..Settings::default()
        };
        assert_eq!(
            Config::from_settings(forever).unwrap().audit_retention,
            None
        );
        let same_port = Settings {
            listen: Some("0.0.0.0:8080".parse().unwrap()),
            metrics_listen: Some("127.0.0.1:8080".parse().unwrap()),
            ..Settings::default()
        };
        assert!(Config::from_settings(same_port).is_err());
        let from_file: Settings = toml::from_str("metrics_listen = \"0.0.0.0:9090\"").unwrap();
        assert_eq!(
            Config::from_settings(from_file).unwrap().metrics_listen,
            Some("0.0.0.0:9090".parse().unwrap())
        );
        let small_frames = Settings {
            max_frame_bytes: Some(4096),
            ..Settings::default()
        };
        let c = Config::from_settings(small_frames).unwrap();
        assert_eq!(
            (c.max_presence_state_bytes, c.max_broadcast_bytes),
            (1024, 2048)
        );
        let too_big_state = Settings {
            max_frame_bytes: Some(4096),
            max_presence_state_bytes: Some(2048),
            ..Settings::default()
        };
        assert!(Config::from_settings(too_big_state).is_err());
        let cert_without_key = Settings {
            redis_url: Some("rediss://cache:6380".into()),
            redis_tls_cert: Some("client.pem".into()),
            ..Settings::default()
        };
        assert!(Config::from_settings(cert_without_key).is_err());
        let tls_on_plain_url = Settings {
            redis_url: Some("redis://cache:6379".into()),
            redis_tls_ca: Some("ca.pem".into()),
            ..Settings::default()
        };
        assert!(Config::from_settings(tls_on_plain_url).is_err());
        let mutual: Settings = toml::from_str(
            "redis_url = \"rediss://cache:6380\"\nredis_tls_cert = \"c.pem\"\nredis_tls_key = \"k.pem\"",
        )
        .unwrap();
        assert!(Config::from_settings(mutual).is_ok());
        let unknown: Result<Settings, _> = toml::from_str("nonsense = 1");
        assert!(unknown.is_err());
    }

    // --- Replicated grants ---
    #[test]
    fn lock_replicas_auto_follows_the_redis_url() {
        let with = |url: Option<&str>, replicas: Option<&str>| {
            let s = Settings {
                redis_url: url.map(str::to_owned),
                lock_replicas: replicas.map(|r| r.parse().unwrap()),
                ..Settings::default()
            };
            Config::from_settings(s).unwrap().lock_replicas_required()
        };
        assert_eq!(with(None, None), 0);
        assert_eq!(with(None, Some("2")), 0, "embedded engines ignore it");
        assert_eq!(with(Some("redis://h:6379"), None), 0);
        assert_eq!(with(Some("rediss://h:6379"), Some("auto")), 0);
        assert_eq!(
            with(
                Some("redis-sentinel://h:26379/0?sentinelServiceName=m"),
                None
            ),
            1
        );
        assert_eq!(with(Some("redis-cluster://h:7000?node=h:7001"), None), 1);
        // Over TLS too: a TLS Sentinel or Cluster has its replicas all the same.
        assert_eq!(with(Some("rediss-cluster://h:7000"), None), 1);
        assert_eq!(
            with(
                Some("rediss-sentinel://h:26379/0?sentinelServiceName=m"),
                None
            ),
            1
        );
        assert_eq!(with(Some("redis-cluster://h:7000"), Some("0")), 0);
        assert_eq!(with(Some("redis://h:6379"), Some("2")), 2);
        let c = Config::from_settings(Settings::default()).unwrap();
        assert_eq!(c.lock_replica_timeout, Duration::from_millis(500));
        assert!("many".parse::<LockReplicas>().is_err());
        let file: Settings =
            toml::from_str("lock_replicas = 2\nlock_replica_timeout = \"1s\"").unwrap();
        assert_eq!(file.lock_replicas, Some(LockReplicas::Count(2)));
        let file: Settings = toml::from_str("lock_replicas = \"auto\"").unwrap();
        assert_eq!(file.lock_replicas, Some(LockReplicas::Auto));
        for bad in [
            Settings {
                lock_replica_timeout: Some(HumanDuration(Duration::from_secs(10))),
                ..Settings::default()
            },
            Settings {
                lock_replicas: Some(LockReplicas::Count(17)),
                ..Settings::default()
            },
        ] {
            assert!(Config::from_settings(bad).is_err());
        }
    }
    // --- end replicated grants ---
}
