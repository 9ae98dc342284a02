-- The engine's records beside its PARTITIONS, written where Redis lacks them (Intake.keep_records).
-- KEYS[1] config hash; ARGV[1] PARTITIONS, ARGV[2] the event codes (JSON), ARGV[3] the
-- 'checking' mark of a PARTITIONS written here (the next start checks the other streams).
-- Writes nothing when both are as they should be: a write would abort every producer's
-- WATCHed append. KEYS[2] the epoch key, ARGV[4] a token for it, written where it is
-- missing (no producer watches it). Returns what it wrote (bits: 1 partitions, 2 codes,
-- 4 the epoch) and the codes recorded before ('' if none, or if they were kept).
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
local codes_wrote = wrote >= 2
if redis.call('SET', KEYS[2], ARGV[4], 'NX') then
  wrote = wrote + 4
end
return {wrote, (codes_wrote and codes) or ''}
