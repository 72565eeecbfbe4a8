"""A producer blocked in `AsyncResult.get()` while Redis restarts gets its result once
Redis is back, however long Redis was away.

Celery's own result consumer retried its pub/sub connection 20 times about a second
apart, then failed the caller (and every later `.get()` of the process) with "Retry
limit exceeded while trying to reconnect to the Celery redis result store backend. The
Celery application must be restarted." (measured on 12-06 across a 3 s restart; on this
machine a stay of about 20 s away is what exhausts it, so both are run).

Real parts: a private `redis-server` with AOF (`RestartableRedis`), a real
`celery -A omni_tasks worker -Q ar` started once Redis is back, and the producer in a
process of its own (this process's app is bound to the test database).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from helpers import eventually

from omni_tasks.dev.launcher import start_worker
from omni_tasks.dev.restartable_redis import RestartableRedis

ROOT = Path(__file__).resolve().parents[2]
#: Waits in `.get()` on a probe no worker runs yet; tells when it waits.
PRODUCER = r"""
import json, sys, time
from omni_tasks.tasks.definitions import probe
sent = probe.delay(prompt="across an outage")
print("WAITING", flush=True)
start = time.monotonic()
try:
    out = {"result": sent.get(timeout=float(sys.argv[1]))["request_id"] == sent.id}
except Exception as exc:
    out = {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())}"}
print(json.dumps({**out, "waited_s": round(time.monotonic() - start, 2)}), flush=True)
"""


@pytest.fixture()
def server() -> Iterator[RestartableRedis]:
    aof = RestartableRedis()
    aof.start()
    yield aof
    aof.close()


@pytest.mark.parametrize("down_s", [3.0, 25.0])
def test_a_producer_waiting_in_get_gets_its_result_after_a_redis_restart(
    down_s: float, server: RestartableRedis, tiny_llama_dir: Path, run_dir: Path
) -> None:
    env = {**os.environ, "OMNI_REDIS_URL": server.url, "OMNI_AR__ENGINE": "transformers"}
    producer = subprocess.Popen(
        [sys.executable, "-c", PRODUCER, "180"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert producer.stdout is not None
    assert producer.stdout.readline().strip() == "WAITING", producer.stderr.read()
    watcher = redis.Redis.from_url(server.url)
    subscribed = eventually(lambda: watcher.pubsub_channels("celery-task-meta-*"))
    assert subscribed, "the producer never subscribed to its result"  # it waits in `.get()`
    watcher.close()

    server.restart(down_s)
    worker = start_worker("ar", run_dir / f"wait-outage-{down_s:.0f}", env=env)
    try:
        out, err = producer.communicate(timeout=240)
    finally:
        worker.stop()
    report = json.loads(out.strip().splitlines()[-1])
    assert report.get("result") is True, (report, err[-3000:])
    assert "Retry limit exceeded" not in err
