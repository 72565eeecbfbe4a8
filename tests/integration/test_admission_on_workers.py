"""Admission (`scheduler.max_queue_size` per pool) on every enqueue path, on real Redis and
real workers: producers racing in separate processes never overshoot the limit, a
refused request is not enqueued, and the count comes back down on every way a request
ends, including a worker killed while it holds admitted requests.

The worker runs the AR pool on the transformers engine (quick to start), with a reaper
pass every second; reconciliation is run by the test itself.
"""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import clean_redis, start_ready_workers
from helpers import DIT_QUEUE, KEYS, eventually, publish_raw

from omni_tasks.config import get_config
from omni_tasks.coordination import admission, keys
from omni_tasks.coordination.client import get_redis

ENV = {
    "OMNI_AR__ENGINE": "transformers",
    "OMNI_REAPER_INTERVAL_S": "1",
    # Long enough that the worker's own reaper never reconciles during a test: a count
    # that comes down does so by its release.
    "OMNI_LEDGER_GRACE_S": "60",
}
RACERS, TRIES, LIMIT = 8, 6, 20

#: One racing producer: waits for "go" on stdin, then enqueues TRIES requests through
#: one of the enqueue paths (argv[1]); prints the accepted ids and the refusals.
PRODUCER = r"""
import asyncio, json, sys
from omni_tasks import OmniScheduler, QueueFullError, create_text_request, submit
from omni_tasks.tasks import app, generate_text, probe
path, tries = sys.argv[1], int(sys.argv[2])
paths = {
    "delay": lambda i: generate_text.delay(prompt=f"race {i}", max_tokens=2).id,
    "apply_async": lambda i: probe.apply_async(kwargs={"prompt": f"race {i}"}).id,
    "send_task": lambda i: app.send_task("omni_tasks.probe", kwargs={"prompt": "race"}).id,
    "submit": lambda i: submit(create_text_request(f"race {i}", max_tokens=2)).id,
}
scheduler = OmniScheduler()
def schedule(i):
    request = create_text_request(f"race {i}", max_tokens=2)
    asyncio.run(scheduler.schedule_request(request))
    return request.request_id
paths["schedule_request"] = schedule
print("ready", flush=True)
sys.stdin.readline()
accepted, refused = [], []
for i in range(tries):
    try:
        accepted.append(paths[path](i))
    except QueueFullError as exc:
        refused.append(str(exc))
print(json.dumps({"accepted": accepted, "refused": refused}), flush=True)
"""
PATHS = ["delay", "apply_async", "send_task", "submit", "schedule_request"]


@pytest.fixture(scope="module")
def ar_worker(tiny_models, run_dir: Path) -> Iterator[Callable[[], object]]:
    """Starts the module's AR worker on first call (the race needs none at first)."""
    started: list = []

    def get() -> object:
        if not started:
            started.extend(start_ready_workers(["ar"], run_dir / "logs", env=ENV))
        return started[0]

    clean_redis()
    yield get
    for worker in started:
        worker.stop()
    clean_redis()


def _queued(queue: str) -> int:
    client = get_redis()
    return sum(client.llen(k) for k in keys.queue_keys(queue))


def _admitted(queue: str) -> int:
    return admission.count(get_redis(), queue)


