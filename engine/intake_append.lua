-- Append intake entries, only if the engine reads as many partitions as the producer
-- writes to (otherwise events would go to streams no partition reads).
-- KEYS[1] config hash, KEYS[2] engine stats hash, KEYS[3..] the entries' streams
-- ARGV[1] the producer's PARTITIONS, ARGV[2] events in all, ARGV[3..] the entries
-- Returns false when appended, else the engine's PARTITIONS.
local recorded = redis.call('HGET', KEYS[1], 'partitions')
if recorded and recorded ~= ARGV[1] then
  return recorded
end
for i = 3, #KEYS do
  redis.call('XADD', KEYS[i], '*', 'e', ARGV[i])
end
redis.call('HINCRBY', KEYS[2], 'events_accepted', tonumber(ARGV[2]))
return false
