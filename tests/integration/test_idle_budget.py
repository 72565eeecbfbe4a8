"""What an idle omni-tasks worker costs Redis, against an idle bare Celery worker with
the same broker settings, measured on a private redis-server with Redis's own
`INFO commandstats`: omni-tasks' heartbeat, worker index and reaper may add at most
one command per second per worker (two workers of each, one window each). A
regression (a scan, a poll, a beat that grew) fails here."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from helpers import KEYS, eventually

from omni_tasks.dev.launcher import start_worker
from omni_tasks.dev.redis_server import PrivateRedis, start_private_redis

ROOT = Path(__file__).resolve().parents[2]
WORKERS = 2
WINDOW_S = 20.0
#: The budget: omni-tasks' own commands per second per idle worker.
EXTRA_PER_S = 1.0
#: Connection upkeep, counted apart: a new connection's handshake and redis-py's health
#: check (a PING before using a connection idle for 30 s). They come with the pool's
#: connections, a few per window, not with the work; a client made per call would show
#: here as a handshake per command.
UPKEEP = ("hello", "ping")
MAX_UPKEEP_PER_WORKER = 4
POOL_ARGS = ["-P", "threads", "-c", "8", "--prefetch-multiplier", "1"]


@pytest.fixture(scope="module")
def server() -> Iterator[PrivateRedis]:
    try:
        found = start_private_redis()
    except (FileNotFoundError, RuntimeError) as exc:
        pytest.skip(f"no redis-server to start: {exc}")
    yield found
    found.stop()


def calls_per_s(client: redis.Redis, window_s: float) -> tuple[float, dict[str, int]]:
    """Commands per second over `window_s`, besides connection upkeep (`UPKEEP`), and
    every command's count (the harness's own INFO/CONFIG left out)."""
    client.config_resetstat()
    started = time.monotonic()
    time.sleep(window_s)
    stats = client.info("commandstats")
    elapsed = time.monotonic() - started
    by_command = {
        name.removeprefix("cmdstat_"): int(row["calls"])
        for name, row in stats.items()
        if not name.startswith(("cmdstat_config", "cmdstat_info"))
    }
    work = sum(n for name, n in by_command.items() if name not in UPKEEP)
    return work / elapsed, by_command


def bare_worker(index: int, url: str, log_dir: Path) -> subprocess.Popen[bytes]:
    """`celery -A bare_app worker`: bench/bare_app.py, the same broker settings."""
    log_dir.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "bare_app", "worker", "-Q", "bare"]
        + ["-n", f"bare{index}-{os.getpid()}@%h", "--loglevel", "WARNING", *POOL_ARGS],
        cwd=ROOT / "bench",
        env={**os.environ, "OMNI_REDIS_URL": url},
        stdout=open(log_dir / f"bare{index}.log", "wb"),  # noqa: SIM115 - the child's
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_consumers(client: redis.Redis, count: int, timeout_s: float = 120) -> None:
    """Until `count` clients block in BRPOP (the workers are consuming)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sum(c.get("cmd") == "brpop" for c in client.client_list()) >= count:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{count} consumers did not start")


def settled(client: redis.Redis, quiet_s: float = 5.0, timeout_s: float = 120) -> None:
    """Until no client has connected or left for `quiet_s`: start-up is over (every
    connection open, the first reaper pass run), so a window measures the steady state."""
    deadline = time.monotonic() + timeout_s
    last, since = client.info("stats")["total_connections_received"], time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = client.info("stats")["total_connections_received"]
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return
    raise TimeoutError("clients kept connecting")


def stop_all(procs: list[Any]) -> None:
    for proc in procs:
        proc.kill() if isinstance(proc, subprocess.Popen) else proc.stop()
    for proc in procs:
        if isinstance(proc, subprocess.Popen):
            proc.wait(30)


def test_an_idle_worker_costs_at_most_one_command_per_second_over_bare_celery(
    server: PrivateRedis, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(server.url, decode_responses=True)
    procs: list[Any] = [bare_worker(i, server.url, tmp_path) for i in range(WORKERS)]
    try:
        wait_consumers(client, WORKERS)
        settled(client)
        bare, bare_cmds = calls_per_s(client, WINDOW_S)
        stop_all(procs)
        env = {"OMNI_REDIS_URL": server.url}
        procs = [
            start_worker("probe", tmp_path, env=env, extra_args=POOL_ARGS, name=f"idle{i}")
            for i in range(WORKERS)
        ]
        for worker in procs:
            beat = KEYS.worker(worker.hostname)
            assert eventually(lambda b=beat: client.exists(b), 120, 0.2), worker.log_path
        settled(client)
        omni, omni_cmds = calls_per_s(client, WINDOW_S)
    finally:
        stop_all(procs)
    extra = (omni - bare) / WORKERS
    seen = f"(omni {omni_cmds}, bare {bare_cmds} in {WINDOW_S} s)"
    assert extra <= EXTRA_PER_S, f"an idle worker costs {extra:.2f} commands/s more {seen}"
    upkeep = sum(omni_cmds.get(name, 0) for name in UPKEEP) / WORKERS
    assert upkeep <= MAX_UPKEEP_PER_WORKER, f"{upkeep} handshakes and health checks {seen}"
