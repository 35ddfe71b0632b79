-- extend.lua: compare-and-extend on the token: the hold limit becomes now + ttl_ms and a lease
-- is renewed with its original duration. A lock past its end (not reaped yet) is refused.
--
-- KEYS[1]  lock:<res>     KEYS[2]  fence:<res>   KEYS[3]  queue:<res>   KEYS[4]  waiters:<res>
-- KEYS[5]  due            KEYS[6]  audit
-- ARGV[1]  shard prefix   ARGV[2]  lock key      ARGV[3]  token (decimal)   ARGV[4]  ttl_ms
-- Returns  one item: {"t":"extended","lock":L} | {"t":"not_held","current":L|absent}
-- Audit    lock_extended {ttl_ms, expires_at}.

local res, token, ttl_ms = ARGV[2], ARGV[3], tonumber(ARGV[4])
local R = load(res)
local l = R.lock
if l and l.token == token and NOW < lock_end(l) then
    l.expires_at = NOW + ttl_ms
    if l.lease_until > 0 then
        l.lease_until = NOW + l.lease_ms
    end
    redis.call('HSET', key('lock', res), 'expires_at', int(l.expires_at),
        'lease_until', int(l.lease_until))
    audit('lock_extended', l, l.room, res, l.token,
        { ttl_ms = ttl_ms, expires_at = l.expires_at })
    finish(R)
    return { enc({ t = 'extended', lock = lock_out(res, l) }) }
end
return { enc({ t = 'not_held', current = l and lock_out(res, l) or nil }) }
