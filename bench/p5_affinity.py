"""P5: cache-affinity routing vs plain pool routing on two diffusion workers.

A Zipf(1.1) workload: 200 requests drawn over 50 distinct requests (prompt + seed),
kept 4 in flight (two workers x two slots), run once with `cache_affinity: true` and
once with `false` (both workers then take from the shared pool queue, in effect round
robin). Each worker's DiT cache is bounded so that it holds fewer entries than the
workload has distinct requests. Reported: the DiT cache hit rate (exact repeats served
from a worker's own cache), what single-flight shared, what was computed, throughput.
Target: >= 1.8x hit rate.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, clean_redis, setup_redis, write_result  # noqa: E402


def zipf_indices(n_requests: int, n_distinct: int, s: float, seed: int) -> list[int]:
    weights = [1.0 / (k**s) for k in range(1, n_distinct + 1)]
    return random.Random(seed).choices(range(n_distinct), weights=weights, k=n_requests)


def run(affinity: bool, order: list[int], size: int, steps: int, budget_gib: float) -> dict:
    from dataclasses import replace

    from omni_tasks import generate_image
    from omni_tasks.config import get_config, set_config
    from omni_tasks.dev.launcher import start_worker

    config = get_config()  # the producer routes: switch affinity in this process
    set_config(replace(config, diffusion=replace(config.diffusion, cache_affinity=affinity)))
    env = {
        "OMNI_CACHE__MAX_MEMORY_GIB": str(budget_gib),
        "OMNI_CACHE__ENABLE_COMPRESSION": "false",
        "OMNI_DIFFUSION__CACHE_AFFINITY": "true" if affinity else "false",
    }
    clean_redis()
    workers = [start_worker("diffusion", RESULTS / "logs", env=env, name="p5") for _ in range(2)]
    try:
        for w in workers:
            w.wait_ready(600)
        generate_image.delay(prompt="warm-up", width=size, height=size, steps=steps).get(300)
        counts = {"latents": {}, "embeddings": {}}
        start = time.perf_counter()
        pending: list = []
        for i in order:
            while len(pending) >= 4:
                done = [r for r in pending if r.ready()]
                for r in done:
                    pending.remove(r)
                    _count(counts, r.get(300))
                if not done:
                    time.sleep(0.002)
            pending.append(
                generate_image.delay(
                    prompt=f"zipf request {i}", seed=i, width=size, height=size, steps=steps
                )
            )
        for r in pending:
            _count(counts, r.get(300))
        elapsed = time.perf_counter() - start
    finally:
        for w in workers:
            w.stop()
    lat, n = counts["latents"], len(order)
    return {
        "affinity": affinity,
        "requests": n,
        "seconds": round(elapsed, 3),
        "throughput_per_s": round(n / elapsed, 2),
        "latents": lat,
        "embeddings": counts["embeddings"],
        # Served from a worker's own DiT cache: the cache hit rate.
        "cache_hit_rate": round(lat.get("hit", 0) / n, 4),
        # Computed once for identical requests in flight at the same time (single-flight).
        "shared_rate": round(lat.get("shared", 0) / n, 4),
        "computed_rate": round(lat.get("miss", 0) / n, 4),
    }


def _count(counts: dict, value: dict) -> None:
    for kind in ("latents", "embeddings"):
        state = value["cache"][kind]
        counts[kind][state] = counts[kind].get(state, 0) + 1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--distinct", type=int, default=50)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--budget-gib", type=float, default=0.0005)
    args = parser.parse_args()
    setup_redis()
    order = zipf_indices(args.requests, args.distinct, 1.1, seed=0)
    plain = run(False, order, args.size, args.steps, args.budget_gib)
    affine = run(True, order, args.size, args.steps, args.budget_gib)
    write_result(
        "p5_affinity",
        {
            "workload": {
                "requests": args.requests,
                "distinct": args.distinct,
                "zipf_s": 1.1,
                "distinct_seen": len(set(order)),
                "size": args.size,
                "steps": args.steps,
                "cache_budget_gib_per_worker": args.budget_gib,
                "in_flight": 4,
            },
            "round_robin": plain,
            "affinity": affine,
            "hit_rate_ratio": round(
                affine["cache_hit_rate"] / max(plain["cache_hit_rate"], 1e-9), 3
            ),
            "throughput_ratio": round(affine["throughput_per_s"] / plain["throughput_per_s"], 3),
            "target": "hit rate ratio >= 1.8",
        },
    )
    clean_redis()


if __name__ == "__main__":
    main()
