-- The grace of a parked session is over: removes its record unless a resume claimed it.
-- KEYS[1]  resume:<token>   (string: ParkedSession JSON, or the tombstone "claimed")
-- Returns  0 when a resume claimed it (the tombstone is left to expire), 1 otherwise: the
--          record was deleted, or it is gone without a tombstone (it expired on its own, the
--          owning node came more than the margin late), and either way nobody resumed it.
local v = redis.call('GET', KEYS[1])
if v == 'claimed' then
  return 0
end
if v then
  redis.call('DEL', KEYS[1])
end
return 1
