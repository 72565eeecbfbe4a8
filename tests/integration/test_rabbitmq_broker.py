"""RabbitMQ as the broker (`OMNI_BROKER_URL=amqp://...`), Redis kept for results and
coordination: real workers and a real RabbitMQ serve requests, native priorities order
them, a worker killed with SIGKILL has its message redelivered at once, and what reads
queue depths degrades to RabbitMQ's counts.

The queues get names of their own (`OMNI_AR__QUEUE`, `OMNI_DIFFUSION__QUEUE`), deleted
at the end, so a shared RabbitMQ is left as found. Skipped when nothing answers at
`OMNI_TEST_AMQP_URL` (default amqp://guest:guest@127.0.0.1:5672//).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from celery.result import AsyncResult
from conftest import clean_redis, start_ready_workers
from helpers import AMQP_URL, amqp_answers, assert_png
from kombu import Connection

from omni_tasks.config import CoreModuleConfig, load_config
from omni_tasks.coordination import keys
from omni_tasks.coordination.client import get_redis
from omni_tasks.coordination.depths import (
    UNKNOWN_LEVEL,
    highest_waiting_level,
    model_depths,
    queue_depths,
    total_queued,
)
from omni_tasks.dev.launcher import WorkerProcess
from omni_tasks.tasks.celery_app import pool_queue

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 180
#: Sends `busy`, waits until a worker runs it, then sends `then` in order; prints ids.
#: Sends one request per (model, queue) of argv[1]; prints their ids.
MODEL_PRODUCER = """
import json, sys
from omni_tasks import generate_image
ids = [
    generate_image.apply_async(kwargs=fields, **({"queue": queue} if queue else {})).id
    for fields, queue in json.loads(sys.argv[1])
]
print(json.dumps(ids))
"""
PRODUCER = """
import json, sys, time
from omni_tasks import generate_image
spec = json.loads(sys.argv[1])
busy = generate_image.delay(**spec["busy"])
deadline = time.monotonic() + 120
while busy.state not in ("STARTED", "PROGRESS") and time.monotonic() < deadline:
    time.sleep(0.02)
then = [generate_image.delay(**fields).id for fields in spec["then"]]
print(json.dumps({"busy": busy.id, "then": then}))
"""


@dataclass
class Rabbit:
    env: dict[str, str]
    config: CoreModuleConfig

    def queues(self) -> list[str]:
        """The pools' queues and their models' (each model's queue, declared when a
        message is first routed there)."""
        dit = self.config.diffusion.queue
        models = [keys.model_queue(dit, m) for m in self.config.diffusion_models()]
        return [self.config.ar.queue, dit, *models]

    def clear(self, delete: bool = False) -> None:
        """Purge (or delete) this module's queues and exchanges."""
        with Connection(AMQP_URL, connect_timeout=5) as connection:
            for name in self.queues():
                channel = connection.channel()
                try:
                    if delete:
                        channel.queue_delete(name)
                        channel.exchange_delete(name)
                    else:
                        channel.queue_purge(name)
                except connection.channel_errors:
                    pass  # not declared yet
                finally:
                    try:
                        channel.close()
                    except Exception:
                        pass


@pytest.fixture(scope="module")
def rabbit(tiny_flux_dir: Path) -> Iterator[Rabbit]:
    if not amqp_answers(AMQP_URL):
        pytest.skip(f"no RabbitMQ answers at {AMQP_URL} (set OMNI_TEST_AMQP_URL)")
    suffix = uuid.uuid4().hex[:6]
    env = {
        "OMNI_BROKER_URL": AMQP_URL,
        "OMNI_AR__QUEUE": f"ar-{suffix}",
        "OMNI_DIFFUSION__QUEUE": f"dit-{suffix}",
        "OMNI_DIFFUSION__CONCURRENCY": "1",
        # No worker-own queues: affinity routing is covered on Redis.
        "OMNI_DIFFUSION__CACHE_AFFINITY": "false",
        # flux-b: registered, served by no worker here (its requests wait in its queue).
        "OMNI_MODELS": '{"flux-b": {}}',
    }
    found = Rabbit(env=env, config=load_config(env={**os.environ, **env}))
    assert found.config.broker == AMQP_URL and not found.config.broker_is_redis
    clean_redis()
    found.clear()
    yield found
    found.clear(delete=True)
    clean_redis()


@pytest.fixture()
def amqp_config(rabbit: Rabbit, use_config: Callable[..., None]) -> CoreModuleConfig:
    """This process's config with the RabbitMQ broker (for the readers of queue depths)."""
    use_config(rabbit.config)
    return rabbit.config


