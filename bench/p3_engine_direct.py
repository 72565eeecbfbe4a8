"""P3 baselines without a queue, run in a process of their own (one vLLM engine per
process): `direct` drives the worker's `VllmTextEngine` from N threads at once;
`offline` is vLLM's own `LLM.generate` on the same prompts.

`direct` serves rounds on demand so that p3_ar_throughput.py can interleave them with
the queue's rounds (both engines warm, the machine's noise shared): it warms up with one
untimed round, prints `READY`, then runs one round per `run` line on stdin and prints
`RESULT <json>`. `offline` runs `--repeats` rounds and prints one `RESULT` line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor


def prompts(n: int) -> list[str]:
    return [f"Request {i}: tell me a long story about the number {i}" for i in range(n)]


def serve_direct(model: str, n: int, max_tokens: int) -> None:
    from workers.engines.base import TextParams
    from workers.engines.vllm_engine import VllmTextEngine

    # The settings a worker builds its engine with (config/default.yaml, runtime.py).
    engine = VllmTextEngine(model, dtype="float32", max_num_seqs=32, kv_cache_gib=1.0)
    params = TextParams(max_tokens=max_tokens, temperature=0.0)

    def round_(pool: ThreadPoolExecutor, tag: str) -> dict:
        start = time.perf_counter()
        ids = [f"{tag}-{i}" for i in range(n)]
        outs = list(pool.map(lambda rid, p: engine.generate(rid, p, params, 300), ids, prompts(n)))
        elapsed = time.perf_counter() - start
        tokens = sum(o.completion_tokens for o in outs)
        return {"tokens": tokens, "seconds": elapsed, "tok_s": tokens / elapsed}

    try:
        with ThreadPoolExecutor(max_workers=n) as pool:
            round_(pool, "warm")
            print("READY", flush=True)
            for r, line in enumerate(sys.stdin):
                if line.strip() != "run":
                    break
                print("RESULT " + json.dumps(round_(pool, f"r{r}")), flush=True)
    finally:
        engine.shutdown()


def run_offline(model: str, n: int, max_tokens: int, repeats: int) -> list[dict]:
    import os

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=model,
        dtype="float32",
        max_num_seqs=32,
        enforce_eager=True,
        distributed_executor_backend="uni",
    )
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    llm.generate(prompts(n), params, use_tqdm=False)
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        outs = llm.generate(prompts(n), params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        runs.append({"tokens": tokens, "seconds": elapsed, "tok_s": tokens / elapsed})
    return runs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["direct", "offline"])
    parser.add_argument("--model", required=True)
    parser.add_argument("-n", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.mode == "direct":
        serve_direct(args.model, args.n, args.max_tokens)
        return
    runs = run_offline(args.model, args.n, args.max_tokens, args.repeats)
    print("RESULT " + json.dumps(runs), flush=True)


if __name__ == "__main__":
    main()
