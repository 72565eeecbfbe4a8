"""Queue depths (`omni_tasks.coordination.depths`) with another broker: an AMQP broker that
does not answer reads as unknown depths."""

from __future__ import annotations

import time

from omni_tasks.coordination.monitoring import (
    highest_waiting_level,
    queue_depths,
    total_queued,
)


def test_an_unreachable_amqp_broker_reads_as_unknown_depths(redis_client, use_config) -> None:
    from dataclasses import replace

    from omni_tasks import get_config
    from omni_tasks.coordination.monitoring import read_snapshot

    config = replace(get_config(), broker_url="amqp://guest:guest@127.0.0.1:1//")
    use_config(config)
    started = time.monotonic()
    assert queue_depths(config) == {queue: {} for queue in config.pool_queues()}
    assert total_queued(config) == 0
    assert highest_waiting_level([config.diffusion.queue]) is None
    assert read_snapshot(config).queued == 0  # status and health still answer
    assert time.monotonic() - started < 30
