"""A Redis restart while diffusion workers run a request: every worker lives on and
serves again once Redis is back, the request succeeds exactly once, and the outage costs
each worker's log a few lines, not a traceback per poll.

Real `celery -A omni_tasks worker -Q diffusion` processes on a private `redis-server`
with AOF on (as compose runs it), stopped with SHUTDOWN while a 512x512 image denoises
and started again 3 s later. The producer runs in a process of its own on that Redis
(this process's app is bound to the test database).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from helpers import KEYS, eventually

from omni_tasks.dev.launcher import WorkerProcess, start_worker
from omni_tasks.dev.restartable_redis import RestartableRedis

ROOT = Path(__file__).resolve().parents[2]
#: Long enough to be running when Redis stops and (mostly) when it returns.
SIZE, STEPS = 512, 100
DOWN_S = 3.0
#: What a 3 s outage may cost one worker's log, from the lost connection to the new one.
MAX_OUTAGE_LINES = 50
PRODUCER = r"""
import json, sys, time
from omni_tasks import app, generate_image
if sys.argv[1] == "send":
    size, steps = int(sys.argv[2]), int(sys.argv[3])
    print(generate_image.delay(prompt="across", width=size, height=size, steps=steps).id)
else:  # every worker answers (a ping sent before it listens again is lost), and serves
    hosts, pinged, deadline = sys.argv[2:], set(), time.monotonic() + 60
    while pinged != set(hosts) and time.monotonic() < deadline:
        pinged |= {h for r in app.control.ping(destination=hosts, timeout=1) for h in r}
    sent = [generate_image.delay(prompt=f"after {i}", width=64, height=64, steps=4)
            for i in range(2 * len(hosts))]
    served = [r.get(timeout=120)["request_id"] for r in sent]
    print(json.dumps({"pinged": sorted(pinged), "sent": [r.id for r in sent],
                      "served": served}))
"""


def produce(url: str, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", PRODUCER, *args],
        env={**os.environ, "OMNI_REDIS_URL": url},
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def server() -> Iterator[RestartableRedis]:
    aof = RestartableRedis()
    aof.start()
    yield aof
    aof.close()


@pytest.fixture(scope="module")
def workers(server: RestartableRedis, tiny_flux_dir: Path, run_dir: Path) -> Iterator[list]:
    """The diffusion workers on `server`; a test that needs more starts them."""
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.stop()


def grow(workers: list[WorkerProcess], n: int, server: RestartableRedis, logs: Path) -> None:
    env = {"OMNI_REDIS_URL": server.url, "OMNI_REAPER_INTERVAL_S": "1"}
    new = [start_worker("diffusion", logs, env=env) for _ in range(n - len(workers))]
    workers.extend(new)
    client = redis.Redis.from_url(server.url)
    for worker in new:
        ready = eventually(lambda w=worker: client.exists(KEYS.worker(w.hostname)), 300, 0.2)
        assert ready, f"{worker.hostname} did not start:\n{worker.log_tail()}"


def state(client: redis.Redis, task_id: str) -> str | None:
    raw = client.get(f"celery-task-meta-{task_id}")
    return json.loads(raw)["status"] if raw else None


def outage_lines(log: str) -> list[str]:
    """The lines from the lost broker connection to the new one."""
    lines = log.splitlines()
    start = next(i for i, line in enumerate(lines) if "Connection to broker lost" in line)
    end = next(i for i in range(start, len(lines)) if "Connected to redis" in lines[i])
    return lines[start:end]


@pytest.mark.parametrize("n_workers", [1, 2])
def test_workers_serve_again_after_a_redis_restart_and_the_request_runs_once(
    n_workers: int, server: RestartableRedis, workers: list, run_dir: Path
) -> None:
    grow(workers, n_workers, server, run_dir / "restart-logs")
    client = redis.Redis.from_url(server.url, decode_responses=True)
    offsets = {w.hostname: w.log_path.stat().st_size for w in workers}
    task_id = produce(server.url, "send", str(SIZE), str(STEPS))
    assert eventually(lambda: state(client, task_id) in ("STARTED", "PROGRESS"), 120)

    server.restart(DOWN_S)

    assert eventually(lambda: state(client, task_id) == "SUCCESS", 180)
    report = json.loads(produce(server.url, "serve", *[w.hostname for w in workers]))
    assert report["pinged"] == sorted(w.hostname for w in workers)
    assert report["served"] == report["sent"]
    # Its message is acked, or given back by the reaper and skipped as a duplicate.
    assert eventually(lambda: not any(task_id in v for v in client.hvals("unacked")), 60)
    assert all(w.proc.poll() is None for w in workers)

    logs = {w.hostname: w.log_path.read_bytes()[offsets[w.hostname] :].decode() for w in workers}
    succeeded = re.compile(rf"generate_image\[{task_id}\] succeeded")
    assert sum(len(succeeded.findall(log)) for log in logs.values()) == 1
    for hostname, log in logs.items():
        assert "Unrecoverable error" not in log, hostname
        lines = outage_lines(log)
        assert len(lines) < MAX_OUTAGE_LINES, (hostname, "\n".join(lines))
