-- raise_fence.lua: raise a resource's fencing counter to at least a value (never lower it), so
-- the next grant's token is above it. Strict fencing calls it when Postgres refused a token
-- because a higher one was registered (this counter went backwards: data loss, failover).
--
-- KEYS[1]  fence:<res>
-- ARGV[1]  shard prefix   ARGV[2]  lock key      ARGV[3]  at_least (decimal, below 2^53)
-- Returns  [] (nothing). Changes no lock; no audit record.

local fk = key('fence', ARGV[2])
local at_least = tonumber(ARGV[3])
local last = tonumber(redis.call('GET', fk) or '0') or 0
if at_least and at_least > last then
    redis.call('SET', fk, int(at_least), 'PX', int(FENCE_TTL_MS))
end
return {}
