-- End the check of a first PARTITIONS record marked 'checking' = ARGV[1]: only if the
-- mark is still that one, clear it (ARGV[2] = 'keep') or take the whole record back
-- (ARGV[2] = 'undo': its count would strand events). Returns 1 if done, 0 if the mark
-- was another's (or gone).
-- KEYS[1] config hash
if redis.call('HGET', KEYS[1], 'checking') ~= ARGV[1] then
  return 0
end
if ARGV[2] == 'undo' then
  redis.call('HDEL', KEYS[1], 'partitions', 'checking')
else
  redis.call('HDEL', KEYS[1], 'checking')
end
return 1
