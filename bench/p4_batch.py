"""P4-batch: step-level batching on one diffusion worker, `max_batch_size` 8 vs 1.

Eight compatible requests (same size and steps, distinct prompts and seeds, so no DiT
cache reuse) are sent at once to one `celery -A omni_tasks worker -Q diffusion` (the
same settings otherwise: 10 held requests, priority policy); the time from the first
send to the last result gives the throughput. Rounds alternate between the two settings
on workers started once each. Target: >= 1.5x throughput with batching.

`--size 512` measures the same on a GPU (the tiny Flux at 512x512).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, clean_redis, setup_redis, write_result  # noqa: E402

N_REQUESTS = 8


def one_round(size: int, steps: int, tag: str) -> dict:
    """Send N_REQUESTS at once; seconds until the last result, and the batches seen."""
    from omni_tasks import generate_image

    start = time.perf_counter()
    results = [
        generate_image.delay(
            prompt=f"p4-batch {tag} {i}", seed=i, width=size, height=size, steps=steps
        )
        for i in range(N_REQUESTS)
    ]
    outs = [r.get(600) for r in results]
    elapsed = time.perf_counter() - start
    assert all(o["cache"]["latents"] == "miss" for o in outs)
    return {"s": elapsed, "max_batch": max(o["max_batch"] for o in outs)}


def measure(size: int, steps: int, rounds: int) -> dict:
    from omni_tasks.dev.launcher import start_worker

    figures: dict[int, list[dict]] = {8: [], 1: []}
    for batch in (8, 1):
        clean_redis()
        env = {"OMNI_DIFFUSION__MAX_BATCH_SIZE": str(batch)}
        worker = start_worker("diffusion", RESULTS / "logs", env=env, name=f"p4b{batch}")
        try:
            worker.wait_ready(600)
            one_round(size, steps, f"warm{batch}")
            for r in range(rounds):
                figures[batch].append(one_round(size, steps, f"b{batch} r{r}"))
        finally:
            worker.stop()
    med = {b: statistics.median(f["s"] for f in runs) for b, runs in figures.items()}
    return {
        "requests": N_REQUESTS,
        "size": size,
        "steps": steps,
        "rounds": rounds,
        "batched_s": round(med[8], 4),
        "unbatched_s": round(med[1], 4),
        "batched_images_per_s": round(N_REQUESTS / med[8], 3),
        "unbatched_images_per_s": round(N_REQUESTS / med[1], 3),
        "throughput_ratio": round(med[1] / med[8], 3),
        "max_batch_seen": {b: max(f["max_batch"] for f in runs) for b, runs in figures.items()},
        "rounds_s": {b: [round(f["s"], 4) for f in runs] for b, runs in figures.items()},
        "target": ">= 1.5x",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--name", default="p4_batch")
    args = parser.parse_args()
    setup_redis()
    write_result(args.name, measure(args.size, args.steps, args.rounds))


if __name__ == "__main__":
    main()
