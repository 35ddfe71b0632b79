-- V4: compacted Yjs documents (issue 11).
--
-- One row per document: its whole state as one Yjs v1 update, the last update-log entry
-- merged into it (`covers`, a Redis stream id `<ms>-<seq>` as two bigints; NULL: none yet),
-- and the fencing token of the compaction lock its writer held. The log is trimmed only
-- through `covers` of a committed row, so this row plus the log after `covers` is the whole
-- document.
--
-- Writers upsert with the stale-writer check inside the statement (src/yjs/snapshots/
-- postgres.rs): the row changes only if the new fence is not lower and the new coverage is
-- not lower; no row changed means the writer was stale.
CREATE TABLE lockstep.documents (
    doc         text        PRIMARY KEY,
    state       bytea       NOT NULL,
    covers_ms   bigint,
    covers_seq  bigint,
    fence       bigint      NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CHECK ((covers_ms IS NULL) = (covers_seq IS NULL))
);
