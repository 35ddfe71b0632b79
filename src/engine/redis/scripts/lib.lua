-- lib.lua: helpers shared by every lock script. `locks.rs` prepends this file to each script
-- when it builds the `Script` (once per store), so the locals below are in scope in all of them.
--
-- Conventions of every lock script:
--   ARGV[1]  the shard's key prefix, `lockstep:ls:{ls<N>}:` (keys::shard_prefix). The other keys
--            of the shard are named from it below, exactly as `keys.rs` names them. They all
--            carry the shard's `{ls<N>}` hash tag, so a script touches one Cluster slot; each
--            script's KEYS declare the keys known before the call (fred routes on KEYS[1]).
--   Clock    the Redis server's (`TIME`), ms for instants, µs for fencing tokens. Never a node's:
--            nodes' clocks may disagree, Redis' is the one every decision shares.
--   Returns  an array of JSON strings (cjson), parsed in one place in locks.rs (`Item`).
--            Numbers that may not fit cjson's 14 significant digits (tokens, instants) travel as
--            decimal strings.
--
-- Lock identity: `res` below is always the lock KEY `<room>/<resource>` (keys::LockKey's text;
-- `/` cannot occur in entity names): the same resource locked in two rooms is two locks, with
-- their own holder, queue and fence counter. `res_of(res)` is the resource part, what records
-- and results name.
--
-- Data of a lock (all in its shard):
--   lock:<res>     hash  token room resource user_id name session_id node_id action since
--                        expires_at lease_until lease_ms (lease_until = 0: no lease). Held
--                        until reaped.
--   fence:<res>    string, last token issued; never decreases; expires FENCE_TTL_MS after its
--                  last write (an idle counter restarts from the clock, above it).
--   queue:<res>    list of waiting session ids, head first; waiters:<res> hash sid -> JSON.
--   due            zset res -> next instant something is due (lock end, earliest deadline).
--   room:<room>    set of lock keys locked in room; sess:<sid> set of lock keys sid holds or
--                  waits for.
--   audit          stream, one entry per audit record: field `rec` = the record's JSON.

local PREFIX = ARGV[1]
-- ARGV[2] is added by locks.rs (`run`) to every call: the fence keys' retention in ms. It is
-- taken out here, so every script's own arguments keep the positions its header lists.
local FENCE_TTL_MS = tonumber(ARGV[2])
table.remove(ARGV, 2)
local TIME = redis.call('TIME')
local NOW = tonumber(TIME[1]) * 1000 + math.floor(tonumber(TIME[2]) / 1000)
local NOW_US = tonumber(TIME[1]) * 1000000 + tonumber(TIME[2])
-- Safety-net expiry past a lock's (or the last waiter's) end; see `finish`.
local SAFETY_MS = 30000
-- The audit stream is not trimmed here: the nodes trim it (only past what the Postgres writer
-- acknowledged, or to a bounded ring without a database; see src/audit/outbox.rs).

local DUE = PREFIX .. 'due'
local AUDIT = PREFIX .. 'audit'

-- An integral number as a decimal string (no exponent, exact below 2^53).
local function int(x)
    return string.format('%.0f', x)
end

local function key(kind, name)
    return PREFIX .. kind .. ':' .. name
end

-- The resource part of a lock key `<room>/<resource>`.
local function res_of(k)
    local slash = string.find(k, '/', 1, true)
    if not slash then
        return k
    end
    return string.sub(k, slash + 1)
end

-- An optional JSON object argument ('' = none).
local function opt_json(s)
    if s == nil or s == '' then
        return nil
    end
    return cjson.decode(s)
end

local function enc(t)
    return cjson.encode(t)
end

-- When a lock stops being live: the earlier of its hold limit and its lease.
local function lock_end(l)
    if l.lease_until > 0 and l.lease_until < l.expires_at then
        return l.lease_until
    end
    return l.expires_at
end

local function lock_out(res, l)
    return {
        room = l.room, resource = l.resource or res_of(res), token = l.token, user_id = l.user_id, name = l.name,
        session_id = l.session_id, node_id = l.node_id, action = l.action,
        since = int(l.since), expires_at = int(l.expires_at),
    }
end

-- The lock of a resource, or nil.
local function load_lock(res)
    local h = redis.call('HGETALL', key('lock', res))
    if #h == 0 then
        return nil
    end
    local l = {}
    for i = 1, #h, 2 do
        l[h[i]] = h[i + 1]
    end
    if not (l.token and l.session_id) then
        return nil
    end
    l.since = tonumber(l.since) or 0
    l.expires_at = tonumber(l.expires_at) or 0
    l.lease_until = tonumber(l.lease_until) or 0
    l.lease_ms = tonumber(l.lease_ms) or 0
    return l
