//! Embedded mode with a database: the JSON-lines file is the outbox, tailed into Postgres.
//!
//! # Design
//!
//! Without Redis, a node's lock store appends its records to `audit.jsonl` through the
//! [`JsonlSink`](super::jsonl::JsonlSink) exactly as without a database: `append` returns once
//! the batch is written to the file (a process crash loses nothing accepted; see that module for
//! fsync). The file is the durable outbox; a lock operation never waits for Postgres.
//!
//! [`FileDrainer`] (one task) tails the file from a checkpoint: the byte offset, in
//! [`OFFSET_FILE`] (`audit.offset`, beside the file) of the first line not yet in Postgres. It
//! reads up to [`BATCH`] complete lines from there (a line still being written, without its
//! newline, waits for the next round), inserts them in one transaction
//! ([`postgres::write_batch`], `ON CONFLICT (id) DO NOTHING`), commits, and only then writes the
//! new offset (to a temporary file renamed over the old one, so the checkpoint is never torn).
//!
//! - **Exactly once**: records carry their UUIDv7 id in the file, so a crash between the commit
//!   and the checkpoint re-sends at most that one batch, and the primary key drops it.
//! - **Postgres outage**: nothing is committed and the offset does not move; the drainer retries
//!   the same lines with backoff (200 ms doubling to 5 s) while the file keeps growing.
//! - **Bad lines**: an unparsable line (e.g. the fragment of a line cut by a crash, which the
//!   sink terminates on reopen) or a record no column can hold goes to
//!   `lockstep.audit_dead_letters` (`stream` = `file:<path>`, `entry_id` = its byte offset) in
//!   the batch's transaction. A row Postgres refuses (data error) is retried a second later,
//!   and dead-lettered after [`MAX_ATTEMPTS`] refusals.
//! - **A file that shrank** below the checkpoint (replaced or truncated by an operator) is read
//!   again from the start; the primary key absorbs what was already sent.
//!
//! The drainer wakes on every append (a [`Notify`] from the sink) and at least every second.
//! `GET /v1/audit` reads Postgres, so a record shows there once drained (normally within
//! milliseconds). `LOCKSTEP_AUDIT_ACK_DELAY_MS` (**tests only**) sleeps between the commit and the
//! checkpoint write.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::AuditRecord;
use super::postgres::{self, DeadLetter, WriteError};
use crate::telemetry::Metrics;

/// The checkpoint file beside `audit.jsonl`.
pub const OFFSET_FILE: &str = "audit.offset";
/// Lines per batch.
pub const BATCH: usize = 500;
/// Refusals by Postgres after which a line becomes a dead letter.
pub const MAX_ATTEMPTS: u32 = 5;
/// Longest wait between two looks at the file.
const POLL: Duration = Duration::from_secs(1);
/// Bytes past the batch scanned to count the backlog.
const BACKLOG_SCAN: u64 = 64 * 1024 * 1024;
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
const RETRY_DELAY: Duration = Duration::from_secs(1);

/// Tails `audit.jsonl` into Postgres (see the module docs).
pub struct FileDrainer {
    file: PathBuf,
    checkpoint: PathBuf,
    db: deadpool_postgres::Pool,
    metrics: Metrics,
    appended: Arc<Notify>,
    ack_delay: Option<Duration>,
    /// Refusals per line offset (data errors).
    refused: HashMap<u64, u32>,
}

/// Lines read from the file.
#[derive(Debug, Default)]
struct Chunk {
    /// (byte offset, line without its newline), complete lines only.
    lines: Vec<(u64, Vec<u8>)>,
    /// Offset after the last line read.
    end: u64,
    /// The file is shorter than the checkpoint.
    shrunk: bool,
    /// Complete lines after `end` (up to [`BACKLOG_SCAN`] bytes looked at).
    more: u64,
}

impl FileDrainer {
    /// A drainer for `file` (its checkpoint is [`OFFSET_FILE`] in the same directory).
    pub fn new(
        file: &Path,
        db: deadpool_postgres::Pool,
        metrics: Metrics,
        appended: Arc<Notify>,
        ack_delay: Option<Duration>,
    ) -> FileDrainer {
        let checkpoint = file
            .parent()
            .map(|d| d.join(OFFSET_FILE))
            .unwrap_or_else(|| PathBuf::from(OFFSET_FILE));
        FileDrainer {
            file: file.to_owned(),
            checkpoint,
            db,
            metrics,
            appended,
            ack_delay,
            refused: HashMap::new(),
        }
    }

    fn stream(&self) -> String {
        format!("file:{}", self.file.display())
    }

