-- Renews the per-user entries of sessions a node still holds (attached or parked).
-- KEYS[1]  us:{<user>}:sessions   zset  session id -> expiry instant (ms, server clock)
-- ARGV[1]  ttl (ms)
-- ARGV[2…] session ids
-- Only entries still there are renewed (XX): an entry removed when its session ended is not
-- brought back by a refresh racing with the end. Returns the number renewed.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expiry = now + tonumber(ARGV[1])
local n = 0
for i = 2, #ARGV do
  n = n + redis.call('ZADD', KEYS[1], 'XX', 'CH', expiry, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return n
