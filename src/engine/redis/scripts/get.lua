-- get.lua: the holder of a resource (held until reaped, even past its end).
--
-- KEYS[1]  lock:<res>
-- ARGV[1]  shard prefix   ARGV[2]  resource
-- Returns  [] or one {"t":"lock","lock":L} item. Writes nothing.

local res = ARGV[2]
local l = load_lock(res)
if not l then
    return {}
end
return { enc({ t = 'lock', lock = lock_out(res, l) }) }
