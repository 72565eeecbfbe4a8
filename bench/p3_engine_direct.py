"""P3 baselines without a queue, run in a process of their own (one vLLM engine per
process): `direct` drives the worker's `VllmTextEngine` from N threads at once;
`offline` is vLLM's own `LLM.generate` on the same prompts. Prints one JSON line."""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor


def prompts(n: int) -> list[str]:
    return [f"Request {i}: tell me a long story about the number {i}" for i in range(n)]


def run_direct(model: str, n: int, max_tokens: int, repeats: int) -> list[dict]:
    from workers.engines.base import TextParams
    from workers.engines.vllm_engine import VllmTextEngine

    engine = VllmTextEngine(model, dtype="float32", max_num_seqs=32, kv_cache_gib=1.0)
    params = TextParams(max_tokens=max_tokens, temperature=0.0)
    runs = []
    try:
        with ThreadPoolExecutor(max_workers=n) as pool:
            list(pool.map(lambda p: engine.generate("warm", p, params, 300), prompts(4)))
            for r in range(repeats):
                start = time.perf_counter()
                ids = [f"r{r}-{i}" for i in range(n)]
                outs = list(
                    pool.map(lambda rid, p: engine.generate(rid, p, params, 300), ids, prompts(n))
                )
                elapsed = time.perf_counter() - start
                tokens = sum(o.completion_tokens for o in outs)
                runs.append({"tokens": tokens, "seconds": elapsed, "tok_s": tokens / elapsed})
    finally:
        engine.shutdown()
    return runs


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
    llm.generate(prompts(4), params, use_tqdm=False)
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
    run = run_direct if args.mode == "direct" else run_offline
    runs = run(args.model, args.n, args.max_tokens, args.repeats)
    print("RESULT " + json.dumps(runs), flush=True)


if __name__ == "__main__":
    main()
