-- A worker cached a DiT key: record it in the directory.
-- KEYS[1]  holders hash of the cache key (HSET worker -> JSON entry)
-- KEYS[2]  the worker's set of keys      (SADD)
-- ARGV     worker, cache key, queue, bytes, now
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode({queue=ARGV[3], bytes=tonumber(ARGV[4]),
  created=tonumber(ARGV[5]), last_hit=0, hits=0}))
redis.call('SADD', KEYS[2], ARGV[2])
return 1
