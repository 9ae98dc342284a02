-- Take back one hand-over of each delivery id: decrement its count if above zero,
-- and drop the count at zero (never below: a count reset meanwhile stays reset).
-- KEYS[1] the unanswered hand-overs hash; ARGV the delivery ids
for _, id in ipairs(ARGV) do
  local n = tonumber(redis.call('HGET', KEYS[1], id) or '0')
  if n > 1 then
    redis.call('HINCRBY', KEYS[1], id, -1)
  elseif n == 1 then
    redis.call('HDEL', KEYS[1], id)
  end
end
return 0
