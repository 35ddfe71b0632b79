-- Storage-side fencing.
--
-- lockstep.fences holds, per resource, the highest fencing token registered. Nodes register
-- every grant here (strictly above the registered token) before returning it, so a token that
-- went backwards in Redis (data loss, failover) is refused instead of handed out.
CREATE TABLE lockstep.fences (
    resource   text        PRIMARY KEY,
    token      bigint      NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Registers a new grant's token: true if it is above every token registered for the resource
-- (and records it), false otherwise (the grant must be refused).
CREATE FUNCTION lockstep.fence_register(p_resource text, p_token bigint)
RETURNS boolean LANGUAGE sql AS $$
    WITH up AS (
        INSERT INTO lockstep.fences AS f (resource, token) VALUES (p_resource, p_token)
        ON CONFLICT (resource) DO UPDATE SET token = EXCLUDED.token, updated_at = now()
        WHERE f.token < EXCLUDED.token
        RETURNING 1
    )
    SELECT EXISTS (SELECT 1 FROM up)
$$;

-- For apps, inside their own transaction before a protected write: true if `p_token` is the
-- highest token seen for the resource (recording it when it is higher), false for a lower,
-- stale one. The row lock taken here is held until the app's transaction ends, so two writers
-- are serialized and a stale holder can never overwrite newer work:
--
--   BEGIN;
--   SELECT lockstep.fence_check('segment:42-7', $token);   -- false: ROLLBACK, you lost the lock
--   UPDATE segments SET approved_by = … WHERE id = '42-7';
--   COMMIT;
CREATE FUNCTION lockstep.fence_check(p_resource text, p_token bigint)
RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    current bigint;
BEGIN
    INSERT INTO lockstep.fences (resource, token) VALUES (p_resource, p_token)
    ON CONFLICT (resource) DO NOTHING;
    SELECT token INTO current FROM lockstep.fences WHERE resource = p_resource FOR UPDATE;
    IF p_token < current THEN
        RETURN false;
    END IF;
    IF p_token > current THEN
        UPDATE lockstep.fences SET token = p_token, updated_at = now() WHERE resource = p_resource;
    END IF;
    RETURN true;
END
$$;
