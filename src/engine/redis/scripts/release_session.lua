-- release_session.lua: ends a session in one shard: drops its waits first (so a lock it
-- releases is never handed to it), then releases its locks, serving their queues.
--
-- KEYS[1]  sess:<session> KEYS[2]  due           KEYS[3]  audit
-- ARGV[1]  shard prefix   ARGV[2]  session_id    ARGV[3]  reason
-- ARGV[4]  JSON array of rooms the call is limited to ('' = all rooms)
-- Returns  one {"t":"released",...} item per lock released, by resource name.
-- Audit    lock_wait_cancelled per dropped wait, lock_<reason> per lock (+ hand-offs).

local sid, reason = ARGV[2], ARGV[3]
local rooms = nil
if ARGV[4] ~= '' then
    rooms = {}
    for _, r in ipairs(cjson.decode(ARGV[4])) do
        rooms[r] = true
    end
end
local members = redis.call('SMEMBERS', key('sess', sid))
table.sort(members)
local loaded = {}
for _, res in ipairs(members) do
    local R = load(res)
    loaded[#loaded + 1] = R
    drop_wait(R, sid, rooms, 'lock_wait_cancelled')
end
local out = {}
for _, R in ipairs(loaded) do
    local l = R.lock
    if l and l.session_id == sid and (not rooms or rooms[l.room]) then
        out[#out + 1] = enc(end_lock(R, reason, nil, nil))
    end
    -- An index entry for something the session neither holds nor waits for is stale.
    unlink_session(R, sid)
    finish(R)
end
return out
