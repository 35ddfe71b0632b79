-- V3: locks belong to a room; fencing accepts only issued tokens; audit names the actor.
--
-- 1. Lock identity is (room, resource): `segment:42-7` locked in `scene:1` and in `scene:42`
--    are two locks with independent fencing counters. `lockstep.fences` is keyed by that pair.
--    The V2 rows (keyed by resource alone) are dropped: tokens are `max(last + 1, Redis time
--    in µs)`, so the first token of a fresh counter is above every token issued before the
--    upgrade (see docs/fencing.md, "Upgrading to room-bound locks"), and dropping them also
--    discards any value an app poisoned through the old `fence_check`.
-- 2. `fence_check(room, resource, token)` never writes: true for the registered token, false
--    for a lower (stale) one, and SQLSTATE LS001 for a token above the registered one or a
--    lock with no registered grant ("never issued"). The V2 two-argument `fence_check` and
--    `fence_register` raise LS002 so old callers fail loudly instead of passing silently.
-- 3. `audit_events.actor`: who acted on somebody else's lock (forced releases).

DROP FUNCTION lockstep.fence_check(text, bigint);
DROP FUNCTION lockstep.fence_register(text, bigint);
DROP TABLE lockstep.fences;

CREATE TABLE lockstep.fences (
    room       text        NOT NULL,
    resource   text        NOT NULL,
    token      bigint      NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (room, resource)
);
-- Retention (`fence_prune`) deletes by token.
CREATE INDEX fences_token ON lockstep.fences (token);

-- Nodes register every grant's token here (strictly above the registered one) before it is
-- returned: true if it was above (and is now the registered one), false otherwise (the lock
-- store's counter went backwards: the grant must be refused and reissued).
CREATE FUNCTION lockstep.fence_register(p_room text, p_resource text, p_token bigint)
RETURNS boolean LANGUAGE sql AS $$
    WITH up AS (
        INSERT INTO lockstep.fences AS f (room, resource, token)
        VALUES (p_room, p_resource, p_token)
        ON CONFLICT (room, resource) DO UPDATE SET token = EXCLUDED.token, updated_at = now()
        WHERE f.token < EXCLUDED.token
        RETURNING 1
    )
    SELECT EXISTS (SELECT 1 FROM up)
$$;

-- For apps, inside their own transaction before a protected write:
--   true   p_token is the registered (newest) grant of the lock: go ahead;
--   false  p_token is lower: a stale holder, ROLLBACK;
--   raises SQLSTATE 'LS001' when p_token is above the registered one, or the lock has no
--          registered grant: the token was never issued (forged, or from another lock).
-- It never writes a token. The row lock (FOR UPDATE) is held until the app's transaction
-- ends, so a newer grant's registration waits for a write made under the older token:
--
--   BEGIN;
--   SELECT lockstep.fence_check('scene:42', 'segment:42-7', $token);  -- false: ROLLBACK
--   UPDATE segments SET approved_by = … WHERE id = '42-7';
--   COMMIT;
CREATE FUNCTION lockstep.fence_check(p_room text, p_resource text, p_token bigint)
RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    current bigint;
BEGIN
    SELECT token INTO current FROM lockstep.fences
    WHERE room = p_room AND resource = p_resource FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no fencing token was ever issued for % in %', p_resource, p_room
            USING ERRCODE = 'LS001',
                  HINT = 'the token was not issued by lockstep for this (room, resource)';
    END IF;
    IF p_token > current THEN
        RAISE EXCEPTION 'fencing token % was never issued for % in %', p_token, p_resource, p_room
            USING ERRCODE = 'LS001',
                  HINT = 'the token was not issued by lockstep for this (room, resource)';
    END IF;
    RETURN p_token = current;
END
$$;

-- The V2 signatures, neutralised: an app still calling them must not silently pass.
CREATE FUNCTION lockstep.fence_check(p_resource text, p_token bigint)
RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'lockstep.fence_check(resource, token) was removed: locks belong to a room'
        USING ERRCODE = 'LS002',
              HINT = 'call lockstep.fence_check(room, resource, token)';
END
$$;

-- Retention: deletes fence rows whose token is below `below_token` (µs since the epoch of
-- (now − retention), computed by the node), in batches; returns how many. A counter idle that
-- long restarts above its old token anyway (tokens are seeded from the clock in µs).
CREATE FUNCTION lockstep.fence_prune(below_token bigint, batch integer DEFAULT 10000)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    removed bigint := 0;
    n bigint;
BEGIN
    LOOP
        DELETE FROM lockstep.fences
        WHERE (room, resource) IN (
            SELECT room, resource FROM lockstep.fences
            WHERE token < below_token
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

ALTER TABLE lockstep.audit_events ADD COLUMN actor jsonb;
CREATE INDEX audit_events_actor_at
    ON lockstep.audit_events ((actor->>'user_id'), at DESC, id DESC);
