"""P3: AR tokens/s for N concurrent `generate_text` requests x M new tokens.

All in one run, same tiny model, same prompts, greedy:
- queue: `.delay()` x N into a `celery -A omni_tasks worker -Q ar` pool (defaults:
  threads, 32 slots, one vLLM engine shared, continuous batching);
- one_at_a_time: the same pool with `-c 1`;
- direct: the worker's engine driven by N threads, no queue (p3_engine_direct.py);
- offline: vLLM's `LLM.generate` on the same prompts (the engine's ceiling).
Targets: queue >= 0.90x direct and >= 4x one_at_a_time; the ratio to offline is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, clean_redis, setup_redis, write_result  # noqa: E402
from p3_engine_direct import prompts  # noqa: E402


def through_queue(n: int, max_tokens: int, repeats: int, extra: list[str]) -> list[dict]:
    from omni_tasks import generate_text
    from omni_tasks.dev.launcher import start_worker

    worker = start_worker("ar", RESULTS / "logs", extra_args=extra, name="bench-ar")
    runs = []
    try:
        worker.wait_ready(600)
        for p in prompts(4):
            generate_text.delay(prompt=p, max_tokens=8, temperature=0).get(300)
        for _ in range(repeats):
            start = time.perf_counter()
            results = [
                generate_text.delay(prompt=p, max_tokens=max_tokens, temperature=0)
                for p in prompts(n)
            ]
            tokens = sum(r.get(600)["usage"]["completion_tokens"] for r in results)
            elapsed = time.perf_counter() - start
            runs.append({"tokens": tokens, "seconds": elapsed, "tok_s": tokens / elapsed})
    finally:
        worker.stop()
    return runs


def in_subprocess(mode: str, model: str, n: int, max_tokens: int, repeats: int) -> list[dict]:
    cmd = [
        sys.executable,
        str(Path(__file__).parent / "p3_engine_direct.py"),
        mode,
        "--model",
        model,
        "-n",
        str(n),
        "--max-tokens",
        str(max_tokens),
        "--repeats",
        str(repeats),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"{mode} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")


def summary(runs: list[dict]) -> dict:
    rates = [r["tok_s"] for r in runs]
    return {
        "runs": runs,
        "median_tok_s": round(statistics.median(rates), 1),
        "best_tok_s": round(max(rates), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    setup_redis()
    clean_redis()
    from omni_tasks.config import get_config
    from workers.runtime import resolve_model

    model = resolve_model(get_config().ar.model, get_config())
    n, m, k = args.n, args.max_tokens, args.repeats
    modes = {
        "queue": summary(through_queue(n, m, k, [])),
        "one_at_a_time": summary(through_queue(n, m, k, ["-c", "1"])),
        "direct": summary(in_subprocess("direct", model, n, m, k)),
        "offline": summary(in_subprocess("offline", model, n, m, k)),
    }
    q = modes["queue"]["median_tok_s"]
    write_result(
        "p3_ar_throughput",
        {
            "requests": n,
            "max_tokens": m,
            "model": "tiny-llama (random weights)",
            "modes": modes,
            "ratio_queue_vs_direct": round(q / modes["direct"]["median_tok_s"], 3),
            "ratio_queue_vs_one_at_a_time": round(q / modes["one_at_a_time"]["median_tok_s"], 2),
            "ratio_queue_vs_offline": round(q / modes["offline"]["median_tok_s"], 3),
            "targets": "queue >= 0.90x direct, >= 4x one_at_a_time",
        },
    )
    clean_redis()


if __name__ == "__main__":
    main()
