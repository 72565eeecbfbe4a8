-- Claim the one run of a task id before a delivery of it runs: at most one delivery of
-- a request runs at a time, and none runs once it has succeeded. The claimed run's
-- STARTED state is stored in the same step.
-- KEYS[1]  the task id's run claim: "<worker hostname> <worker instance> <run token>"
--          (SET NX EX; GET, TTL, SET EX when one is held; DEL when a success is found)
-- KEYS[2]  the task id's Celery result, JSON (GET; SET EX and PUBLISH when claimed)
-- ARGV[1]  this run's claim
-- ARGV[2]  the claim's time to live, in seconds (longer than any run); what it has
--          lived is this minus its TTL, in Redis's own clock
-- ARGV[3]  the prefix of the workers' heartbeat hashes (HGET <prefix><hostname> instance)
-- ARGV[4]  the prefix of the workers' held sets (SISMEMBER <prefix><hostname> task id)
-- ARGV[5]  seconds a new claim counts as running before its worker's held set lists it
-- ARGV[6]  the task id
-- ARGV[7]  '1' for a message given back (a dead worker's, restored or published again
--          by the reaper, or requeued by the broker): it takes any claim over, since
--          its holder no longer holds it; '0' otherwise
-- ARGV[8]  the result to store once claimed: the STARTED state, as Celery encodes it
-- ARGV[9]  that result's time to live, in seconds
-- A claim is live while its worker beats with the claim's instance, and either the
-- worker's held set lists the task or the claim is younger than ARGV[5]: the view the
-- reaper takes of which messages a live worker holds.
-- Returns 'claimed' (this run is the one), 'done' (a success is stored: nothing to
-- run) or 'running' (a live claim is held); nothing is written unless 'claimed'.
-- The common case, no claim held yet, costs 5 commands (EVALSHA, SET NX, GET, SET,
-- PUBLISH): what Celery's own STARTED costs (GET, MULTI, SETEX, PUBLISH, EXEC).
local ttl = tonumber(ARGV[2])
local fresh = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ttl)
local meta = redis.call('GET', KEYS[2])
if meta then
  local ok, decoded = pcall(cjson.decode, meta)
  if ok and type(decoded) == 'table' and decoded['status'] == 'SUCCESS' then
    if fresh then
      redis.call('DEL', KEYS[1])
    end
    return 'done'
  end
end
if not fresh then
  local holder = redis.call('GET', KEYS[1])
  if holder ~= ARGV[1] and ARGV[7] ~= '1' then
    local host, instance = string.match(holder, '^(.+) (%S+) %S+$')
    if host and redis.call('HGET', ARGV[3] .. host, 'instance') == instance then
      local age = ttl - redis.call('TTL', KEYS[1])
      if age < tonumber(ARGV[5]) or redis.call('SISMEMBER', ARGV[4] .. host, ARGV[6]) == 1 then
        return 'running'
      end
    end
  end
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ttl)
end
redis.call('SET', KEYS[2], ARGV[8], 'EX', tonumber(ARGV[9]))
redis.call('PUBLISH', KEYS[2], ARGV[8])
return 'claimed'
