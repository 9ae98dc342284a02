-- Book an outcome (retry schedule, dead letters, stats) or acknowledge settled intake
-- entries (and count their deliveries) at most once: a booking sent again after its
-- reply was lost (the same token) changes nothing. The commands are the ones a MULTI
-- would hold, carried out as atomically (engine.stores.Booking).
-- KEYS[1] the booking worker's last tokens (a list, the newest first: a late copy
-- of an earlier booking is known too); ARGV[1] this booking's token; ARGV[2..] the
-- commands, each as its word count, then its words (a command of a few words: unpack
-- takes some thousands at most)
if redis.call('LPOS', KEYS[1], ARGV[1]) then
  return 0
end
local i = 2
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  redis.call(unpack(ARGV, i + 1, i + n))
  i = i + n + 1
end
redis.call('LPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], 0, 31)
return 1
