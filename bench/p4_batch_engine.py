"""P4-batch inside one engine: the step loop with batches of 8 vs 1, no queue around it.

Eight compatible requests (distinct prompts and seeds) run at once on one
`DiffusersEngine`, as a worker's task threads run them; rounds alternate the loop's
batch limit between 8 and 1 on the same warm engine. Also reported: how far a batched
request's image is from the same request run alone (mean absolute pixel difference,
in 1/255 units). For a GPU, where this is the figure to look at: `--size 512`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

N_REQUESTS = 8


def one_round(engine, size: int, steps: int, tag: str) -> tuple[float, list]:
    from workers.engines.base import ImageParams

    outs: list = [None] * N_REQUESTS

    def run(i: int) -> None:
        params = ImageParams(width=size, height=size, steps=steps, seed=i)
        outs[i] = engine.generate(f"{tag}-{i}", f"p4-batch prompt {i}", params, 600)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(N_REQUESTS)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, outs


def pixel_diff(a, b) -> float:
    import numpy as np

    x, y = (np.asarray(img.image, dtype=np.float64) for img in (a, b))
    return float(np.abs(x - y).mean())


def main() -> None:
    import torch

    from workers.engines.diffusers_engine import DiffusersEngine

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="a tiny-flux folder")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    engine = DiffusersEngine(args.model, max_batch_size=8)
    times: dict[int, list[float]] = {8: [], 1: []}
    batched: list = []
    for r in range(args.rounds + 1):
        for limit in (8, 1):
            engine.loop.limit = limit
            elapsed, outs = one_round(engine, args.size, args.steps, f"r{r}b{limit}")
            if r:  # round 0 warms up
                times[limit].append(elapsed)
            if limit == 8:
                batched = outs
    engine.loop.limit = 1
    _, alone = one_round(engine, args.size, args.steps, "alone")
    engine.shutdown()
    med = {b: statistics.median(t) for b, t in times.items()}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(
        {
            "device": device,
            "dtype": str(engine.dtype),
            "size": args.size,
            "steps": args.steps,
            "batched_s": round(med[8], 4),
            "unbatched_s": round(med[1], 4),
            "throughput_ratio": round(med[1] / med[8], 3),
            "max_batch_seen": max(o.max_batch for o in batched),
            "max_pixel_diff_vs_alone_255ths": round(
                max(pixel_diff(a, b) for a, b in zip(batched, alone, strict=True)), 4
            ),
            "rounds_s": {b: [round(x, 4) for x in t] for b, t in times.items()},
        }
    )


if __name__ == "__main__":
    main()
