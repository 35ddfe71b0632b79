-- release.lua: compare-and-delete on the token; the head live waiter is granted in this step.
--
-- KEYS[1]  lock:<res>     KEYS[2]  fence:<res>   KEYS[3]  queue:<res>   KEYS[4]  waiters:<res>
-- KEYS[5]  due            KEYS[6]  audit
-- ARGV[1]  shard prefix   ARGV[2]  resource      ARGV[3]  token (decimal)
-- ARGV[4]  reason: released | expired | disconnected | forced
-- Returns  one item:
--   {"t":"released","lock":L,"reason":r,"granted":{"lock":L,"request_id":"n"|absent}|absent}
--   {"t":"not_held","current":L|absent}
-- Audit    lock_<reason> (+ lock_acquired for the hand-off).

local res, token, reason = ARGV[2], ARGV[3], ARGV[4]
local R = load(res)
if R.lock and R.lock.token == token then
    local out = end_lock(R, reason, nil)
    finish(R)
    return { enc(out) }
end
return { enc({ t = 'not_held', current = R.lock and lock_out(res, R.lock) or nil }) }
