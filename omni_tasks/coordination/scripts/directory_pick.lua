-- The first live, not overloaded holder of a request's cache keys.
-- KEYS     the holders hashes of the request's cache keys, best first (HKEYS)
-- ARGV[1]  heartbeat-key prefix, ARGV[2] worker-queue prefix, ARGV[3] priority
--          separator, ARGV[4..] the priority levels above 0
-- Also touches (read only): <heartbeat prefix><worker> (EXISTS, HGET concurrency) and
-- the worker's own queue lists, derived from the holder names (single Redis only).
-- Returns the worker whose own queue holds fewer messages than its concurrency, or false.
for _, holders in ipairs(KEYS) do
  local names = redis.call('HKEYS', holders)
  for _, worker in ipairs(names) do
    local beat = ARGV[1] .. worker
    if redis.call('EXISTS', beat) == 1 then
      local slots = tonumber(redis.call('HGET', beat, 'concurrency') or '1') or 1
      local q = ARGV[2] .. worker
      local backlog = redis.call('LLEN', q)
      for i = 4, #ARGV do backlog = backlog + redis.call('LLEN', q .. ARGV[3] .. ARGV[i]) end
      if backlog < slots then return worker end
    end
  end
end
return false
