"""P8: per-request LoRA adapters on two diffusion workers.

Part 1, routing. A Zipf(1.1) workload: 200 image requests, each naming one of 20 tiny
adapters (every request a new prompt and seed, so the DiT cache never answers), kept 4
in flight on two diffusion workers with 2 slots each and a small adapter budget (room
for 2 adapters per worker). Run with adapter-affinity routing (`cache_affinity: true`:
a request goes to the live worker whose directory entry says it holds the adapter,
while that worker's own queue has room) and without (both workers take from the shared
pool queue: round robin), in the order round robin, affinity, affinity, round robin, so
that neither mode always runs first (a busy machine drifts). Reported: the adapter hit
rate (adapters already loaded when the request ran), over all runs of a mode, and the
median throughput. Target: hit rate ratio >= 1.5.

Part 2, load vs step, in one process on an otherwise idle engine: the time to load an
adapter (a miss that unloads another, as under a full budget) against one denoising
step of a lone request, and against a whole request.

Part 3, mixed-adapter steps (`lora.mixed_batches`), in one process: rounds of 8
concurrent requests over 4 adapters, on an engine that batches one adapter set per step
and on one that runs every row with its own deltas in a shared step; rounds alternate
between the two. Reported: images per second of each and the ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, clean_redis, setup_redis, write_result  # noqa: E402
from p5_affinity import zipf_indices  # noqa: E402

GIB = 2**30


def registry(n: int) -> dict[str, str]:
    return {f"style{i:02d}": f"tiny-flux-lora-style{i:02d}" for i in range(n)}


def prebuild(loras: dict[str, str]) -> int:
    """Build the tiny adapters before any worker starts; one adapter's tensor bytes."""
    import math

    from safetensors import safe_open

    from omni_tasks.config import get_config
    from workers.lora.registry import adapter_path

    config = replace(get_config(), loras=loras)
    folders = [adapter_path(name, config) for name in loras]
    with safe_open(str(folders[0] / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) * 4 for k in f.keys())  # noqa: SIM118


# --- part 1: routing -------------------------------------------------------------------


def run_pool(affinity: bool, order: list[int], loras: dict[str, str], args: Any) -> dict:
    from omni_tasks import generate_image
    from omni_tasks.config import get_config, set_config
    from omni_tasks.dev.launcher import start_worker

    config = get_config()  # the producer routes: affinity is switched in this process
    set_config(
        replace(config, loras=loras, diffusion=replace(config.diffusion, cache_affinity=affinity))
    )
    env = {
        "OMNI_LORAS": json.dumps(loras),
        "OMNI_LORA__MEMORY_GIB": str(args.budget_gib),
        "OMNI_DIFFUSION__CACHE_AFFINITY": "true" if affinity else "false",
        "OMNI_DIFFUSION__CONCURRENCY": "2",
    }
    names = sorted(loras)
    size = {"width": args.size, "height": args.size, "steps": args.steps}
    clean_redis()
    workers = [start_worker("diffusion", RESULTS / "logs", env=env, name="p8") for _ in range(2)]
    try:
        for w in workers:
            w.wait_ready(600)
        for r in [generate_image.delay(prompt=f"warm-up {i}", **size) for i in range(2)]:
            r.get(300)
        sent = [
            {"prompt": f"p8 {time.time()} {n}", "seed": n, "lora": [names[i]], **size}
            for n, i in enumerate(order)
        ]
        results, elapsed = _drive(generate_image, sent, in_flight=4)
    finally:
        for w in workers:
            w.stop()
    uses = [u for r in results for u in r["lora"]]
    return {
        "seconds": round(elapsed, 3),
        "throughput_per_s": round(len(results) / elapsed, 3),
        "adapter_hits": sum(1 for u in uses if u["hit"]),
        "adapter_uses": len(uses),
        "most_in_one_step": max(r["max_batch"] for r in results),
    }


def _drive(task: Any, kwargs_list: list[dict], in_flight: int) -> tuple[list[dict], float]:
    results: list[dict] = []
    pending: list = []
    start = time.perf_counter()
    for kwargs in kwargs_list:
        while len(pending) >= in_flight:
            done = [r for r in pending if r.ready()]
            for r in done:
                pending.remove(r)
                results.append(r.get(300))
            if not done:
                time.sleep(0.002)
        pending.append(task.delay(**kwargs))
    results += [r.get(300) for r in pending]
    return results, time.perf_counter() - start


def routing(order: list[int], loras: dict[str, str], args: Any) -> dict:
    runs: dict[bool, list[dict]] = {False: [], True: []}
    for i in range(args.repeats * 2):
        affinity = i % 4 in (1, 2)  # round robin, affinity, affinity, round robin
        runs[affinity].append(run_pool(affinity, order, loras, args))
    modes = {}
    for affinity, mode in ((False, "round_robin"), (True, "affinity")):
        done = runs[affinity]
        hits = sum(r["adapter_hits"] for r in done)
        modes[mode] = {
            "adapter_hit_rate": round(hits / sum(r["adapter_uses"] for r in done), 4),
            "throughput_per_s": round(statistics.median(r["throughput_per_s"] for r in done), 3),
            "runs": done,
        }
    rr, af = modes["round_robin"], modes["affinity"]
    return {
        **modes,
        "hit_rate_ratio": round(af["adapter_hit_rate"] / max(rr["adapter_hit_rate"], 1e-9), 3),
        "throughput_ratio": round(af["throughput_per_s"] / rr["throughput_per_s"], 3),
        "target": "hit rate ratio >= 1.5",
    }


