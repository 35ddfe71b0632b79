-- Audit records: one row per lock decision, conflict, session event, auth failure, denial.
-- Written by the outbox writer (batches, ON CONFLICT (id) DO NOTHING), read by GET /v1/audit.
CREATE SCHEMA IF NOT EXISTS lockstep;

CREATE TABLE lockstep.audit_events (
    id         uuid        PRIMARY KEY,
    at         timestamptz NOT NULL,
    kind       text        NOT NULL,
    room       text,
    resource   text,
    user_id    text,
    session_id text,
    node_id    text        NOT NULL,
    token      bigint,
    detail     jsonb       NOT NULL DEFAULT '{}'::jsonb
);

-- "Who touched this resource / what did this user do / all conflicts", newest first; the id
-- breaks ties for keyset pagination.
CREATE INDEX audit_events_resource_at ON lockstep.audit_events (resource, at DESC, id DESC);
CREATE INDEX audit_events_user_at     ON lockstep.audit_events (user_id, at DESC, id DESC);
CREATE INDEX audit_events_kind_at     ON lockstep.audit_events (kind, at DESC, id DESC);
CREATE INDEX audit_events_room_at     ON lockstep.audit_events (room, at DESC, id DESC);
CREATE INDEX audit_events_at          ON lockstep.audit_events (at DESC, id DESC);

-- Outbox entries that could not be inserted after repeated attempts (malformed records):
-- kept here, acknowledged in the stream, so one bad entry never blocks the rest.
CREATE TABLE lockstep.audit_dead_letters (
    stream     text        NOT NULL,
    entry_id   text        NOT NULL,
    payload    text        NOT NULL,
    error      text        NOT NULL,
    attempts   integer     NOT NULL,
    failed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream, entry_id)
);

-- Retention: delete records older than `keep` in batches (called by the nodes' pruning job
-- when LOCKSTEP_AUDIT_RETENTION is set; safe to run from several nodes at once).
CREATE FUNCTION lockstep.prune_audit(keep interval, batch integer DEFAULT 10000)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    removed bigint := 0;
    n bigint;
BEGIN
    LOOP
        DELETE FROM lockstep.audit_events
        WHERE id IN (
            SELECT id FROM lockstep.audit_events
            WHERE at < now() - keep
            LIMIT batch
            FOR UPDATE SKIP LOCKED
        );
        GET DIAGNOSTICS n = ROW_COUNT;
        removed := removed + n;
        EXIT WHEN n < batch;
    END LOOP;
    RETURN removed;
END
$$;