end

-- Loads a resource: its lock (or nil) and its waiters in queue order.
local function load(res)
    local R = { res = res, lock = load_lock(res), waiters = {} }
    local ids = redis.call('LRANGE', key('queue', res), 0, -1)
    if #ids > 0 then
        local raw = redis.call('HGETALL', key('waiters', res))
        local by = {}
        for i = 1, #raw, 2 do
            by[raw[i]] = raw[i + 1]
        end
        for _, sid in ipairs(ids) do
            local j = by[sid]
            if j then
                local w = cjson.decode(j)
                w.ttl_ms = tonumber(w.ttl_ms)
                w.lease_ms = w.lease_ms and tonumber(w.lease_ms)
                w.deadline = tonumber(w.deadline)
                w.request_id = w.request_id and tonumber(w.request_id)
                R.waiters[#R.waiters + 1] = w
            end
        end
    end
    return R
end

local function find_waiter(R, sid)
    for i, w in ipairs(R.waiters) do
        if w.session_id == sid then
            return i
        end
    end
    return nil
end

-- Raises a key's expiry to at least `ms` from now (never lowers it; no-op for a missing key).
local function extend_ttl(k, ms)
    local cur = redis.call('PTTL', k)
    if cur == -1 or (cur >= 0 and cur < ms) then
        redis.call('PEXPIRE', k, int(ms))
    end
end

-- Drops `res` from the session's index unless the session still holds or waits for it.
local function unlink_session(R, sid)
    if (R.lock and R.lock.session_id == sid) or find_waiter(R, sid) then
        return
    end
    redis.call('SREM', key('sess', sid), R.res)
end

-- Appends one audit record to the shard's stream. `who` has user_id, session_id, node_id;
-- `res` is the lock key (the record names its resource part); `token` is a decimal string or
-- nil; `actor` (optional) is who acted on `who`'s lock. `at` and `token` are spliced in as
-- exact JSON numbers.
local function audit(kind, who, room, res, token, detail, actor)
    local body = cjson.encode({
        kind = kind, room = room, resource = res_of(res), user_id = who.user_id,
        session_id = who.session_id, node_id = who.node_id, detail = detail, actor = actor,
    })
    local head = '{"at":' .. int(NOW)
    if token then
        head = head .. ',"token":' .. token
    end
    local rec
    if body == '{}' then
        rec = head .. '}'
    else
        rec = head .. ',' .. string.sub(body, 2)
    end
    redis.call('XADD', AUDIT, '*', 'rec', rec)
end

local function remove_waiter(R, i)
    local w = table.remove(R.waiters, i)
    redis.call('LREM', key('queue', R.res), 1, w.session_id)
    redis.call('HDEL', key('waiters', R.res), w.session_id)
    unlink_session(R, w.session_id)
    return w
end

local function add_waiter(R, w)
    R.waiters[#R.waiters + 1] = w
    redis.call('RPUSH', key('queue', R.res), w.session_id)
    redis.call('HSET', key('waiters', R.res), w.session_id, cjson.encode({
        session_id = w.session_id, user_id = w.user_id, name = w.name, node_id = w.node_id,
        room = w.room, action = w.action, ttl_ms = int(w.ttl_ms),
        lease_ms = w.lease_ms and int(w.lease_ms) or nil, deadline = int(w.deadline),
        request_id = w.request_id and int(w.request_id) or nil,
    }))
    redis.call('SADD', key('sess', w.session_id), R.res)
    extend_ttl(key('sess', w.session_id), math.max(w.deadline - NOW, 0) + SAFETY_MS)
end

-- The next fencing token: max(last + 1, server time in µs). Seeding from the clock keeps tokens
-- increasing even when Redis lost the counter (restart without persistence, failover).
local function next_token(res)
    local fk = key('fence', res)
    local last = tonumber(redis.call('GET', fk) or '0') or 0
    local token = int(math.max(last + 1, NOW_US))
    redis.call('SET', fk, token, 'PX', int(FENCE_TTL_MS))
    return token
end

-- Grants the (free) resource to `spec` (a request or a waiter) and records `lock_acquired`.
local function grant(R, spec, via_queue)
    local token = next_token(R.res)
    local l = {
        token = token, room = spec.room, user_id = spec.user_id, name = spec.name,
        session_id = spec.session_id, node_id = spec.node_id, action = spec.action,
        since = NOW, expires_at = NOW + spec.ttl_ms,
        lease_until = spec.lease_ms and (NOW + spec.lease_ms) or 0,
        lease_ms = spec.lease_ms or 0,
    }
    R.lock = l
    -- The new holder's own queue entry (necessarily expired) is answered by this grant.
    local i = find_waiter(R, l.session_id)
    if i then
        remove_waiter(R, i)
    end
    redis.call('HSET', key('lock', R.res), 'token', l.token, 'room', l.room,
        'resource', res_of(R.res), 'user_id', l.user_id, 'name', l.name, 'session_id', l.session_id,
        'node_id', l.node_id, 'action', l.action, 'since', int(l.since),
        'expires_at', int(l.expires_at), 'lease_until', int(l.lease_until),
        'lease_ms', int(l.lease_ms))
    redis.call('SADD', key('sess', l.session_id), R.res)
    redis.call('SADD', key('room', l.room), R.res)
    local detail = { action = l.action, ttl_ms = spec.ttl_ms }
    if via_queue then
        detail.via = 'queue'
        detail.request_id = spec.request_id or cjson.null
    else
        detail.via = 'request'
    end
    audit('lock_acquired', l, l.room, R.res, token, detail)
    return l
end

local RELEASE_KIND = {
    released = 'lock_released', expired = 'lock_expired',
    disconnected = 'lock_disconnected', forced = 'lock_forced',
    revoked = 'lock_revoked',
}

-- Ends the current lock for `reason` and hands it to the first waiter whose deadline has not
-- passed, in this same step. Expired waiters stay queued for the reaper to report. `actor`
-- (a table) is who ended somebody else's lock; `withdrawn` (a reason string) records the end
-- as `lock_withdrawn` instead: a grant taken back before its token was told to anyone.
local function end_lock(R, reason, actor, withdrawn)
    local l = R.lock
    R.lock = nil
    redis.call('DEL', key('lock', R.res))
    redis.call('SREM', key('room', l.room), R.res)
    unlink_session(R, l.session_id)
    if withdrawn then
        audit('lock_withdrawn', l, l.room, R.res, l.token, { reason = withdrawn })
    else
        audit(RELEASE_KIND[reason], l, l.room, R.res, l.token,
            actor and { by = actor.user_id } or nil, actor)
    end
    local out = { t = 'released', lock = lock_out(R.res, l), reason = reason }
    for i, w in ipairs(R.waiters) do
        if w.deadline > NOW then
            remove_waiter(R, i)
            local g = grant(R, w, true)
            out.granted = {
                lock = lock_out(R.res, g),
                request_id = w.request_id and int(w.request_id) or nil,
            }
            break
        end
    end
    return out
end

-- Removes `sid`'s queue entry (if any, and in one of `rooms` when given) and records `kind`.
local function drop_wait(R, sid, rooms, kind)
    local i = find_waiter(R, sid)
    if not i then
        return false
    end
    local w = R.waiters[i]
    if rooms and not rooms[w.room] then
        return false
    end
    remove_waiter(R, i)
    audit(kind, w, w.room, R.res, nil, { request_id = w.request_id or cjson.null })
    return true
end

-- Files the resource again after an operation: its `due` score (the earliest of its lock's end
-- and its waiters' deadlines, or none), and the safety-net expiries. A lock stays held until the
-- reaper ends it; the key expiry (its end + SAFETY_MS) only cleans up when no node runs a reaper.
local function finish(R)
    local nxt = nil
    local last_deadline = nil
    if R.lock then
        nxt = lock_end(R.lock)
    end
    for _, w in ipairs(R.waiters) do
        if not nxt or w.deadline < nxt then
            nxt = w.deadline
        end
        if not last_deadline or w.deadline > last_deadline then
            last_deadline = w.deadline
        end
    end
    if nxt then
        local s = int(nxt)
        if redis.call('ZSCORE', DUE, R.res) ~= s then
            redis.call('ZADD', DUE, s, R.res)
        end
    else
        redis.call('ZREM', DUE, R.res)
    end
    if R.lock then
        local ttl = math.max(lock_end(R.lock) - NOW, 0) + SAFETY_MS
        redis.call('PEXPIRE', key('lock', R.res), int(ttl))
        extend_ttl(key('room', R.lock.room), ttl)
        extend_ttl(key('sess', R.lock.session_id), ttl)
    end
    if last_deadline then
        local ttl = int(math.max(last_deadline - NOW, 0) + SAFETY_MS)
        redis.call('PEXPIRE', key('queue', R.res), ttl)
        redis.call('PEXPIRE', key('waiters', R.res), ttl)
    end
end

-- Parses an optional numeric argument ('' = none).
local function opt_num(s)
    if s == nil or s == '' then
        return nil
    end
    return tonumber(s)
end
