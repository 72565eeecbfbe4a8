"""P7: the HTTP API's added latency over `.delay()`, for a no-op request.

The no-op request is `omni_tasks.probe`: a TEXT request whose worker runs no engine, so
both sides measure the queue path alone (validation, routing, admission, the ledger,
the worker's checks and counters, the result write). The API serves it as the job type
`probe`; `Prefer: wait=N` makes `POST /v1/jobs` answer once the job has ended, so one
HTTP round trip is the whole request, like `.delay().get()`.

- baseline: `probe.delay(prompt="x").get()` from this process;
- api: `POST /v1/jobs {"type": "probe", "prompt": "x"}` with `Prefer: wait=30`, over one
  kept-alive connection (`http.client`, the leanest client, so the figure is the API's
  cost, not an HTTP library's), to one `omni-tasks api` process.

Both go to the same worker (`-Q ar`, threads x32; the probe never touches its engine),
one request at a time, the two sides alternating request by request so drift hits both.
Added latency = api - baseline, at p50 and p99, and the median of the paired
differences. Target: <= 5 ms at p50 on this machine.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import time
from pathlib import Path

from common import (
    POOL_WORKER_ARGS,
    RESULTS,
    clean_redis,
    percentiles,
    setup_redis,
    start_celery,
    stop,
    wait_ping,
    write_result,
)

BODY = json.dumps({"type": "probe", "prompt": "x"})
HEADERS = {"Content-Type": "application/json", "Prefer": "wait=30"}
TARGET_P50_MS = 5.0


def wait_accepted(port: int, timeout_s: float = 120) -> None:
    """Until the API accepts a probe (it needs the worker's heartbeat first)."""
    deadline = time.monotonic() + timeout_s
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    while True:
        try:
            api_round_trip(conn)
            return
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def api_round_trip(conn: http.client.HTTPConnection) -> float:
    start = time.perf_counter()
    conn.request("POST", "/v1/jobs", BODY, HEADERS)
    response = conn.getresponse()
    body = json.loads(response.read())
    elapsed = time.perf_counter() - start
    if response.status != 200 or body["status"] != "succeeded":
        raise RuntimeError(f"the API answered {response.status}: {body}")
    return elapsed


def delay_round_trip(probe) -> float:
    start = time.perf_counter()
    probe.delay(prompt="x").get(timeout=30)
    return time.perf_counter() - start


def measure(port: int, rounds: int, warmup: int) -> dict[str, object]:
    from omni_tasks.tasks.definitions import probe

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for _ in range(warmup):
        api_round_trip(conn)
        delay_round_trip(probe)
    api, base = [], []
    for i in range(rounds):  # alternate which side goes first
        if i % 2:
            api.append(api_round_trip(conn))
            base.append(delay_round_trip(probe))
        else:
            base.append(delay_round_trip(probe))
            api.append(api_round_trip(conn))
    conn.close()
    added = [a - b for a, b in zip(api, base, strict=True)]
    api_p, base_p = percentiles(api), percentiles(base)
    return {
        "rounds": rounds,
        "delay": base_p,
        "api": api_p,
        "added_p50_ms": round(api_p["p50_ms"] - base_p["p50_ms"], 3),
        "added_p99_ms": round(api_p["p99_ms"] - base_p["p99_ms"], 3),
        "added_paired_median_ms": round(statistics.median(added) * 1e3, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=50)
    args = parser.parse_args()
    url = setup_redis()
    os.environ.setdefault("OMNI_AR__ENGINE", "transformers")  # loads fast; never used here
    import omni_tasks
    from omni_tasks.dev.launcher import free_port, start_api

    clean_redis()
    logs = RESULTS / "logs"
    worker = start_celery("omni_tasks", "ar", POOL_WORKER_ARGS, logs / "p7-worker.log")
    api = start_api(logs, free_port())
    try:
        wait_ping(omni_tasks.app)
        api.wait_ready()
        wait_accepted(api.port)
        figures = measure(api.port, args.rounds, args.warmup)
        print(figures, flush=True)
    finally:
        api.stop()
        stop(worker)
    write_result(
        "p7_api",
        {
            "redis": url.split("@")[-1],
            "worker_settings": " ".join(POOL_WORKER_ARGS),
            "request": "omni_tasks.probe (no engine): .delay().get() vs POST /v1/jobs "
            "type=probe with Prefer: wait",
            **figures,
            "target": f"added latency p50 <= {TARGET_P50_MS} ms",
            "met": figures["added_p50_ms"] <= TARGET_P50_MS,
        },
    )
    clean_redis()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
