//! Snapshots as files, for the embedded mode (no database): one file per document in
//! `<data dir>/yjs/`, replaced atomically (temp file in the same directory, fsync, rename,
//! fsync of the directory), so a crash leaves either the old snapshot or the new one, whole.
//!
//! File names are the document name percent-encoded (every byte outside `[A-Za-z0-9_-]`
//! becomes `%XX`), so any name is a safe, reversible, single path component (`.`, `..`, `/`
//! cannot appear). Names whose encoding exceeds [`MAX_FILE_NAME`] bytes are refused.
//!
//! The stale-writer check is a read-compare-rename under one mutex: it is atomic for the one
//! embedded node that owns the data directory (two processes sharing a data directory are not
//! supported, as for the rest of the embedded mode).
//!
//! Format (big-endian): `LSYDOC1\n`, fence u64, covers flag u8, covers ms u64, covers seq u64,
//! state length u64, state bytes. A file whose length does not add up is reported, not used.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;

use super::refusal;
use crate::yjs::store::{EntryId, Snapshot, SnapshotError, SnapshotStore};

const MAGIC: &[u8; 8] = b"LSYDOC1\n";
const HEADER: usize = 8 + 8 + 1 + 8 + 8 + 8;
/// Below the usual 255-byte file name limit, leaving room for the suffix.
pub const MAX_FILE_NAME: usize = 240;
const SUFFIX: &str = ".ydoc";

pub struct FileSnapshots {
    dir: PathBuf,
    /// Serializes writers: the compare and the rename are one step. Owned by the blocking
    /// task, so a cancelled caller cannot let the next writer in while its write still runs.
    write: Arc<tokio::sync::Mutex<()>>,
}

impl FileSnapshots {
    /// Snapshots under `<data_dir>/yjs/` (created if missing).
    pub fn open(data_dir: &Path) -> Result<Arc<FileSnapshots>, SnapshotError> {
        let dir = data_dir.join("yjs");
        std::fs::create_dir_all(&dir).map_err(|e| io_error(&dir, e))?;
        Ok(Arc::new(FileSnapshots {
            dir,
            write: Arc::new(tokio::sync::Mutex::new(())),
        }))
    }

    /// The file holding `doc`'s snapshot.
    pub fn path_of(&self, doc: &str) -> Result<PathBuf, SnapshotError> {
        let name = encode_name(doc);
        if name.len() > MAX_FILE_NAME {
            return Err(SnapshotError::Unavailable(format!(
                "document name too long for a snapshot file ({} bytes encoded, at most {MAX_FILE_NAME})",
                name.len()
            )));
        }
        Ok(self.dir.join(name + SUFFIX))
    }
}

/// Percent-encodes every byte outside `[A-Za-z0-9_-]`.
pub fn encode_name(doc: &str) -> String {
    let mut out = String::with_capacity(doc.len());
    for b in doc.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn io_error(path: &Path, e: std::io::Error) -> SnapshotError {
    SnapshotError::Unavailable(format!("{}: {e}", path.display()))
}

fn encode(s: &Snapshot) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + s.state.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&s.fence.to_be_bytes());
    let covers = s.covers.unwrap_or(EntryId::ZERO);
    out.push(u8::from(s.covers.is_some()));
    out.extend_from_slice(&covers.ms.to_be_bytes());
    out.extend_from_slice(&covers.seq.to_be_bytes());
    out.extend_from_slice(&(s.state.len() as u64).to_be_bytes());
    out.extend_from_slice(&s.state);
    out
}

fn decode(path: &Path, bytes: &[u8]) -> Result<Snapshot, SnapshotError> {
    let corrupt = |why: &str| {
        SnapshotError::Unavailable(format!("{}: corrupt snapshot file ({why})", path.display()))
    };
    if bytes.len() < HEADER || &bytes[..8] != MAGIC {
        return Err(corrupt("bad header"));
    }
    let u64_at = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap_or([0; 8]));
    let fence = u64_at(8);
    let has_covers = bytes[16] == 1;
    let covers = EntryId {
        ms: u64_at(17),
        seq: u64_at(25),
    };
    let len = u64_at(33);
    if (bytes.len() - HEADER) as u64 != len {
        return Err(corrupt("length mismatch"));
    }
    Ok(Snapshot {
        state: bytes[HEADER..].to_vec(),
        covers: has_covers.then_some(covers),
        fence,
    })
}

fn read(path: &Path) -> Result<Option<Snapshot>, SnapshotError> {
    match std::fs::read(path) {
        Ok(bytes) => decode(path, &bytes).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error(path, e)),
    }
}

/// Temp file in the target's directory (same file system, so the rename is atomic), fsync,
/// rename over the target, fsync the directory so the rename itself survives a power loss.
fn write_atomically(dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), SnapshotError> {
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .map_err(|e| io_error(dir, e))?;
    tmp.write_all(bytes).map_err(|e| io_error(tmp.path(), e))?;
    tmp.as_file().sync_all().map_err(|e| io_error(path, e))?;
    tmp.persist(path).map_err(|e| io_error(path, e.error))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error(dir, e))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SnapshotError> + Send + 'static,
) -> Result<T, SnapshotError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| SnapshotError::Unavailable(format!("snapshot file task: {e}")))?
}

#[async_trait]
impl SnapshotStore for FileSnapshots {
    async fn load(&self, doc: &str) -> Result<Option<Snapshot>, SnapshotError> {
        let path = self.path_of(doc)?;
        blocking(move || read(&path)).await
    }

    async fn store(&self, doc: &str, snapshot: &Snapshot) -> Result<(), SnapshotError> {
        let path = self.path_of(doc)?;
        let dir = self.dir.clone();
        let snapshot = snapshot.clone();
        let writer = self.write.clone().lock_owned().await;
        blocking(move || {
            let _writer = writer;
            if let Some(why) = read(&path)?.and_then(|stored| refusal(&stored, &snapshot)) {
                return Err(SnapshotError::Stale(why));
            }
            write_atomically(&dir, &path, &encode(&snapshot))
        })
        .await
    }
}
