-- refresh_leases.lua: renews the leases of (resource, token) grants of one shard. A grant is
-- renewed when its token is the holder's and the lock is still inside its hold limit and lease;
-- a lock without a lease (HTTP) is left as it is.
--
-- KEYS[1]  due
-- ARGV[1]  shard prefix   ARGV[2]  lease_ms
-- ARGV[3], ARGV[4], ...   lock key, token (decimal) pairs
-- Returns  one {"t":"lost","key":lock key,"token":"n"} item per grant no longer held.
-- Audit    none.

local lease_ms = tonumber(ARGV[2])
local out = {}
for i = 3, #ARGV - 1, 2 do
    local res, token = ARGV[i], ARGV[i + 1]
    local R = load(res)
    local l = R.lock
    if l and l.token == token and NOW < lock_end(l) then
        if l.lease_until > 0 then
            l.lease_until = NOW + lease_ms
            redis.call('HSET', key('lock', res), 'lease_until', int(l.lease_until))
            finish(R)
        end
    else
        out[#out + 1] = enc({ t = 'lost', key = res, token = token })
    end
end
return out
