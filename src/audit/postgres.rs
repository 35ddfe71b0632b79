//! Audit records in Postgres: idempotent batch inserts, dead letters, and the queries of
//! `GET /v1/audit`.
//!
//! # Writing
//!
//! Records reach `lockstep.audit_events` only through an outbox drainer (the Redis stream
//! writer of [`super::outbox`], or the JSON-lines tailer of [`super::drain`]). Both hand a batch
//! to [`write_batch`]: one transaction, one multi-row `INSERT … ON CONFLICT (id) DO NOTHING`
//! per [`INSERT_CHUNK`] records, plus the batch's dead letters, then `COMMIT`. A record's id is
//! fixed before it reaches Postgres (derived from its stream entry, or written in the file), so
//! sending a batch again after a crash between the commit and the outbox acknowledgement
//! inserts nothing twice.
//!
//! [`WriteError`] tells the two ways a batch can fail apart:
//!
//! - **Outage** (no connection, connection lost, timeout, server shutting down, anything that is
//!   not about the rows): nothing was written; the caller keeps the whole batch and retries it
//!   with backoff, acknowledging nothing.
//! - **Data** (SQLSTATE classes 22 data exception, 23 integrity, 54 program limit: the rows
//!   themselves): the caller isolates the culprits with [`write_isolating`] (one savepoint per
//!   row, the good rows committed) and retries or dead-letters the refused ones.
//!
//! Every database call is bounded by [`DB_TIMEOUT`]; a timed-out commit is an outage, and the
//! batch sent again is deduplicated by the primary key. Commits are synchronous even on a server
//! configured with `synchronous_commit = off` (the pool of [`crate::db::pool`] sets it on every
//! connection): the outbox acknowledges entries because the commit returned, and an
//! asynchronous commit can vanish in a Postgres crash — which the outage test reproduces when
//! the setting is off.
//!
//! # Reading
//!
//! [`PgAuditQuery`] answers an [`AuditQuery`] with one indexed statement: the filters that are
//! set, newest first by `(at, id)`, keyset pagination with `before` (rows strictly older by
//! `(at, id)` than the record with that id; for a record already pruned, its id's embedded
//! millisecond stands in for its `at`). [`PgBackedSink`] combines an outbox sink (where
//! `append` goes) with these queries.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use deadpool_postgres::Pool;
use tokio::sync::Notify;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::jsonl::RecordFilter;
use super::{AuditError, AuditKind, AuditPage, AuditQuery, AuditRecord, AuditSink};

/// Records per `INSERT` statement (11 parameters each, far below Postgres' 65535).
pub const INSERT_CHUNK: usize = 1000;
/// Upper bound of every database call made here.
pub const DB_TIMEOUT: Duration = Duration::from_secs(15);
/// The latest `at` accepted: 9999-12-31T23:59:59.999Z.
pub const MAX_AT_MS: u64 = 253_402_300_799_999;

const COLUMNS: &str =
    "id, at, kind, room, resource, user_id, session_id, node_id, token, detail, actor";

/// Why a batch was not written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Postgres is unreachable or failed for reasons unrelated to the rows: retry the batch.
    #[error("postgres unavailable: {0}")]
    Outage(String),
    /// Postgres refused some row: isolate it with [`write_isolating`].
    #[error("postgres refused a row: {0}")]
    Data(String),
}

/// An outbox entry that cannot be written, kept in `lockstep.audit_dead_letters`.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// Where it came from: a stream key, or `file:<path>` for the JSON-lines outbox.
    pub stream: String,
    /// Its position there: a stream entry id, or a byte offset.
    pub entry_id: String,
    /// The entry as found (NUL characters replaced, as `text` cannot hold them).
    pub payload: String,
    pub error: String,
    /// Deliveries (stream) or attempts (file) before it was given up.
    pub attempts: i32,
}

impl DeadLetter {
    pub fn new(
        stream: impl Into<String>,
        entry_id: impl Into<String>,
        payload: &str,
        error: &str,
        attempts: u64,
    ) -> DeadLetter {
        DeadLetter {
            stream: stream.into(),
            entry_id: entry_id.into(),
            payload: payload.replace('\0', "\u{FFFD}"),
            error: error.replace('\0', "\u{FFFD}"),
            attempts: i32::try_from(attempts).unwrap_or(i32::MAX),
        }
    }
}

