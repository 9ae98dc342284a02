-- Book an outcome (retry schedule, dead letters, stats) or acknowledge settled intake
-- entries (and count their deliveries) at most once: a booking sent again after its
-- reply was lost (the same token) changes nothing. The commands are the ones a MULTI
-- would hold, carried out as atomically (engine.stores.Booking).
-- Only into the data its work was built under: a booking whose epoch is not the
-- stored one (Redis lost the engine's data since, and a new hook may have taken the
-- hook id it books under) changes nothing either, and says so.
-- KEYS[1] the data's epoch (engine.keys: {p}:epoch); KEYS[2] (with a token) the
-- booking worker's last tokens (a list, the newest first: a late copy of an earlier
-- booking is known too); ARGV[1] the epoch the worker read with the work booked ('':
-- none read, not checked); ARGV[2] this booking's token ('': none, nothing kept);
-- ARGV[3..] the commands, each as its word count, then its words (a command of a few
-- words: unpack takes some thousands at most)
-- A script is not undone by a failing command, and a booking that failed is sent
-- again: a counter that cannot be added to (its field damaged from outside, not an
-- integer, of another type, or at its limit) is left as it is, not counted, and
-- named in the reply, rather than failing the booking after the commands before it,
-- which every later try would carry out again. Returns {2} (another epoch: nothing
-- booked), {0} (booked before), or {1} and the counts not made.
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return {2}
end
local token = ARGV[2] ~= ''
if token and redis.call('LPOS', KEYS[2], ARGV[2]) then
  return {0}
end
local skipped = {}
local i = 3
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  if ARGV[i + 1] == 'HINCRBY' then
    local reply = redis.pcall(unpack(ARGV, i + 1, i + n))
    if type(reply) == 'table' and reply.err then
      -- only a counter's own damage is passed over: any other error (out of memory,
      -- raised only at a script's first write) fails the booking, to be sent again
      local err = reply.err
      if not (string.find(err, 'not an integer', 1, true) or
              string.find(err, 'WRONGTYPE', 1, true) or
              string.find(err, 'overflow', 1, true)) then
        return reply
      end
      skipped[#skipped + 1] = ARGV[i + 2] .. ' ' .. ARGV[i + 3] .. ': ' .. err
    end
  else
    redis.call(unpack(ARGV, i + 1, i + n))
  end
  i = i + n + 1
end
if token then
  redis.call('LPUSH', KEYS[2], ARGV[2])
  redis.call('LTRIM', KEYS[2], 0, 31)
end
return {1, unpack(skipped)}
