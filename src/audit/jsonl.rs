//! Audit records appended to `audit.jsonl` in the data directory.
//!
//! [`JsonlSink`] is the embedded default: one JSON object per line, in the [`AuditRecord`]
//! serde form, appended by a single writer thread.
//!
//! # Durability and backpressure
//!
//! - `append` hands its batch to the writer through a **bounded** channel (4096 batches). When
//!   the writer is behind, `append` waits for room: records are never dropped, the callers slow
//!   down instead (a lock store's caller waits on its audit write).
//! - `append` returns only after the writer has **written** the batch to the file (a oneshot
//!   acknowledgement). A returned append therefore survives a kill of the process (the data is in
//!   the kernel's page cache). The cost is one round trip to the writer thread per call,
//!   typically tens of microseconds; concurrent callers are not serialized behind each other's
//!   round trip, only behind the writes themselves.
//! - The file is `fsync`ed (`sync_data`) like Redis' `appendfsync everysec`, tightened: a
//!   separate thread syncs written data within 200 ms. A machine crash (power loss) can thus
//!   lose at most the last ~200 ms of records; a process crash loses nothing. The sync never
//!   sits on the path of an `append` (a lock operation does not wait on the disk's fsync).
//!   [`flush`](AuditSink::flush) waits until everything accepted is written and synced.
//! - The writer is a dedicated OS thread, not a tokio task: file writes and `fsync` block, and a
//!   runtime worker must not. The thread ends (after a last sync) when the sink is dropped.
//! - A failed write is truncated away so the file never holds half a line before a good one; a
//!   half line left by a crash is terminated when the file is reopened, and skipped by queries.
//!
//! # Queries
//!
//! [`query`](AuditSink::query) streams the whole file through a `BufReader` on the blocking
//! pool, keeping only the newest `limit` matching records (a bounded heap ordered by UUIDv7 id,
//! so out-of-order lines from concurrent appends are still returned newest first). That is
//! O(file size) per query: fine for the embedded single node; the Postgres sink is the one meant
//! for large trails. Unparsable lines are skipped and counted; the first time any are found a
//! warning is logged.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::{AuditError, AuditKind, AuditPage, AuditQuery, AuditRecord, AuditSink, rfc3339_ms};

/// The file name inside the data directory.
pub const FILE_NAME: &str = "audit.jsonl";
/// Batches waiting for the writer before `append` waits.
pub const QUEUE_BATCHES: usize = 4096;
/// While busy, the file is synced at most this often (and always when the queue goes idle).
pub const SYNC_INTERVAL: Duration = Duration::from_millis(200);
/// Default and maximum page sizes of a query.
pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 1000;

/// The JSON-lines [`AuditSink`].
pub struct JsonlSink {
    tx: mpsc::Sender<Command>,
    path: PathBuf,
    skipped: Arc<SkipCounter>,
}

/// Unparsable lines seen by the last query, and whether that was already logged.
#[derive(Default)]
struct SkipCounter {
    last: AtomicU64,
    logged: AtomicBool,
}

enum Command {
    Append {
        records: Vec<AuditRecord>,
        ack: oneshot::Sender<Result<(), String>>,
    },
    Flush {
        ack: oneshot::Sender<Result<(), String>>,
    },
}

