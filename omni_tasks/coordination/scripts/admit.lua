-- Accept one request: check its id against the request accepted under it before (when
-- ARGV[4] is given), admit it into its pool (unless the pool already holds
-- max_queue_size), when KEYS[3] and KEYS[4] are given record it in the ledger of
-- accepted requests, and when KEYS[5] is given publish its message there. One step, one
-- round trip per send: a send that fails leaves all of it or none of it.
-- KEYS[1]  the pool's admitted set: request id -> when admitted (ZCARD, ZADD NX; ZSCORE
--          only when the pool is full)
-- KEYS[2]  the request id's fingerprint (SET NX EX; GET when it is taken; DEL when a
--          full pool refuses the request); untouched when ARGV[4] is ''
-- KEYS[3]  optional: the request's ledger entry (HSET, EXPIRE)
-- KEYS[4]  optional: the ledger's open set: task id -> when published (ZADD)
-- ARGV[1]  admission id (the request's final task id)
-- ARGV[2]  the pool's limit; 0 admits without a limit (a continuation or a republish);
--          -1 does not admit (a chain's later stage, counted with its first)
-- ARGV[3]  now, in seconds
-- ARGV[4]  the request's fingerprint; '' skips the check (a chain's later stage, a
--          message published again)
-- ARGV[5]  the fingerprint's time to live, in seconds
-- ARGV[6]  with the ledger keys: the task id (the open set's member)
-- ARGV[7]  with the ledger keys: the entry's time to live, in seconds
-- ARGV[8]  with the ledger keys: the task's name
-- ARGV[9]  with the ledger keys: its args (JSON)
-- ARGV[10] with the ledger keys: its kwargs (JSON)
-- ARGV[11] with the ledger keys: its publish options (JSON)
-- KEYS[5]  optional, with the ledger keys: the queue's list at the message's priority
--          level (LPUSH), as kombu's Redis transport publishes
-- ARGV[12] with KEYS[5]: the message (kombu's JSON envelope)
-- ARGV[13..] with KEYS[5]: optional (channel, payload) pairs PUBLISHed after the LPUSH:
--          the send's task-sent event, as kombu's Redis transport publishes it
-- Returns {status, count}: status 1 admitted, 0 already admitted or not admitted
-- (ARGV[2] = -1), -1 refused (the pool is full), 2 a repeat (the same fingerprint is
-- recorded under this id), -2 a conflict (another one is); nothing is recorded for -1,
-- 2 and -2 (and nothing is published). count is the pool's size after the call where
-- the limit was checked (ARGV[2] > 0), else -1 (not read).
-- The common case, a new request into a pool with room, costs 7 commands besides the
-- LPUSH: SET NX, ZCARD, ZADD NX, HSET, EXPIRE, ZADD and the EVALSHA itself.
local limit = tonumber(ARGV[2])
local status = 0
local count = -1
local fingerprinted = false
if ARGV[4] ~= '' then
  if not redis.call('SET', KEYS[2], ARGV[4], 'NX', 'EX', tonumber(ARGV[5])) then
    if redis.call('GET', KEYS[2]) == ARGV[4] then
      return {2, count}
    end
    return {-2, count}
  end
  fingerprinted = true
end
if limit > 0 then
  count = redis.call('ZCARD', KEYS[1])
  if count >= limit and not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
    if fingerprinted then
      redis.call('DEL', KEYS[2])
    end
    return {-1, count}
  end
end
if limit >= 0 then
  status = redis.call('ZADD', KEYS[1], 'NX', tonumber(ARGV[3]), ARGV[1])
  if limit > 0 then
    count = count + status
  end
end
if #KEYS >= 4 then
  redis.call('HSET', KEYS[3], 'task', ARGV[8], 'args', ARGV[9], 'kwargs', ARGV[10],
             'options', ARGV[11])
  redis.call('EXPIRE', KEYS[3], tonumber(ARGV[7]))
  redis.call('ZADD', KEYS[4], tonumber(ARGV[3]), ARGV[6])
end
if #KEYS == 5 then
  redis.call('LPUSH', KEYS[5], ARGV[12])
  for i = 13, #ARGV, 2 do
    redis.call('PUBLISH', ARGV[i], ARGV[i + 1])
  end
end
return {status, count}
