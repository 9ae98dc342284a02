-- Index dead letters by account and hook, each only if it is still a dead letter
-- (a replay that ran meanwhile removed it: indexing it now would leave a stale entry),
-- with the time it died as the dead letters hold it now (it may have died again).
-- Those already indexed (by kill, or an earlier pass) are indexed again, unchanged.
-- KEYS[1] dead zset, KEYS[2..] the index zsets
-- ARGV per dead letter: id, KEYS position of its account's index, KEYS position of
-- its hook's index
-- Returns how many were in neither index before (an earlier version's dead letters).
local added = 0
for i = 1, #ARGV, 3 do
  local died = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if died then
    local a = redis.call('ZADD', KEYS[tonumber(ARGV[i + 1])], died, ARGV[i])
    local h = redis.call('ZADD', KEYS[tonumber(ARGV[i + 2])], died, ARGV[i])
    if a + h > 0 then added = added + 1 end
  end
end
return added
