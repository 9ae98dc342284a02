-- The engine's records beside its PARTITIONS, written where Redis lacks them (Intake.keep_records).
-- KEYS[1] config hash; ARGV[1] PARTITIONS, ARGV[2] the event codes (JSON), ARGV[3] the
-- 'checking' mark of a PARTITIONS written here (the next start checks the other streams).
-- Writes nothing when both are as they should be: a write would abort every producer's
-- WATCHed append. Returns what it wrote (0 nothing, 1 partitions, 2 codes, 3 both) and
-- the codes recorded before ('' if none, or if they were kept).
local wrote = 0
if redis.call('HEXISTS', KEYS[1], 'partitions') == 0 then
  redis.call('HSET', KEYS[1], 'partitions', ARGV[1], 'checking', ARGV[3])
  wrote = wrote + 1
end
local codes = redis.call('HGET', KEYS[1], 'event_types')
if codes ~= ARGV[2] then
  redis.call('HSET', KEYS[1], 'event_types', ARGV[2])
  wrote = wrote + 2
end
return {wrote, (wrote >= 2 and codes) or ''}