impl JsonlSink {
    /// Creates `dir` if needed, opens (or creates) `dir/audit.jsonl` for appending and starts
    /// the writer thread. Needs no tokio runtime.
    pub fn open(dir: &Path) -> Result<JsonlSink, AuditError> {
        let unavailable = |what: &str, e: std::io::Error| {
            AuditError::Unavailable(format!("{what} {}: {e}", dir.display()))
        };
        std::fs::create_dir_all(dir).map_err(|e| unavailable("cannot create", e))?;
        let path = dir.join(FILE_NAME);
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&path)
            .map_err(|e| unavailable("cannot open audit file in", e))?;
        let len = terminate_partial_line(&mut file).map_err(|e| unavailable("cannot repair", e))?;
        let (tx, rx) = mpsc::channel(QUEUE_BATCHES);
        let dirty = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let sync_file = file
            .try_clone()
            .map_err(|e| unavailable("cannot open audit file in", e))?;
        // The threads log inside the opener's span (the node's): their lines carry `node_id`.
        let span = tracing::Span::current();
        let syncer = {
            let (dirty, stop, span) = (dirty.clone(), stop.clone(), span.clone());
            std::thread::Builder::new()
                .name("audit-fsync".into())
                .spawn(move || span.in_scope(|| periodic_sync(sync_file, dirty, stop)))
                .map_err(|e| unavailable("cannot start the audit syncer for", e))?
        };
        let writer = Writer {
            file,
            len,
            dirty,
            stop,
            syncer: syncer.thread().clone(),
        };
        std::thread::Builder::new()
            .name("audit-jsonl".into())
            .spawn(move || span.in_scope(|| writer.run(rx)))
            .map_err(|e| unavailable("cannot start the audit writer for", e))?;
        Ok(JsonlSink {
            tx,
            path,
            skipped: Arc::default(),
        })
    }

    /// The file this sink appends to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many unparsable lines the last query skipped.
    pub fn skipped_lines(&self) -> u64 {
        self.skipped.last.load(Ordering::Relaxed)
    }

    async fn call(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<(), String>>) -> Command,
    ) -> Result<(), AuditError> {
        let gone = || AuditError::Unavailable("audit writer stopped".into());
        let (ack, done) = oneshot::channel();
        self.tx.send(make(ack)).await.map_err(|_| gone())?;
        done.await
            .map_err(|_| gone())?
            .map_err(|e| AuditError::Unavailable(format!("audit file write failed: {e}")))
    }
}

/// If a crash left half a line at the end of the file, ends it so the next record starts on a
/// line of its own (the fragment is then skipped by queries). Returns the file length.
fn terminate_partial_line(file: &mut File) -> std::io::Result<u64> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(0);
    }
    file.seek(SeekFrom::Start(len - 1))?;
    let mut last = [0u8; 1];
    file.read_exact(&mut last)?;
    if last[0] == b'\n' {
        return Ok(len);
    }
    file.write_all(b"\n")?;
    Ok(len + 1)
}

struct Writer {
    file: File,
    /// Length of the file as written so far (every line complete).
    len: u64,
    /// Written but not yet synced (shared with the syncer thread).
    dirty: Arc<AtomicBool>,
    /// Tells the syncer thread to finish.
    stop: Arc<AtomicBool>,
    syncer: std::thread::Thread,
}

/// Syncs the file within [`SYNC_INTERVAL`] of a write, on its own thread (same file, its own
/// descriptor), so appends never wait for the disk.
fn periodic_sync(file: File, dirty: Arc<AtomicBool>, stop: Arc<AtomicBool>) {
    loop {
        std::thread::park_timeout(SYNC_INTERVAL);
        let stopping = stop.load(Ordering::Acquire);
        if dirty.swap(false, Ordering::AcqRel)
            && let Err(e) = file.sync_data()
        {
            dirty.store(true, Ordering::Release);
            tracing::error!(error = %e, "audit file sync failed");
        }
        if stopping {
            return;
        }
    }
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        while let Some(cmd) = rx.blocking_recv() {
            match cmd {
                Command::Append { records, ack } => {
                    let result = self.write(&records);
                    // The caller may have given up waiting; the records are written regardless.
                    let _ = ack.send(result.map_err(|e| e.to_string()));
                }
                Command::Flush { ack } => {
                    let _ = ack.send(self.sync().map_err(|e| e.to_string()));
                }
            }
        }
        if let Err(e) = self.sync() {
            tracing::error!(error = %e, "audit file sync failed at close");
        }
        self.stop.store(true, Ordering::Release);
        self.syncer.unpark();
    }

    /// Writes the batch with one `write_all`; on failure truncates back to the last full line.
    fn write(&mut self, records: &[AuditRecord]) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(records.len() * 256);
        for r in records {
            serde_json::to_writer(&mut buf, r)?;
            buf.push(b'\n');
        }
        match self.file.write_all(&buf) {
            Ok(()) => {
                self.len += buf.len() as u64;
                self.dirty.store(true, Ordering::Release);
                Ok(())
            }
            Err(e) => {
                if let Err(te) = self.file.set_len(self.len) {
                    tracing::error!(error = %te, "cannot truncate a partly written audit batch");
                }
                Err(e)
            }
        }
    }

    fn sync(&mut self) -> std::io::Result<()> {
        if self.dirty.swap(false, Ordering::AcqRel)
            && let Err(e) = self.file.sync_data()
        {
            self.dirty.store(true, Ordering::Release);
            return Err(e);
        }
        Ok(())
    }
}