def _race() -> list[dict]:
    import os

    env = {**os.environ, "OMNI_SCHEDULER__MAX_QUEUE_SIZE": str(LIMIT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PRODUCER, PATHS[i % len(PATHS)], str(TRIES)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        for i in range(RACERS)
    ]
    for proc in procs:  # all imported and connected: start them together
        assert proc.stdout.readline().strip() == "ready"
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    outs = [json.loads(proc.communicate(timeout=120)[0].splitlines()[-1]) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs)
    return outs


def _push_malformed(task: str, task_id: str) -> None:
    """A kombu envelope whose body's kwargs are not an object, straight onto `ar`."""
    from omni_tasks.tasks import app

    headers = app.amqp.create_task_message(task_id, task, (), {}).headers
    body = json.dumps([[], "not an object", {"callbacks": None, "errbacks": None}])
    entry = {
        "body": base64.b64encode(body.encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": {
            "correlation_id": task_id,
            "delivery_mode": 2,
            "delivery_info": {"exchange": "ar", "routing_key": "ar"},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    get_redis().lpush(keys.queue_key("ar", 0), json.dumps(entry))


def test_racing_producers_never_exceed_the_limit_and_every_accepted_request_completes(
    ar_worker, run_dir: Path
) -> None:
    from omni_tasks import app

    clean_redis()
    outs = _race()
    accepted = [i for out in outs for i in out["accepted"]]
    refused = [r for out in outs for r in out["refused"]]
    assert len(accepted) + len(refused) == RACERS * TRIES
    assert len(accepted) == LIMIT  # never more, and the pool fills up
    assert len(set(accepted)) == LIMIT
    assert _queued("ar") == LIMIT  # a refused request was not enqueued
    assert _admitted("ar") == LIMIT
    assert all("pool 'ar'" in r and f"max_queue_size={LIMIT}" in r for r in refused)
    print(f"race: {len(accepted)} accepted, {len(refused)} refused, limit {LIMIT}")

    ar_worker()
    results = [app.AsyncResult(task_id) for task_id in accepted]
    assert all(isinstance(r.get(120), dict) for r in results)
    assert {r.state for r in results} == {"SUCCESS"}
    assert eventually(lambda: _admitted("ar") == 0, timeout_s=15)


def test_the_count_is_released_on_every_outcome(ar_worker) -> None:
    from omni_tasks import cancel
    from omni_tasks.tasks import app, generate_text, probe

    ar_worker()
    done = generate_text.delay(prompt="done", max_tokens=2)
    # Admitted as their producers did, then published past the producer's checks.
    failed_id, refused_id = (f"{kind}-{uuid.uuid4().hex[:8]}" for kind in ("bad", "refused"))
    for task_id in (failed_id, refused_id):
        admission.admit(get_redis(), get_config(), "ar", task_id)
    publish_raw("omni_tasks.probe", {"prompt": 5}, "ar", task_id=failed_id)  # fails there
    _push_malformed("omni_tasks.probe", refused_id)  # refused by the worker's consumer
    cancelled = probe.apply_async(kwargs={"prompt": "cancelled"}, countdown=2)
    cancel(cancelled.id)
    expired = probe.apply_async(kwargs={"prompt": "expired"}, countdown=2, expires=1)
    assert done.get(60)["request_id"] == done.id
    states = {
        r.id: eventually(lambda r=r: r.state if r.ready() else None, timeout_s=30)
        for r in map(app.AsyncResult, (failed_id, cancelled.id, expired.id, refused_id))
    }
    assert list(states.values()) == ["FAILURE", "REVOKED", "REVOKED", "FAILURE"]
    assert eventually(lambda: _admitted("ar") == 0, timeout_s=15)


def test_a_chain_keeps_its_one_place_while_its_later_stage_waits(ar_worker) -> None:
    from omni_tasks import cancel, generate_multimodal
    from omni_tasks.tasks import app

    ar_worker()  # runs the AR stage; no diffusion worker takes the DiT stage
    result = generate_multimodal.delay(prompt="a cat", max_tokens=4)
    app.AsyncResult(result.id + ".prompt").get(60)
    assert eventually(lambda: _queued(DIT_QUEUE) == 1, timeout_s=10)
    assert (_admitted("ar"), _admitted("diffusion")) == (1, 0)
    cancel(result.id)


def test_a_killed_workers_admitted_requests_are_released_once_they_complete(
    ar_worker, tiny_models, run_dir: Path
) -> None:
    from omni_tasks import generate_text
    from omni_tasks.tasks.celery_app import app

    main = ar_worker()
    before = _admitted("ar")  # what earlier tests left waiting for other pools
    victim = start_ready_workers(["ar"], run_dir / "logs", env=ENV, name="victim")[0]
    app.control.cancel_consumer("ar", destination=[main.hostname], reply=True)
    try:
        results = [generate_text.delay(prompt=f"victim {i}", max_tokens=64) for i in range(3)]
        eventually(lambda: results[0].state in ("STARTED", "PROGRESS"), timeout_s=30)
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait()
        assert _admitted("ar") == before + 3
    finally:
        app.control.add_consumer("ar", destination=[main.hostname], reply=True)
    assert [r.get(120)["request_id"] for r in results] == [r.id for r in results]
    assert eventually(lambda: _admitted("ar") == before, timeout_s=15)


def test_the_reaper_reconciles_admissions_nothing_will_release(ar_worker, use_config) -> None:
    from dataclasses import replace

    from omni_tasks.tasks import app, probe
    from workers.lifecycle.reaper import Reaper

    ar_worker()
    finished, vanished = (f"{kind}-{uuid.uuid4().hex[:8]}" for kind in ("done", "gone"))
    app.backend.mark_as_done(finished, {"request_id": finished})  # its release was lost
    admission.admit(get_redis(), get_config(), "ar", finished)
    admission.admit(
        get_redis(), get_config(), "ar", vanished
    )  # no message, no ledger entry, no result anywhere
    waiting = probe.apply_async(kwargs={"prompt": "later"}, countdown=30)  # open, not done
    use_config(replace(get_config(), ledger_grace_s=0.01))
    time.sleep(0.05)  # past the grace
    reaper = Reaper(app)

    def one_pass() -> dict[str, int]:  # the worker's reaper keeps taking the lock
        get_redis().delete(KEYS.reaper_lock())
        return reaper.run_once()

    done = eventually(one_pass, timeout_s=10)
    assert done["released"] >= 2  # with what earlier tests left final (a cancelled chain)
    left = set(get_redis().zrange(KEYS.admitted("ar"), 0, -1))
    assert waiting.id in left and not left & {finished, vanished}
    waiting.revoke()
