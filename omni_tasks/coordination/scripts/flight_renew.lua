-- Extend a single-flight lease, only if we still hold it.
-- KEYS[1]  the lease (GET, PEXPIRE)
-- ARGV     token, lease in ms
-- Returns 1 if extended, else 0.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
