-- Give back a lease or claim this holder still holds: a single-flight lease whose
-- computation failed, a run claim whose run did not succeed.
-- KEYS[1]  the lease or claim (GET, DEL when ours)
-- ARGV[1]  the holder's token (the value it was written with)
-- Returns 1 if released, else 0 (another holder has it, or nobody does).
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
