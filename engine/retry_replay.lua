-- Replay dead letters atomically, if none changed since they were read: each id's
-- payload is compared (by SHA-1) with the one read; if any is gone or different,
-- nothing moves and those ids are returned. Otherwise every id moves from the dead
-- letters (and their account and hook indexes) to the retry schedule, due ARGV[1],
-- with its new payload.
-- KEYS[1] dead zset, KEYS[2] dead payload hash, KEYS[3] retry zset, KEYS[4] retry
-- payload hash, KEYS[5..] the account and hook index zsets of the ids
-- ARGV[1] due (ms); then per id: id, SHA-1 (hex) of the payload read, new payload,
-- the KEYS position of its account index, the KEYS position of its hook index
local changed = {}
for i = 2, #ARGV, 5 do
  local current = redis.call('HGET', KEYS[2], ARGV[i])
  if (not current) or redis.sha1hex(current) ~= ARGV[i + 1] then
    table.insert(changed, ARGV[i])
  end
end
if #changed > 0 then
  return changed
end
for i = 2, #ARGV, 5 do
  redis.call('ZREM', KEYS[1], ARGV[i])
  redis.call('ZREM', KEYS[tonumber(ARGV[i + 3])], ARGV[i])
  redis.call('ZREM', KEYS[tonumber(ARGV[i + 4])], ARGV[i])
  redis.call('HDEL', KEYS[2], ARGV[i])
  redis.call('HSET', KEYS[4], ARGV[i], ARGV[i + 2])
  redis.call('ZADD', KEYS[3], ARGV[1], ARGV[i])
end
return changed