#[async_trait]
impl AuditSink for JsonlSink {
    async fn append(&self, records: Vec<AuditRecord>) -> Result<(), AuditError> {
        if records.is_empty() {
            return Ok(());
        }
        self.call(|ack| Command::Append { records, ack }).await
    }

    async fn query(&self, q: &AuditQuery) -> Result<AuditPage, AuditError> {
        let filter = RecordFilter::new(q)?;
        let path = self.path.clone();
        let skipped = self.skipped.clone();
        tokio::task::spawn_blocking(move || scan(&path, filter, &skipped))
            .await
            .map_err(|e| AuditError::Unavailable(format!("audit query task failed: {e}")))?
    }

    async fn flush(&self) -> Result<(), AuditError> {
        self.call(|ack| Command::Flush { ack }).await
    }
}

/// Streams the file, keeping the newest matching records.
fn scan(path: &Path, filter: RecordFilter, skipped: &SkipCounter) -> Result<AuditPage, AuditError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(AuditPage {
                records: Vec::new(),
                next: None,
            });
        }
        Err(e) => {
            return Err(AuditError::Unavailable(format!(
                "cannot read {}: {e}",
                path.display()
            )));
        }
    };
    let mut reader = BufReader::with_capacity(64 * 1024, file);
    let mut page = PageCollector::new(filter.limit());
    let mut line = Vec::new();
    let mut bad = 0u64;
    loop {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .map_err(|e| AuditError::Unavailable(format!("cannot read {}: {e}", path.display())))?;
        if n == 0 {
            break;
        }
        if line.last() != Some(&b'\n') {
            // A line still being written by the writer: not accepted yet, not an error.
            break;
        }
        let text = &line[..line.len() - 1];
        if text.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<AuditRecord>(text) {
            Ok(record) => {
                if filter.matches(&record) {
                    page.offer(record);
                }
            }
            Err(_) => bad += 1,
        }
    }
    skipped.last.store(bad, Ordering::Relaxed);
    if bad > 0 && !skipped.logged.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            path = %path.display(),
            lines = bad,
            "skipping unparsable lines in the audit file (logged once)"
        );
    }
    Ok(page.finish())
}

/// The filters of an [`AuditQuery`], validated once and checked per record. Shared by the
/// sinks that filter in process.
#[derive(Debug, Clone)]
pub struct RecordFilter {
    resource: Option<String>,
    room: Option<String>,
    user_id: Option<String>,
    actor: Option<String>,
    kind: Option<AuditKind>,
    since: Option<u64>,
    until: Option<u64>,
    before: Option<Uuid>,
    limit: usize,
}

impl RecordFilter {
    /// Validates the query: an unknown `kind`, an unparsable `since`/`until` or a zero `limit`
    /// is [`AuditError::BadQuery`]; a `limit` over [`MAX_LIMIT`] is capped.
    pub fn new(q: &AuditQuery) -> Result<RecordFilter, AuditError> {
        let kind = q
            .kind
            .as_deref()
            .map(|k| AuditKind::parse(k).ok_or_else(|| bad(format!("unknown kind {k:?}"))))
            .transpose()?;
        let instant = |name: &str, v: &Option<String>| {
            v.as_deref()
                .map(|s| {
                    rfc3339_ms::parse(s).ok_or_else(|| {
                        bad(format!(
                            "{name} must be RFC 3339 or ms since the epoch, got {s:?}"
                        ))
                    })
                })
                .transpose()
        };
        let limit = match q.limit {
            None => DEFAULT_LIMIT,
            Some(0) => return Err(bad("limit must be at least 1".into())),
            Some(n) => n.min(MAX_LIMIT),
        };
        Ok(RecordFilter {
            resource: q.resource.clone(),
            room: q.room.clone(),
            user_id: q.user_id.clone(),
            actor: q.actor.clone(),
            kind,
            since: instant("since", &q.since)?,
            until: instant("until", &q.until)?,
            before: q.before,
            limit,
        })
    }

