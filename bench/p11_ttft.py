"""P11: time to first token through the queue and the API, against the engine direct.

One request at a time, greedy, the same prompt, the tiny Llama on vLLM:
- direct: the worker's `VllmTextEngine` in a process of its own; the first token is the
  engine's first `on_delta` call (its first step's output);
- queue: `generate_text.delay(..., stream=True)` into a `celery -A omni_tasks worker -Q
  ar` pool, followed with `omni_tasks.stream_text`; the first token is the first piece;
- api: `POST /v1/completions` with `stream: true` to an `omni-tasks api` process (the
  official `openai` client); the first token is the first chunk.
Each is timed from the call. Rounds alternate between the three (the order rotates), so
whatever else runs on the machine hits all alike. Target: at most 10 ms added at p50.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    RESULTS,
    FirstCall,
    RoundServer,
    added_p50,
    alternate_rounds,
    clean_redis,
    percentiles,
    serve_rounds,
    setup_redis,
    write_result,
)

PROMPT = "Request 1: tell me a long story about the number 1"
MAX_TOKENS = 16
TARGET_P50_MS = 10.0


def serve_direct(model: str) -> None:
    """The direct side: one round per `run` line on stdin, `RESULT <seconds>` out."""
    from workers.engines.base import TextParams
    from workers.engines.vllm_engine import VllmTextEngine

    engine = VllmTextEngine(model, dtype="float32", max_num_seqs=32, kv_cache_gib=1.0)
    params = TextParams(max_tokens=MAX_TOKENS, temperature=0.0)

    def one(r: int) -> float:
        first = FirstCall()
        start = time.perf_counter()
        engine.generate(f"d{r}", PROMPT, params, 60, on_delta=first)
        return float(first.at or 0.0) - start

    try:
        serve_rounds(one)
    finally:
        engine.shutdown()


def queue_ttft() -> float:
    from omni_tasks import generate_text, stream_text

    start = time.perf_counter()
    sent = generate_text.delay(prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stream=True)
    pieces = stream_text(sent, timeout_s=60)
    next(pieces)
    first = time.perf_counter() - start
    for _ in pieces:
        pass
    return first


def api_ttft(client: object) -> float:
    start = time.perf_counter()
    chunks = client.completions.create(  # type: ignore[attr-defined]
        model="tiny-llama", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    first = None
    for _ in chunks:
        if first is None:
            first = time.perf_counter() - start
    assert first is not None
    return first


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--direct", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.direct:
        serve_direct(args.direct)
        return
    setup_redis()
    clean_redis()
    logs = RESULTS / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    import openai

    from omni_tasks.config import get_config
    from omni_tasks.dev.launcher import free_port, start_api, start_worker
    from workers.runtime import resolve_model

    model = resolve_model(get_config().ar.model, get_config())
    worker = start_worker("ar", logs, name="bench-p11")
    os.environ.pop("OMNI_API_TOKEN", None)
    api = start_api(logs, free_port())
    direct = RoundServer([sys.executable, __file__, "--direct", model], "p11-direct.log")
    try:
        worker.wait_ready(600)
        api.wait_ready()
        client = openai.OpenAI(base_url=f"{api.url}v1", api_key="x", max_retries=0)
        sides = {"direct": direct.run, "queue": queue_ttft, "api": lambda: api_ttft(client)}
        samples = alternate_rounds(sides, args.rounds)
    finally:
        direct.close()
        api.stop()
        worker.stop()
    figures = {name: percentiles(values) for name, values in samples.items()}
    added = added_p50(figures, "direct")
    write_result(
        "p11_ttft",
        {
            "model": "tiny-llama (random weights), vLLM",
            "request": f"one at a time, greedy, {MAX_TOKENS} tokens, streamed",
            "rounds": args.rounds,
            "ttft": figures,
            **added,
            "target": f"added p50 <= {TARGET_P50_MS} ms",
            "met": all(v <= TARGET_P50_MS for v in added.values()),
        },
    )
    clean_redis()


if __name__ == "__main__":
    main()
