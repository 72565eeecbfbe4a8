"""P1: the queue path of omni-tasks vs bare Celery, same broker and worker settings.

Round trip: one request at a time (send, wait for the result), p50/p99.
Throughput: requests sent at once, time until the last result.
Both sides: threads pool, concurrency 32, prefetch 1, acks_late, JSON, events on.
omni-tasks sends `omni_tasks.probe` (a TEXT request that runs no engine) through
`.delay()`: request validation, admission, the ledger, the worker's checks, its run
claim and counters.

Both workers run side by side for the whole bench, and each of the 3 paired runs
alternates short blocks of the two (a block: `rounds / blocks` round trips, then a burst
of `burst / blocks`), the order flipping every block. On this shared 2-core machine
the speed drifts by ±20% from one minute to the next (bare Celery's own p50 ranged
2.99-4.17 ms over consecutive runs): blocks of a few seconds put both sides under the
same drift, where one side after the other did not.
Target: omni-tasks throughput >= 0.95x bare Celery, p50 <= 1.1x, over 3 paired runs.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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

SIDES = ("bare", "omni")


class Side:
    """One side's send function and what its blocks measured in the current run."""

    def __init__(self, send: Callable[[], Any]) -> None:
        self.send = send
        self.reset()

    def reset(self) -> None:
        self.latencies: list[float] = []
        self.burst_s = 0.0
        self.burst_n = 0

    def block(self, rounds: int, burst: int, timeout_s: float = 300) -> None:
        for _ in range(rounds):
            start = time.perf_counter()
            self.send().get(timeout=timeout_s)
            self.latencies.append(time.perf_counter() - start)
        start = time.perf_counter()
        results = [self.send() for _ in range(burst)]
        for r in results:
            r.get(timeout=timeout_s)
        self.burst_s += time.perf_counter() - start
        self.burst_n += burst

    def summary(self) -> dict[str, float]:
        return {
            **percentiles(self.latencies),
            "throughput_per_s": round(self.burst_n / self.burst_s, 1),
            "burst": self.burst_n,
            "rounds": len(self.latencies),
        }


def paired_run(sides: dict[str, Side], rounds: int, burst: int, blocks: int) -> None:
    """One paired run: `blocks` blocks of each side, alternating, the order flipped
    every block."""
    for side in sides.values():
        side.reset()
    for block in range(blocks):
        order = SIDES if block % 2 == 0 else SIDES[::-1]
        for name in order:
            sides[name].block(rounds // blocks, burst // blocks)


def paired_ratios(runs: dict[str, list[dict[str, float]]]) -> dict[str, object]:
    """Each run's omni side against its bare side, then the median of the 3 pairs."""
    pairs = list(zip(runs["bare"], runs["omni"], strict=True))

    def median_ratio(field: str) -> float:
        return round(statistics.median(o[field] / b[field] for b, o in pairs), 3)

    return {
        "throughput_ratio_omni_vs_bare": median_ratio("throughput_per_s"),
        "throughput_ratios_per_pair": [
            round(o["throughput_per_s"] / b["throughput_per_s"], 3) for b, o in pairs
        ],
        "p50_ratio_omni_vs_bare": median_ratio("p50_ms"),
        "p50_ratios_per_pair": [round(o["p50_ms"] / b["p50_ms"], 3) for b, o in pairs],
        "p99_ratio_omni_vs_bare": median_ratio("p99_ms"),
    }


def warm(sides: dict[str, Side]) -> None:
    for side in sides.values():
        for _ in range(50):
            side.send().get(timeout=300)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--burst", type=int, default=2000)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    url = setup_redis()
    # The bursts are larger than the default admission limit: admission still runs, as
    # on every send, with room for all of them.
    os.environ.setdefault("OMNI_SCHEDULER__MAX_QUEUE_SIZE", str(10 * args.burst))
    import bare_app

    import omni_tasks

    clean_redis()
    logs = RESULTS / "logs"
    procs = [
        start_celery("bare_app", "bare", POOL_WORKER_ARGS, logs / "p1-bare.log"),
        start_celery("omni_tasks", "probe", POOL_WORKER_ARGS, logs / "p1-omni.log"),
    ]
    tasks = {"bare": (bare_app.noop, "bare"), "omni": (omni_tasks.tasks.probe, "probe")}
    sides = {
        name: Side(functools.partial(task.apply_async, kwargs={"prompt": "x"}, queue=queue))
        for name, (task, queue) in tasks.items()
    }
    runs: dict[str, list[dict[str, float]]] = {"bare": [], "omni": []}
    try:
        wait_ping(bare_app.app)
        wait_ping(omni_tasks.app)
        warm(sides)
        for repeat in range(args.repeats):
            paired_run(sides, args.rounds, args.burst, args.blocks)
            for name in SIDES:
                runs[name].append(sides[name].summary())
                print(name, repeat, runs[name][-1], flush=True)
    finally:
        for proc in procs:
            stop(proc)
    write_result(
        "p1_queue_overhead",
        {
            "redis": url.split("@")[-1],
            "worker_settings": " ".join(POOL_WORKER_ARGS),
            "method": f"both workers up; {args.blocks} alternating blocks per side per run",
            "runs": runs,
            **paired_ratios(runs),
            "target": "throughput ratio >= 0.95, p50 ratio <= 1.1",
        },
    )
    clean_redis()


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    main()