/// Checks what Postgres' column types cannot hold, before sending: an `at` past year 9999 or
/// a token above `bigint`. Such a record is dead-lettered at once (it can never be written).
pub fn check_row(r: &AuditRecord) -> Result<(), String> {
    if r.at > MAX_AT_MS {
        return Err(format!("at {} ms is out of range", r.at));
    }
    if r.token.is_some_and(|t| i64::try_from(t).is_err()) {
        return Err(format!("token {:?} does not fit a bigint", r.token));
    }
    Ok(())
}

/// SQLSTATE classes that are about the rows themselves, not the server or the connection.
fn is_data_error(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        let c = c.code();
        c.starts_with("22") || c.starts_with("23") || c.starts_with("54")
    })
}

fn classify(e: tokio_postgres::Error) -> WriteError {
    let msg = match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    };
    if is_data_error(&e) {
        WriteError::Data(msg)
    } else {
        WriteError::Outage(msg)
    }
}

async fn bounded<T>(fut: impl Future<Output = Result<T, WriteError>>) -> Result<T, WriteError> {
    match tokio::time::timeout(DB_TIMEOUT, fut).await {
        Ok(r) => r,
        Err(_) => Err(WriteError::Outage(format!(
            "no answer within {DB_TIMEOUT:?}"
        ))),
    }
}

async fn client(pool: &Pool) -> Result<deadpool_postgres::Object, WriteError> {
    pool.get()
        .await
        .map_err(|e| WriteError::Outage(format!("connection: {e}")))
}

/// Writes `records` (ignoring ids already present) and `dead` letters in one transaction.
pub async fn write_batch(
    pool: &Pool,
    records: &[AuditRecord],
    dead: &[DeadLetter],
) -> Result<(), WriteError> {
    if records.is_empty() && dead.is_empty() {
        return Ok(());
    }
    bounded(async {
        let mut client = client(pool).await?;
        let tx = client.transaction().await.map_err(classify)?;
        insert_records(&tx, records).await.map_err(classify)?;
        insert_dead_letters(&tx, dead).await.map_err(classify)?;
        tx.commit().await.map_err(classify)
    })
    .await
}

/// Writes `records` one savepoint each, so a refused row does not take the others with it, and
/// the `dead` letters; commits what was accepted. Returns, per record, `None` if written (or
/// already present) and the reason if refused. An outage (or a refused dead letter) fails the
/// whole call and writes nothing.
pub async fn write_isolating(
    pool: &Pool,
    records: &[AuditRecord],
    dead: &[DeadLetter],
) -> Result<Vec<Option<String>>, WriteError> {
    bounded(async {
        let mut client = client(pool).await?;
        let tx = client.transaction().await.map_err(classify)?;
        let mut verdicts = Vec::with_capacity(records.len());
        for r in records {
            tx.batch_execute("SAVEPOINT audit_row")
                .await
                .map_err(classify)?;
            match insert_records(&tx, std::slice::from_ref(r)).await {
                Ok(_) => {
                    tx.batch_execute("RELEASE SAVEPOINT audit_row")
                        .await
                        .map_err(classify)?;
                    verdicts.push(None);
                }
                Err(e) => match classify(e) {
                    WriteError::Data(msg) => {
                        tx.batch_execute("ROLLBACK TO SAVEPOINT audit_row")
                            .await
                            .map_err(classify)?;
                        verdicts.push(Some(msg));
                    }
                    outage => return Err(outage),
                },
            }
        }
        insert_dead_letters(&tx, dead)
            .await
            .map_err(|e| match classify(e) {
                WriteError::Data(m) => WriteError::Outage(format!("dead letter refused: {m}")),
                outage => outage,
            })?;
        tx.commit().await.map_err(classify)?;
        Ok(verdicts)
    })
    .await
}

