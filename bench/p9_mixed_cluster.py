"""P9: a mixed diffusion cluster, one worker per model, against each model's worker alone.

Two diffusion workers, both started as `celery -A omni_tasks worker -Q diffusion` on the
same Redis: worker A serves tiny-flux (`OMNI_DIFFUSION__MODEL=tiny-flux`), worker B
tiny-qwen-image; producer and workers register tiny-qwen-image (`OMNI_MODELS`). The
workload: `--requests` requests (default 24) alternating the two models, the same size
and steps, distinct prompts and seeds (no DiT cache reuse), all sent at once; its time
is from the first send to the last result (the makespan).

The phases, each of `--rounds` rounds after a warm-up (a worker's half of the workload
at once), medians:

1. flux alone: only worker A up, the workload's tiny-flux half (T_flux);
2. mixed: A and B up, the whole interleaved workload (T_mixed);
3. qwen alone: A stopped, only B up, the workload's tiny-qwen-image half (T_qwen).

`throughput_ratio` (target >= 0.95): mixed cluster throughput / the throughput of the
two alone runs executed back to back, i.e. `(T_flux + T_qwen) / T_mixed`, over the same
requests. Back to back because here both workers share the same CPU cores: running them
at the same time is not free, so each model's throughput in the mixed run against its
worker alone (also reported, `per_model`) measures the shared CPU, not the cluster; on
separate devices the two definitions agree. `cpu_efficiency_ratio`: the workers' CPU
seconds (user + system, from /proc) for the two alone runs / for the mixed run, i.e.
images per CPU second, mixed vs alone: what mixing costs, whatever the neighbours do.
Checked too: every result's `model` is the one it asked for, and it ran on the worker
serving that model (the result's `worker`).

The workers' CPU threads (`--cpu-threads`, their OMP_NUM_THREADS, the same in every
phase) bias the makespan ratio on a small CPU box either way: with torch's default
(all CPUs) two workers' OpenMP teams oversubscribe the cores and stall each other and
any neighbour; with 1, a worker alone leaves the second core idle and the mixed run
uses both.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, clean_redis, setup_redis, write_result  # noqa: E402

if TYPE_CHECKING:
    from omni_tasks.dev.launcher import WorkerProcess

MODELS = ("tiny-flux", "tiny-qwen-image")
#: Registered for producer and workers (tiny-flux is the pool's default model).
REGISTRY = {"tiny-qwen-image": {}}


def workload(n: int) -> list[str]:
    """The model of each request: alternating, tiny-flux first."""
    return [MODELS[i % 2] for i in range(n)]


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds the processes have used so far (Linux /proc)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def one_round(
    models: list[str], size: int, steps: int, tag: str, pids: list[int]
) -> dict[str, Any]:
    """Send every request at once; the makespan, each model's last result, the workers'
    CPU seconds, and what ran where."""
    from omni_tasks import app, generate_image

    cpu = cpu_seconds(pids)
    start, wall = time.perf_counter(), time.time()
    sent = [
        generate_image.delay(
            prompt=f"p9 {tag} {i}", seed=i, width=size, height=size, steps=steps, model=model
        )
        for i, model in enumerate(models)
    ]
    done: dict[str, float] = {}  # a model's last result, by the worker's clock (same host)
    ran: list[tuple[str, str, str]] = []  # (asked, result model, worker)
    for model, result in zip(models, sent, strict=True):
        value = result.get(600)
        finished = value["timings"]["started_at"] + value["timings"]["run_s"] - wall
        done[model] = max(done.get(model, 0.0), finished)
        assert value["cache"]["latents"] == "miss", value["cache"]
        worker = str(app.backend.get_task_meta(result.id).get("worker"))
        ran.append((model, value["model"], worker))
    elapsed = time.perf_counter() - start
    return {"s": elapsed, "cpu_s": cpu_seconds(pids) - cpu, "last_result_s": done, "ran": ran}


def phase(
    workers: dict[str, WorkerProcess], models: list[str], args: argparse.Namespace, name: str
) -> dict[str, Any]:
    """`--rounds` rounds of `models` on the workers up now: medians and checks."""
    pids = [w.proc.pid for w in workers.values()]
    tags = [f"{name} r{r}" for r in range(args.rounds)]
    rounds = [one_round(models, args.size, args.steps, tag, pids) for tag in tags]
    hosts = {model: w.hostname for model, w in workers.items()}
    ran = [entry for r in rounds for entry in r["ran"]]
    wrong_model = sum(asked != got for asked, got, _ in ran)
    wrong_worker = sum(worker != hosts.get(asked) for asked, _, worker in ran)
    per_worker: dict[str, dict[str, int]] = {}
    for _, got, worker in ran:
        counts = per_worker.setdefault(worker, {})
        counts[got] = counts.get(got, 0) + 1
    makespan = statistics.median(r["s"] for r in rounds)
    cpu = statistics.median(r["cpu_s"] for r in rounds)
    last = {m: statistics.median(r["last_result_s"][m] for r in rounds) for m in set(models)}
    return {
        "requests": len(models),
        "makespan_s": round(makespan, 4),
        "images_per_s": round(len(models) / makespan, 3),
        "last_result_s": {m: round(s, 4) for m, s in sorted(last.items())},
        "rounds_s": [round(r["s"], 4) for r in rounds],
        "worker_cpu_s": round(cpu, 3),
        "images_per_worker_cpu_s": round(len(models) / cpu, 3),
        "rounds_worker_cpu_s": [round(r["cpu_s"], 3) for r in rounds],
        "results_checked": len(ran),
        "wrong_model": wrong_model,
        "wrong_worker": wrong_worker,
        "results_per_worker": per_worker,
    }


def start(model: str, label: str, cpu_threads: int | None) -> WorkerProcess:
    from omni_tasks.dev.launcher import start_worker

    env = {"OMNI_DIFFUSION__MODEL": model, "OMNI_MODELS": json.dumps(REGISTRY)}
    if cpu_threads:
        env["OMP_NUM_THREADS"] = str(cpu_threads)
    worker = start_worker("diffusion", RESULTS / "logs", env=env, name=f"p9-{label}")
    worker.wait_ready(600)
    return worker


def warm(model: str, n: int, size: int, steps: int) -> None:
    """`n` requests of `model` at once: its worker's batched shapes are warm afterwards."""
    from omni_tasks import generate_image

    fields = {"width": size, "height": size, "steps": steps, "model": model}
    sent = [generate_image.delay(prompt=f"p9 warm-up {i}", seed=i, **fields) for i in range(n)]
    for result in sent:
        result.get(600)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """The three phases with two worker starts: A alone, A + B, B alone."""
    mixed_models = workload(args.requests)
    halves = {m: [x for x in mixed_models if x == m] for m in MODELS}
    clean_redis()
    flux = start("tiny-flux", "flux", args.cpu_threads)
    qwen: WorkerProcess | None = None
    try:
        warm("tiny-flux", len(halves["tiny-flux"]), args.size, args.steps)
        flux_alone = phase({"tiny-flux": flux}, halves["tiny-flux"], args, "flux-alone")
        qwen = start("tiny-qwen-image", "qwen", args.cpu_threads)
        warm("tiny-qwen-image", len(halves["tiny-qwen-image"]), args.size, args.steps)
        both = {"tiny-flux": flux, "tiny-qwen-image": qwen}
        mixed = phase(both, mixed_models, args, "mixed")
        flux.stop()
        qwen_alone = phase({"tiny-qwen-image": qwen}, halves["tiny-qwen-image"], args, "qwen")
    finally:
        flux.stop()
        if qwen is not None:
            qwen.stop()
    return {"flux_alone": flux_alone, "mixed": mixed, "qwen_alone": qwen_alone}


