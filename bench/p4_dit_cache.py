"""P4: what the DiT cache and step caching save, on the tiny Flux model.

Through the queue (one `celery -A omni_tasks worker -Q diffusion`, 128x128, 8 steps):
- exact repeat (latents hit: decode only) vs miss (full run): median latency ratio,
  target >= 20x;
- new seed of a known prompt (embeddings hit: text encoders skipped) vs a cold prompt.
In process (the worker's engine and cache classes, same settings):
- each `step_cache` mode vs none at the same steps and seed: speedup and mean relative
  difference of the image; target >= 1.6x at <= 1%;
- compression: stored/original bytes and the error of cached embeddings and latents.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, clean_redis, setup_redis, write_result  # noqa: E402

SIZE, STEPS = 128, 8


def queue_latencies(rounds: int, steps: int) -> dict:
    from omni_tasks import generate_image
    from omni_tasks.dev.launcher import start_worker

    def timed(**kw) -> tuple[float, dict]:
        start = time.perf_counter()
        value = generate_image.delay(width=SIZE, height=SIZE, steps=steps, **kw).get(300)
        return time.perf_counter() - start, value

    worker = start_worker("diffusion", RESULTS / "logs", name="p4")
    miss, hit, cold, warm = [], [], [], []
    try:
        worker.wait_ready(600)
        timed(prompt="warm-up", seed=0)
        for i in range(rounds):
            t, v = timed(prompt=f"p4 prompt {i}", seed=i)
            assert v["cache"]["latents"] == "miss"
            miss.append(t)
            cold.append(t)  # a new prompt: embeddings miss too
            t, v = timed(prompt=f"p4 prompt {i}", seed=i)
            assert v["cache"]["latents"] == "hit", v["cache"]
            hit.append(t)
            t, v = timed(prompt=f"p4 prompt {i}", seed=10_000 + i)
            assert v["cache"] == {"latents": "miss", "embeddings": "hit"}, v["cache"]
            warm.append(t)
    finally:
        worker.stop()
    med = statistics.median
    return {
        "miss_ms": round(med(miss) * 1e3, 2),
        "hit_ms": round(med(hit) * 1e3, 2),
        "exact_repeat_speedup": round(med(miss) / med(hit), 2),
        "cold_prompt_ms": round(med(cold) * 1e3, 2),
        "known_prompt_new_seed_ms": round(med(warm) * 1e3, 2),
        "embeddings_hit_speedup": round(med(cold) / med(warm), 3),
        "rounds": rounds,
        "target": "exact repeat >= 20x",
    }


def step_cache_modes(model: str, rounds: int) -> dict:
    import numpy as np

    from workers.engines.base import ImageParams, StepCacheSettings
    from workers.engines.diffusers_engine import DiffusersEngine
    from workers.engines.step_cache import STEP_CACHE_MODES, cache_dit_available

    engine = DiffusersEngine(model)
    prompt = "a lighthouse on a cliff at dusk"

    def run(mode: str) -> tuple[float, np.ndarray, int]:
        params = ImageParams(
            width=SIZE, height=SIZE, steps=STEPS, seed=42, step_cache=StepCacheSettings(mode=mode)
        )
        engine.generate("warm", prompt, params, 300)
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            out = engine.generate("m", prompt, params, 300)
            times.append(time.perf_counter() - start)
        return statistics.median(times), np.asarray(out.image, dtype=np.float64), out.steps_run

    base_t, base_img, base_steps = run("none")
    modes = {"none": {"ms": round(base_t * 1e3, 2), "steps_run": base_steps}}
    for mode in STEP_CACHE_MODES:
        if mode == "none" or (mode == "cache_dit" and not cache_dit_available()):
            continue
        t, img, steps = run(mode)
        diff = float(np.abs(img - base_img).mean() / max(np.abs(base_img).mean(), 1e-9))
        modes[mode] = {
            "ms": round(t * 1e3, 2),
            "steps_run": steps,
            "speedup": round(base_t / t, 3),
            "mean_rel_diff": round(diff, 5),
        }
    engine.shutdown()
    return {"size": SIZE, "steps": STEPS, "modes": modes, "target": ">= 1.6x at <= 1%"}


def compression(model: str) -> dict:
    from omni_tasks.config import CacheConfig
    from workers.dit_cache import DiTCacheManager
    from workers.dit_cache.compression import relative_errors
    from workers.engines.base import ImageParams
    from workers.engines.diffusers_engine import DiffusersEngine

    engine = DiffusersEngine(model)
    out = engine.generate("c", "a red fox", ImageParams(width=SIZE, height=SIZE, steps=STEPS), 300)
    engine.shutdown()
    values = {"embeddings": out.embeds, "latents": {"latents": out.latents}}
    report = {}
    for ratio in (0.7, 0.3):
        cache = DiTCacheManager(CacheConfig(max_memory_gib=1.0, compression_ratio=ratio))
        raw = DiTCacheManager(CacheConfig(max_memory_gib=1.0, enable_compression=False))
        entry: dict = {}
        for name, value in values.items():
            cache.put(name, value)
            raw.put(name, value)
            back = cache.get(name)
            entry[name] = {
                k: dict(
                    zip(
                        ("max_rel_err", "mean_rel_err"),
                        (round(e, 6) for e in relative_errors(v, back[k])),
                        strict=True,
                    )
                )
                for k, v in value.items()
            }
        entry["stored_over_original"] = round(cache.stats()["bytes"] / raw.stats()["bytes"], 4)
        report[f"compression_ratio_{ratio}"] = entry
    return report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    setup_redis()
    clean_redis()
    from omni_tasks.config import get_config
    from workers.runtime import resolve_model

    model = resolve_model(get_config().diffusion.model, get_config())
    write_result(
        "p4_dit_cache",
        {
            # 8 steps (FLUX.1-schnell-like) and 28 (FLUX.1-dev's default): a hit (the
            # stored PNG, no decode) costs the same either way, a miss scales with the steps.
            "through_queue": [queue_latencies(args.rounds, steps) for steps in (STEPS, 28)],
            "step_cache": step_cache_modes(model, args.rounds),
            "compression": compression(model),
        },
    )
    clean_redis()


if __name__ == "__main__":
    main()
