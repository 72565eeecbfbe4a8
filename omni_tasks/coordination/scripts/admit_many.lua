-- Accept a batch of N requests in one step, all or nothing: check every id against the
-- request accepted under it before, admit every new one into its pool (refused as a
-- whole when a pool cannot take all of them), record each in the ledger of accepted
-- requests and publish each message. admit.lua does the same for one request; a
-- repeat (the same fingerprint under its id) is left out of the batch, not refused.
-- KEYS[1]  the ledger's open set: task id -> when published (ZADD; untouched when
--          ARGV[4] is 2)
-- KEYS[2..] ARGV[4] keys per request, request i (from 0) at 1 + ARGV[4] * i + j:
--          j=1 its pool's admitted set (ZCARD, ZSCORE, ZADD), j=2 its id's fingerprint
--          (GET, SET EX), j=3 its ledger entry (HSET, EXPIRE), j=4 the queue's list at
--          the message's priority level (LPUSH, as kombu's Redis transport publishes)
-- ARGV[1]  now, in seconds
-- ARGV[2]  the fingerprints' time to live, in seconds
-- ARGV[3]  the ledger entries' time to live, in seconds
-- ARGV[4]  keys per request: 2 (admit only), 3 (and record), 4 (and publish)
-- ARGV[5..] 9 per request, request i (from 0) at 4 + 9 * i + j: j=1 admission id (its
--          final task id), j=2 the pool's limit (0: no limit, -1: not counted), j=3 its
--          fingerprint ('' skips the check), j=4 task id (the open set's member),
--          j=5 task name, j=6 args (JSON), j=7 kwargs (JSON), j=8 publish options
--          (JSON), j=9 the message (kombu's JSON envelope); j=4..9 unused below 3 or 4
--          keys per request, as their keys are
-- Returns {1, status_1, ..., status_N} when the batch is accepted: 1 admitted, 0 already
-- admitted or not counted (recorded and published all the same), 2 a repeat (nothing
-- done for it). Refused, nothing is written: {-1, i, count, adding} when a pool is full
-- (i: the first request, from 1, of that pool; count: its size; adding: what the batch
-- adds to it), {-2, i} when request i's id holds another fingerprint.
local per = tonumber(ARGV[4])
local n = (#KEYS - 1) / per
local now = tonumber(ARGV[1])
local sizes, adding, first, limits, pools = {}, {}, {}, {}, {}
local repeat_of, counted = {}, {}
for i = 0, n - 1 do
  local k, a = 1 + per * i, 4 + 9 * i
  local fingerprint = ARGV[a + 3]
  if fingerprint ~= '' then
    local found = redis.call('GET', KEYS[k + 2])
    if found == fingerprint then
      repeat_of[i] = true
    elseif found then
      return {-2, i + 1}
    end
  end
  local limit = tonumber(ARGV[a + 2])
  local pool = KEYS[k + 1]
  if not repeat_of[i] and limit >= 0 and not redis.call('ZSCORE', pool, ARGV[a + 1]) then
    counted[i] = true
    if sizes[pool] == nil then
      sizes[pool], adding[pool] = redis.call('ZCARD', pool), 0
      first[pool], limits[pool] = i + 1, limit
      pools[#pools + 1] = pool
    end
    adding[pool] = adding[pool] + 1
  end
end
for _, pool in ipairs(pools) do
  if limits[pool] > 0 and sizes[pool] + adding[pool] > limits[pool] then
    return {-1, first[pool], sizes[pool], adding[pool]}
  end
end
local statuses = {1}
for i = 0, n - 1 do
  local k, a = 1 + per * i, 4 + 9 * i
  if repeat_of[i] then
    statuses[#statuses + 1] = 2
  else
    local status = 0
    if counted[i] then
      redis.call('ZADD', KEYS[k + 1], now, ARGV[a + 1])
      status = 1
    end
    if ARGV[a + 3] ~= '' then
      redis.call('SET', KEYS[k + 2], ARGV[a + 3], 'EX', tonumber(ARGV[2]))
    end
    if per >= 3 then
      redis.call('HSET', KEYS[k + 3], 'task', ARGV[a + 5], 'args', ARGV[a + 6],
                 'kwargs', ARGV[a + 7], 'options', ARGV[a + 8])
      redis.call('EXPIRE', KEYS[k + 3], tonumber(ARGV[3]))
      redis.call('ZADD', KEYS[1], now, ARGV[a + 4])
    end
    if per == 4 then
      redis.call('LPUSH', KEYS[k + 4], ARGV[a + 9])
    end
    statuses[#statuses + 1] = status
  end
end
return statuses
