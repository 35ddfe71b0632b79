-- presence_due: claims rooms that may hold expired members, for one sweeper.
--
-- KEYS[1]  ps:rooms   zset  room -> the instant (ms, server clock) the room next needs a sweep
-- ARGV[1]  the most rooms to claim
-- ARGV[2]  claim duration (ms)
--
-- Returns {now, room, room, ...}: rooms whose instant has come. Each is moved to
-- now + claim, so concurrent sweepers take different rooms; a sweeper that dies before
-- rescheduling a room leaves it to come due again when the claim runs out.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {now}
local rooms = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local claim = now + tonumber(ARGV[2])
for _, room in ipairs(rooms) do
  redis.call('ZADD', KEYS[1], claim, room)
  out[#out + 1] = room
end
return out
