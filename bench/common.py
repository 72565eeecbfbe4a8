"""Shared bench plumbing: a Redis database of its own, worker processes, JSON output.

Set OMNI_REDIS_URL before anything imports omni_tasks (the Celery app reads it once).
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BENCH_DB = 14
#: The AR pool's worker defaults (threads, 32 slots, prefetch 1), for a bare Celery
#: baseline or a probe worker started with `start_celery`.
POOL_WORKER_ARGS = ["-P", "threads", "-c", "32", "--prefetch-multiplier", "1"]


def setup_redis() -> str:
    """OMNI_REDIS_URL, else DB 14 of a local Redis, else a private server."""
    sys.path.insert(0, str(ROOT))
    from omni_tasks.dev.redis_server import redis_answers, start_private_redis

    url = os.environ.get("OMNI_REDIS_URL") or f"redis://127.0.0.1:6379/{BENCH_DB}"
    if not redis_answers(url):
        url = start_private_redis().url
    os.environ["OMNI_REDIS_URL"] = url
    os.environ.setdefault("OMNI_MODELS_DIR", str(ROOT / "tests" / ".models"))
    os.environ.setdefault("OMNI_OUTPUT_DIR", str(RESULTS / "outputs"))
    return url


def clean_redis() -> None:
    from omni_tasks.coordination.client import get_redis

    client = get_redis()
    doomed = [k for k in client.scan_iter(count=1000) if not k.startswith("_kombu.binding")]
    for i in range(0, len(doomed), 500):
        client.delete(*doomed[i : i + 500])


def start_celery(app: str, queue: str, args: list[str], log: Path) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        app,
        "worker",
        "-Q",
        queue,
        "-n",
        f"bench-{queue}-{os.getpid()}@%h",
        "--loglevel",
        "WARNING",
        *args,
    ]
    log.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        cmd,
        cwd=ROOT / "bench",
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_ping(app: Any, count: int = 1, timeout_s: float = 300) -> None:
    """Until `count` workers answer a control ping."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        replies = app.control.ping(timeout=0.5) or []
        if len(replies) >= count:
            return
    raise TimeoutError("workers did not answer")


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    q = statistics.quantiles(ordered, n=100, method="inclusive")
    return {
        "p50_ms": round(q[49] * 1e3, 3),
        "p99_ms": round(q[98] * 1e3, 3),
        "mean_ms": round(statistics.fmean(ordered) * 1e3, 3),
    }


def write_result(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {
        "benchmark": name,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        **data,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps(data, indent=2))
    return path


class RoundServer:
    """A benchmark side in a process of its own (the engine driven directly: one engine
    per process), so that its rounds can alternate with the queue's: it prints `READY`
    once warm, then runs one round per `run` line on stdin and prints `RESULT <json>`."""

    def __init__(self, cmd: list[str], log_name: str) -> None:
        self.log_name = log_name
        log = open(RESULTS / "logs" / log_name, "w")  # noqa: SIM115 - the child's stderr
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True
        )
        self._read("READY")

    def _read(self, prefix: str) -> str:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return line[len(prefix) :].strip()
        raise RuntimeError(
            f"{self.proc.args} exited ({self.proc.wait()}); see logs/{self.log_name}"
        )

    def run(self) -> Any:
        """One round's result (its JSON)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return json.loads(self._read("RESULT "))

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(120)


def alternate_rounds(sides: dict[str, Any], rounds: int) -> dict[str, list[float]]:
    """Each side's samples over `rounds`, the sides taking turns in a rotating order, so
    whatever else runs on the machine hits all alike; one unrecorded call each first
    (connections, subscriptions, the engine's caches)."""
    for side in sides.values():
        side()
    samples: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(sides[name]())
    return samples


def added_p50(figures: dict[str, dict[str, float]], base: str) -> dict[str, float]:
    """`added_<side>_p50_ms`: each side's p50 less the `base` side's."""
    return {
        f"added_{side}_p50_ms": round(found["p50_ms"] - figures[base]["p50_ms"], 3)
        for side, found in figures.items()
        if side != base
    }


def serve_rounds(run: Callable[[int], float]) -> None:
    """The side a `RoundServer` drives: `run(round)` once to warm (then `READY`), then
    once per `run` line on stdin, printing `RESULT <its value>`."""
    for r, line in enumerate(itertools.chain(["warm"], sys.stdin)):
        if line.strip() not in ("run", "warm"):
            break
        value = run(r)
        print("READY" if line == "warm" else f"RESULT {value}", flush=True)


class FirstCall:
    """A callback that notes when it is first called (the first token, the first audio)."""

    def __init__(self) -> None:
        self.at: float | None = None

    def __call__(self, *args: Any) -> None:
        if self.at is None:
            self.at = time.perf_counter()
