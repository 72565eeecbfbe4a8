-- Forget everything a worker held (it stopped, or its heartbeat expired).
-- KEYS[1]  the worker's set of keys (SMEMBERS, DEL)
-- ARGV     worker, holders-key prefix
-- Also touches: <holders-key prefix><key> for each key held (HDEL), derived from the
-- set's members (fine on a single Redis, not on a cluster).
-- Returns how many keys the worker held.
local held = redis.call('SMEMBERS', KEYS[1])
for _, k in ipairs(held) do
  redis.call('HDEL', ARGV[2] .. k, ARGV[1])
end
redis.call('DEL', KEYS[1])
return #held
