"""Fault scenarios: what omni-tasks promises when things break, measured.

Each scenario sends a mixed run (text on the AR pool, 64x64 images on the diffusion
pool) through a private `redis-server` with AOF on (as compose runs it), breaks
something mid-run, and counts per scenario: requests sent, completed, lost (no result
by the deadline), duplicated (a request whose run succeeded twice, from the workers'
logs), the reaper's restored/recovered and the skipped duplicate deliveries, and the
time to recover (from the fault to the last result).

- `kill9`: kill -9 of a worker 5 times during a 300-request run; a new one replaces it.
- `redis_restart`: the Redis server stops and starts again mid-run.
- `rabbitmq_restart` (RabbitMQ broker only): `rabbitmqctl stop_app`, then `start_app`.

Each runs on both brokers: Redis, and RabbitMQ (127.0.0.1:5672, or
`OMNI_TEST_AMQP_URL`) with Redis for results, when one answers.

Usage: python bench/faults.py [--requests 300] [--scenario kill9 ...] [--broker redis]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, write_result  # noqa: E402

LOGS = RESULTS / "logs" / "faults"
SCENARIOS = ["kill9", "redis_restart", "rabbitmq_restart"]
AMQP_URL = os.environ.get("OMNI_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
#: Quick to start; a reaper pass every 2 s.
WORKER_ENV = {"OMNI_AR__ENGINE": "transformers", "OMNI_REAPER_INTERVAL_S": "2"}
SUCCEEDED = re.compile(r"Task omni_tasks\.\w+\[([^\]]+)\] succeeded")


class AofRedis:
    """A `redis-server` with AOF on, on a fixed port and directory across restarts."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="omni-faults-redis-")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [shutil.which("redis-server") or "redis-server", "--port", str(self.port)]
        cmd += ["--bind", "127.0.0.1", "--dir", self.dir, "--appendonly", "yes", "--save", ""]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                redis.Redis.from_url(self.url, socket_timeout=0.2).ping()
                return
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()  # SIGTERM: Redis flushes its AOF, as on a restart
            self.proc.wait(30)
            self.proc = None


def send_mixed(n: int) -> list:
    from omni_tasks import generate_image, generate_text

    results = []
    for i in range(n):
        if i % 3 == 2:
            results.append(generate_image.delay(prompt=f"f{i}", width=64, height=64, steps=4))
        else:
            results.append(generate_text.delay(prompt=f"fault {i}", max_tokens=8))
    return results


def collect(results: list, deadline_s: float) -> tuple[int, float]:
    """(completed, when the last one completed) by `deadline_s` from now.

    Reads the result backend directly (not the client's pub/sub subscription, which a
    Redis restart breaks): what counts is whether the result exists.
    """
    import redis

    from omni_tasks.coordination.client import get_redis

    backend = results[0].backend
    pending = {r.id for r in results}
    end = last = time.monotonic()
    end += deadline_s
    while pending and time.monotonic() < end:
        ids = sorted(pending)
        try:
            metas = get_redis().mget([backend.get_key_for_task(i).decode() for i in ids])
        except redis.RedisError:
            metas = [None] * len(ids)
        for task_id, raw in zip(ids, metas, strict=True):
            if raw and json.loads(raw).get("status") == "SUCCESS":
                pending.discard(task_id)
                last = time.monotonic()
        time.sleep(0.2)
    return len(results) - len(pending), last


def duplicated() -> int:
    runs: Counter[str] = Counter()
    for log in LOGS.glob("*.log"):
        runs.update(SUCCEEDED.findall(log.read_text(errors="replace")))
    return sum(1 for n in runs.values() if n > 1)


def counters() -> dict[str, int]:
    from omni_tasks.config import get_config
    from omni_tasks.coordination import keys
    from omni_tasks.coordination.client import get_redis

    totals: Counter[str] = Counter()
    for queue in (get_config().ar.queue, get_config().diffusion.queue):
        raw = get_redis().hgetall(keys.stats(queue))
        for name in ("restored", "recovered", "duplicates"):
            totals[name] += int(raw.get(name, 0))
    return dict(totals)


