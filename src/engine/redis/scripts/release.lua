-- release.lua: compare-and-delete on the token; the head live waiter is granted in this step.
--
-- KEYS[1]  lock:<res>     KEYS[2]  fence:<res>   KEYS[3]  queue:<res>   KEYS[4]  waiters:<res>
-- KEYS[5]  due            KEYS[6]  audit
-- ARGV[1]  shard prefix   ARGV[2]  lock key      ARGV[3]  token (decimal)
-- ARGV[4]  reason: released | expired | disconnected | forced
-- ARGV[5]  actor JSON {user_id, session_id?, node_id, via} ('' = the holder itself)
-- ARGV[6]  withdrawal reason ('' = a release): recorded as lock_withdrawn {reason} instead
-- ARGV[7]  holder check (absent or '' = none): 's:<session id>' or 'u:<user id>'; the lock
--          is released only if its holder matches too (a holder's own release, one step)
-- Returns  one item:
--   {"t":"released","lock":L,"reason":r,"granted":{"lock":L,"request_id":"n"|absent}|absent}
--   {"t":"not_held","current":L|absent}
-- Audit    lock_<reason> {by}+actor, or lock_withdrawn {reason} (+ lock_acquired for the hand-off).

local res, token, reason = ARGV[2], ARGV[3], ARGV[4]
local actor = opt_json(ARGV[5])
local withdrawn = ARGV[6] ~= nil and ARGV[6] ~= '' and ARGV[6] or nil
local check = ARGV[7] or ''
local function holder_ok(l)
    if check == '' then
        return true
    end
    local kind, who = string.sub(check, 1, 1), string.sub(check, 3)
    if kind == 's' then
        return l.session_id == who
    end
    return l.user_id == who
end
local R = load(res)
if R.lock and R.lock.token == token and holder_ok(R.lock) then
    local out = end_lock(R, reason, actor, withdrawn)
    finish(R)
    return { enc(out) }
end
return { enc({ t = 'not_held', current = R.lock and lock_out(res, R.lock) or nil }) }
