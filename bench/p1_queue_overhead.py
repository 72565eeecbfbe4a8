"""P1: the queue path of omni-tasks vs bare Celery, same broker and worker settings.

Round trip: one request at a time (send, wait for the result), p50/p99.
Throughput: N requests sent at once, time until the last result.
Both sides: threads pool, concurrency 32, prefetch 1, acks_late, JSON, events on.
omni-tasks sends `omni_tasks.probe` (a TEXT request that runs no engine) through
`.delay()`: request validation, the router's policy, the worker's checks and counters.
Target: omni-tasks throughput >= 0.95x bare Celery, p50 <= 1.1x, over 3 paired runs.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
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


def measure(send, rounds: int, burst: int, timeout_s: float = 300) -> dict[str, float]:
    for _ in range(20):  # warm-up
        send().get(timeout=timeout_s)
    latencies = []
    for _ in range(rounds):
        start = time.perf_counter()
        send().get(timeout=timeout_s)
        latencies.append(time.perf_counter() - start)
    start = time.perf_counter()
    results = [send() for _ in range(burst)]
    for r in results:
        r.get(timeout=timeout_s)
    elapsed = time.perf_counter() - start
    return {
        **percentiles(latencies),
        "throughput_per_s": round(burst / elapsed, 1),
        "burst": burst,
        "rounds": rounds,
    }


def paired_ratios(runs: dict[str, list[dict[str, float]]]) -> dict[str, object]:
    """Each omni run against the bare run just before it, then the median of the pairs:
    the machine's drift hits both sides of a pair alike."""
    pairs = list(zip(runs["bare"], runs["omni"], strict=True))

    def median_ratio(field: str) -> float:
        return round(statistics.median(o[field] / b[field] for b, o in pairs), 3)

    return {
        "throughput_ratio_omni_vs_bare": median_ratio("throughput_per_s"),
        "throughput_ratios_per_pair": [
            round(o["throughput_per_s"] / b["throughput_per_s"], 3) for b, o in pairs
        ],
        "p50_ratio_omni_vs_bare": median_ratio("p50_ms"),
        "p99_ratio_omni_vs_bare": median_ratio("p99_ms"),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--burst", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    url = setup_redis()
    # The burst is larger than the default admission limit: admission still runs, as on
    # every send, with room for the whole burst.
    os.environ.setdefault("OMNI_SCHEDULER__MAX_QUEUE_SIZE", str(10 * args.burst))
    import bare_app

    import omni_tasks

    logs = RESULTS / "logs"
    runs: dict[str, list[dict[str, float]]] = {"bare": [], "omni": []}
    for repeat in range(args.repeats):
        for side in ("bare", "omni"):  # alternate, so drift hits both
            clean_redis()
            if side == "bare":
                proc = start_celery("bare_app", "bare", POOL_WORKER_ARGS, logs / "p1-bare.log")
                app, task, queue = bare_app.app, bare_app.noop, "bare"
            else:
                proc = start_celery("omni_tasks", "probe", POOL_WORKER_ARGS, logs / "p1-omni.log")
                app, task, queue = omni_tasks.app, omni_tasks.tasks.probe, "probe"

            send = functools.partial(task.apply_async, kwargs={"prompt": "x"}, queue=queue)

            try:
                wait_ping(app)
                runs[side].append(measure(send, args.rounds, args.burst))
                print(side, repeat, runs[side][-1], flush=True)
            finally:
                stop(proc)
    write_result(
        "p1_queue_overhead",
        {
            "redis": url.split("@")[-1],
            "worker_settings": " ".join(POOL_WORKER_ARGS),
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
