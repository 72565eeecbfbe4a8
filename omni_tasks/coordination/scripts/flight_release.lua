-- Release a single-flight lease without an outcome (the computation failed).
-- KEYS[1]  the lease (GET, DEL when ours)
-- ARGV     token
-- Returns 1 if released, else 0.
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
