"""A Celery client that never imports omni_tasks, with kombu's default transport options:
its requests land in lists the workers read, in the order the contract promises
(docs/wire.md): an integer priority at kombu's default step at or below it, a request
sent without one by its `priority` class. Sent with the pool stopped, then served by a
one-slot worker, so the order it starts them in is the order they were queued in."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import KEYS, foreign

from omni_tasks.config import get_config
from omni_tasks.coordination import keys
from omni_tasks.requests import OmniRequest, RequestType
from omni_tasks.scheduling.policies import create_policy

pytestmark = pytest.mark.slow


def class_level(priority: str) -> int:
    request = OmniRequest(request_type=RequestType.TEXT, prompt="p", priority=priority)
    return create_policy(get_config()).route(request, "ar").level


def text(tag: str, **extra: object) -> dict:
    return {"prompt": f"foreign {tag}", "max_tokens": 2, "temperature": 0, **extra}


def test_default_client_priorities_are_honoured(redis_client, tiny_models, run_dir) -> None:
    from tests.conftest import start_ready_workers

    spec = {  # tag -> (message, the level it must be served at)
        "int9": ({"kwargs": text("int9"), "priority": 9}, 9),
        "low": ({"kwargs": text("low", priority="low")}, class_level("low")),
        "int4": ({"kwargs": text("int4"), "priority": 4}, 3),  # kombu's step below 4
        "no-priority": ({"kwargs": text("none")}, class_level("normal")),
        "high": ({"kwargs": text("high", priority="high")}, class_level("high")),
        "int7": ({"kwargs": text("int7"), "priority": 7}, 6),
    }
    messages = [{"task": "omni_tasks.generate_text", "queue": "ar", **m} for m, _ in spec.values()]
    ids = dict(zip(spec, foreign("send", json.dumps(messages)), strict=True))
    # Queued where a worker reads them: the pool's lists, with kombu's default separator.
    queued = sum(redis_client.llen(k) for k in keys.queue_keys(get_config().ar.queue))
    assert queued == len(spec)

    (worker,) = start_ready_workers(["ar"], run_dir / "logs", extra_args=["-c", "1"])
    try:
        results = foreign("wait", json.dumps(list(ids.values())))
    finally:
        worker.stop()
    started = {r["id"]: r["result"]["timings"]["started_at"] for r in results}
    assert all("result" in r for r in results), results
    order = sorted(spec, key=lambda tag: started[ids[tag]])
    levels = [spec[tag][1] for tag in order]
    assert levels == sorted(levels), f"served {order} at levels {levels}"
    assert order[0] == "high" and order[-1] in ("int9", "low")
    rerouted = "re-routed"
    log = worker.log_path.read_text(errors="replace")
    assert log.count(rerouted) == 3, "exactly the three sent without a priority move"


def test_a_list_no_worker_reads_is_reported_and_purge_covers_own_and_model_queues(
    redis_client,
) -> None:
    from omni_tasks import OmniScheduler

    # Sent without queue=: Celery's default queue, which no omni-tasks worker reads.
    (lost,) = foreign(
        "send",
        json.dumps(
            [{"task": "omni_tasks.generate_text", "kwargs": text("lost"), "queue": "celery"}]
        ),
    )
    health = OmniScheduler().get_health_status()
    assert health["stranded"] == {"celery": 1}
    assert not health["healthy"] and any("'celery'" in i for i in health["issues"])
    # A message in a diffusion worker's own queue (cache-affinity routing put it there).
    own = keys.queue_key(KEYS.worker_queue("gone@host"), 6)
    redis_client.lpush(own, json.dumps({"body": "", "headers": {}, "properties": {}}))
    diffusion = keys.queue_key(get_config().diffusion.queue, 3)
    redis_client.lpush(diffusion, json.dumps({"body": "", "headers": {}, "properties": {}}))
    # And one in the default model's queue: never stranded (its workers read it).
    model = keys.queue_key(keys.model_queue("diffusion", get_config().diffusion.model), 0)
    redis_client.lpush(model, json.dumps({"body": "", "headers": {}, "properties": {}}))
    redis_client.delete(KEYS.stranded())  # the scan above is cached
    assert OmniScheduler().get_health_status()["stranded"] == {"celery": 1}
    out = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "omni_tasks", "purge", "-f"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "Purged 3 messages" in out.stdout, out.stdout
    assert not any(redis_client.exists(k) for k in (own, diffusion, model))
    assert redis_client.llen("celery") == 1  # not an omni-tasks queue: left alone
    redis_client.delete("celery")


def test_a_request_in_the_wrong_pool_is_rerouted(pools) -> None:
    (task_id,) = foreign(
        "send",
        json.dumps(
            [
                {
                    "task": "omni_tasks.generate_text",
                    "kwargs": text("wrong"),
                    "queue": "diffusion",
                    "priority": 6,
                }
            ]
        ),
    )
    (result,) = foreign("wait", json.dumps([task_id]))
    assert result["result"]["request_type"] == "text", result
    log = pools["diffusion"].log_path.read_text(errors="replace")
    assert f"re-routed {task_id}" in log


def test_a_default_client_gets_answers_to_control_commands(pools) -> None:
    answered = foreign("ping")
    assert {w.hostname for w in pools.values()} <= set(answered)
