-- Move every message of a list to another, oldest first, so the destination serves
-- them in their original order after its own older messages.
-- KEYS[1]  source list      (RPOPLPUSH)
-- KEYS[2]  destination list (RPOPLPUSH)
-- ARGV     none
-- Returns how many messages moved.
local n = 0
while redis.call('RPOPLPUSH', KEYS[1], KEYS[2]) do n = n + 1 end
return n
