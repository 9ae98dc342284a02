-- Replay or discard dead letters atomically, if none changed since they were read:
-- each id's payload is compared (by SHA-1) with the one read; if any is gone or
-- different, nothing moves and those ids are returned. Otherwise every id leaves the
-- dead letters (and its account and hook indexes) and, by ARGV[1]:
--   "replay":  goes back on the retry schedule, due ARGV[2], with its new payload;
--              a letter of a deleted hook marks it deleted again, now (by Redis'
--              clock), in this same script: its counters stay while its letters are
--              on the schedule, in no dead-letter index (a mark made after the move
--              left forget_gone_stats a moment to find the hook without letters and
--              delete them);
--   "discard": is deleted, its messages counted as "discarded" in its hook's stats;
-- but for one that died (its score) after ARGV[3], when given: one replayed and dead
-- again since it was read is left where it is (a run moves those dead when it began,
-- an expiry those past the retention).
-- KEYS[1] dead zset, KEYS[2] dead payload hash, KEYS[3] retry zset, KEYS[4] retry
-- payload hash, KEYS[5] hooks hash, KEYS[6] deleted hooks zset, KEYS[7..] the account
-- and hook index zsets and stats hashes of the ids
-- ARGV[1] mode, ARGV[2] due (ms), ARGV[3] the latest death moved (ms) or ""; then per
-- id: id, SHA-1 (hex) of the payload read, new payload (replay) or "" (discard), the
-- KEYS positions of its account index, its hook index and its hook's stats, its
-- message count, and its hook's id
-- Returns {how many moved, the ids that changed...} (none moved when some changed).
local STRIDE = 8
local replay = ARGV[1] == 'replay'
if not replay and ARGV[1] ~= 'discard' then
  return redis.error_reply('dead_move.lua: unknown mode ' .. tostring(ARGV[1]))
end
local latest = tonumber(ARGV[3])
local FIRST = 4
local changed = {0}
local later = {}
for i = FIRST, #ARGV, STRIDE do
  local current = redis.call('HGET', KEYS[2], ARGV[i])
  if (not current) or redis.sha1hex(current) ~= ARGV[i + 1] then
    table.insert(changed, ARGV[i])
  elseif latest then
    local died = redis.call('ZSCORE', KEYS[1], ARGV[i])
    later[i] = died ~= false and tonumber(died) > latest
  end
end
if #changed > 1 then
  return changed
end
local moved = 0
local now
for i = FIRST, #ARGV, STRIDE do
  if not later[i] then
    moved = moved + 1
    redis.call('ZREM', KEYS[1], ARGV[i])
    redis.call('ZREM', KEYS[tonumber(ARGV[i + 3])], ARGV[i])
    redis.call('ZREM', KEYS[tonumber(ARGV[i + 4])], ARGV[i])
    redis.call('HDEL', KEYS[2], ARGV[i])
    if replay then
      redis.call('HSET', KEYS[4], ARGV[i], ARGV[i + 2])
      redis.call('ZADD', KEYS[3], ARGV[2], ARGV[i])
      if redis.call('HEXISTS', KEYS[5], ARGV[i + 7]) == 0 then
        if not now then
          local t = redis.call('TIME')
          now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
        end
        redis.call('ZADD', KEYS[6], now, ARGV[i + 7])
      end
    else
      -- pcall: a count whose field was damaged from outside is not made, rather than
      -- failing the call after the letters before it were removed
      redis.pcall('HINCRBY', KEYS[tonumber(ARGV[i + 5])], 'discarded', ARGV[i + 6])
    end
  end
end
return {moved}
