"""The handler each task body runs on a worker (`workers.handlers`): one per task name,
redelivery admission (cancelled meanwhile, or returned too often), validation and
rejection records, the hand-back on shutdown, and the outcome counters.

In-process tests run the task bodies of a fresh Celery app whose tasks are declared
like `omni_tasks`' own (same functions, bases and options): registering handlers on
the process-wide app would change the tasks that `tests/test_architecture.py` checks.
They run on the real Redis of the tests; the last test runs a real worker.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import pytest
from celery import Celery
from celery.exceptions import Ignore, Reject
from helpers import KEYS, eventually

import omni_tasks
from omni_tasks import (
    create_multimodal_request,
    create_text_request,
)
from omni_tasks.config import get_config, set_config
from omni_tasks.coordination import runs
from omni_tasks.coordination.client import get_redis
from omni_tasks.coordination.idempotency import ACCEPTED_HEADER
from omni_tasks.coordination.rejections import list_rejections
from omni_tasks.errors import ProcessingError, RequestValidationError
from omni_tasks.tasks.base import OmniTask
from workers.handlers import (
    DELIVERY_KEY_TTL_S,
    become_chain,
    execute,
    handlers,
    register_handlers,
)
from workers.runtime import WorkerRuntime


def hands_its_message_to_a_handler(task: OmniTask) -> bool:
    """True when the task's body is `run_on_worker`."""
    return "run_on_worker" in type(task).__wrapped__.__code__.co_names


def omni_task_names() -> list[str]:
    return sorted(n for n, t in omni_tasks.app.tasks.items() if isinstance(t, OmniTask))


def declare_like_omni_tasks(app: Celery) -> None:
    """Declare every omni-tasks task on `app` the way `omni_tasks.tasks.definitions` does."""
    for name in omni_task_names():
        cls = type(omni_tasks.app.tasks[name])
        app.task(
            bind=True,
            base=cls.__bases__[0],
            name=name,
            shared=False,
            request_type=cls.request_type,
            stage=cls.stage,
        )(cls.__wrapped__)


@pytest.fixture(scope="module")
def worker_app() -> Celery:
    """A fresh app with omni-tasks' tasks and the handlers a worker registers."""
    conf = omni_tasks.app.conf
    app = Celery("handlers-under-test", set_as_current=False)
    app.conf.update(
        broker_url=conf.broker_url,
        result_backend=conf.result_backend,
        result_extended=True,
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
    )
    declare_like_omni_tasks(app)
    register_handlers(app)
    return app


@contextmanager
def delivered(
    task: OmniTask, task_id: str, redelivered: bool = False, **headers: Any
) -> Iterator[None]:
    """The request context Celery gives a task body for one delivery of a message."""
    task.push_request(id=task_id, delivery_info={"redelivered": redelivered}, **headers)
    try:
        yield
    finally:
        task.pop_request()


@contextmanager
def config_with(**changes: Any) -> Iterator[None]:
    original = get_config()
    set_config(replace(original, **changes))
    try:
        yield
    finally:
        set_config(original)


def stats(queue: str) -> dict[str, str]:
    return get_redis().hgetall(KEYS.stats(queue))


def rejection_of(task_id: str) -> dict[str, Any]:
    return next(r for r in list_rejections(get_redis()) if r["task_id"] == task_id)


# ---------------------------------------------------------------- registration


def test_every_task_body_that_hands_over_has_a_runner() -> None:
    handing_over = {
        name
        for name in omni_task_names()
        if hands_its_message_to_a_handler(omni_tasks.app.tasks[name])
    }
    assert handing_over == set(handlers()) == set(omni_task_names())


def test_the_fresh_app_declares_the_tasks_like_omni_tasks(worker_app: Celery) -> None:
    for name in omni_task_names():
        ours, theirs = worker_app.tasks[name], omni_tasks.app.tasks[name]
        assert type(ours).__bases__ == type(theirs).__bases__
        assert type(ours).__wrapped__ is type(theirs).__wrapped__
        assert (ours.request_type, ours.stage) == (theirs.request_type, theirs.stage)


def test_register_handlers_sets_a_handler_on_each_task_of_that_app_only(
    worker_app: Celery,
) -> None:
    for name in handlers():
        assert callable(worker_app.tasks[name].handler), name
    # Sent by name, generate_multimodal becomes the two-stage chain.
    assert worker_app.tasks["omni_tasks.generate_multimodal"].handler is become_chain
    # The process-wide app (an application process) keeps its tasks handler-free.
    assert all(omni_tasks.app.tasks[name].handler is None for name in omni_task_names())
    assert OmniTask.handler is None


# ------------------------------------------------------------------ one delivery


def test_a_probe_runs_and_is_counted(worker_app: Celery, redis_client) -> None:
    task = worker_app.tasks["omni_tasks.probe"]
    request = create_text_request("probe me")
    with delivered(task, request.request_id):
        value = task.run(**request.to_message())
    assert set(value) == {"request_id", "text", "timings"}
    assert value["request_id"] == request.request_id
    timings = value["timings"]
    assert timings["queued_s"] >= 0 and timings["run_s"] >= 0
    assert timings["started_at"] >= request.created_at
    assert eventually(lambda: stats("ar").get("processed") == "1")
    assert "failed" not in stats("ar")
    assert not redis_client.exists(KEYS.deliveries(request.request_id))  # first delivery