# --- parts 2 and 3: in one process -------------------------------------------------------


def engine_for(loras: dict[str, str], **lora_settings: Any) -> Any:
    from omni_tasks.config import get_config
    from workers.engines.diffusers_engine import DiffusersEngine
    from workers.runtime import resolve_model

    base = replace(get_config(), loras=loras)
    config = replace(base, lora=replace(base.lora, **lora_settings))
    return DiffusersEngine(resolve_model("tiny-flux", base), config=config)


def load_vs_step(loras: dict[str, str], args: Any) -> dict:
    """Cold adapter loads (each unloads the least recent of two) against steps."""
    from workers.engines.base import ImageParams

    engine = engine_for(loras, memory_gib=args.budget_gib)
    size = {"width": args.size, "height": args.size, "steps": args.steps}
    loads, steps, images = [], [], []
    try:
        engine.generate("warm", "warm-up", ImageParams(**size), 120)
        for i, name in enumerate(sorted(loras)):
            styled = engine.generate(f"l{i}", "p8", ImageParams(**size, lora=((name, 1.0),)), 120)
            loads.append(styled.lora[0]["load_s"])
            alone = engine.generate(f"s{i}", f"p8 base {i}", ImageParams(**size, seed=i), 120)
            steps.append(alone.timings["denoise_s"] / alone.denoise_steps)
            images.append(alone.timings["total_s"])
    finally:
        engine.shutdown()
    load_ms, step_ms = statistics.median(loads) * 1e3, statistics.median(steps) * 1e3
    return {
        "loads": len(loads),
        "load_ms_median": round(load_ms, 2),
        "step_ms_median": round(step_ms, 2),
        "image_ms_median": round(statistics.median(images) * 1e3, 2),
        "load_per_step": round(load_ms / step_ms, 2),
    }


def mixed_steps(loras: dict[str, str], args: Any) -> dict:
    """Per-adapter steps vs mixed-adapter steps."""
    from workers.engines.base import ImageParams

    names = sorted(loras)[: args.mixed_adapters]
    engines = {mixed: engine_for(loras, mixed_batches=mixed) for mixed in (False, True)}
    size = {"width": args.size, "height": args.size, "steps": args.steps}
    jobs = [
        ImageParams(**size, seed=i, lora=((n, 1.0),))
        for i, n in enumerate(names * (args.mixed_requests // len(names)))
    ]
    seconds: dict[bool, list[float]] = {False: [], True: []}
    batches: dict[bool, int] = {False: 0, True: 0}
    try:
        for engine in engines.values():  # adapters loaded, shapes measured: not timed
            _round(engine, jobs)
        for r in range(args.rounds * 2):
            mixed = r % 4 in (1, 2)  # ABBA: neither always goes first
            took, outs = _round(engines[mixed], jobs)
            seconds[mixed].append(took)
            batches[mixed] = max(batches[mixed], max(o.max_batch for o in outs))
    finally:
        for engine in engines.values():
            engine.shutdown()
    per_adapter, mixed_rate = (len(jobs) / statistics.median(seconds[m]) for m in (False, True))
    return {
        "requests_per_round": len(jobs),
        "adapters_per_round": len(names),
        "rounds": args.rounds,
        "per_adapter_steps": {"images_per_s": round(per_adapter, 2), "max_batch": batches[False]},
        "mixed_steps": {"images_per_s": round(mixed_rate, 2), "max_batch": batches[True]},
        "mixed_vs_per_adapter": round(mixed_rate / per_adapter, 3),
    }


def _round(engine: Any, jobs: list) -> tuple[float, list]:
    outs: list = [None] * len(jobs)

    def run(i: int) -> None:
        outs[i] = engine.generate(f"mix{i}", f"a harbour, variant {i}", jobs[i], 120)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start, outs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--adapters", type=int, default=20)
    parser.add_argument("--zipf-s", type=float, default=1.1)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--budget-adapters", type=float, default=2.5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--mixed-adapters", type=int, default=4)
    parser.add_argument("--mixed-requests", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    setup_redis()
    loras = registry(args.adapters)
    adapter_bytes = prebuild(loras)
    args.budget_gib = args.budget_adapters * adapter_bytes / GIB
    order = zipf_indices(args.requests, args.adapters, args.zipf_s, seed=0)
    workload = {
        "requests": args.requests,
        "adapters": args.adapters,
        "zipf_s": args.zipf_s,
        "adapters_seen": len(set(order)),
        "size": args.size,
        "steps": args.steps,
        "workers": 2,
        "slots_per_worker": 2,
        "in_flight": 4,
        "runs_per_mode": args.repeats,
        "adapter_bytes": adapter_bytes,
        "adapter_budget_per_worker": f"{args.budget_adapters:g} adapters",
    }
    figures = routing(order, loras, args)
    write_result(
        "p8_lora",
        {
            "workload": workload,
            **figures,
            "load_vs_step": load_vs_step(loras, args),
            "mixed_batches": mixed_steps(loras, args),
        },
    )
    clean_redis()


if __name__ == "__main__":
    main()