def summary(phases: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    alone = {"tiny-flux": phases["flux_alone"], "tiny-qwen-image": phases["qwen_alone"]}
    back_to_back = sum(p["makespan_s"] for p in alone.values())
    alone_cpu = sum(p["worker_cpu_s"] for p in alone.values())
    mixed = phases["mixed"]
    per_model = {
        m: {
            "alone_images_per_s": p["images_per_s"],
            "in_mixed_images_per_s": round(p["requests"] / mixed["last_result_s"][m], 3),
            "ratio": round(p["makespan_s"] / mixed["last_result_s"][m], 3),
        }
        for m, p in alone.items()
    }
    checks = [phases[k] for k in ("flux_alone", "mixed", "qwen_alone")]
    return {
        "definition": (
            "throughput_ratio = mixed throughput / back-to-back alone throughput ="
            " (T_flux_alone + T_qwen_alone) / T_mixed over the same requests; T = median"
            " makespan of a round (all requests sent at once, first send to last result)."
            " per_model.ratio = a model's alone makespan / the time of its last result in"
            " the mixed run (both workers sharing the same CPU cores)."
            " cpu_efficiency_ratio = the workers' CPU seconds (user + system) for the two"
            " alone runs / for the mixed run: images per CPU second, mixed vs alone"
        ),
        "workload": {
            "requests": args.requests,
            "models": list(MODELS),
            "order": "alternating",
            "size": args.size,
            "steps": args.steps,
            "rounds": args.rounds,
            "worker_omp_num_threads": args.cpu_threads,
        },
        "command": " ".join(["python", "bench/p9_mixed_cluster.py", *sys.argv[1:]]),
        **phases,
        "alone_back_to_back_s": round(back_to_back, 4),
        "alone_back_to_back_images_per_s": round(args.requests / back_to_back, 3),
        "throughput_ratio": round(back_to_back / mixed["makespan_s"], 3),
        "alone_worker_cpu_s": round(alone_cpu, 3),
        "cpu_efficiency_ratio": round(alone_cpu / mixed["worker_cpu_s"], 3),
        "per_model": per_model,
        "all_results_on_their_model": all(
            c["wrong_model"] == 0 and c["wrong_worker"] == 0 for c in checks
        ),
        "target": ">= 0.95x",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--cpu-threads", type=int, help="the workers' OMP_NUM_THREADS; default torch's"
    )
    args = parser.parse_args()
    if args.requests % 2:
        parser.error("--requests must be even (half per model)")
    os.environ["OMNI_MODELS"] = json.dumps(REGISTRY)  # before the config is first read
    setup_redis()
    from omni_tasks.config import get_config

    assert set(MODELS) <= set(get_config().diffusion_models()), "tiny-qwen-image unregistered"
    phases = measure(args)
    write_result("p9_mixed_cluster", summary(phases, args))
    clean_redis()


if __name__ == "__main__":
    main()
