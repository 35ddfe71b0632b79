//! [`SnapshotStore`](super::store::SnapshotStore) implementations: where compacted Yjs
//! documents are kept.
//!
//! - [`memory::MemorySnapshots`]: in process, for tests;
//! - [`file::FileSnapshots`]: embedded mode, one file per document in the data directory;
//! - [`postgres::PgSnapshots`]: `lockstep.documents` (migration V4).
//!
//! All of them refuse a stale writer with the same rule, [`refusal`]: a lower fencing token
//! than the stored snapshot's, or a snapshot covering less of the log. An equal token and
//! equal coverage is accepted (a retried write whose answer was lost must not fail).

pub mod file;
pub mod memory;
pub mod postgres;

pub use file::FileSnapshots;
pub use memory::MemorySnapshots;
pub use postgres::PgSnapshots;

use std::sync::Arc;

use super::store::{Snapshot, SnapshotError, SnapshotStore};

/// The store a node uses: Postgres when it has a database; files in its data directory when
/// its log is in process too (embedded); none with Redis and no database, because a
/// document's snapshot must be one every node reads: a node folding the shared Redis log into
/// its own file would trim entries the other nodes then cannot load, and a file left from an
/// earlier run would be applied over a log it never covered.
pub fn for_node(node: &crate::node::Node) -> Result<Option<Arc<dyn SnapshotStore>>, SnapshotError> {
    open(
        node.db.as_ref(),
        node.config.redis_url.is_some(),
        &node.config.data_dir,
    )
}

/// [`for_node`] before the node exists (its document registry is built with the store).
pub fn open(
    db: Option<&deadpool_postgres::Pool>,
    shared_log: bool,
    data_dir: &std::path::Path,
) -> Result<Option<Arc<dyn SnapshotStore>>, SnapshotError> {
    match db {
        Some(pool) => Ok(Some(Arc::new(PgSnapshots::new(pool.clone())))),
        None if shared_log => Ok(None),
        None => Ok(Some(FileSnapshots::open(data_dir)?)),
    }
}

/// Why `new` may not replace `stored` (`None`: it may).
pub fn refusal(stored: &Snapshot, new: &Snapshot) -> Option<String> {
    if new.fence < stored.fence {
        return Some(format!(
            "fencing token {} is below the stored snapshot's {}",
            new.fence, stored.fence
        ));
    }
    // `None` (covers nothing) orders below every entry id.
    if new.covers < stored.covers {
        return Some(format!(
            "snapshot covers {} but the stored one covers {}",
            show(new.covers),
            show(stored.covers)
        ));
    }
    None
}

fn show(covers: Option<super::store::EntryId>) -> String {
    covers.map_or_else(|| "no entry".to_owned(), |id| id.to_string())
}
