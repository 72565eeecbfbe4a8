-- Accept one request before its message is published: admit it into its pool (unless
-- the pool already holds max_queue_size) and, when KEYS[2] and KEYS[3] are given,
-- record it in the ledger of accepted requests. One step, one round trip per send.
-- KEYS[1]  the pool's admitted set: request id -> when admitted (ZSCORE, ZCARD, ZADD)
-- KEYS[2]  optional: the request's ledger entry (HSET, EXPIRE)
-- KEYS[3]  optional: the ledger's open set: task id -> when published (ZADD)
-- ARGV[1]  admission id (the request's final task id)
-- ARGV[2]  the pool's limit; 0 admits without a limit (a continuation or a republish);
--          -1 does not admit (a chain's later stage, counted with its first)
-- ARGV[3]  now, in seconds
-- ARGV[4]  with the ledger keys: the task id (the open set's member)
-- ARGV[5]  with the ledger keys: the entry's time to live, in seconds
-- ARGV[6]  with the ledger keys: the task's name
-- ARGV[7]  with the ledger keys: its args (JSON)
-- ARGV[8]  with the ledger keys: its kwargs (JSON)
-- ARGV[9]  with the ledger keys: its publish options (JSON)
-- Returns {status, count}: status 1 admitted, 0 already admitted or not admitted
-- (ARGV[2] = -1), -1 refused (the pool is full: nothing is recorded); count is the
-- pool's size after the call.
local limit = tonumber(ARGV[2])
local status = 0
local count = redis.call('ZCARD', KEYS[1])
if limit >= 0 and not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  if limit > 0 and count >= limit then
    return {-1, count}
  end
  redis.call('ZADD', KEYS[1], tonumber(ARGV[3]), ARGV[1])
  status = 1
  count = count + 1
end
if #KEYS == 3 then
  redis.call('HSET', KEYS[2], 'task', ARGV[6], 'args', ARGV[7], 'kwargs', ARGV[8],
             'options', ARGV[9])
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[5]))
  redis.call('ZADD', KEYS[3], tonumber(ARGV[3]), ARGV[4])
end
return {status, count}
