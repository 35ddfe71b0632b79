-- presence_members: the live (not expired) members of a room, or of some of its sessions.
--
-- KEYS[1]  ps:{<room>}:members   hash  session id -> member JSON
-- KEYS[2]  ps:{<room>}:expiry    zset  session id -> expiry instant (ms, server clock)
-- ARGV     session ids to look up; none = every live member
--
-- Returns {now, JSON, JSON, ...} (server clock, ms), in no particular order. A member is
-- live while its expiry is in the future; expired entries stay until a sweep removes them.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {now}
if #ARGV == 0 then
  local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. now, '+inf')
  -- HMGET in chunks: unpack() of a huge table overflows the Lua stack.
  local chunk = 500
  for i = 1, #ids, chunk do
    local last = math.min(i + chunk - 1, #ids)
    local jsons = redis.call('HMGET', KEYS[1], unpack(ids, i, last))
    for _, json in ipairs(jsons) do
      if json then
        out[#out + 1] = json
      end
    end
  end
else
  for _, id in ipairs(ARGV) do
    local expiry = redis.call('ZSCORE', KEYS[2], id)
    if expiry and tonumber(expiry) > now then
      local json = redis.call('HGET', KEYS[1], id)
      if json then
        out[#out + 1] = json
      end
    end
  end
end
return out
