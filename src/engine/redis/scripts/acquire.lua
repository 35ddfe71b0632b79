-- acquire.lua: grant a lock, return the existing grant to its session, or report the holder
-- (queueing the requester when asked).
--
-- KEYS[1]  lock:<res>     KEYS[2]  fence:<res>   KEYS[3]  queue:<res>   KEYS[4]  waiters:<res>
-- KEYS[5]  due            KEYS[6]  audit         KEYS[7]  room:<room>   KEYS[8]  sess:<session>
-- ARGV[1]  shard prefix   ARGV[2]  lock key      ARGV[3]  room          ARGV[4]  action
-- ARGV[5]  user_id        ARGV[6]  name          ARGV[7]  session_id    ARGV[8]  node_id
-- ARGV[9]  ttl_ms         ARGV[10] lease_ms ('' = no lease)
-- ARGV[11] wait timeout ms ('' = do not queue)    ARGV[12] request_id ('' = none)
-- Returns  one item:
--   {"t":"granted","lock":L,"reentrant":bool}
--   {"t":"held","lock":L,"position":"n"|absent,"wait":"ms"}
-- Audit    lock_acquired | lock_denied | lock_waiting; nothing for a reentrant acquire.

local res = ARGV[2]
local req = {
    room = ARGV[3], action = ARGV[4], user_id = ARGV[5], name = ARGV[6],
    session_id = ARGV[7], node_id = ARGV[8], ttl_ms = tonumber(ARGV[9]),
    lease_ms = opt_num(ARGV[10]),
}
local wait_ms = opt_num(ARGV[11])
local request_id = opt_num(ARGV[12])

local R = load(res)
if not R.lock then
    -- Free: only expired waiters can be queued, so grant directly.
    local l = grant(R, req, false)
    finish(R)
    return { enc({ t = 'granted', lock = lock_out(res, l), reentrant = false }) }
end

local cur = R.lock
if cur.session_id == req.session_id and NOW < lock_end(cur) then
    return { enc({ t = 'granted', lock = lock_out(res, cur), reentrant = true }) }
end

local holder_left = math.max(cur.expires_at - NOW, 0)
local queued_at = find_waiter(R, req.session_id)
local ahead, position, kind, detail
if queued_at then
    ahead, position, kind = queued_at - 1, queued_at, 'lock_waiting'
    detail = { position = queued_at, already_queued = true }
elseif wait_ms then
    add_waiter(R, {
        session_id = req.session_id, user_id = req.user_id, name = req.name,
        node_id = req.node_id, room = req.room, action = req.action, ttl_ms = req.ttl_ms,
        lease_ms = req.lease_ms, deadline = NOW + wait_ms, request_id = request_id,
    })
    local n = #R.waiters
    ahead, position, kind = n - 1, n, 'lock_waiting'
    detail = { position = n, timeout_ms = wait_ms, request_id = request_id or cjson.null }
else
    ahead, position, kind = #R.waiters, nil, 'lock_denied'
    detail = { holder = { user_id = cur.user_id, session_id = cur.session_id, action = cur.action } }
end
detail.action = req.action
detail.ttl_ms = req.ttl_ms
-- An upper bound: the holder keeps the lock at most to its hold limit, and each waiter ahead
-- at most for its own hold limit (extensions aside).
local estimate = holder_left
for i = 1, ahead do
    estimate = estimate + R.waiters[i].ttl_ms
end
audit(kind, req, req.room, res, cur.token, detail)
finish(R)
return { enc({
    t = 'held', lock = lock_out(res, cur),
    position = position and int(position) or nil, wait = int(estimate),
}) }