/// The parameters of one row, borrowed from its record.
struct RowParams<'a> {
    id: Uuid,
    at: SystemTime,
    kind: &'static str,
    room: Option<&'a str>,
    resource: Option<&'a str>,
    user_id: Option<&'a str>,
    session_id: Option<&'a str>,
    node_id: &'a str,
    token: Option<i64>,
    detail: &'a serde_json::Value,
    /// `{user_id, session_id?, node_id, via}` (jsonb, V3), null for most records.
    actor: Option<serde_json::Value>,
}

async fn insert_records(
    tx: &tokio_postgres::Transaction<'_>,
    records: &[AuditRecord],
) -> Result<u64, tokio_postgres::Error> {
    let empty = serde_json::Value::Object(serde_json::Map::new());
    let mut inserted = 0;
    for chunk in records.chunks(INSERT_CHUNK) {
        let rows: Vec<RowParams<'_>> = chunk
            .iter()
            .map(|r| RowParams {
                id: r.id,
                at: UNIX_EPOCH + Duration::from_millis(r.at.min(MAX_AT_MS)),
                kind: r.kind.as_str(),
                room: r.room.as_deref(),
                resource: r.resource.as_deref(),
                user_id: r.user_id.as_deref(),
                session_id: r.session_id.as_deref(),
                node_id: &r.node_id,
                // Checked by `check_row`; clamped rather than wrapped should one slip through.
                token: r.token.map(|t| i64::try_from(t).unwrap_or(i64::MAX)),
                detail: if r.detail.is_null() {
                    &empty
                } else {
                    &r.detail
                },
                actor: r.actor.as_ref().and_then(|a| serde_json::to_value(a).ok()),
            })
            .collect();
        let mut sql = format!("INSERT INTO lockstep.audit_events ({COLUMNS}) VALUES ");
        let mut params: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(rows.len() * 11);
        for (i, row) in rows.iter().enumerate() {
            let b = i * 11;
            if i > 0 {
                sql.push(',');
            }
            let _ = write!(
                sql,
                "(${},${},${},${},${},${},${},${},${},${},${})",
                b + 1,
                b + 2,
                b + 3,
                b + 4,
                b + 5,
                b + 6,
                b + 7,
                b + 8,
                b + 9,
                b + 10,
                b + 11
            );
            params.extend([
                &row.id as &(dyn ToSql + Sync),
                &row.at,
                &row.kind,
                &row.room,
                &row.resource,
                &row.user_id,
                &row.session_id,
                &row.node_id,
                &row.token,
                &row.detail,
                &row.actor,
            ]);
        }
        sql.push_str(" ON CONFLICT (id) DO NOTHING");
        inserted += tx.execute(sql.as_str(), &params).await?;
    }
    Ok(inserted)
}

async fn insert_dead_letters(
    tx: &tokio_postgres::Transaction<'_>,
    dead: &[DeadLetter],
) -> Result<(), tokio_postgres::Error> {
    for d in dead {
        tx.execute(
            "INSERT INTO lockstep.audit_dead_letters (stream, entry_id, payload, error, attempts) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (stream, entry_id) DO NOTHING",
            &[&d.stream, &d.entry_id, &d.payload, &d.error, &d.attempts],
        )
        .await?;
    }
    Ok(())
}

/// `GET /v1/audit` from `lockstep.audit_events`.
#[derive(Clone)]
pub struct PgAuditQuery {
    pool: Pool,
    logged_unknown: Arc<AtomicBool>,
}

impl PgAuditQuery {
    pub fn new(pool: Pool) -> PgAuditQuery {
        PgAuditQuery {
            pool,
            logged_unknown: Arc::default(),
        }
    }

