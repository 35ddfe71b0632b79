-- cancel_wait.lua: takes a session out of a resource's queue.
--
-- KEYS[1]  queue:<res>    KEYS[2]  waiters:<res> KEYS[3]  due           KEYS[4]  audit
-- ARGV[1]  shard prefix   ARGV[2]  lock key      ARGV[3]  session_id
-- Returns  one item: {"t":"cancelled","ok":bool}
-- Audit    lock_wait_cancelled {request_id} when it was waiting.

local res, sid = ARGV[2], ARGV[3]
local R = load(res)
local ok = drop_wait(R, sid, nil, 'lock_wait_cancelled')
if ok then
    finish(R)
end
return { enc({ t = 'cancelled', ok = ok }) }
