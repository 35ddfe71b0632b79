-- Takes a parked session for a resume, only by the user it belongs to.
-- KEYS[1]  resume:<token>        (string: ParkedSession JSON)
-- ARGV[1]  user id of the resuming connection
-- Returns  the JSON (and deletes it) when the user matches; nil otherwise (record kept).
local json = redis.call('GET', KEYS[1])
if not json then
  return nil
end
local ok, parked = pcall(cjson.decode, json)
if not ok or parked['user_id'] ~= ARGV[1] then
  return nil
end
redis.call('DEL', KEYS[1])
return json
