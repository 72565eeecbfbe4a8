-- Lease the deliveries that are due: their due time moves to the lease's end, so no other
-- API process takes them meanwhile, and a process that dies mid-delivery leaves them due
-- again once the lease ends.
-- KEYS[1]  the deliveries due, by time (ZRANGEBYSCORE, ZADD)
-- ARGV[1]  now (Unix seconds)
-- ARGV[2]  the lease's end
-- ARGV[3]  how many to take at most
-- Returns the delivery ids taken.
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], ARGV[2], id) end
return ids
