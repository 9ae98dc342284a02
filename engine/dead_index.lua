-- Index dead letters by account and hook, each only if it is still a dead letter
-- (a replay that ran meanwhile removed it: indexing it now would leave a stale entry).
-- KEYS[1] dead zset, KEYS[2..] the index zsets
-- ARGV per dead letter: id, time it died (score), KEYS position of its account's
-- index, KEYS position of its hook's index
for i = 1, #ARGV, 4 do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[tonumber(ARGV[i + 2])], ARGV[i + 1], ARGV[i])
    redis.call('ZADD', KEYS[tonumber(ARGV[i + 3])], ARGV[i + 1], ARGV[i])
  end
end
return 0
