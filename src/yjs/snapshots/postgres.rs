//! Snapshots in Postgres (`lockstep.documents`, migration V4), through the node's pool.
//!
//! The stale-writer check is inside the upsert's `ON CONFLICT … DO UPDATE … WHERE`: Postgres
//! evaluates it on the locked existing row, so two writers racing are serialized by the row
//! lock and the lower one changes nothing, whatever the interleaving. No row changed is
//! reported as [`SnapshotError::Stale`]. Commits are synchronous (the pool's connection hook,
//! `src/db.rs`): a snapshot the compactor was told is stored survives a Postgres crash, which
//! is what makes trimming the log after it safe.

use async_trait::async_trait;
use deadpool_postgres::Pool;

use super::refusal;
use crate::yjs::store::{EntryId, Snapshot, SnapshotError, SnapshotStore};

pub struct PgSnapshots {
    pool: Pool,
}

const UPSERT: &str = "\
INSERT INTO lockstep.documents AS d (doc, state, covers_ms, covers_seq, fence)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (doc) DO UPDATE SET
    state = EXCLUDED.state, covers_ms = EXCLUDED.covers_ms, covers_seq = EXCLUDED.covers_seq,
    fence = EXCLUDED.fence, updated_at = now()
WHERE d.fence <= EXCLUDED.fence
  AND (COALESCE(d.covers_ms, -1), COALESCE(d.covers_seq, -1))
      <= (COALESCE(EXCLUDED.covers_ms, -1), COALESCE(EXCLUDED.covers_seq, -1))";

const SELECT: &str =
    "SELECT state, covers_ms, covers_seq, fence FROM lockstep.documents WHERE doc = $1";

impl PgSnapshots {
    /// Uses `pool` (the node's); the table comes from the migrations (`lockstep migrate`).
    pub fn new(pool: Pool) -> PgSnapshots {
        PgSnapshots { pool }
    }
}

fn unavailable(e: impl std::fmt::Display) -> SnapshotError {
    SnapshotError::Unavailable(e.to_string())
}

fn to_i64(v: u64, what: &str) -> Result<i64, SnapshotError> {
    i64::try_from(v)
        .map_err(|_| SnapshotError::Unavailable(format!("{what} {v} does not fit a bigint")))
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

#[async_trait]
impl SnapshotStore for PgSnapshots {
    async fn load(&self, doc: &str) -> Result<Option<Snapshot>, SnapshotError> {
        let client = self.pool.get().await.map_err(unavailable)?;
        let stmt = client.prepare_cached(SELECT).await.map_err(unavailable)?;
        let Some(row) = client
            .query_opt(&stmt, &[&doc])
            .await
            .map_err(unavailable)?
        else {
            return Ok(None);
        };
        let ms: Option<i64> = row.try_get(1).map_err(unavailable)?;
        let seq: Option<i64> = row.try_get(2).map_err(unavailable)?;
        Ok(Some(Snapshot {
            state: row.try_get(0).map_err(unavailable)?,
            covers: ms.zip(seq).map(|(ms, seq)| EntryId {
                ms: to_u64(ms),
                seq: to_u64(seq),
            }),
            fence: to_u64(row.try_get(3).map_err(unavailable)?),
        }))
    }

    async fn store(&self, doc: &str, snapshot: &Snapshot) -> Result<(), SnapshotError> {
        let fence = to_i64(snapshot.fence, "fencing token")?;
        let (ms, seq) = match snapshot.covers {
            Some(id) => (
                Some(to_i64(id.ms, "entry id")?),
                Some(to_i64(id.seq, "entry id")?),
            ),
            None => (None, None),
        };
        let client = self.pool.get().await.map_err(unavailable)?;
        let stmt = client.prepare_cached(UPSERT).await.map_err(unavailable)?;
        let changed = client
            .execute(&stmt, &[&doc, &snapshot.state, &ms, &seq, &fence])
            .await
            .map_err(unavailable)?;
        if changed == 1 {
            return Ok(());
        }
        // Refused inside the statement; read the winner only to say why.
        let why = match self.load(doc).await {
            Ok(Some(stored)) => refusal(&stored, snapshot),
            _ => None,
        };
        Err(SnapshotError::Stale(why.unwrap_or_else(|| {
            "a newer snapshot writer won the row".to_owned()
        })))
    }
}
