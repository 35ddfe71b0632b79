-- presence_leave: removes one member of a room.
--
-- KEYS[1]  ps:{<room>}:members   hash  session id -> member JSON
-- KEYS[2]  ps:{<room>}:expiry    zset  session id -> expiry instant (ms, server clock)
-- ARGV[1]  session id
--
-- Returns {removed JSON or false, its expiry or false}. Whoever removes an entry (leave or
-- sweep) is the only one to get it back, so its departure is announced exactly once.
local old = redis.call('HGET', KEYS[1], ARGV[1])
local old_expiry = redis.call('ZSCORE', KEYS[2], ARGV[1])
if old then
  redis.call('HDEL', KEYS[1], ARGV[1])
end
if old_expiry then
  redis.call('ZREM', KEYS[2], ARGV[1])
  old_expiry = tonumber(old_expiry)
end
return {old, old_expiry}
