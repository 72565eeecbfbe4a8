"""Redis Sentinel: a failover in the middle of 200 mixed requests loses none and runs
none twice, and the producer blocked in `AsyncResult.get()` gets every result.

Real parts: a master, a replica and three Sentinels (`redis-server --sentinel`) on free
loopback ports (`SentinelCluster`); real `celery -A omni_tasks worker` processes (an AR
pool and a diffusion pool) and a producer process, all given only the
`sentinel://...;sentinel://...` URL. The master is killed (SIGKILL) right after the
requests are sent; the Sentinels promote the replica, and every connection (kombu's,
Celery's result backend and consumer, omni-tasks' coordination client, the HTTP API's
asyncio client) finds it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from helpers import KEYS

from omni_tasks.coordination.client import async_redis_for_url, redis_for_url
from omni_tasks.dev.launcher import WorkerProcess, start_worker
from omni_tasks.dev.sentinel_cluster import MASTER_NAME, SentinelCluster

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="needs the redis-server binary (Sentinel mode)"
)

ROOT = Path(__file__).resolve().parents[2]
REQUESTS = 200
SUCCEEDED = re.compile(r"Task omni_tasks\.\w+\[([^\]]+)\] succeeded")
#: 200 mixed requests (1 in 10 a 64x64 image, 1 in 5 a short text, the rest no-engine
#: probes), sent before the fault; then every result waited for with `.get()`.
PRODUCER = r"""
import json, sys, time
from omni_tasks import generate_image, generate_text
from omni_tasks.tasks.definitions import probe
sent = []
for i in range(int(sys.argv[1])):
    if i % 10 == 9:
        sent.append(generate_image.delay(prompt=f"s{i}", width=64, height=64, steps=4))
    elif i % 5 == 2:
        sent.append(generate_text.delay(prompt=f"sentinel {i}", max_tokens=8))
    else:
        sent.append(probe.delay(prompt=f"p{i}"))
print("SENT", flush=True)
got, errors = [], []
for r in sent:
    try:
        got.append(r.get(timeout=120)["request_id"] == r.id)
    except Exception as exc:
        errors.append(f"{r.id}: {type(exc).__name__}: {' '.join(str(exc).split())}")
print(json.dumps({"ids": [r.id for r in sent], "ok": sum(got), "errors": errors}), flush=True)
"""


@pytest.fixture(scope="module")
def cluster() -> Iterator[SentinelCluster]:
    found = SentinelCluster()
    try:
        found.start()
        yield found
    finally:
        found.close()


def sentinel_env(cluster: SentinelCluster) -> dict[str, str]:
    return {
        **os.environ,
        "OMNI_REDIS_URL": cluster.url,
        "OMNI_REDIS_SENTINEL_MASTER": MASTER_NAME,
        "OMNI_AR__ENGINE": "transformers",
        "OMNI_REAPER_INTERVAL_S": "1",
    }


@pytest.fixture(scope="module")
def workers(
    cluster: SentinelCluster, tiny_llama_dir: Path, tiny_flux_dir: Path, run_dir: Path
) -> Iterator[list[WorkerProcess]]:
    env = sentinel_env(cluster)
    started = [start_worker(q, run_dir / "sentinel-logs", env=env) for q in ("ar", "diffusion")]
    client = redis_for_url(cluster.url, MASTER_NAME, decode_responses=True)
    try:
        for worker in started:
            wait_ready(client, worker)
        yield started
    finally:
        for worker in started:
            worker.stop()


def wait_ready(client: redis.Redis, worker: WorkerProcess, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not client.exists(KEYS.worker(worker.hostname)):
        assert worker.proc.poll() is None, worker.log_tail()
        assert time.monotonic() < deadline, f"{worker.hostname} not ready:\n{worker.log_tail()}"
        time.sleep(0.2)


async def api_client_across_failover(cluster: SentinelCluster) -> str | None:
    """Write through the asyncio client (replicated: WAIT), kill the master, and read
    the value back through the same client once the replica is promoted."""
    client = async_redis_for_url(cluster.url, MASTER_NAME, decode_responses=True)
    try:
        await client.set("omni-sentinel-probe", "before")
        await client.execute_command("WAIT", 1, 2000)
        old = await asyncio.to_thread(cluster.kill_master)
        await asyncio.to_thread(cluster.wait_promoted, old)
        deadline = time.monotonic() + 30
        while True:
            try:
                return await client.get("omni-sentinel-probe")
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
    finally:
        await client.aclose()


def test_a_sentinel_failover_mid_run_loses_and_duplicates_nothing(
    cluster: SentinelCluster, workers: list[WorkerProcess]
) -> None:
    producer = subprocess.Popen(
        [sys.executable, "-c", PRODUCER, str(REQUESTS)],
        env=sentinel_env(cluster),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert producer.stdout is not None
    assert producer.stdout.readline().strip() == "SENT", producer.communicate()[1][-3000:]

    # The HTTP API's asyncio client, opened before the failover, serves after it.
    assert asyncio.run(api_client_across_failover(cluster)) == "before"
    out, err = producer.communicate(timeout=240)

    report = json.loads(out.strip().splitlines()[-1])
    assert report["errors"] == [], err[-3000:]
    assert report["ok"] == REQUESTS
    runs = Counter(
        task_id for w in workers for task_id in SUCCEEDED.findall(w.log_path.read_text())
    )
    assert {i for i in report["ids"] if runs[i] != 1} == set()
    assert all(w.proc.poll() is None for w in workers)
    assert not any("Unrecoverable error" in w.log_path.read_text() for w in workers)
