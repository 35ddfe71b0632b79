-- presence_update: compare-and-set of one member's JSON (the patch is applied by the caller,
-- which owns the JSON format; Lua's cjson would rewrite numbers and empty arrays).
-- A successful update also renews the member's expiry: its session just spoke.
--
-- KEYS[1]  ps:{<room>}:members   hash  session id -> member JSON
-- KEYS[2]  ps:{<room>}:expiry    zset  session id -> expiry instant (ms, server clock)
-- ARGV[1]  session id
-- ARGV[2]  the member JSON the patch was applied to (expected current value)
-- ARGV[3]  the new member JSON
-- ARGV[4]  ttl (ms)
--
-- Returns {1, previous expiry or false, new expiry} when written,
--         {0, current JSON} when the entry changed since it was read (the caller retries),
--         {-1} when the session is not a member of the room.
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur then
  return {-1}
end
if cur ~= ARGV[2] then
  return {0, cur}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expiry = now + tonumber(ARGV[4])
local old_expiry = redis.call('ZSCORE', KEYS[2], ARGV[1])
if old_expiry then
  old_expiry = tonumber(old_expiry)
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('ZADD', KEYS[2], expiry, ARGV[1])
return {1, old_expiry, expiry}
