-- Claim up to ARGV[3] due retries, holding at most ARGV[4] bytes of payloads (one at
-- least, however large): hide each for a lease instead of removing it, so a sender
-- that dies leaves the delivery due again once the lease ends. Large payloads make
-- smaller claims, so Redis is not held up copying hundreds of megabytes.
-- Returns id, payload, id, payload, ...; a scheduled id without a payload (removed from
-- outside: a Redis evicting keys) is left out of the schedule, its payload nil
-- KEYS[1] retry zset, KEYS[2] retry payload hash, KEYS[3] the data's epoch
-- ARGV[1] now (ms; '': Redis' clock, which due times are written by), ARGV[2] the
-- lease (ms), ARGV[3] limit, ARGV[4] byte limit, ARGV[5] the epoch the claiming
-- worker's hooks are of ('': not checked): none is claimed for hooks of another epoch
-- (Redis lost the data they were of since: a re-send of the new data would go to a
-- hook of the old, its destination and secrets)
if ARGV[5] ~= '' and redis.call('GET', KEYS[3]) ~= ARGV[5] then
  return {}
end
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local lease_end = now + tonumber(ARGV[2])
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
local budget = tonumber(ARGV[4])
local out = {}
local bytes = 0
local taken = 0
for _, id in ipairs(ids) do
  if taken > 0 and bytes >= budget then
    break
  end
  local size = redis.call('HSTRLEN', KEYS[2], id)
  if size == 0 and redis.call('HEXISTS', KEYS[2], id) == 0 then
    redis.call('ZREM', KEYS[1], id)
    table.insert(out, id)
    table.insert(out, false)
  elseif taken > 0 and bytes + size > budget then
    break
  else
    redis.call('ZADD', KEYS[1], lease_end, id)
    table.insert(out, id)
    table.insert(out, redis.call('HGET', KEYS[2], id))
    bytes = bytes + size
    taken = taken + 1
  end
end
return out
