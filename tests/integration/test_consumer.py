"""The worker's message consumer (`workers.lifecycle.consumer`) in a live `celery worker`:
messages it cannot run are refused, recorded in the rejected list and, when they name
a task id, marked failed; the worker keeps serving.

A pickled message refused on arrival is covered by
`tests/integration/test_end_to_end.py::test_worker_refuses_a_pickled_message_and_keeps_serving`.
"""

from __future__ import annotations

import pytest
from celery.result import AsyncResult
from helpers import KEYS, assert_png, eventually, publish_raw

from omni_tasks import app, generate_image
from omni_tasks.coordination import keys
from omni_tasks.coordination.client import get_redis
from omni_tasks.coordination.rejections import list_rejections

pytestmark = pytest.mark.slow
TIMEOUT = 180


@pytest.fixture(scope="module")
def diffusion_worker(pools: dict) -> object:
    """The shared pools' diffusion worker."""
    return pools["diffusion"]


def waiting_in(queue: str) -> int:
    return sum(get_redis().llen(k) for k in keys.queue_keys(queue))


def still_serving() -> None:
    value = generate_image.delay(prompt="still here", width=32, height=32, steps=1).get(TIMEOUT)
    assert_png(value["image_path"], 32, 32)


def test_a_message_for_an_unknown_task_is_refused_recorded_and_failed(diffusion_worker) -> None:
    task_id = publish_raw("omni_tasks.no_such_task", {"prompt": "x"}, "diffusion")
    with pytest.raises(Exception, match="no_such_task"):
        AsyncResult(task_id).get(TIMEOUT)
    assert AsyncResult(task_id).state == "FAILURE"
    record = next(r for r in list_rejections(get_redis()) if r["task_id"] == task_id)
    assert record["reason"].startswith("unknown task")
    assert record["task"] == "omni_tasks.no_such_task" and record["queue"] == "diffusion"
    assert int(get_redis().hget(KEYS.stats("diffusion"), "rejected") or 0) >= 1
    still_serving()


def test_an_undecodable_message_is_recorded_and_dropped(diffusion_worker) -> None:
    queue = app.amqp.queues["diffusion"]
    with app.producer_or_acquire() as producer:
        producer.publish(
            b'{"prompt": "half a message',
            exchange=queue.exchange,
            routing_key=queue.routing_key,
            declare=[queue],
            content_type="application/json",
            content_encoding="utf-8",
        )

    def undecodable() -> list[dict]:
        return [
            r for r in list_rejections(get_redis()) if r["reason"].startswith("undecodable message")
        ]

    found = eventually(undecodable, timeout_s=60)
    assert len(found) == 1, list_rejections(get_redis())
    record = found[0]
    assert record["queue"] == "diffusion" and record["task_id"] is None
    assert record["body"] == '{"prompt": "half a message'
    assert eventually(lambda: waiting_in("diffusion") == 0)  # acknowledged, not requeued
    still_serving()


def test_task_events_are_published_in_batches_and_all_arrive(diffusion_worker) -> None:
    """Task events held for a batch (`EVENT_BATCH_S`) all reach Flower's channel, none
    stuck, several to a PUBLISH. (Celery's own consumer also groups events when its loop
    is busy; what the batch window saves under load is measured by bench P1.)"""
    import base64
    import json

    listener = get_redis().pubsub()
    listener.psubscribe("*celeryev/task.multi")
    listener.get_message(timeout=1)  # the subscription's confirmation
    ids = [
        generate_image.delay(prompt=f"events {i}", width=32, height=32, steps=1).get(TIMEOUT)[
            "request_id"
        ]
        for i in range(5)
    ]
    published: list[list[dict]] = []

    def every_event_seen() -> bool:
        while (message := listener.get_message(timeout=0.2)) is not None:
            if message["type"] == "pmessage":
                envelope = json.loads(message["data"])
                events = json.loads(base64.b64decode(envelope["body"]))
                published.append([e for e in events if e.get("uuid") in ids])
        seen = {(e["uuid"], e["type"]) for batch in published for e in batch}
        kinds = ("task-received", "task-started", "task-succeeded")
        return all((i, kind) in seen for i in ids for kind in kinds)

    try:
        assert eventually(every_event_seen, timeout_s=10)
    finally:
        listener.close()
    carrying = [batch for batch in published if batch]
    assert len(carrying) < sum(len(batch) for batch in carrying), carrying
