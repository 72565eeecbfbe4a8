"""P3: AR tokens/s for N concurrent `generate_text` requests x M new tokens.

All in one run, same tiny model, same prompts, same max_tokens, greedy:
- queue: `.delay()` x N into a `celery -A omni_tasks worker -Q ar` pool (defaults:
  threads, 32 slots, one vLLM engine shared, continuous batching);
- batch: the same N requests through `submit_many` (the batch path: one accepting
  step for all of them), into the same pool;
- direct: the worker's engine class with the worker's settings, driven by N threads, no
  queue (p3_engine_direct.py, a process of its own);
- bare: hand-rolled Celery + vLLM: `.delay()` x N of a bare Celery task (bare_app.py,
  the same broker and worker settings) that runs the same engine class; it separates
  Celery's own message path from what omni-tasks adds on top of it;
- one_at_a_time: the same pool with `-c 1`;
- offline: vLLM's `LLM.generate` on the same prompts (the engine's ceiling).
Queue, batch, bare and direct all warm up with one untimed round, then their rounds
alternate (the order rotates every round), so that whatever else runs on the machine hits
all alike.
Targets: queue >= 0.90x direct and >= 4x one_at_a_time; batch >= 0.90x direct and
>= 0.75x offline; queue >= 0.95x bare. The ratios to offline are reported.
Each queue round also records where its time goes (sending, the last task's start,
the tail after the last generation), and a second queue/direct run with longer
generations (`--long-tokens`) separates the per-message cost from the per-token one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, RoundServer, clean_redis, setup_redis, write_result  # noqa: E402
from p3_engine_direct import prompts  # noqa: E402

DIRECT = str(Path(__file__).parent / "p3_engine_direct.py")
#: The sides that send through a queue (their sending and intake times are reported).
QUEUED = ("queue", "batch", "bare")


def queue_round(n: int, max_tokens: int, bare: bool = False, batch: bool = False) -> dict:
    from omni_tasks import create_text_request, generate_text, submit_many

    start, sent_at = time.perf_counter(), time.time()
    if batch:
        requests = [
            create_text_request(p, max_tokens=max_tokens, temperature=0) for p in prompts(n)
        ]
        results = submit_many(requests).results
    elif bare:
        import bare_app

        results = [
            bare_app.generate.apply_async(
                kwargs={"prompt": p, "max_tokens": max_tokens}, queue="bare"
            )
            for p in prompts(n)
        ]
    else:
        results = [
            generate_text.delay(prompt=p, max_tokens=max_tokens, temperature=0) for p in prompts(n)
        ]
    sent_s = time.perf_counter() - start
    outs = [r.get(600) for r in results]
    elapsed = time.perf_counter() - start
    if bare:
        tokens = sum(o["completion_tokens"] for o in outs)
        starts = [o["started_at"] for o in outs]
    else:
        tokens = sum(o["usage"]["completion_tokens"] for o in outs)
        starts = [o["timings"]["started_at"] for o in outs]
    # Where a round's time goes: sending, and the worker's intake (the last task started).
    return {
        "tokens": tokens,
        "seconds": elapsed,
        "tok_s": tokens / elapsed,
        "sent_s": round(sent_s, 4),
        "last_started_s": round(max(starts) - sent_at, 4),
    }


def interleaved(model: str, n: int, max_tokens: int, repeats: int) -> dict[str, list[dict]]:
    import bare_app
    from common import POOL_WORKER_ARGS, start_celery, stop, wait_ping

    from omni_tasks.dev.launcher import start_worker

    worker = start_worker("ar", RESULTS / "logs", name="bench-ar")
    bare = start_celery("bare_app", "bare", POOL_WORKER_ARGS, RESULTS / "logs" / "p3-bare.log")
    direct = None
    try:
        cmd = [sys.executable, DIRECT, "direct", "--model", model, "-n", str(n)]
        direct = RoundServer([*cmd, "--max-tokens", str(max_tokens)], "p3-direct.log")
        worker.wait_ready(600)
        wait_ping(bare_app.app)
        sides: dict[str, Callable[[], dict]] = {
            "queue": lambda: queue_round(n, max_tokens),
            "batch": lambda: queue_round(n, max_tokens, batch=True),
            "bare": lambda: queue_round(n, max_tokens, bare=True),
            "direct": direct.run,
        }
        sides["queue"]()  # warm-up, like the direct engine's
        sides["batch"]()
        sides["bare"]()  # (builds the bare worker's engine)
        runs: dict[str, list[dict]] = {side: [] for side in sides}
        order = list(sides)
        for i in range(repeats):
            for side in order[i % len(order) :] + order[: i % len(order)]:
                time.sleep(0.3)  # let the other side's stragglers (acks, events) settle
                runs[side].append(sides[side]())
        return runs
    finally:
        if direct is not None:
            direct.close()
        worker.stop()
        stop(bare)


def one_at_a_time(n: int, max_tokens: int, repeats: int) -> list[dict]:
    from omni_tasks.dev.launcher import start_worker

    worker = start_worker("ar", RESULTS / "logs", extra_args=["-c", "1"], name="bench-ar1")
    try:
        worker.wait_ready(600)
        queue_round(4, 8)  # warm-up
        return [queue_round(n, max_tokens) for _ in range(repeats)]
    finally:
        worker.stop()


def offline(model: str, n: int, max_tokens: int, repeats: int) -> list[dict]:
    cmd = [sys.executable, DIRECT, "offline", "--model", model, "-n", str(n)]
    cmd += ["--max-tokens", str(max_tokens), "--repeats", str(repeats)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"offline failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")


def summary(runs: list[dict]) -> dict:
    rates = [r["tok_s"] for r in runs]
    return {
        "runs": runs,
        "median_tok_s": round(statistics.median(rates), 1),
        "best_tok_s": round(max(rates), 1),
    }


def ratios(pairs: dict[str, list[dict]], long_pairs: dict[str, list[dict]], modes: dict) -> dict:
    """Every ratio of one run: medians of each side, and round by round."""

    def ratio(runs: dict[str, list[dict]], a: str, b: str) -> float:
        return round(summary(runs[a])["median_tok_s"] / summary(runs[b])["median_tok_s"], 3)

    def per_round(a: str, b: str) -> list[float]:
        return [round(x["tok_s"] / y["tok_s"], 3) for x, y in zip(pairs[a], pairs[b], strict=True)]

    def median_of(side: str, field: str) -> float:
        return round(statistics.median(r[field] for r in pairs[side]), 4)

    q = modes["queue"]["median_tok_s"]
    return {
        "ratio_queue_vs_direct": ratio(pairs, "queue", "direct"),
        "ratios_queue_vs_direct_per_round": per_round("queue", "direct"),
        "ratio_bare_celery_vs_direct": ratio(pairs, "bare", "direct"),
        "ratios_bare_celery_vs_direct_per_round": per_round("bare", "direct"),
        "ratio_queue_vs_bare_celery": ratio(pairs, "queue", "bare"),
        "ratio_batch_vs_direct": ratio(pairs, "batch", "direct"),
        "ratios_batch_vs_direct_per_round": per_round("batch", "direct"),
        "ratio_batch_vs_queue": ratio(pairs, "batch", "queue"),
        "sent_s_median": {side: median_of(side, "sent_s") for side in QUEUED},
        "last_started_s_median": {side: median_of(side, "last_started_s") for side in QUEUED},
        "direct_s_median": median_of("direct", "seconds"),
        "long_ratio_queue_vs_direct": ratio(long_pairs, "queue", "direct"),
        "long_ratio_batch_vs_direct": ratio(long_pairs, "batch", "direct"),
        "long_ratio_bare_celery_vs_direct": ratio(long_pairs, "bare", "direct"),
        "ratio_queue_vs_one_at_a_time": round(q / modes["one_at_a_time"]["median_tok_s"], 2),
        "ratio_queue_vs_offline": round(q / modes["offline"]["median_tok_s"], 3),
        "ratio_batch_vs_offline": round(
            modes["batch"]["median_tok_s"] / modes["offline"]["median_tok_s"], 3
        ),
        "ratio_direct_vs_offline": round(
            modes["direct"]["median_tok_s"] / modes["offline"]["median_tok_s"], 3
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--long-tokens", type=int, default=512, help="a second queue/direct run, longer"
    )
    args = parser.parse_args()
    setup_redis()
    clean_redis()
    (RESULTS / "logs").mkdir(parents=True, exist_ok=True)
    from omni_tasks.config import get_config
    from workers.runtime import resolve_model

    model = resolve_model(get_config().ar.model, get_config())
    n, m, k = args.n, args.max_tokens, args.repeats
    pairs = interleaved(model, n, m, k)
    long_pairs = interleaved(model, n, args.long_tokens, 3)
    modes = {
        "queue": summary(pairs["queue"]),
        "batch": summary(pairs["batch"]),
        "bare": summary(pairs["bare"]),
        "direct": summary(pairs["direct"]),
        "one_at_a_time": summary(one_at_a_time(n, m, 3)),
        "offline": summary(offline(model, n, m, k)),
    }

    write_result(
        "p3_ar_throughput",
        {
            "requests": n,
            "max_tokens": m,
            "model": "tiny-llama (random weights)",
            "modes": modes,
            **ratios(pairs, long_pairs, modes),
            "long_max_tokens": args.long_tokens,
            "targets": "queue >= 0.90x direct, >= 4x one_at_a_time, >= 0.95x bare; "
            "batch >= 0.90x direct, >= 0.75x offline",
        },
    )
    clean_redis()


if __name__ == "__main__":
    main()