def kill9(n: int, kills: int) -> dict:
    from omni_tasks.dev.launcher import start_worker

    workers = [start_worker(q, LOGS, env=WORKER_ENV) for q in ("ar", "ar", "diffusion")]
    for w in workers:
        w.wait_ready(600)
    results = send_mixed(n)
    fault_at = time.monotonic()
    for _ in range(kills):
        time.sleep(2.0)
        victim = random.choice([w for w in workers if w.queue == "ar"] + workers[-1:])
        victim.proc.kill()
        victim.proc.wait()
        workers.remove(victim)
        workers.append(start_worker(victim.queue, LOGS, env=WORKER_ENV))
    done, last = collect(results, 300)
    for w in workers:
        w.stop()
    return _figures(n, done, last - fault_at, {"kills": kills})


def restart(n: int, stop: Callable[[], None], start: Callable[[], None]) -> dict:
    """A mixed run with the broker or result store stopped and started again mid-run."""
    from omni_tasks.dev.launcher import start_worker

    workers = [start_worker(q, LOGS, env=WORKER_ENV) for q in ("ar", "diffusion")]
    for w in workers:
        w.wait_ready(600)
    results = send_mixed(n)
    time.sleep(1.0)
    fault_at = time.monotonic()
    stop()
    time.sleep(2.0)
    start()
    done, last = collect(results, 300)
    for w in workers:
        w.stop()
    return _figures(n, done, last - fault_at, {})


def rabbitmqctl(command: str) -> None:
    subprocess.run(["rabbitmqctl", command], check=True, capture_output=True, timeout=120)


def _figures(n: int, done: int, recover_s: float, extra: dict) -> dict:
    return {
        "sent": n,
        "completed": done,
        "lost": n - done,
        "duplicated": duplicated(),
        **counters(),
        "time_to_recover_s": round(recover_s, 2),
        **extra,
    }


def run_broker(broker: str, scenarios: list[str], n: int, kills: int) -> dict[str, dict]:
    """This process's scenarios on one broker (the Celery app reads its config once)."""
    server = AofRedis()
    server.start()
    os.environ["OMNI_REDIS_URL"] = server.url
    if broker == "amqp":
        os.environ["OMNI_BROKER_URL"] = AMQP_URL
    os.environ.setdefault("OMNI_MODELS_DIR", str(RESULTS.parents[1] / "tests" / ".models"))
    os.environ.setdefault("OMNI_OUTPUT_DIR", str(RESULTS / "outputs"))
    from omni_tasks.coordination.client import get_redis
    from omni_tasks.tasks.celery_app import app

    out: dict[str, dict] = {}
    try:
        for scenario in scenarios:
            shutil.rmtree(LOGS, ignore_errors=True)
            LOGS.mkdir(parents=True)
            get_redis().flushdb()
            app.control.purge()
            if scenario == "kill9":
                out[scenario] = kill9(n, kills)
            elif scenario == "redis_restart":
                out[scenario] = restart(n, server.stop, server.start)
            elif scenario == "rabbitmq_restart" and broker == "amqp":
                out[scenario] = restart(
                    n, lambda: rabbitmqctl("stop_app"), lambda: rabbitmqctl("start_app")
                )
            print(broker, scenario, out.get(scenario), file=sys.stderr, flush=True)
    finally:
        server.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--scenario", nargs="*", default=SCENARIOS)
    parser.add_argument("--broker", choices=["redis", "amqp", "all"], default="all")
    args = parser.parse_args()
    if args.broker != "all":
        out = run_broker(args.broker, args.scenario, args.requests, args.kills)
        print("RESULT " + json.dumps(out), flush=True)
        return
    brokers = ["redis"] + (["amqp"] if amqp_answers() else [])
    results: dict[str, dict] = {}
    for broker in brokers:
        cmd = [sys.executable, __file__, "--broker", broker, "--requests", str(args.requests)]
        cmd += ["--kills", str(args.kills), "--scenario", *args.scenario]
        child = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=3600)
        line = [x for x in child.stdout.splitlines() if x.startswith("RESULT ")][-1]
        for scenario, figures in json.loads(line[len("RESULT ") :]).items():
            results.setdefault(scenario, {})[broker] = figures
    write_result("faults", {"requests": args.requests, "brokers": brokers, "scenarios": results})


def amqp_answers() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=1):
            return True
    except OSError:
        return False


if __name__ == "__main__":
    main()
