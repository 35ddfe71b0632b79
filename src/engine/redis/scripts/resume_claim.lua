-- Takes a parked session for a resume, only by the user it belongs to, only within the grace.
-- KEYS[1]  resume:<token>   (string: ParkedSession JSON, or "claimed" once resumed)
-- ARGV[1]  user id of the resuming connection
-- ARGV[2]  margin (ms): the key lives this long past the grace, so the grace is over once
--          its PTTL is at or below the margin (Redis's clock only: no skew between nodes)
-- Returns  the JSON when the user matches and the grace runs (the key then becomes the
--          tombstone "claimed", so the owning node's `resume_expire` knows it lost); nil
--          otherwise (record kept).
local json = redis.call('GET', KEYS[1])
if not json then
  return nil
end
local ok, parked = pcall(cjson.decode, json)
if not ok or type(parked) ~= 'table' or parked['user_id'] ~= ARGV[1] then
  return nil
end
local margin = tonumber(ARGV[2])
local pttl = redis.call('PTTL', KEYS[1])
if pttl >= 0 and pttl <= margin then
  return nil
end
-- The tombstone outlives the grace by the margin, as the record would have.
redis.call('SET', KEYS[1], 'claimed', 'PX', math.max(pttl, margin))
return json
