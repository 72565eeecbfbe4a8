-- Publish a single-flight outcome for the waiters and release the lease.
-- KEYS[1]  the lease   (GET, DEL when ours)
-- KEYS[2]  the outcome (SET EX)
-- ARGV     token, outcome, outcome TTL in s
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
