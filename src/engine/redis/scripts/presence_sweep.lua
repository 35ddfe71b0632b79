-- presence_sweep: removes the members of one room whose expiry has passed.
--
-- KEYS[1]  ps:{<room>}:members   hash  session id -> member JSON
-- KEYS[2]  ps:{<room>}:expiry    zset  session id -> expiry instant (ms, server clock)
-- ARGV[1]  the most members to remove in this call
--
-- Returns {next, JSON, expiry, JSON, expiry, ...}: the removed members with the expiry they
-- had, and `next` = the earliest expiry left in the room (-1: the room is empty).
-- The removal is atomic, so when several nodes sweep the same room each expired member is
-- returned to exactly one of them (and never to a `leave` that raced with the sweep).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {-1}
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[1]))
for i = 1, #ids, 2 do
  local id = ids[i]
  local json = redis.call('HGET', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
  if json then
    redis.call('HDEL', KEYS[1], id)
    out[#out + 1] = json
    out[#out + 1] = tonumber(ids[i + 1])
  end
end
local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
if first[2] then
  out[1] = tonumber(first[2])
else
  -- Every member has an expiry entry (the scripts write both); with none left, whatever is
  -- still in the hash is an orphan that no read shows and no sweep would ever find.
  redis.call('DEL', KEYS[1])
end
return out
