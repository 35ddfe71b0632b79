-- reap.lua: one shard's due work: waiters past their deadline leave the queue, then locks past
-- their hold limit (expired) or lease (disconnected) end and go to the next live waiter. At most
-- ARGV[2] resources per call, earliest due first; each resource's due score is recomputed.
--
-- KEYS[1]  due            KEYS[2]  audit
-- ARGV[1]  shard prefix   ARGV[2]  max resources this call
-- Returns  {"t":"wait_expired","room":..,"resource":..,"session_id":..,"request_id":"n"|absent}
--          and {"t":"released",...} items, in order; a last {"t":"more"} when the limit was hit.
-- Audit    lock_wait_expired {request_id}, lock_expired / lock_disconnected (+ hand-offs).

local limit = tonumber(ARGV[2])
local due = redis.call('ZRANGEBYSCORE', DUE, '-inf', int(NOW), 'LIMIT', 0, limit)
local out = {}
for _, res in ipairs(due) do
    local R = load(res)
    -- Waiters first: one past its deadline must not be granted the lock freed below.
    local i = 1
    while i <= #R.waiters do
        local w = R.waiters[i]
        if w.deadline > NOW then
            i = i + 1
        else
            remove_waiter(R, i)
            audit('lock_wait_expired', w, w.room, res, nil,
                { request_id = w.request_id or cjson.null })
            out[#out + 1] = enc({
                t = 'wait_expired', room = w.room, resource = res_of(res),
                session_id = w.session_id,
                request_id = w.request_id and int(w.request_id) or nil,
            })
        end
    end
    local l = R.lock
    if l then
        local reason = nil
        if NOW >= l.expires_at then
            reason = 'expired'
        elseif l.lease_until > 0 and NOW >= l.lease_until then
            reason = 'disconnected'
        end
        if reason then
            out[#out + 1] = enc(end_lock(R, reason, nil, nil))
        end
    end
    finish(R)
end
if #due >= limit then
    out[#out + 1] = enc({ t = 'more' })
end
return out
