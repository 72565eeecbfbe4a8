"""The colon layout in Redis (`ar:3`), converted when a worker starts."""

from __future__ import annotations

from omni_tasks.coordination import colon_layout, keys


def test_colon_lists_move_in_order_and_colon_bindings_are_dropped(redis_client) -> None:
    redis_client.lpush("ar:3", "first", "second")
    redis_client.lpush(keys.queue_key("ar", 3), "already-there")
    binding = colon_layout.BINDING_PREFIX + "colon-test"  # not a live exchange's bindings
    current = keys.PRIORITY_SEP.join(["colon-test", "", "colon-test"])
    redis_client.sadd(binding, "colon-test::colon-test", current)

    assert colon_layout.convert(redis_client, ["ar", "diffusion"]) == {
        "moved": 2,
        "bindings_dropped": 1,
    }
    assert not redis_client.exists("ar:3")
    # The moved messages are served after what waited there, in their own order.
    served = [redis_client.rpop(keys.queue_key("ar", 3)) for _ in range(3)]
    assert served == ["already-there", "first", "second"]
    assert redis_client.smembers(binding) == {current}
    assert colon_layout.convert(redis_client, ["ar"]) == {
        "moved": 0,
        "bindings_dropped": 0,
    }  # idempotent
    redis_client.delete(binding)
