"""The per-request Redis command budget: an omni-tasks request costs at most
bare Celery's commands per request + 8, end to end, measured side by side on a small
real cluster.

The test starts a private `redis-server` (so that `INFO commandstats` sees only this
cluster's traffic) and a driver process (this file run as a script: the Celery apps
read their Redis URL once, at import). The driver starts one bare Celery worker
(`bench/bare_app.py`: the same broker settings) and one real `celery -A omni_tasks
worker -Q probe`, both with the AR pool's worker settings, and sends N sequential
requests to each (`.delay()`, then `.get()`): omni-tasks' `probe` (a TEXT request that
runs no engine) and bare Celery's no-op. Commands per request are the commandstats
deltas of each phase, less the workers' idle traffic over the same time (an idle window
measured just before). The per-command figures are printed, so a failure says which
command grew.

Sequential, as `bench/scale.py` measures it: requests in flight together would let
Celery group more task events into one PUBLISH on one side than on the other. A worker's
batched writes (success counters and admission releases, one flush of about 13 commands
every 0.25 s) cost less per request the faster requests come: at 130 to 300 requests a
second here they add 0.2 to 0.4; the budget holds down to about 50 a second.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: What omni-tasks may add to bare Celery's commands per request.
BUDGET_OVER_BARE = 8
REQUESTS = 300
IDLE_WINDOW_S = 4.0
#: The AR pool's worker settings (`bench/common.py` POOL_WORKER_ARGS).
WORKER_ARGS = ["-P", "threads", "-c", "32", "--prefetch-multiplier", "1"]
#: The driver's own commands, left out of every tally.
OWN = {"config"}


@pytest.fixture()
def private_redis_url() -> Any:
    if shutil.which("redis-server") is None:
        pytest.skip("needs the system redis-server: INFO commandstats of a private server")
    from omni_tasks.dev.redis_server import start_private_redis

    server = start_private_redis()
    yield server.url
    server.stop()


def test_a_request_costs_at_most_bare_celery_plus_8_commands(
    private_redis_url: str, tmp_path: Path
) -> None:
    env = {**os.environ, "OMNI_REDIS_URL": private_redis_url}
    env["OMNI_SCHEDULER__MAX_QUEUE_SIZE"] = "100000"  # admission runs, with room
    env["OMNI_OUTPUT_DIR"] = str(tmp_path / "outputs")
    done = subprocess.run(
        [sys.executable, __file__, str(tmp_path / "logs")],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    bare, omni = found["bare"], found["omni"]
    shown = json.dumps(found, indent=1)
    assert bare["per_request"] > 10, shown  # the measurement saw the requests
    assert omni["per_request"] <= bare["per_request"] + BUDGET_OVER_BARE, shown


# -- the driver (a process of its own, on the private server) ------------------------
class Tally:
    """`INFO commandstats` of one phase: reset, then read back as calls by command."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.started = 0.0

    def reset(self) -> None:
        self.client.config_resetstat()
        self.started = time.perf_counter()

    def read(self) -> tuple[dict[str, int], float]:
        elapsed = time.perf_counter() - self.started
        calls = {
            name.removeprefix("cmdstat_"): int(row["calls"])
            for name, row in self.client.info("commandstats").items()
        }
        return {c: n for c, n in calls.items() if c.split("|")[0] not in OWN}, elapsed


def per_request(
    tally: Tally, send: Any, count: int, idle: tuple[dict[str, int], float]
) -> dict[str, Any]:
    """Commands per request of `count` sequential requests, net of idle traffic."""
    tally.reset()
    for _ in range(count):
        send().get(timeout=60)
    calls, elapsed = tally.read()
    idle_calls, idle_s = idle
    net = {c: max(n - idle_calls.get(c, 0) * elapsed / idle_s, 0.0) for c, n in calls.items()}
    by_command = {c: round(n / count, 2) for c, n in sorted(net.items(), key=lambda kv: -kv[1])}
    return {
        "per_request": round(sum(net.values()) / count, 2),
        "by_command": {c: v for c, v in by_command.items() if v >= 0.01},
        "seconds": round(elapsed, 2),
    }


def drive(log_dir: Path) -> dict[str, Any]:
    """Both workers, an idle window, then each side's requests: the figures."""
    sys.path.insert(0, str(ROOT / "bench"))
    import bare_app

    from omni_tasks.coordination.client import get_redis
    from omni_tasks.dev.launcher import start_worker
    from omni_tasks.tasks import probe

    log_dir.mkdir(parents=True, exist_ok=True)
    bare_cmd = [sys.executable, "-m", "celery", "-A", "bare_app", "worker", "-Q", "bare"]
    bare_cmd += ["-n", f"budget-bare-{os.getpid()}@%h", "--loglevel", "WARNING", *WORKER_ARGS]
    with open(log_dir / "bare.log", "wb") as log:
        bare = subprocess.Popen(bare_cmd, cwd=ROOT / "bench", stdout=log, stderr=log)
    omni = start_worker("probe", log_dir, extra_args=WORKER_ARGS, name="budget")
    try:
        omni.wait_ready(90)
        deadline = time.monotonic() + 90
        while not bare_app.app.control.ping(timeout=0.5):
            assert time.monotonic() < deadline, "the bare worker did not answer"
        sends = {
            # `.delay()` with the queue the workers read (what `.delay()` runs: the
            # router, admission, the ledger and the publish).
            "bare": lambda: bare_app.noop.apply_async(kwargs={"prompt": "x"}, queue="bare"),
            "omni": lambda: probe.apply_async(kwargs={"prompt": "x"}, queue="probe"),
        }
        for send in sends.values():  # warm-up: connections, subscriptions, first beats
            for _ in range(10):
                send().get(timeout=60)
        tally = Tally(get_redis())
        tally.reset()
        time.sleep(IDLE_WINDOW_S)
        idle = tally.read()
        return {side: per_request(tally, send, REQUESTS, idle) for side, send in sends.items()}
    finally:
        omni.stop()
        bare.terminate()
        bare.wait(30)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    print(json.dumps(drive(Path(sys.argv[1]))))
