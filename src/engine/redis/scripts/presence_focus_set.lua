-- presence_focus_set: one focus-index entry written or removed by the server clock, for an
-- update that sends it beside presence_update instead of after it (one round trip).
--
-- KEYS[1]  ps:{<entity>}:focus   hash  "<room> <session>" -> expiry instant (ms)
-- ARGV[1]  set | del
-- ARGV[2]  ttl (ms): the member's ttl, so the entry's expiry is the member's (to the ms)
-- ARGV[3]  field
--
-- set: writes now + ttl. del: deletes the field if its value is at or below now + ttl, i.e.
-- written by a membership no later than this call (a later focus on this entity has a later
-- value and stays). Returns 1 if written or deleted, else 0.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local at = now + tonumber(ARGV[2])
if ARGV[1] == 'set' then
  redis.call('HSET', KEYS[1], ARGV[3], at)
  return 1
end
local v = redis.call('HGET', KEYS[1], ARGV[3])
-- A value that is not a number was not written by us: delete it too.
if v and (tonumber(v) == nil or tonumber(v) <= at) then
  redis.call('HDEL', KEYS[1], ARGV[3])
  return 1
end
return 0
