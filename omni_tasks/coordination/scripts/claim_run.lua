-- Claim the one run of a task id before a delivery of it runs: at most one delivery of
-- a request runs at a time, and none runs once it has succeeded.
-- KEYS[1]  the task id's run claim: "<worker hostname> <worker instance> <run token>"
--          (GET, SET EX)
-- KEYS[2]  the task id's Celery result, JSON (GET)
-- ARGV[1]  this run's claim
-- ARGV[2]  the claim's time to live, in seconds (longer than any run)
-- ARGV[3]  the prefix of the workers' heartbeat hashes: a claim's holder is live while
--          the hash of its hostname holds its instance (HGET)
-- Returns 'claimed' (this run is the one), 'done' (a success is stored: nothing to
-- run) or 'running' (a live worker holds the claim); the claim is written only for
-- 'claimed'.
local meta = redis.call('GET', KEYS[2])
if meta then
  local ok, decoded = pcall(cjson.decode, meta)
  if ok and type(decoded) == 'table' and decoded['status'] == 'SUCCESS' then
    return 'done'
  end
end
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then
  local host, instance = string.match(holder, '^(.+) (%S+) %S+$')
  if host and redis.call('HGET', ARGV[3] .. host, 'instance') == instance then
    return 'running'
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[2]))
return 'claimed'
