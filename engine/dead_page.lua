-- One page of a dead-letter sorted set after a cursor (score, member): the members
-- ordered after it as Redis orders them (by score, equal scores by member, byte by
-- byte), found by binary search among the members of its score, so a page costs
-- O(log^2 n) however many dead letters died in the same millisecond, and members
-- removed meanwhile (a replay, the cursor's own) make no page skip or repeat others.
-- KEYS[1] the sorted set
-- ARGV[1] the cursor's score ("" for the first page), ARGV[2] its member, ARGV[3] the
-- page size. Returns member, score, member, score...
local key, after = KEYS[1], ARGV[2]
local size = tonumber(ARGV[3])
local function le(a, b)  -- a <= b, byte by byte
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a <= #b
end
local pos = 0
if ARGV[1] ~= '' then
  local lo = redis.call('ZCOUNT', key, '-inf', '(' .. ARGV[1])
  local hi = redis.call('ZCOUNT', key, '-inf', ARGV[1])
  while lo < hi do  -- the first member of the cursor's score ordered after it
    local mid = math.floor((lo + hi) / 2)
    if le(redis.call('ZRANGE', key, mid, mid)[1], after) then
      lo = mid + 1
    else
      hi = mid
    end
  end
  pos = lo
end
return redis.call('ZRANGE', key, pos, pos + size - 1, 'WITHSCORES')
