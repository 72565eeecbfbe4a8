"""Admission on the producer side, on real Redis with no worker: the count is atomic,
idempotent and released once, one step with the ledger entry, and the limit holds for
`send_task`, chains and `schedule_request`."""

from __future__ import annotations

from typing import Any

import pytest
from helpers import DIT_QUEUE, KEYS

from omni_tasks.config import get_config
from omni_tasks.coordination import admission, keys
from omni_tasks.coordination.client import get_redis
from omni_tasks.errors import QueueFullError, RequestValidationError

INF = float("inf")


def _admit(queue: str, admission_id: str, **options: Any) -> admission.Admission:
    """`admission.admit` with the process's client and config."""
    return admission.admit(get_redis(), get_config(), queue, admission_id, **options)


def _count(queue: str) -> int:
    return admission.count(get_redis(), queue)


def _queued(queue: str) -> int:
    client = get_redis()
    return sum(client.llen(k) for k in keys.queue_keys(queue))


def test_admission_is_atomic_idempotent_and_released_once(redis_client) -> None:
    with admission.max_queue_size(2):
        first = _admit("ar", "a")
        assert first.added
        assert not _admit("ar", "a").added  # the same id again: no new place
        _admit("ar", "b")
        with pytest.raises(QueueFullError, match=r"pool 'ar'.*max_queue_size=2"):
            _admit("ar", "c")
        assert _admit("ar", "c", enforce=False).added  # a republish: no limit
    assert _count("ar") == 3
    admission.release(redis_client, get_config().pool_queues(), ["a", "a", "c"])
    assert _count("ar") == 1
    assert _count("diffusion") == 0


def test_admission_and_ledger_entry_are_one_step(redis_client) -> None:
    """A send admits and records in one script: a refused request leaves no entry,
    an accepted one is open in the ledger, and undo closes both."""
    from omni_tasks.coordination import ledger

    def entry(task_id: str) -> ledger.Entry:
        return ledger.prepare("omni_tasks.generate_text", task_id, [], {"prompt": "p"}, {})

    with admission.max_queue_size(1):
        accepted = _admit("ar", "a", entry=entry("a"))
        with pytest.raises(QueueFullError):
            _admit("ar", "b", entry=entry("b"))
    assert accepted.added and accepted.recorded == "a"
    assert ledger.entry(redis_client, "a")["kwargs"] == {"prompt": "p"}
    assert ledger.entry(redis_client, "b") is None
    assert ledger.open_since(redis_client, INF) == ["a"]
    later = _admit("ar", "a", counted=False, entry=entry("a-stage2"))
    assert not later.added and later.recorded == "a-stage2"  # recorded, not counted
    assert _count("ar") == 1
    queues = get_config().pool_queues()
    accepted.undo(redis_client, queues)
    later.undo(redis_client, queues)
    assert _count("ar") == 0 and ledger.open_since(redis_client, INF) == []


def test_send_task_is_admitted_and_refused_when_full(redis_client, use_config) -> None:
    from dataclasses import replace

    from omni_tasks import app

    config = get_config()
    use_config(replace(config, scheduler=replace(config.scheduler, max_queue_size=1)))
    sent = app.send_task("omni_tasks.generate_image", kwargs={"prompt": "x"})
    assert _count("diffusion") == 1
    with pytest.raises(QueueFullError, match="pool 'diffusion'"):
        app.send_task("omni_tasks.generate_image", kwargs={"prompt": "y"})
    assert _queued(DIT_QUEUE) == 1
    assert redis_client.zscore(KEYS.admitted("diffusion"), sent.id) is not None
    # A send the router refuses (invalid kwargs) gives its place back.
    with pytest.raises(RequestValidationError, match="prompt"):
        app.send_task("omni_tasks.probe", kwargs={"prompt": 5})
    assert _count("ar") == 0


def test_a_multimodal_chain_is_counted_once(redis_client) -> None:
    from omni_tasks import generate_multimodal

    with admission.max_queue_size(1):
        result = generate_multimodal.delay(prompt="a cat")
        with pytest.raises(QueueFullError):
            generate_multimodal.delay(prompt="a dog")
    assert (_count("ar"), _count("diffusion")) == (1, 0)
    assert redis_client.zrange(KEYS.admitted("ar"), 0, -1) == [result.id]
    assert _queued("ar") == 1


def test_the_scheduler_limit_applies_to_schedule_request(redis_client) -> None:
    import asyncio

    from omni_tasks import OmniScheduler, SchedulerConfig, create_text_request

    scheduler = OmniScheduler(SchedulerConfig(max_queue_size=1))
    assert asyncio.run(scheduler.schedule_request(create_text_request("a")))
    with pytest.raises(QueueFullError, match="max_queue_size=1"):
        asyncio.run(scheduler.schedule_request(create_text_request("b")))
    assert _count("ar") == 1 and _queued("ar") == 1
