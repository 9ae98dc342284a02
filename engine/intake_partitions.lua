-- Record the engine's PARTITIONS, only while the given streams are empty (their events
-- would be stranded, or read out of order); otherwise nothing changes and the
-- non-empty streams' lengths return.
-- KEYS[1] config hash, KEYS[2..] the streams that must be empty: all of the count
-- recorded before (none when nothing was: the caller then checks the streams the new
-- count would not read, once producers of another count are refused)
-- ARGV[1] the new PARTITIONS, ARGV[2] the count recorded before ('' if none),
-- ARGV[3] a token marking the record as not checked yet ('' for none): field
-- 'checking', cleared by the check (intake_checked.lua)
local recorded = redis.call('HGET', KEYS[1], 'partitions')
if (recorded or '') ~= ARGV[2] then
  return {'changed', recorded or ''}
end
local busy = {}
for i = 2, #KEYS do
  local n = redis.call('XLEN', KEYS[i])
  if n > 0 then
    table.insert(busy, KEYS[i])
    table.insert(busy, n)
  end
end
if #busy > 0 then
  return busy
end
redis.call('HSET', KEYS[1], 'partitions', ARGV[1])
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[1], 'checking', ARGV[3])
end
return {}