    /// The page size.
    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn resource(&self) -> Option<&str> {
        self.resource.as_deref()
    }
    pub fn room(&self) -> Option<&str> {
        self.room.as_deref()
    }
    pub fn user_id(&self) -> Option<&str> {
        self.user_id.as_deref()
    }
    /// Only records whose actor (who forced a release) is this user.
    pub fn actor(&self) -> Option<&str> {
        self.actor.as_deref()
    }
    pub fn kind(&self) -> Option<AuditKind> {
        self.kind
    }
    /// Only records at or after this instant (ms since the epoch).
    pub fn since(&self) -> Option<u64> {
        self.since
    }
    /// Only records before this instant (ms since the epoch).
    pub fn until(&self) -> Option<u64> {
        self.until
    }
    /// The keyset cursor: only records older than this one.
    pub fn before(&self) -> Option<Uuid> {
        self.before
    }

    pub fn matches(&self, r: &AuditRecord) -> bool {
        fn eq(want: &Option<String>, have: &Option<Arc<str>>) -> bool {
            want.as_deref().is_none_or(|w| have.as_deref() == Some(w))
        }
        eq(&self.resource, &r.resource)
            && eq(&self.room, &r.room)
            && eq(&self.user_id, &r.user_id)
            && self
                .actor
                .as_deref()
                .is_none_or(|a| r.actor.as_ref().is_some_and(|x| &*x.user_id == a))
            && self.kind.is_none_or(|k| r.kind == k)
            && self.since.is_none_or(|s| r.at >= s)
            && self.until.is_none_or(|u| r.at < u)
            && self.before.is_none_or(|b| r.id < b)
    }
}

fn bad(msg: String) -> AuditError {
    AuditError::BadQuery(msg)
}

/// Keeps the newest `limit` records offered (by UUIDv7 id) and builds the page.
pub struct PageCollector {
    limit: usize,
    heap: BinaryHeap<Reverse<ById>>,
}

struct ById(AuditRecord);

impl PartialEq for ById {
    fn eq(&self, other: &Self) -> bool {
        self.0.id == other.0.id
    }
}
impl Eq for ById {}
impl PartialOrd for ById {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for ById {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.id.cmp(&other.0.id)
    }
}

impl PageCollector {
    pub fn new(limit: usize) -> PageCollector {
        PageCollector {
            limit,
            heap: BinaryHeap::with_capacity(limit.min(MAX_LIMIT) + 1),
        }
    }

    /// Offers a record that matched the filter.
    pub fn offer(&mut self, record: AuditRecord) {
        if self.heap.len() < self.limit {
            self.heap.push(Reverse(ById(record)));
        } else if let Some(Reverse(oldest)) = self.heap.peek()
            && record.id > oldest.0.id
        {
            self.heap.pop();
            self.heap.push(Reverse(ById(record)));
        }
    }

    /// Newest first; `next` is the last record's id when the page is full.
    pub fn finish(self) -> AuditPage {
        let full = self.heap.len() >= self.limit;
        // `into_sorted_vec` of `Reverse` is ascending in `Reverse`, i.e. newest first.
        let records: Vec<AuditRecord> = self
            .heap
            .into_sorted_vec()
            .into_iter()
            .map(|Reverse(ById(r))| r)
            .collect();
        let next = if full {
            records.last().map(|r| r.id)
        } else {
            None
        };
        AuditPage { records, next }
    }
}
