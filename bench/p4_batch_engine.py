"""P4-batch inside one engine: the step loop with batches of 8 vs 1, no queue around it.

Eight compatible requests (same size and steps, distinct prompts and seeds) run at once
on one `DiffusersEngine`, from 8 threads as a worker's task threads run them; rounds
alternate the loop's batch limit between 8 and 1 on the same warm engine (the baseline:
the same 8 threads with `engine.loop.limit = 1`, so each denoising step runs one
request). Also reported: how far a batched request's image is from the same request
run unbatched (mean absolute pixel difference, in 1/255 units), and where one request's
time goes when it runs alone (encode, denoise, decode).

Two ways to run it:

- `--model PATH_OR_TINY_NAME`: one checkpoint, its figures printed (for a
  GPU, where this is the figure to look at: `--model tiny-flux --size 512`).
- `--families` (the default without `--model`): each tiny family model in turn
  (tiny-flux, tiny-sd3, tiny-qwen-image, tiny-sana, tiny-qwen-image-edit with an input
  image), one warm engine each; a model that does not load is recorded as skipped with
  the reason. Writes `bench/results/p4_batch_families.json`. Target: >= 1.5x each.
  The edit model runs `--edit-steps` / `--edit-rounds` (default 2 and 1): its pipeline
  appends the input image's latents at about a megapixel (4096 tokens) to every row of
  every step, whatever the output size, so one of its rounds costs tens of seconds on
  a CPU.

On a small shared CPU box, `--cpu-threads 1` (one OpenMP thread per team, as
`workers.engines.background.set_cpu_threads` gives text engines on 2 cores): the engine
loads its model on the main thread and steps on the step loop's thread, so torch's
default gives the process two OpenMP teams of all CPUs, which stall whenever a
neighbour runs (measured: a tiny-flux 128x128 round 10x slower).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

if TYPE_CHECKING:
    from PIL import Image

    from workers.engines.base import ImageOutput
    from workers.engines.diffusers_engine import DiffusersEngine

N_REQUESTS = 8
FAMILY_MODELS = ("tiny-flux", "tiny-sd3", "tiny-qwen-image", "tiny-sana", "tiny-qwen-image-edit")
#: The side of the input image given to an edit model (the pipeline resizes it to about
#: a megapixel for its condition latents, whatever its size).
EDIT_IMAGE_SIDE = 64


def one_round(
    engine: DiffusersEngine,
    size: int,
    steps: int,
    tag: str,
    image: Image.Image | None = None,
) -> tuple[float, list[ImageOutput]]:
    """N_REQUESTS requests sent together from as many threads: seconds until the last."""
    from workers.engines.base import ImageParams

    outs: list[Any] = [None] * N_REQUESTS

    def run(i: int) -> None:
        params = ImageParams(width=size, height=size, steps=steps, seed=i)
        prompt = f"p4-batch prompt {i}"
        outs[i] = engine.generate(f"{tag}-{i}", prompt, params, 600, image)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(N_REQUESTS)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if any(o is None for o in outs):
        raise RuntimeError(f"round {tag}: a request failed (see the traceback above)")
    return elapsed, outs


def pixel_diff(a: ImageOutput, b: ImageOutput) -> float:
    import numpy as np

    x, y = (np.asarray(img.image.convert("RGB"), dtype=np.float64) for img in (a, b))
    return float(np.abs(x - y).mean())


def alone_phases(
    engine: DiffusersEngine, size: int, steps: int, image: Image.Image | None
) -> dict[str, float]:
    """One request by itself: seconds per phase, and the denoising share of the total."""
    from workers.engines.base import ImageParams

    params = ImageParams(width=size, height=size, steps=steps, seed=99)
    out = engine.generate("phases", "p4-batch phases", params, 600, image)
    phases = {k: round(out.timings.get(k, 0.0), 4) for k in ("encode_s", "denoise_s", "decode_s")}
    total = out.timings.get("total_s") or sum(phases.values())
    return {
        **phases,
        "total_s": round(total, 4),
        "denoise_share": round(phases["denoise_s"] / total, 3),
    }


def measure(
    engine: DiffusersEngine,
    size: int,
    steps: int,
    rounds: int,
    image: Image.Image | None = None,
    budget_s: float | None = None,
) -> dict[str, Any]:
    """Batch limit 8 vs 1 on `engine`, rounds alternating which goes first; stops early
    once `budget_s` has passed after at least 2 measured rounds. A batched round and one
    request alone (its phases reported) warm both shapes up first."""
    times: dict[int, list[float]] = {8: [], 1: []}
    seen: dict[int, int] = {8: 0, 1: 0}
    last: dict[int, list[ImageOutput]] = {}
    start = time.perf_counter()
    engine.loop.limit = 8
    one_round(engine, size, steps, "warm", image)
    engine.loop.limit = 1
    phases = alone_phases(engine, size, steps, image)
    for r in range(1, rounds + 1):
        for limit in (1, 8) if r % 2 == 0 else (8, 1):
            engine.loop.limit = limit
            elapsed, outs = one_round(engine, size, steps, f"r{r}b{limit}", image)
            last[limit] = outs
            times[limit].append(elapsed)
            seen[limit] = max(seen[limit], *(o.max_batch for o in outs))
        if budget_s is not None and r >= 2 and time.perf_counter() - start > budget_s:
            break
    engine.loop.limit = 8
    med = {b: statistics.median(t) for b, t in times.items()}
    diffs = [pixel_diff(a, b) for a, b in zip(last[8], last[1], strict=True)]
    return {
        "size": size,
        "steps": steps,
        "rounds": len(times[8]),
        "batched_s": round(med[8], 4),
        "unbatched_s": round(med[1], 4),
        "batched_images_per_s": round(N_REQUESTS / med[8], 3),
        "unbatched_images_per_s": round(N_REQUESTS / med[1], 3),
        "throughput_ratio": round(med[1] / med[8], 3),
        "max_batch_seen": seen[8],
        "max_batch_seen_unbatched": seen[1],
        "max_pixel_diff_vs_alone_255ths": round(max(diffs), 4),
        "alone_phases_s": phases,
        "rounds_s": {b: [round(x, 4) for x in t] for b, t in times.items()},
    }


def resolve(model: str) -> str:
    """A checkpoint folder, or a tiny model's name (built under OMNI_MODELS_DIR if missing)."""
    from omni_tasks.config import get_config
    from workers.runtime import resolve_model

    return resolve_model(model, get_config())


