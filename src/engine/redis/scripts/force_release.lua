-- force_release.lua: ends whatever lock holds the resource (owner/admin action) and serves the
-- queue in the same step.
--
-- KEYS[1]  lock:<res>     KEYS[2]  fence:<res>   KEYS[3]  queue:<res>   KEYS[4]  waiters:<res>
-- KEYS[5]  due            KEYS[6]  audit
-- ARGV[1]  shard prefix   ARGV[2]  lock key      ARGV[3]  actor JSON {user_id, session_id?, node_id, via}
-- Returns  [] when free, else one {"t":"released",...} item (reason "forced").
-- Audit    lock_forced {by} with the actor (+ lock_acquired for the hand-off).

local res, by = ARGV[2], opt_json(ARGV[3])
local R = load(res)
if not R.lock then
    return {}
end
local out = end_lock(R, 'forced', by, nil)
finish(R)
return { enc(out) }