    /// Runs until `stop` fires (between batches).
    pub async fn run(mut self, stop: CancellationToken) {
        self.metrics.audit_writer_started();
        let mut offset = match read_checkpoint(&self.checkpoint) {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(error = %e, path = %self.checkpoint.display(),
                    "unreadable audit checkpoint: draining the audit file from its start");
                0
            }
        };
        let mut backoff = BACKOFF_MIN;
        while !stop.is_cancelled() {
            let file = self.file.clone();
            let chunk = tokio::task::spawn_blocking(move || read_chunk(&file, offset, BATCH))
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))
                .and_then(|r| r);
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the audit file");
                    if !self.pause(&stop, POLL).await {
                        return;
                    }
                    continue;
                }
            };
            if chunk.shrunk {
                tracing::warn!(path = %self.file.display(), offset,
                    "the audit file is shorter than its checkpoint: draining it from the start");
                offset = 0;
                continue;
            }
            if chunk.lines.is_empty() {
                self.metrics.audit_backlog(0);
                if chunk.end != offset {
                    // Only blank lines: move past them.
                    offset = chunk.end;
                    self.save(offset).await;
                }
                if !self.pause(&stop, POLL).await {
                    return;
                }
                continue;
            }
            self.metrics
                .audit_backlog(chunk.lines.len() as u64 + chunk.more);
            let started = Instant::now();
            let span = super::outbox::drain_span("jsonl_file", chunk.lines.len());
            let written = self.write(&chunk).instrument(span.clone()).await;
            let outcome = match written {
                Ok(true) => "ok",
                // Some line was refused and is retried; the others are written.
                Ok(false) => "partial",
                Err(_) => "error",
            };
            super::instrumented::record_outcome(&span, outcome);
            match written {
                Ok(true) => {
                    backoff = BACKOFF_MIN;
                    if let Some(d) = self.ack_delay {
                        tokio::time::sleep(d).await;
                    }
                    offset = chunk.end;
                    self.save(offset).await;
                    self.metrics
                        .audit_batch_time(started.elapsed().as_secs_f64());
                    if chunk.more == 0 {
                        self.metrics.audit_backlog(0);
                    }
                }
                Ok(false) => {
                    // Some line was refused and will be retried: the good ones are written.
                    if !pause_plain(&stop, RETRY_DELAY).await {
                        return;
                    }
                }
                Err(e) => {
                    self.metrics.audit_write_failure();
                    tracing::warn!(error = %e, lines = chunk.lines.len(),
                        "audit batch not written to Postgres; retrying");
                    if !pause_plain(&stop, backoff).await {
                        return;
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    /// Waits for an append, `d`, or `stop`; returns whether to go on.
    async fn pause(&self, stop: &CancellationToken, d: Duration) -> bool {
        tokio::select! {
            _ = stop.cancelled() => false,
            _ = self.appended.notified() => true,
            _ = tokio::time::sleep(d) => true,
        }
    }

    async fn save(&self, offset: u64) {
        let path = self.checkpoint.clone();
        let r = tokio::task::spawn_blocking(move || write_checkpoint(&path, offset)).await;
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot write the audit checkpoint (records may be re-sent; duplicates are ignored)")
            }
            Err(e) => tracing::warn!(error = %e, "audit checkpoint task failed"),
        }
    }

    /// Writes a chunk. `Ok(true)`: everything is in Postgres (or dead-lettered), the checkpoint
    /// may move; `Ok(false)`: a refused line waits for a retry; `Err`: an outage, nothing written.
    async fn write(&mut self, chunk: &Chunk) -> Result<bool, String> {
        let stream = self.stream();
        let mut records: Vec<AuditRecord> = Vec::with_capacity(chunk.lines.len());
        let mut record_offset: Vec<u64> = Vec::with_capacity(chunk.lines.len());
        let mut dead = Vec::new();
        for (off, line) in &chunk.lines {
            let parsed = serde_json::from_slice::<AuditRecord>(line)
                .map_err(|e| format!("unparsable audit line: {e}"))
                .and_then(|r| postgres::check_row(&r).map(|()| r));
            match parsed {
                Ok(r) => {
                    records.push(r);
                    record_offset.push(*off);
                }
                Err(error) => {
                    tracing::warn!(offset = off, %error, "bad audit line: moving it to lockstep.audit_dead_letters");
                    dead.push(DeadLetter::new(
                        stream.clone(),
                        off.to_string(),
                        &String::from_utf8_lossy(line),
                        &error,
                        1,
                    ));
                }
            }
        }
        let mut dead_count = dead.len() as u64;
        let mut complete = true;
        match postgres::write_batch(&self.db, &records, &dead).await {
            Ok(()) => {}
            Err(WriteError::Outage(e)) => return Err(e),
            Err(WriteError::Data(e)) => {
                tracing::warn!(error = %e, "Postgres refused an audit line: writing the batch line by line");
                let verdicts = postgres::write_isolating(&self.db, &records, &dead)
                    .await
                    .map_err(|e| e.to_string())?;
                let mut exhausted = Vec::new();
                for (k, verdict) in verdicts.iter().enumerate() {
                    let Some(error) = verdict else { continue };
                    let off = record_offset[k];
                    let n = self.refused.entry(off).or_insert(0);
                    *n += 1;
                    if *n >= MAX_ATTEMPTS {
                        tracing::error!(offset = off, %error, "audit line refused by Postgres too often: moving it to lockstep.audit_dead_letters");
                        let line = chunk
                            .lines
                            .iter()
                            .find(|(o, _)| *o == off)
                            .map(|(_, l)| String::from_utf8_lossy(l).into_owned())
                            .unwrap_or_default();
                        exhausted.push(DeadLetter::new(
                            stream.clone(),
                            off.to_string(),
                            &line,
                            error,
                            u64::from(*n),
                        ));
                    } else {
                        complete = false;
                    }
                }
                if complete && !exhausted.is_empty() {
                    postgres::write_batch(&self.db, &[], &exhausted)
                        .await
                        .map_err(|e| e.to_string())?;
                    dead_count += exhausted.len() as u64;
                }
            }
        }
        if complete {
            self.refused.clear();
        }
        if dead_count > 0 && complete {
            self.metrics.audit_dead_letters(dead_count);
        }
        Ok(complete)
    }
}