    /// The page of records matching `q`, newest first by `(at, id)`.
    pub async fn query(&self, q: &AuditQuery) -> Result<AuditPage, AuditError> {
        let filter = RecordFilter::new(q)?;
        let (sql, params) = select_statement(&filter);
        let refs: Vec<&(dyn ToSql + Sync)> = params
            .iter()
            .map(|p| p.as_ref() as &(dyn ToSql + Sync))
            .collect();
        let unavailable = |e: String| AuditError::Unavailable(format!("postgres: {e}"));
        let rows = tokio::time::timeout(DB_TIMEOUT, async {
            let client = self.pool.get().await.map_err(|e| e.to_string())?;
            client
                .query(sql.as_str(), &refs)
                .await
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|_| unavailable(format!("no answer within {DB_TIMEOUT:?}")))?
        .map_err(unavailable)?;
        let limit = filter.limit();
        let more = rows.len() > limit;
        let mut records = Vec::with_capacity(rows.len().min(limit));
        for row in rows.iter().take(limit) {
            match record_of(row) {
                Ok(r) => records.push(r),
                Err(e) => {
                    if !self.logged_unknown.swap(true, Ordering::Relaxed) {
                        tracing::warn!(error = %e, "skipping an unreadable audit row (logged once)");
                    }
                }
            }
        }
        let next = if more {
            rows.get(limit - 1)
                .and_then(|r| r.try_get::<_, Uuid>("id").ok())
        } else {
            None
        };
        Ok(AuditPage { records, next })
    }
}

type Param = Box<dyn ToSql + Sync + Send>;

/// The `SELECT` for a validated filter and its parameters (only the filters that are set, so
/// the planner can use the matching `(column, at DESC, id DESC)` index).
fn select_statement(f: &RecordFilter) -> (String, Vec<Param>) {
    let mut params: Vec<Param> = Vec::new();
    let mut conds: Vec<String> = Vec::new();
    fn add(params: &mut Vec<Param>, p: Param) -> usize {
        params.push(p);
        params.len()
    }
    for (column, value) in [
        ("resource", f.resource()),
        ("room", f.room()),
        ("user_id", f.user_id()),
    ] {
        if let Some(v) = value {
            let n = add(&mut params, Box::new(v.to_owned()));
            conds.push(format!("{column} = ${n}"));
        }
    }
    if let Some(a) = f.actor() {
        // Served by the `(actor->>'user_id', at DESC, id DESC)` index (V3).
        let n = add(&mut params, Box::new(a.to_owned()));
        conds.push(format!("actor->>'user_id' = ${n}"));
    }
    if let Some(k) = f.kind() {
        let n = add(&mut params, Box::new(k.as_str()));
        conds.push(format!("kind = ${n}"));
    }
    if let Some(s) = f.since() {
        let n = add(&mut params, Box::new(instant(s)));
        conds.push(format!("at >= ${n}"));
    }
    if let Some(u) = f.until() {
        let n = add(&mut params, Box::new(instant(u)));
        conds.push(format!("at < ${n}"));
    }
    if let Some(b) = f.before() {
        let id = add(&mut params, Box::new(b));
        let fallback = add(&mut params, Box::new(instant(uuid_ms(b))));
        conds.push(format!(
            "(at, id) < (COALESCE((SELECT c.at FROM lockstep.audit_events c WHERE c.id = ${id}), \
             ${fallback}), ${id})"
        ));
    }
    let limit = add(&mut params, Box::new(f.limit() as i64 + 1));
    let mut sql = format!("SELECT {COLUMNS} FROM lockstep.audit_events");
    if !conds.is_empty() {
        sql.push_str(" WHERE ");
        sql.push_str(&conds.join(" AND "));
    }
    let _ = write!(sql, " ORDER BY at DESC, id DESC LIMIT ${limit}");
    (sql, params)
}

fn instant(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms.min(MAX_AT_MS))
}

/// The millisecond prefix of a time-ordered id (UUIDv7, or the stream-derived UUIDv8).
fn uuid_ms(id: Uuid) -> u64 {
    (id.as_u128() >> 80) as u64
}