def edit_image() -> Image.Image:
    from PIL import Image

    image = Image.new("RGB", (EDIT_IMAGE_SIDE, EDIT_IMAGE_SIDE), (200, 80, 40))
    image.paste((40, 90, 200), (0, 0, EDIT_IMAGE_SIDE // 2, EDIT_IMAGE_SIDE))
    return image


def engine_facts(engine: DiffusersEngine) -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "dtype": str(engine.dtype),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }


def one_family(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """One model's figures on its own warm engine, or why it was skipped."""
    from workers.engines.diffusers_engine import DiffusersEngine

    image = edit_image() if name.endswith("-edit") else None
    steps, rounds = (args.edit_steps, args.edit_rounds) if image else (args.steps, args.rounds)
    start = time.perf_counter()
    try:
        engine = DiffusersEngine(resolve(name), max_batch_size=N_REQUESTS)
    except Exception as exc:  # noqa: BLE001 - recorded, the other families still run
        reason = " ".join(str(exc).split()).split(". ")[0][:200]
        print(f"== {name}: skipped ({type(exc).__name__}: {reason})", flush=True)
        return {"skipped": f"does not load here: {type(exc).__name__}: {reason}"}
    load_s = time.perf_counter() - start
    try:
        figures = measure(engine, args.size, steps, rounds, image, args.budget_s)
    finally:
        engine.shutdown()
    figures = {
        "family": engine.family.name,
        **({"input_image": f"{EDIT_IMAGE_SIDE}x{EDIT_IMAGE_SIDE}"} if image else {}),
        **figures,
        "load_s": round(load_s, 2),
        "run_s": round(time.perf_counter() - start - load_s, 2),
        **engine_facts(engine),
    }
    print(f"== {name}: {figures}", flush=True)
    return figures


def families_main(args: argparse.Namespace) -> None:
    from common import write_result

    names = args.only or list(FAMILY_MODELS)
    results = {name: one_family(name, args) for name in names}
    ratios = {n: r["throughput_ratio"] for n, r in results.items() if "throughput_ratio" in r}
    write_result(
        args.name,
        {
            "how": (
                "bench/p4_batch_engine.py --families: per model, one warm DiffusersEngine"
                f" (max_batch_size={N_REQUESTS}); {N_REQUESTS} same-shape requests sent"
                f" together from {N_REQUESTS} threads with the step loop's batch limit 8"
                " vs 1 (baseline: the same threads, engine.loop.limit = 1), rounds"
                " alternating, medians"
            ),
            "command": " ".join(["python", "bench/p4_batch_engine.py", *sys.argv[1:]]),
            "requests": N_REQUESTS,
            "families": results,
            "throughput_ratios": ratios,
            "min_throughput_ratio": min(ratios.values()) if ratios else None,
            "all_meet_target": bool(ratios) and min(ratios.values()) >= 1.5,
            "target": ">= 1.5x per family",
        },
    )


def single_main(args: argparse.Namespace) -> None:
    from workers.engines.diffusers_engine import DiffusersEngine

    engine = DiffusersEngine(resolve(args.model), max_batch_size=N_REQUESTS)
    image = edit_image() if engine.family.needs_image else None
    try:
        figures = measure(engine, args.size, args.steps, args.rounds, image, args.budget_s)
    finally:
        engine.shutdown()
    facts = engine_facts(engine)
    print({"device": facts["device"], "dtype": facts["dtype"], **figures})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="one checkpoint folder or tiny model name")
    parser.add_argument("--families", action="store_true", help="every tiny family model")
    parser.add_argument("--only", nargs="+", choices=FAMILY_MODELS, help="with --families")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--budget-s", type=float, help="stop a model's rounds after this")
    parser.add_argument("--edit-steps", type=int, default=2, help="tiny-qwen-image-edit's")
    parser.add_argument("--edit-rounds", type=int, default=1, help="tiny-qwen-image-edit's")
    parser.add_argument("--name", default="p4_batch_families", help="with --families")
    parser.add_argument(
        "--cpu-threads", type=int, help="torch's CPU threads (OMP_NUM_THREADS); default torch's"
    )
    args = parser.parse_args()
    os.environ.setdefault("OMNI_MODELS_DIR", str(ROOT / "tests" / ".models"))
    if args.cpu_threads:  # before torch is imported: every thread's OpenMP team
        os.environ["OMP_NUM_THREADS"] = str(args.cpu_threads)
    if args.model and not args.families:
        single_main(args)
    else:
        families_main(args)


if __name__ == "__main__":
    main()
