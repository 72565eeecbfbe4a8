-- A worker's DiT cache dropped a key (evicted, expired, invalidated, replaced, cleared).
-- KEYS[1]  holders hash of the cache key (HDEL)
-- KEYS[2]  the worker's set of keys      (SREM)
-- ARGV     worker, cache key
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('SREM', KEYS[2], ARGV[2])
return 1
