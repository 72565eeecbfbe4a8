-- Admit one request into a pool, unless the pool already holds max_queue_size.
-- KEYS[1]  the pool's admitted set: request id -> when admitted (ZSCORE, ZCARD, ZADD)
-- ARGV[1]  admission id (the request's final task id)
-- ARGV[2]  the pool's limit; 0 admits without a limit (a continuation or a republish)
-- ARGV[3]  now, in seconds
-- Returns {status, count}: status 1 admitted, 0 already admitted (nothing changes),
-- -1 refused (the pool is full); count is the pool's size after the call.
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return {0, redis.call('ZCARD', KEYS[1])}
end
local count = redis.call('ZCARD', KEYS[1])
local limit = tonumber(ARGV[2])
if limit > 0 and count >= limit then
  return {-1, count}
end
redis.call('ZADD', KEYS[1], tonumber(ARGV[3]), ARGV[1])
return {1, count + 1}