async fn pause_plain(stop: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

/// The checkpoint offset; 0 when there is none yet.
pub fn read_checkpoint(path: &Path) -> std::io::Result<u64> {
    match std::fs::read_to_string(path) {
        Ok(s) => s
            .trim()
            .parse()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

/// Replaces the checkpoint atomically (temporary file, then rename).
fn write_checkpoint(path: &Path, offset: u64) -> std::io::Result<()> {
    let tmp = path.with_extension("offset.tmp");
    {
        let mut f = File::create(&tmp)?;
        writeln!(f, "{offset}")?;
    }
    std::fs::rename(&tmp, path)
}

/// Reads up to `max` complete, non-blank lines from `offset`.
fn read_chunk(path: &Path, offset: u64, max: usize) -> std::io::Result<Chunk> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Chunk {
                end: offset,
                shrunk: offset > 0,
                ..Chunk::default()
            });
        }
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    if len < offset {
        return Ok(Chunk {
            end: offset,
            shrunk: true,
            ..Chunk::default()
        });
    }
    file.seek(SeekFrom::Start(offset))?;
    let mut reader = BufReader::with_capacity(64 * 1024, file);
    let mut chunk = Chunk {
        end: offset,
        ..Chunk::default()
    };
    let mut line = Vec::new();
    while chunk.lines.len() < max {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 || line.last() != Some(&b'\n') {
            // End of file, or a line still being written.
            return Ok(chunk);
        }
        let at = chunk.end;
        chunk.end += n as u64;
        line.pop();
        if !line.iter().all(u8::is_ascii_whitespace) {
            chunk.lines.push((at, line.clone()));
        }
    }
    // Count what is left, for the backlog gauge.
    let mut buf = [0u8; 64 * 1024];
    let mut scanned = 0u64;
    while scanned < BACKLOG_SCAN {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        scanned += n as u64;
        chunk.more += buf[..n].iter().filter(|b| **b == b'\n').count() as u64;
    }
    Ok(chunk)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_stop_at_partial_lines_and_skip_blank_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        std::fs::write(&path, b"{\"a\":1}\n\n{\"b\":2}\n{\"c\":3}\n{\"d\"").unwrap();
        let c = read_chunk(&path, 0, 10).unwrap();
        assert_eq!(c.lines.len(), 3);
        assert_eq!(c.lines[1], (9, b"{\"b\":2}".to_vec()));
        assert_eq!(c.end, 25);
        assert!(!c.shrunk);
        let c = read_chunk(&path, 0, 1).unwrap();
        assert_eq!(c.lines.len(), 1);
        assert_eq!(c.end, 8);
        assert_eq!(c.more, 3, "two more lines plus the blank one");
        let c = read_chunk(&path, 1000, 10).unwrap();
        assert!(c.shrunk);
        let cp = dir.path().join(OFFSET_FILE);
        assert_eq!(read_checkpoint(&cp).unwrap(), 0);
        write_checkpoint(&cp, 25).unwrap();
        assert_eq!(read_checkpoint(&cp).unwrap(), 25);
    }
}
