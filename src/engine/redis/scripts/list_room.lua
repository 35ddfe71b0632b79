-- list_room.lua: the locks announced in a room, in one shard.
--
-- KEYS[1]  room:<room>
-- ARGV[1]  shard prefix   ARGV[2]  room
-- Returns  one {"t":"lock","lock":L} item per lock, by resource name.
-- Writes   only to drop index entries whose lock is gone (its key expired while no reaper ran).

local room = ARGV[2]
local members = redis.call('SMEMBERS', key('room', room))
table.sort(members)
local out = {}
for _, res in ipairs(members) do
    local l = load_lock(res)
    if l and l.room == room then
        out[#out + 1] = enc({ t = 'lock', lock = lock_out(res, l) })
    elseif not l then
        redis.call('SREM', key('room', room), res)
    end
end
return out
