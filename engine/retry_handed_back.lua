-- Take back one hand-over of each delivery id: decrement its count if above zero,
-- and drop the count at zero (never below: a count reset meanwhile stays reset). A
-- count damaged meanwhile (written from outside: no integer) is dropped as one at
-- zero, rather than failing the others handed back with it (they would count as
-- unanswered, and a stop as a crash).
-- KEYS[1] the unanswered hand-overs hash; ARGV the delivery ids
for _, id in ipairs(ARGV) do
  local v = redis.call('HGET', KEYS[1], id)
  if v then
    local n = string.match(v, '^%d+$') and tonumber(v)
    local down = n and n > 1 and redis.pcall('HINCRBY', KEYS[1], id, -1)
    if type(down) ~= 'number' then  -- at one, or damaged (past 64 bits too)
      redis.call('HDEL', KEYS[1], id)
    end
  end
end
return 0
