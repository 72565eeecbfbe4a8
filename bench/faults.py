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
- `redis_restart_running` (Redis broker only), with 1 and with 2 diffusion workers: one
  512x512, 100-step image; once it runs, Redis shuts down (SHUTDOWN) and starts again
  3 s later. Counted: workers alive afterwards and serving (small images sent at Redis's
  return, the time to the first result), runs of the image that succeeded (exactly 1),
  the time until its message left Redis's unacked hash (acked, or restored by the reaper
  and skipped as a duplicate), and the log lines each worker wrote during the outage.

- `sentinel_failover` (Redis through Sentinel: a master, a replica and 3 Sentinels, every
  process given only the `sentinel://` URL): the master is killed (SIGKILL) 1 s into the
  run; the Sentinels promote the replica. Counted as above, plus the time until the
  replica was promoted and the `.get()` calls that failed once every result was in.

Each runs on both brokers: Redis, and RabbitMQ (127.0.0.1:5672, or
`OMNI_TEST_AMQP_URL`) with Redis for results, when one answers; `sentinel_failover`
runs on Redis through Sentinel only (its row's key is `sentinel`).

Usage: python bench/faults.py [--requests 300] [--scenario kill9 ...] [--broker redis]
(figures of the scenarios not run stay as they are in bench/results/faults.json)
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
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, write_result  # noqa: E402

from omni_tasks.dev.restartable_redis import RestartableRedis  # noqa: E402
from omni_tasks.dev.sentinel_cluster import SentinelCluster  # noqa: E402

LOGS = RESULTS / "logs" / "faults"
SCENARIOS = [
    "kill9",
    "redis_restart",
    "rabbitmq_restart",
    "redis_restart_running",
    "sentinel_failover",
]
AMQP_URL = os.environ.get("OMNI_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
#: Quick to start; a reaper pass every 2 s.
WORKER_ENV = {"OMNI_AR__ENGINE": "transformers", "OMNI_REAPER_INTERVAL_S": "2"}
SUCCEEDED = re.compile(r"Task omni_tasks\.\w+\[([^\]]+)\] succeeded")


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
    from omni_tasks.coordination.client import get_redis
    from omni_tasks.coordination.keyspace import keyspace

    config = get_config()
    totals: Counter[str] = Counter()
    for queue in (config.ar.queue, config.diffusion.queue):
        raw = get_redis().hgetall(keyspace(config.key_prefix).stats(queue))
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


def mixed_run_under_way(n: int) -> tuple[list, list, float]:
    """An AR and a diffusion worker, `n` mixed requests sent, 1 s of running: (workers,
    results, when the fault strikes)."""
    from omni_tasks.dev.launcher import start_worker

    workers = [start_worker(q, LOGS, env=WORKER_ENV) for q in ("ar", "diffusion")]
    for w in workers:
        w.wait_ready(600)
    results = send_mixed(n)
    time.sleep(1.0)
    return workers, results, time.monotonic()


def restart(n: int, stop: Callable[[], None], start: Callable[[], None]) -> dict:
    """A mixed run with the broker or result store stopped and started again mid-run."""
    workers, results, fault_at = mixed_run_under_way(n)
    stop()
    time.sleep(2.0)
    start()
    done, last = collect(results, 300)
    for w in workers:
        w.stop()
    return _figures(n, done, last - fault_at, {})


def restart_while_running(n_workers: int, server: RestartableRedis) -> dict:
    """One long image on `n_workers` diffusion workers; Redis restarts while it runs."""
    from omni_tasks import generate_image
    from omni_tasks.coordination.client import get_redis
    from omni_tasks.dev.launcher import start_worker

    shutil.rmtree(LOGS, ignore_errors=True)
    workers = [start_worker("diffusion", LOGS, env=WORKER_ENV) for _ in range(n_workers)]
    for w in workers:
        w.wait_ready(600)
    before = counters()
    image = generate_image.delay(prompt="across a restart", width=512, height=512, steps=100)
    key = image.backend.get_key_for_task(image.id).decode()
    while (json.loads(get_redis().get(key) or "{}")).get("status") not in RUNNING:
        time.sleep(0.05)
    server.restart(3.0)
    back = time.monotonic()
    probes = [
        generate_image.delay(prompt=f"back {i}", width=64, height=64, steps=4)
        for i in range(2 * n_workers)
    ]
    served, _ = collect(probes, 300)
    first_served = first_success(probes) - back
    done, last = collect([image], 300)
    while any(image.id in v for v in get_redis().hvals("unacked")):
        time.sleep(0.2)
    unacked_cleared = time.monotonic() - back
    alive = sum(w.proc.poll() is None for w in workers)
    for w in workers:
        w.stop()
    logs = [w.log_path.read_text(errors="replace") for w in workers]
    runs = sum(log.count(f"generate_image[{image.id}] succeeded") for log in logs)
    after = counters()
    return {
        "workers": n_workers,
        "alive_after": alive,
        "completed": done,
        "succeeded_runs": runs,
        "probes_served": f"{served}/{len(probes)}",
        "first_probe_after_return_s": round(first_served, 2),
        "unacked_cleared_after_return_s": round(unacked_cleared, 2),
        "restored": after.get("restored", 0) - before.get("restored", 0),
        "duplicates": after.get("duplicates", 0) - before.get("duplicates", 0),
        "outage_log_lines_max": max(len(outage_lines(log)) for log in logs),
        "unrecoverable_errors": sum(log.count("Unrecoverable error") for log in logs),
    }


def sentinel_failover(n: int, cluster: SentinelCluster) -> dict:
    """A mixed run through Sentinel; the master is killed 1 s in and the replica is
    promoted. The results are read from Redis, then waited for with `.get()` too."""
    workers, results, fault_at = mixed_run_under_way(n)
    old = cluster.kill_master()
    promoted_s = cluster.wait_promoted(old)
    done, last = collect(results, 300)
    get_failed = 0
    for r in results:
        try:
            r.get(timeout=10)
        except Exception:  # noqa: BLE001 - counted: any failure of a caller's wait
            get_failed += 1
    for w in workers:
        w.stop()
    return _figures(
        n,
        done,
        last - fault_at,
        {"promoted_after_s": round(promoted_s, 2), "get_failed": get_failed},
    )


RUNNING = ("STARTED", "PROGRESS")


def first_success(results: list) -> float:
    """When (monotonic) the first of `results` that succeeded had its result stored."""
    from omni_tasks.coordination.client import get_redis

    backend = results[0].backend
    stamps = []
    for r in results:
        meta = json.loads(get_redis().get(backend.get_key_for_task(r.id).decode()) or "{}")
        if meta.get("status") == "SUCCESS" and meta.get("date_done"):
            stamps.append(meta["date_done"])
    done = datetime.fromisoformat(min(stamps)).replace(tzinfo=UTC).timestamp()
    return time.monotonic() - (time.time() - done)


def outage_lines(log: str) -> list[str]:
    """A worker's log lines from its lost broker connection to its new one."""
    lines = log.splitlines()
    start = next((i for i, x in enumerate(lines) if "Connection to broker lost" in x), None)
    if start is None:
        return []
    end = next((i for i in range(start, len(lines)) if "Connected to redis" in lines[i]), None)
    return lines[start : end if end is not None else len(lines)]


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
    if broker == "sentinel":
        return run_sentinel(scenarios, n)
    server = RestartableRedis()
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
                out[scenario] = restart(n, server.shutdown, server.start)
            elif scenario == "rabbitmq_restart" and broker == "amqp":
                out[scenario] = restart(
                    n, lambda: rabbitmqctl("stop_app"), lambda: rabbitmqctl("start_app")
                )
            elif scenario == "redis_restart_running" and broker == "redis":
                out[scenario] = {f"{n}_workers": restart_while_running(n, server) for n in (1, 2)}
            print(broker, scenario, out.get(scenario), file=sys.stderr, flush=True)
    finally:
        server.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--scenario", nargs="*", default=SCENARIOS)
    parser.add_argument("--broker", choices=["redis", "amqp", "sentinel", "all"], default="all")
    args = parser.parse_args()
    if args.broker != "all":
        out = run_broker(args.broker, args.scenario, args.requests, args.kills)
        print("RESULT " + json.dumps(out), flush=True)
        return
    brokers = ["redis"] + (["amqp"] if amqp_answers() else [])
    results: dict[str, dict] = {}
    others = [x for x in args.scenario if x != "sentinel_failover"]
    runs = (brokers if others else []) + (["sentinel"] if others != args.scenario else [])
    for broker in runs:
        cmd = [sys.executable, __file__, "--broker", broker, "--requests", str(args.requests)]
        cmd += ["--kills", str(args.kills), "--scenario", *args.scenario]
        child = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=3600)
        line = [x for x in child.stdout.splitlines() if x.startswith("RESULT ")][-1]
        for scenario, figures in json.loads(line[len("RESULT ") :]).items():
            results.setdefault(scenario, {})[broker] = figures
    kept, measured = earlier_scenarios()
    for scenario, figures in results.items():
        kept[scenario] = {**kept.get(scenario, {}), **figures}
        measured[scenario] = time.strftime("%Y-%m-%dT%H:%M:%S")
    data = {"requests": args.requests, "brokers": brokers, "measured": measured}
    write_result("faults", {**data, "scenarios": kept})


def run_sentinel(scenarios: list[str], n: int) -> dict[str, dict]:
    """`sentinel_failover`, in a process whose every Redis client goes through Sentinel."""
    if "sentinel_failover" not in scenarios:
        return {}
    cluster = SentinelCluster()
    cluster.start()
    os.environ["OMNI_REDIS_URL"] = cluster.url
    os.environ.setdefault("OMNI_MODELS_DIR", str(RESULTS.parents[1] / "tests" / ".models"))
    os.environ.setdefault("OMNI_OUTPUT_DIR", str(RESULTS / "outputs"))
    try:
        shutil.rmtree(LOGS, ignore_errors=True)
        LOGS.mkdir(parents=True)
        out = {"sentinel_failover": sentinel_failover(n, cluster)}
        print("sentinel", out, file=sys.stderr, flush=True)
    finally:
        cluster.close()
    return out


def earlier_scenarios() -> tuple[dict[str, dict], dict[str, str]]:
    """The figures bench/results/faults.json holds already, and when each scenario was
    measured: a run of some scenarios leaves the others' as they were."""
    try:
        old = json.loads((RESULTS / "faults.json").read_text())
        scenarios = dict(old["scenarios"])
    except (OSError, ValueError, KeyError):
        return {}, {}
    measured = old.get("measured") or dict.fromkeys(scenarios, old.get("time", ""))
    return scenarios, dict(measured)


def amqp_answers() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=1):
            return True
    except OSError:
        return False


if __name__ == "__main__":
    main()
