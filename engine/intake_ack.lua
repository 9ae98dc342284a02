-- Acknowledge and delete a partition worker's settled intake entries and count its
-- deliveries, once per round: a round sent again after its reply was lost (the same
-- token) changes nothing.
-- KEYS[1] the stream, KEYS[2] the worker's last rounds' tokens (a list, the newest
-- first: a late copy of an earlier round is known too), KEYS[3..] stats hashes
-- ARGV[1] consumer group, ARGV[2] the round's token, ARGV[3] k, the number of entry
-- ids, ARGV[4 .. 3+k] the ids, ARGV[4+k ..] delivered messages per stats hash, in
-- the order of KEYS[3..]
if redis.call('LPOS', KEYS[2], ARGV[2]) then
  return 0
end
local k = tonumber(ARGV[3])
local first = 4
while first <= 3 + k do  -- in chunks: unpack has a limit
  local last = math.min(first + 999, 3 + k)
  redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, first, last))
  redis.call('XDEL', KEYS[1], unpack(ARGV, first, last))
  first = last + 1
end
for i = 3, #KEYS do
  redis.call('HINCRBY', KEYS[i], 'delivered', ARGV[k + i + 1])
end
redis.call('LPUSH', KEYS[2], ARGV[2])
redis.call('LTRIM', KEYS[2], 0, 31)
return 1
