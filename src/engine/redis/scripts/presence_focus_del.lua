-- presence_focus_del: compare-and-delete of focus-index entries.
--
-- KEYS[1]  ps:{<entity>}:focus   hash  "<room> <session>" -> expiry instant (ms)
-- ARGV[1]  bound (ms); 0 = the server clock now
-- ARGV[2…] fields
--
-- Deletes each field whose expiry is at or below the bound. Entries are written with the
-- member's expiry at the time, which only grows, so a late delete for an older membership or
-- focus never removes the entry of a newer one. Returns the number of fields deleted.
local bound = tonumber(ARGV[1])
if bound == 0 then
  local t = redis.call('TIME')
  bound = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local n = 0
for i = 2, #ARGV do
  local v = redis.call('HGET', KEYS[1], ARGV[i])
  -- A value that is not a number was not written by us: delete it too.
  if v and (tonumber(v) == nil or tonumber(v) <= bound) then
    redis.call('HDEL', KEYS[1], ARGV[i])
    n = n + 1
  end
end
return n
