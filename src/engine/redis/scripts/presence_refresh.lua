-- presence_refresh: renews the expiry of members whose sessions are alive.
--
-- KEYS[1]  ps:{<room>}:members   hash  session id -> member JSON
-- KEYS[2]  ps:{<room>}:expiry    zset  session id -> expiry instant (ms, server clock)
-- ARGV[1]  ttl (ms)
-- ARGV[2…] session ids
--
-- Sessions no longer in the room (left, or already swept) are skipped: refresh never
-- recreates an entry. An expired entry not swept yet is renewed (its session is alive).
-- Returns {new expiry, n, missing session × n, session, focus, session, focus, ...}: the
-- sessions not found (their node must re-register them: they are alive but were swept), then
-- the renewed members that have a focus, so the caller can renew their focus-index entries.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expiry = now + tonumber(ARGV[1])
local missing = {}
local focused = {}
for i = 2, #ARGV do
  local json = redis.call('HGET', KEYS[1], ARGV[i])
  if not json then
    missing[#missing + 1] = ARGV[i]
  else
    redis.call('ZADD', KEYS[2], expiry, ARGV[i])
    local ok, m = pcall(cjson.decode, json)
    if ok and type(m) == 'table' and type(m.focus) == 'string' then
      focused[#focused + 1] = ARGV[i]
      focused[#focused + 1] = m.focus
    end
  end
end
local out = {expiry, #missing}
for _, s in ipairs(missing) do
  out[#out + 1] = s
end
for _, v in ipairs(focused) do
  out[#out + 1] = v
end
return out
