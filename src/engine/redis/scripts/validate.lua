-- validate.lua: whether a token is the live holder of a lock now, by the server's clock: the
-- token matches and the lock is inside its hold limit and its lease (`lock_end`).
--
-- KEYS[1]  lock:<res>
-- ARGV[1]  shard prefix   ARGV[2]  lock key      ARGV[3]  token (decimal, only compared)
-- Returns  [] when nothing holds the lock, else one {"t":"validated","valid":bool,"lock":L}.
-- Writes   nothing.

local res, token = ARGV[2], ARGV[3]
local l = load_lock(res)
if not l then
    return {}
end
local valid = l.token == token and NOW < lock_end(l)
return { enc({ t = 'validated', valid = valid, lock = lock_out(res, l) }) }
