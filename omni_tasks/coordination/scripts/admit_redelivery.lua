-- A message came back (worker died, shutdown, visibility timeout): may it run again?
-- KEYS[1]  revoked flag of the task       (read)
-- KEYS[2]  redelivery counter of the task (INCR, EXPIRE)
-- ARGV[1]  counter TTL in seconds
-- Returns {revoked (0/1), redeliveries}. A revoked task's counter is not touched.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {1, 0}
end
local starts = redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[1]))
return {0, starts}
