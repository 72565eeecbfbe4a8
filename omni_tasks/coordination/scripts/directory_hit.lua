-- Count a hit on an entry the worker holds.
-- KEYS[1]  holders hash of the cache key (HGET, HSET)
-- ARGV     worker, now
-- Returns the entry's hits, or 0 when the worker does not hold it.
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
local entry = cjson.decode(raw)
entry.hits = entry.hits + 1
entry.last_hit = tonumber(ARGV[2])
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(entry))
return entry.hits
