-- Records awareness states of a document and announces them, in one step.
-- KEYS[1] the document's awareness hash; ARGV[1] channel (same hash tag), ARGV[2] '1' for
-- SPUBLISH, ARGV[3] the announcement, ARGV[4] now (ms), ARGV[5] ttl (ms), then triples
-- client, clock, json. A field is "<clock>\n<expires at ms>\n<json>"; readers skip expired
-- ones, so a dead node's clients disappear ttl after their last update.
local expires = tonumber(ARGV[4]) + tonumber(ARGV[5])
for i = 6, #ARGV, 3 do
    if ARGV[i + 2] == 'null' then
        redis.call('HDEL', KEYS[1], ARGV[i])
    else
        redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1] .. '\n' .. expires .. '\n' .. ARGV[i + 2])
    end
end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
if ARGV[2] == '1' then
    redis.call('SPUBLISH', ARGV[1], ARGV[3])
else
    redis.call('PUBLISH', ARGV[1], ARGV[3])
end
return 1
