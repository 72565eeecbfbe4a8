"""The worker's heartbeat (`workers.lifecycle.heartbeat`): the Redis hash that says a
worker is alive and what it serves, renewed until `stop()`, removed by `clear()`.

Importing `workers.lifecycle` registers the handlers on the process-wide app, which an
application process (this one) must never do; so each heartbeat beats in a child
process driven over a pipe, for a `WorkerRuntime` given an identity, and the test reads
the real Redis. The beat interval is shortened in the child to keep the tests short.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import KEYS, eventually

from omni_tasks.coordination import cache_directory
from omni_tasks.coordination.client import get_redis

REPO_ROOT = Path(__file__).resolve().parents[3]
INTERVAL_S = 0.1
DRIVER = r"""
import json, os, sys
from workers.lifecycle import heartbeat  # registers the handlers: fine in this child
from workers.runtime import WorkerIdentity, WorkerRuntime

heartbeat.HEARTBEAT_INTERVAL_S = float(sys.argv[2])
runtime = WorkerRuntime()
runtime.attach(WorkerIdentity(**json.loads(sys.argv[1])))
beat = heartbeat.Heartbeat(runtime)
print(json.dumps({"pid": os.getpid(), "ttl_s": heartbeat.HEARTBEAT_TTL_S}), flush=True)
for line in sys.stdin:
    print(json.dumps(getattr(beat, line.strip())()), flush=True)
"""


class HeartbeatProcess:
    """A child process holding one `Heartbeat`; `call("start")` runs `heartbeat.start()`."""

    def __init__(self, identity: dict[str, Any], log: Path) -> None:
        self.hostname = identity["hostname"]
        self._log = open(log, "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", DRIVER, json.dumps(identity), str(INTERVAL_S)],
            cwd=REPO_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        hello = self._read()
        self.pid, self.ttl_s = hello["pid"], hello["ttl_s"]

    def call(self, method: str) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(method + "\n")
        self.proc.stdin.flush()
        return self._read()

    def _read(self) -> Any:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"heartbeat child exited; see {self._log.name}"
        return json.loads(line)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@pytest.fixture()
def heartbeat_of(redis_client, tmp_path: Path) -> Iterator[Callable[..., HeartbeatProcess]]:
    started: list[HeartbeatProcess] = []

    def start(hostname: str, **identity: Any) -> HeartbeatProcess:
        child = HeartbeatProcess({"hostname": hostname, **identity}, tmp_path / f"{hostname}.log")
        started.append(child)
        return child

    yield start
    for child in started:  # before redis_client empties the database
        child.close()


def beat_of(redis_client, hostname: str) -> float | None:
    value = redis_client.hget(KEYS.worker(hostname), "beat")
    return None if value is None else float(value)


AR_WORKER = {"queues": ["ar"], "stages": ["ar"], "pool_type": "threads", "concurrency": 4}
DIT_WORKER = {"queues": ["diffusion"], "stages": ["dit"], "pool_type": "threads"}


def test_info_describes_the_worker(heartbeat_of) -> None:
    child = heartbeat_of("ar@test", **AR_WORKER)
    before = time.time()
    info = child.call("info")
    assert info.pop("started") >= before - 1
    assert len(info.pop("instance")) == 12  # this run of the worker (`coordination.runs`)
    assert info == {
        "hostname": "ar@test",
        "queues": '["ar"]',
        "stages": '["ar"]',
        "models": '{"ar": "tiny-llama"}',
        "pool_type": "threads",
        "concurrency": 4,
        "pid": child.pid,
    }


def test_a_started_heartbeat_writes_its_hash_with_a_ttl(heartbeat_of, redis_client) -> None:
    child = heartbeat_of("ar@test", **AR_WORKER)
    assert not redis_client.exists(KEYS.worker("ar@test"))
    child.call("start")
    assert eventually(lambda: redis_client.exists(KEYS.worker("ar@test")))
    stored = redis_client.hgetall(KEYS.worker("ar@test"))
    assert set(stored) == {
        "hostname",
        "queues",
        "stages",
        "models",
        "pool_type",
        "concurrency",
        "pid",
        "instance",
        "started",
        "beat",
        "dit_cache_bytes",
        "dit_cache_entries",
        "dit_cache_max_bytes",
    }
    assert (stored["hostname"], stored["queues"], stored["pid"]) == (
        "ar@test",
        '["ar"]',
        str(child.pid),
    )
    assert stored["dit_cache_entries"] == stored["dit_cache_bytes"] == "0"  # no DiT cache
    assert 0 < redis_client.ttl(KEYS.worker("ar@test")) <= child.ttl_s
    first = beat_of(redis_client, "ar@test")
    assert eventually(lambda: beat_of(redis_client, "ar@test") > first)  # renewed


def test_stop_stops_the_beats(heartbeat_of, redis_client) -> None:
    child = heartbeat_of("ar@test", **AR_WORKER)
    child.call("start")
    assert eventually(lambda: beat_of(redis_client, "ar@test"))
    child.call("stop")
    time.sleep(5 * INTERVAL_S)  # a beat under way when stop() was called has landed
    last = beat_of(redis_client, "ar@test")
    time.sleep(10 * INTERVAL_S)  # ten intervals without a beat
    assert beat_of(redis_client, "ar@test") == last
    assert 0 < redis_client.ttl(KEYS.worker("ar@test")) <= child.ttl_s  # it will expire


def test_clear_deletes_the_heartbeat_and_the_directory_entries(heartbeat_of, redis_client) -> None:
    child = heartbeat_of("dit@test", **DIT_WORKER)
    cache_directory.record_insert(get_redis(), "dit@test", "diffusion", "k1", 100)
    cache_directory.record_insert(get_redis(), "dit@test", "diffusion", "k2", 100)
    cache_directory.record_insert(get_redis(), "other@test", "diffusion", "k1", 100)
    redis_client.hset(KEYS.worker("other@test"), "beat", time.time())  # alive: not swept
    child.call("start")
    assert eventually(lambda: redis_client.exists(KEYS.worker("dit@test")))
    child.call("stop")
    child.call("clear")
    assert not redis_client.exists(KEYS.worker("dit@test"))
    assert cache_directory.held_by(get_redis(), "dit@test") == set()
    assert [h.worker for h in cache_directory.holders(get_redis(), "k1")] == ["other@test"]
    assert cache_directory.holders(get_redis(), "k2") == []


def test_a_diffusion_workers_heartbeat_sweeps_dead_workers(heartbeat_of, redis_client) -> None:
    cache_directory.record_insert(get_redis(), "dead@test", "diffusion", "k-dead", 100)
    # It beat last ten minutes ago: the worker index lists it, its hash has expired.
    redis_client.zadd(KEYS.worker_beats("dit"), {"dead@test": time.time() - 600})
    ar = heartbeat_of("ar@test", **AR_WORKER)
    ar.call("start")
    assert eventually(lambda: beat_of(redis_client, "ar@test"))
    time.sleep(5 * INTERVAL_S)  # several beats, none of which may sweep
    assert cache_directory.held_by(get_redis(), "dead@test") == {
        "k-dead"
    }  # an AR worker never sweeps
    dit = heartbeat_of("dit@test", **DIT_WORKER)
    dit.call("start")
    assert eventually(lambda: not cache_directory.held_by(get_redis(), "dead@test"))
    assert cache_directory.holders(get_redis(), "k-dead") == []