def test_an_invalid_message_is_rejected_recorded_and_counted(
    worker_app: Celery, redis_client
) -> None:
    task = worker_app.tasks["omni_tasks.generate_image"]
    with delivered(task, "bad-width"), pytest.raises(RequestValidationError) as info:
        task.run(prompt="fox", width=33)
    assert info.value.field == "width"
    record = rejection_of("bad-width")
    assert record["task"] == "omni_tasks.generate_image" and record["queue"] == "diffusion"
    assert "width" in record["reason"] and json.loads(record["body"])["width"] == 33
    assert stats("diffusion")["failed"] == "1" and stats("diffusion")["rejected"] == "1"


def test_a_failing_stage_is_counted_as_failed(worker_app: Celery, redis_client) -> None:
    task = worker_app.tasks["omni_tasks.multimodal_render"]
    request = create_multimodal_request("no prompt stage", width=32, height=32, steps=1)
    with delivered(task, request.request_id), pytest.raises(ProcessingError, match="AR stage"):
        task.run(None, **request.to_message())
    assert stats("diffusion")["failed"] == "1"
    assert list_rejections(get_redis()) == []  # a failure, not a refused message


def test_a_shutdown_hands_the_message_back_without_counting_a_return(
    worker_app: Celery, redis_client
) -> None:
    task = worker_app.tasks["omni_tasks.probe"]
    request = create_text_request("interrupted")
    stopped = WorkerRuntime()
    stopped.stop()  # a warm shutdown: its engines raise EngineStoppedError
    with delivered(task, request.request_id), pytest.raises(Reject) as info:
        execute(task, request.to_message(), lambda _: stopped.text_engine())
    assert info.value.requeue
    assert redis_client.get(KEYS.deliveries(request.request_id)) == "-1"  # the credit
    assert "failed" not in stats("ar")
    # Coming back after the shutdown is not a return that counts against the cap:
    # even with no redeliveries allowed, the message runs.
    with config_with(max_redeliveries=0):
        with delivered(task, request.request_id, redelivered=True):
            value = task.run(**request.to_message())
    assert value["request_id"] == request.request_id
    assert not redis_client.exists(KEYS.deliveries(request.request_id))
    assert eventually(lambda: stats("ar").get("processed") == "1")


# ------------------------------------------------------------------ request ids


def test_a_message_without_a_request_id_takes_the_task_id(worker_app: Celery, redis_client) -> None:
    task = worker_app.tasks["omni_tasks.probe"]
    with delivered(task, "from-elsewhere"):
        assert task.run(prompt="no id")["request_id"] == "from-elsewhere"
    assert eventually(lambda: stats("ar").get("processed") == "1")


@pytest.mark.parametrize(
    ("args", "kwargs", "field"),
    [((), {"prompt": "x", "request_id": "another"}, "request_id"), (("hi",), {}, "args")],
    ids=["other-id", "positional"],
)
def test_a_message_no_producer_would_send_is_refused_and_recorded(
    worker_app: Celery, redis_client, args: tuple, kwargs: dict, field: str
) -> None:
    task = worker_app.tasks["omni_tasks.probe"]
    with delivered(task, "odd"), pytest.raises(RequestValidationError) as info:
        task.run(*args, **kwargs)
    assert info.value.field == field
    assert field in rejection_of("odd")["reason"]
    assert stats("ar")["failed"] == "1"


def test_another_clients_repeat_and_conflict_leave_the_first_result(
    worker_app: Celery, redis_client
) -> None:
    task = worker_app.tasks["omni_tasks.probe"]
    with delivered(task, "reused"):
        first = task.run(prompt="first")
    worker_app.backend.mark_as_done("reused", first)  # what Celery stores after the body
    with delivered(task, "reused"), pytest.raises(Ignore):
        task.run(prompt="first")  # the same request: not run again
    assert stats("ar")["duplicates"] == "1"
    with delivered(task, "reused"), pytest.raises(Ignore):
        task.run(prompt="second")  # refused and recorded, no state stored
    assert "different request" in rejection_of("reused")["reason"]
    assert worker_app.AsyncResult("reused").get(timeout=5) == first
    assert eventually(lambda: stats("ar").get("processed") == "1")  # one run


def test_a_conflict_while_the_first_request_runs_stores_no_state(
    worker_app: Celery, redis_client
) -> None:
    task = worker_app.tasks["omni_tasks.probe"]
    worker_app.backend.store_result("busy", {"step": 3, "steps": 8}, "PROGRESS")
    with delivered(task, "busy"):
        task.run(prompt="first")  # claims the id's fingerprint
    worker_app.backend.store_result("busy", {"step": 4, "steps": 8}, "PROGRESS")
    with delivered(task, "busy"), pytest.raises(Ignore):
        task.run(prompt="second")
    meta = worker_app.backend.get_task_meta("busy")
    assert meta["status"] == "PROGRESS" and meta["result"] == {"step": 4, "steps": 8}
    assert "different request" in rejection_of("busy")["reason"]
    assert eventually(lambda: stats("ar").get("processed") == "1")  # the first only


