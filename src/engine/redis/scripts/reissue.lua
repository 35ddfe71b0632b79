-- reissue.lua: give the live lock held with a token a fresh token from the fence counter (after
-- raise_fence: one above the raised value), keeping holder, room, action, since, hold limit and
-- lease. Strict fencing retries a refused grant this way, in place.
--
-- KEYS[1]  lock:<res>     KEYS[2]  fence:<res>   KEYS[3]  queue:<res>   KEYS[4]  waiters:<res>
-- KEYS[5]  due            KEYS[6]  audit
-- ARGV[1]  shard prefix   ARGV[2]  lock key      ARGV[3]  token (decimal)
-- Returns  one item: {"t":"reissued","lock":L} | {"t":"not_held","current":L|absent}
-- Audit    lock_acquired {action, via: "reissue", replaces: "<old token>"} with the new token.

local res, token = ARGV[2], ARGV[3]
local l = load_lock(res)
if l and l.token == token and NOW < lock_end(l) then
    l.token = next_token(res)
    redis.call('HSET', key('lock', res), 'token', l.token)
    audit('lock_acquired', l, l.room, res, l.token,
        { action = l.action, via = 'reissue', replaces = token })
    return { enc({ t = 'reissued', lock = lock_out(res, l) }) }
end
return { enc({ t = 'not_held', current = l and lock_out(res, l) or nil }) }
