-- Appends a Yjs update to a document's log and announces it, in one step.
-- KEYS[1] the document's stream; ARGV[1] update, ARGV[2] origin node id,
-- ARGV[3] announcement channel (same hash tag as KEYS[1]), ARGV[4] '1' for SPUBLISH.
-- Announcement: "<id>\n<prev id or empty>\n<origin>\n<update bytes>".
local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local prev = ''
if newest[1] then
    prev = newest[1][1]
end
local id = redis.call('XADD', KEYS[1], '*', 'u', ARGV[1])
local msg = id .. '\n' .. prev .. '\n' .. ARGV[2] .. '\n' .. ARGV[1]
if ARGV[4] == '1' then
    redis.call('SPUBLISH', ARGV[3], msg)
else
    redis.call('PUBLISH', ARGV[3], msg)
end
return {id, prev}