fn record_of(row: &tokio_postgres::Row) -> Result<AuditRecord, String> {
    let text = |name: &str| -> Result<Option<Arc<str>>, String> {
        row.try_get::<_, Option<String>>(name)
            .map(|v| v.map(Arc::from))
            .map_err(|e| e.to_string())
    };
    let kind: String = row.try_get("kind").map_err(|e| e.to_string())?;
    let kind = AuditKind::parse(&kind).ok_or_else(|| format!("unknown kind {kind:?}"))?;
    let at: SystemTime = row.try_get("at").map_err(|e| e.to_string())?;
    let at = at
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let token: Option<i64> = row.try_get("token").map_err(|e| e.to_string())?;
    let detail: serde_json::Value = row.try_get("detail").map_err(|e| e.to_string())?;
    let detail = match detail {
        serde_json::Value::Object(m) if m.is_empty() => serde_json::Value::Null,
        d => d,
    };
    let node_id: String = row.try_get("node_id").map_err(|e| e.to_string())?;
    let actor: Option<serde_json::Value> = row.try_get("actor").map_err(|e| e.to_string())?;
    let actor = actor
        .map(serde_json::from_value)
        .transpose()
        .map_err(|e| format!("unreadable actor: {e}"))?;
    Ok(AuditRecord {
        id: row.try_get("id").map_err(|e| e.to_string())?,
        at,
        kind,
        room: text("room")?,
        resource: text("resource")?,
        user_id: text("user_id")?,
        session_id: text("session_id")?,
        node_id: Arc::from(node_id),
        token: token.and_then(|t| u64::try_from(t).ok()),
        detail,
        actor,
    })
}

/// An [`AuditSink`] whose `append` goes to an outbox sink (Redis streams or the JSON-lines
/// file, drained to Postgres by a writer) and whose `query` reads Postgres.
pub struct PgBackedSink<S> {
    outbox: S,
    reader: PgAuditQuery,
    appended: Option<Arc<Notify>>,
}

impl<S: AuditSink> PgBackedSink<S> {
    pub fn new(outbox: S, pool: Pool) -> PgBackedSink<S> {
        PgBackedSink {
            outbox,
            reader: PgAuditQuery::new(pool),
            appended: None,
        }
    }

    /// Wakes `notify` after every append (the file drainer waits on it).
    pub fn notify_on_append(mut self, notify: Arc<Notify>) -> PgBackedSink<S> {
        self.appended = Some(notify);
        self
    }

    pub fn outbox(&self) -> &S {
        &self.outbox
    }
}

#[async_trait]
impl<S: AuditSink> AuditSink for PgBackedSink<S> {
    async fn append(&self, records: Vec<AuditRecord>) -> Result<(), AuditError> {
        self.outbox.append(records).await?;
        if let Some(n) = &self.appended {
            n.notify_one();
        }
        Ok(())
    }

    async fn query(&self, q: &AuditQuery) -> Result<AuditPage, AuditError> {
        self.reader.query(q).await
    }

    async fn flush(&self) -> Result<(), AuditError> {
        self.outbox.flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_use_only_the_filters_given() {
        let q = AuditQuery::default();
        let (sql, params) = select_statement(&RecordFilter::new(&q).unwrap());
        assert_eq!(
            sql,
            format!(
                "SELECT {COLUMNS} FROM lockstep.audit_events ORDER BY at DESC, id DESC LIMIT $1"
            )
        );
        assert_eq!(params.len(), 1);
        let q = AuditQuery {
            resource: Some("segment:1".into()),
            kind: Some("lock_denied".into()),
            since: Some("1700000000000".into()),
            before: Some(Uuid::now_v7()),
            limit: Some(5),
            ..AuditQuery::default()
        };
        let (sql, params) = select_statement(&RecordFilter::new(&q).unwrap());
        assert!(sql.contains("resource = $1 AND kind = $2 AND at >= $3 AND (at, id) < "));
        assert!(sql.ends_with("LIMIT $6"), "{sql}");
        assert_eq!(params.len(), 6);
    }

    #[test]
    fn unwritable_rows_are_caught_before_sending() {
        let mut r = AuditRecord::new(AuditKind::LockAcquired, "n".into());
        assert!(check_row(&r).is_ok());
        r.token = Some(u64::MAX);
        assert!(check_row(&r).is_err());
        r.token = Some(1);
        r.at = MAX_AT_MS + 1;
        assert!(check_row(&r).is_err());
        let d = DeadLetter::new("s", "1-0", "a\0b", "e", 7);
        assert_eq!(d.payload, "a\u{FFFD}b");
        assert_eq!(d.attempts, 7);
    }
}