def test_a_twin_of_a_request_a_live_worker_runs_is_not_run(
    worker_app: Celery, redis_client
) -> None:
    task = worker_app.tasks["omni_tasks.probe"]
    redis_client.hset(KEYS.worker("w9@host"), "instance", "i9")  # a live worker's beat
    redis_client.sadd(KEYS.held("w9@host"), "twin")  # and holds the twin
    redis_client.set(KEYS.run_claim("twin"), runs.claim_value("w9@host", "i9"), ex=3600)
    with delivered(task, "twin", **{ACCEPTED_HEADER: True}), pytest.raises(Ignore):
        task.run(prompt="twin")
    assert stats("ar")["duplicates"] == "1"
    assert worker_app.backend.get_task_meta("twin")["status"] == "PENDING"  # no STARTED
    redis_client.delete(KEYS.worker("w9@host"))  # that worker died: the twin runs
    with delivered(task, "twin", **{ACCEPTED_HEADER: True}):
        assert task.run(prompt="twin")["request_id"] == "twin"
    assert worker_app.backend.get_task_meta("twin")["status"] == "STARTED"
    assert eventually(lambda: stats("ar").get("processed") == "1")  # one run


def test_a_message_a_producer_accepted_is_not_checked_again(
    worker_app: Celery, redis_client
) -> None:
    task = worker_app.tasks["omni_tasks.probe"]
    with delivered(task, "checked", **{ACCEPTED_HEADER: True}):
        task.run(prompt="checked at the producer")
    assert not redis_client.exists(KEYS.request_fingerprint("checked"))  # no round trip
    assert eventually(lambda: stats("ar").get("processed") == "1")


# ------------------------------------------------------------------- redelivery


def test_admit_script_counts_returns_and_leaves_a_revoked_counter_alone(redis_client) -> None:
    task_id = "admit-me"
    script_keys = [KEYS.revoked(task_id), KEYS.deliveries(task_id)]
    admit = redis_client.scripts.admit_redelivery
    assert admit(keys=script_keys, args=[DELIVERY_KEY_TTL_S]) == [0, 1]
    assert admit(keys=script_keys, args=[DELIVERY_KEY_TTL_S]) == [0, 2]
    assert 0 < redis_client.ttl(KEYS.deliveries(task_id)) <= DELIVERY_KEY_TTL_S
    redis_client.set(KEYS.revoked(task_id), "1")
    assert admit(keys=script_keys, args=[DELIVERY_KEY_TTL_S]) == [1, 0]
    assert redis_client.get(KEYS.deliveries(task_id)) == "2"


def test_a_redelivered_message_within_the_cap_runs(worker_app: Celery, redis_client) -> None:
    task = worker_app.tasks["omni_tasks.probe"]
    request = create_text_request("came back")
    cap = get_config().max_redeliveries
    redis_client.set(KEYS.deliveries(request.request_id), cap - 1)  # this return is the cap
    with delivered(task, request.request_id, redelivered=True):
        value = task.run(**request.to_message())
    assert value["request_id"] == request.request_id
    assert not redis_client.exists(KEYS.deliveries(request.request_id))  # done: forgotten
    assert list_rejections(get_redis()) == []
    assert eventually(lambda: stats("ar").get("processed") == "1")


def test_a_message_returned_past_the_cap_is_refused(worker_app: Celery, redis_client) -> None:
    task = worker_app.tasks["omni_tasks.probe"]
    request = create_text_request("poison")
    cap = get_config().max_redeliveries
    redis_client.set(KEYS.deliveries(request.request_id), cap)
    with delivered(task, request.request_id, redelivered=True):
        with pytest.raises(ProcessingError, match="max_redeliveries"):
            task.run(**request.to_message())
    record = rejection_of(request.request_id)
    assert f"redelivered {cap + 1} times" in record["reason"]
    assert record["task"] == "omni_tasks.probe" and record["queue"] == "ar"
    assert stats("ar")["failed"] == "1"
    assert eventually(lambda: "processed" in stats("ar"), timeout_s=0.5) is False


def test_a_redelivered_message_cancelled_meanwhile_is_skipped(
    worker_app: Celery, redis_client
) -> None:
    task = worker_app.tasks["omni_tasks.probe"]
    request = create_text_request("cancelled while away")
    redis_client.set(KEYS.revoked(request.request_id), "1")
    with delivered(task, request.request_id, redelivered=True), pytest.raises(Ignore):
        task.run(**request.to_message())
    assert omni_tasks.app.AsyncResult(request.request_id).state == "REVOKED"
    assert not redis_client.exists(KEYS.deliveries(request.request_id))
    assert list_rejections(get_redis()) == [] and "failed" not in stats("ar")


# --------------------------------------------------------------- a real worker
