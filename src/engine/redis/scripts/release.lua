-- release.lua: compare-and-delete on the token; the head live waiter is granted in this step.
--
-- KEYS[1]  lock:<res>     KEYS[2]  fence:<res>   KEYS[3]  queue:<res>   KEYS[4]  waiters:<res>
-- KEYS[5]  due            KEYS[6]  audit
-- ARGV[1]  shard prefix   ARGV[2]  lock key      ARGV[3]  token (decimal)
-- ARGV[4]  reason: released | expired | disconnected | forced
-- ARGV[5]  actor JSON {user_id, session_id?, node_id, via} ('' = the holder itself)
-- ARGV[6]  withdrawal reason ('' = a release): recorded as lock_withdrawn {reason} instead
-- Returns  one item:
--   {"t":"released","lock":L,"reason":r,"granted":{"lock":L,"request_id":"n"|absent}|absent}
--   {"t":"not_held","current":L|absent}
-- Audit    lock_<reason> {by}+actor, or lock_withdrawn {reason} (+ lock_acquired for the hand-off).

local res, token, reason = ARGV[2], ARGV[3], ARGV[4]
local actor = opt_json(ARGV[5])
local withdrawn = ARGV[6] ~= nil and ARGV[6] ~= '' and ARGV[6] or nil
local R = load(res)
if R.lock and R.lock.token == token then
    local out = end_lock(R, reason, actor, withdrawn)
    finish(R)
    return { enc(out) }
end
return { enc({ t = 'not_held', current = R.lock and lock_out(res, R.lock) or nil }) }
