//! Snapshots in a map, for tests (and as the reference the other stores are tested against).

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;

use super::refusal;
use crate::yjs::store::{Snapshot, SnapshotError, SnapshotStore};

#[derive(Default)]
pub struct MemorySnapshots {
    docs: Mutex<HashMap<String, Snapshot>>,
}

impl MemorySnapshots {
    pub fn new() -> MemorySnapshots {
        MemorySnapshots::default()
    }
}

#[async_trait]
impl SnapshotStore for MemorySnapshots {
    async fn load(&self, doc: &str) -> Result<Option<Snapshot>, SnapshotError> {
        Ok(self
            .docs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(doc)
            .cloned())
    }

    async fn store(&self, doc: &str, snapshot: &Snapshot) -> Result<(), SnapshotError> {
        let mut docs = self.docs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(why) = docs.get(doc).and_then(|stored| refusal(stored, snapshot)) {
            return Err(SnapshotError::Stale(why));
        }
        docs.insert(doc.to_owned(), snapshot.clone());
        Ok(())
    }
}
