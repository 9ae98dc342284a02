-- Claim up to ARGV[3] due retries: hide each for a lease instead of removing it,
-- so a sender that dies leaves the delivery due again once the lease ends.
-- Returns id, payload, id, payload, ...
-- KEYS[1] retry zset, KEYS[2] retry payload hash
-- ARGV[1] now (ms), ARGV[2] lease end (ms), ARGV[3] limit
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], ARGV[2], id)
  local payload = redis.call('HGET', KEYS[2], id)
  if payload then
    table.insert(out, id)
    table.insert(out, payload)
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return out
