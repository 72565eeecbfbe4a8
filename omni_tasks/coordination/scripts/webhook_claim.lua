-- Take over a finished job's webhook: the one API process that removes the job from the
-- watch set records its delivery and schedules it, so a delivery is made once.
-- KEYS[1]  the webhook watch set: job ids whose result is awaited (ZREM)
-- KEYS[2]  the deliveries due, by time (ZADD)
-- KEYS[3]  the deliveries: delivery id -> its JSON (HSET)
-- ARGV[1]  the job id
-- ARGV[2]  the delivery id
-- ARGV[3]  the delivery, JSON
-- ARGV[4]  when it is due (Unix seconds)
-- Returns 1 when this call claimed it, 0 when another process had.
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[2])
  return 1
end
return 0
