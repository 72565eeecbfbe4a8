-- Store a task's state, as Celery's Redis result backend does, in one round trip:
-- Celery reads the stored state first (GET) and writes unless it is SUCCESS (a later
-- state never replaces a success), then writes and publishes (MULTI, SET, PUBLISH,
-- EXEC): two round trips for every state a task stores.
-- KEYS[1]  the task's Celery result key (GET; SET [EX] and PUBLISH unless a success
--          is stored)
-- ARGV[1]  the state, as Celery encodes it (JSON)
-- ARGV[2]  its time to live in seconds; '0' for none
-- Returns 1 when stored and published, 0 when a success was stored already.
local meta = redis.call('GET', KEYS[1])
if meta and string.find(meta, '"status"%s*:%s*"SUCCESS"') then
  local ok, decoded = pcall(cjson.decode, meta)
  if ok and type(decoded) == 'table' and decoded['status'] == 'SUCCESS' then
    return 0
  end
end
local ttl = tonumber(ARGV[2])
if ttl > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ttl)
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
