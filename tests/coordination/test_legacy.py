"""An older release's Redis layout, converted when a worker starts."""

from __future__ import annotations

from omni_tasks.coordination import keys, legacy


def test_old_lists_move_in_order_and_old_bindings_are_dropped(redis_client) -> None:
    redis_client.lpush("ar:3", "first", "second")
    redis_client.lpush(keys.queue_key("ar", 3), "already-there")
    binding = legacy.BINDING_PREFIX + "legacy-test"  # not a live exchange's bindings
    current = keys.PRIORITY_SEP.join(["legacy-test", "", "legacy-test"])
    redis_client.sadd(binding, "legacy-test::legacy-test", current)

    assert legacy.convert(["ar", "diffusion"]) == {"moved": 2, "bindings_dropped": 1}
    assert not redis_client.exists("ar:3")
    # The moved messages are served after what waited there, in their own order.
    served = [redis_client.rpop(keys.queue_key("ar", 3)) for _ in range(3)]
    assert served == ["already-there", "first", "second"]
    assert redis_client.smembers(binding) == {current}
    assert legacy.convert(["ar"]) == {"moved": 0, "bindings_dropped": 0}  # idempotent
    redis_client.delete(binding)
