"""The reaper's question "which of these due requests still wait in a queue?", read
from the old end of each list: exact where lists are in publish order, and bounded by
the messages older than the newest request asked about, however deep the queue."""

from __future__ import annotations

import json
import time

from helpers import KEYS, write_heartbeat

from omni_tasks.config import get_config
from omni_tasks.coordination import keys
from omni_tasks.coordination.client import get_redis
from omni_tasks.coordination.queue_walk import CHUNK, queued_among

NOW = time.time()


def publish(client, queue: str, task_ids: list[str], at: float, level: int = 0) -> None:
    """Messages as kombu queues them (LPUSH: the tail is the oldest), with their ledger
    times."""
    for task_id in task_ids:
        client.lpush(keys.queue_key(queue, level), json.dumps({"headers": {"id": task_id}}))
    client.zadd(KEYS.ledger_open(), dict.fromkeys(task_ids, at))


def lranges(client) -> int:
    return int(client.info("commandstats").get("cmdstat_lrange", {}).get("calls", 0))


def queued(ids: set[str], published_before: float) -> set[str]:
    """`queued_among` with the process's client and config."""
    return queued_among(get_redis(), get_config(), ids, published_before)


def test_the_old_requests_of_a_deep_queue_are_found_from_its_tail(redis_client) -> None:
    old = [f"old-{i}" for i in range(10)]
    publish(redis_client, "ar", old, NOW - 600)
    publish(redis_client, "ar", [f"new-{i}" for i in range(20 * CHUNK)], NOW - 1)
    before = lranges(redis_client)
    found = queued({*old[:3], "lost-1"}, NOW - 300)
    assert found == set(old[:3])  # "lost-1" is nowhere: the reaper publishes it again
    assert lranges(redis_client) - before <= 2  # not the 10,000 newer messages


def test_every_level_of_the_pools_models_and_own_queues_is_looked_at(redis_client) -> None:
    write_heartbeat(redis_client, "w1@h", {"hostname": "w1@h", "stages": '["dit"]'})
    publish(redis_client, "diffusion", ["d9"], NOW - 600, level=9)
    publish(redis_client, KEYS.worker_queue("w1@h"), ["own3"], NOW - 600, level=3)
    publish(redis_client, keys.model_queue("diffusion", "tiny-flux"), ["m0"], NOW - 600)
    wanted = {"d9", "own3", "m0", "gone"}
    assert queued(wanted, NOW - 300) == {"d9", "own3", "m0"}


def test_foreign_messages_without_ledger_times_do_not_stop_the_walk(redis_client) -> None:
    redis_client.rpush("ar", "not json")  # unreadable, at the very tail
    for i in range(3 * CHUNK):  # a foreign client's older messages: no ledger entry
        redis_client.lpush("ar", json.dumps({"headers": {"id": f"foreign-{i}"}}))
    publish(redis_client, "ar", ["mine"], NOW - 600)
    assert queued({"mine"}, NOW - 300) == {"mine"}
