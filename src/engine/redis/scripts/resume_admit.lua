-- Admits a session under the per-user session limit, cluster-wide.
-- KEYS[1]  us:{<user>}:sessions   zset  session id -> expiry instant (ms, server clock),
--                                       refreshed by the node holding the session (attached
--                                       or parked); entries of a dead node lapse
-- ARGV[1]  session id
-- ARGV[2]  limit
-- ARGV[3]  ttl (ms) of the entry
-- Returns  {1, count} when admitted (or already counted: a resume), {0, count} when the user
--          already has `limit` live sessions.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local expiry = now + tonumber(ARGV[3])
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], expiry, ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return {1, redis.call('ZCARD', KEYS[1])}
end
local count = redis.call('ZCARD', KEYS[1])
if count >= tonumber(ARGV[2]) then
  return {0, count}
end
redis.call('ZADD', KEYS[1], expiry, ARGV[1])
-- The set goes with its last entry: every refresh pushes this forward.
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {1, count + 1}
