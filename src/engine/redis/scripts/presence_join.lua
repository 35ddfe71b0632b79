-- presence_join: adds or replaces one member of a room.
--
-- KEYS[1]  ps:{<room>}:members   hash  session id -> member JSON
-- KEYS[2]  ps:{<room>}:expiry    zset  session id -> expiry instant (ms, server clock)
-- ARGV[1]  session id
-- ARGV[2]  member JSON
-- ARGV[3]  ttl (ms)
-- ARGV[4]  members cap of the room
--
-- Returns {previous JSON or false, previous expiry or false, new expiry}, or
-- {false, false, -1} when the session is new to the room and the room already has ARGV[4]
-- live members (nothing written). Check and add are one step, so the cap holds across nodes.
-- A previous entry is returned even if it had expired but was not swept yet: the caller
-- replaced it, so no sweep will ever announce it.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expiry = now + tonumber(ARGV[3])
local old = redis.call('HGET', KEYS[1], ARGV[1])
local old_expiry = redis.call('ZSCORE', KEYS[2], ARGV[1])
-- Members past their expiry but not swept yet do not count: they are leaving.
if not old and redis.call('ZCOUNT', KEYS[2], now, '+inf') >= tonumber(ARGV[4]) then
  return {false, false, -1}
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], expiry, ARGV[1])
if old_expiry then
  old_expiry = tonumber(old_expiry)
end
return {old, old_expiry, expiry}