def send(rabbit: Rabbit, busy: dict[str, Any], then: list[dict[str, Any]]) -> dict[str, Any]:
    """Run `PRODUCER` as an application would: its own process, the RabbitMQ broker."""
    out = subprocess.run(
        [sys.executable, "-c", PRODUCER, json.dumps({"busy": busy, "then": then})],
        env={**os.environ, **rabbit.env},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def started_at(value: dict[str, Any]) -> float:
    return float(value["timings"]["started_at"])


def image(prompt: str, priority: str, steps: int = 1, size: int = 32) -> dict[str, Any]:
    return {"prompt": prompt, "width": size, "height": size, "steps": steps, "priority": priority}


def test_native_priorities_serve_the_high_request_next(
    rabbit: Rabbit, amqp_config: CoreModuleConfig, run_dir: Path
) -> None:
    queue = rabbit.config.diffusion.queue
    client = get_redis(amqp_config.redis_url)
    logs = run_dir / "rmq-logs"
    (worker,) = start_ready_workers([queue], logs, env=rabbit.env, extra_args=["-c", "1"])
    try:
        then = [*(image(f"low {i}", "low") for i in range(5)), image("high", "high")]
        sent = send(rabbit, image("busy", "low", steps=40, size=128), then)
        busy = AsyncResult(sent["busy"])
        # While the one slot is busy, RabbitMQ holds the rest; its count is what readers see.
        depths = queue_depths(client, amqp_config)
        if busy.state != "SUCCESS":
            assert depths[queue] == {UNKNOWN_LEVEL: 6}
            assert total_queued(client, amqp_config) == 6
        assert highest_waiting_level(client, amqp_config, [queue]) is None  # no levels
        busy_value = busy.get(TIMEOUT)
        *low_ids, high_id = sent["then"]
        high = AsyncResult(high_id).get(TIMEOUT)
        low_values = [AsyncResult(i).get(TIMEOUT) for i in low_ids]
    finally:
        worker.stop()
    assert_png(high["image_path"], 32, 32)
    assert all(started_at(high) < started_at(v) for v in low_values)
    assert started_at(busy_value) < started_at(high)
    low_starts = [started_at(v) for v in low_values]
    assert low_starts == sorted(low_starts)  # FIFO within a priority
    assert total_queued(client, amqp_config) == 0


def test_model_queues_and_a_message_passed_on(
    rabbit: Rabbit, amqp_config: CoreModuleConfig, run_dir: Path
) -> None:
    """A worker serving tiny-flux reads its model's queue; a flux-b request sent to it
    is passed on to flux-b's queue, declared with x-max-priority as workers declare
    it, where it waits (no worker serves flux-b here)."""
    dit = rabbit.config.diffusion.queue
    client = get_redis(amqp_config.redis_url)
    own, other = keys.model_queue(dit, "tiny-flux"), keys.model_queue(dit, "flux-b")
    logs = run_dir / "rmq-logs"
    (worker,) = start_ready_workers([dit], logs, env=rabbit.env, extra_args=["-c", "1"])
    try:
        spec = [
            (image("routed to tiny-flux's queue", "normal"), None),
            ({**image("for flux-b", "high"), "model": "flux-b"}, own),
        ]
        out = subprocess.run(
            [sys.executable, "-c", MODEL_PRODUCER, json.dumps(spec)],
            env={**os.environ, **rabbit.env},
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            cwd=ROOT,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        served, passed = json.loads(out.stdout.strip().splitlines()[-1])
        value = AsyncResult(served).get(TIMEOUT)
        deadline = time.monotonic() + 60
        while model_depths(client, amqp_config)["flux-b"] != {UNKNOWN_LEVEL: 1}:
            assert time.monotonic() < deadline, model_depths(client, amqp_config)
            time.sleep(0.2)
    finally:
        worker.stop()
    assert value["model"] == "tiny-flux"
    assert AsyncResult(passed).state == "PENDING"
    assert sum(queue_depths(client, amqp_config)[dit].values()) == 1  # the pool counts it
    with Connection(AMQP_URL, connect_timeout=5) as connection:
        channel = connection.channel()
        try:  # declared as a pool queue: the same declaration is accepted again
            pool_queue(other)(channel).declare()
        finally:
            channel.close()


def runner_of(task_id: str, workers: list[WorkerProcess], timeout_s: float = 60) -> WorkerProcess:
    """The worker running `task_id`, from its result meta (`result_extended`)."""
    by_name = {w.hostname: w for w in workers}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        meta = AsyncResult(task_id).backend.get_task_meta(task_id)
        if meta["status"] in ("STARTED", "PROGRESS") and meta.get("worker") in by_name:
            return by_name[meta["worker"]]
        time.sleep(0.05)
    raise AssertionError(f"{task_id} did not start on {sorted(by_name)}")


def test_a_killed_workers_message_is_redelivered_at_once(rabbit: Rabbit, run_dir) -> None:
    workers = start_ready_workers(
        [rabbit.config.diffusion.queue] * 2,
        run_dir / "rmq-logs",
        env=rabbit.env,
        extra_args=["-c", "1"],
    )
    try:
        sent = send(rabbit, image("killed mid-run", "normal", steps=30, size=128), [])
        victim = runner_of(sent["busy"], workers)
        (survivor,) = [w for w in workers if w is not victim]
        os.killpg(victim.proc.pid, signal.SIGKILL)
        victim.proc.wait()
        killed_at = time.monotonic()
        assert runner_of(sent["busy"], [survivor], timeout_s=60) is survivor
        redelivered_s = time.monotonic() - killed_at
        value = AsyncResult(sent["busy"]).get(TIMEOUT)
        done_s = time.monotonic() - killed_at
    finally:
        for worker in workers:
            worker.stop()
    assert_png(value["image_path"], 128, 128)
    meta = AsyncResult(sent["busy"]).backend.get_task_meta(sent["busy"])
    assert meta["status"] == "SUCCESS" and meta["worker"] == survivor.hostname
    # No visibility timeout: RabbitMQ requeues at the connection loss. (Completion may
    # wait up to the dead worker's DiT cache single-flight lease, 30 s, on top.)
    assert redelivered_s < 10, f"redelivered {redelivered_s:.1f}s after the kill"
    assert done_s < 60, f"completed {done_s:.1f}s after the kill"
