"""P12: speech. Time to the first audio byte through the queue and the API, against the
speech engine called directly, and requests per second with a worker's concurrency 8
against 1.

First audio, one request at a time, the same two-sentence text, the tiny VITS, PCM:
- direct: the worker's `SpeechEngine` in a process of its own; the first audio is the
  engine's first `on_chunk` call (the first sentence's samples);
- queue: `generate_speech.delay(..., stream=True)` into `celery -A omni_tasks worker -Q
  speech`, followed with `omni_tasks.stream_audio`; the first audio is the first piece;
- api: `POST /v1/audio/speech` to an `omni-tasks api` process through the official
  `openai` client's streaming response; the first audio is the first bytes.
Each is timed from the call; rounds alternate between the three (the order rotates), so
whatever else runs on the machine hits all alike. Target: at most 15 ms added at p50.

Throughput: `--burst` requests (different texts, unseeded so that they batch) sent at
once to one speech worker with `speech.concurrency` 8, then to one with 1; requests per
second from the first send to the last result.
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

TEXT = "Hello there, this is the first sentence. And here is the second one."
TARGET_P50_MS = 15.0


def serve_direct(model: str) -> None:
    """The direct side: one round per `run` line on stdin, `RESULT <seconds>` out."""
    from workers.engines.speech_engine import SpeechEngine

    engine = SpeechEngine(model)

    def one(r: int) -> float:
        first = FirstCall()
        start = time.perf_counter()
        engine.synthesize(f"d{r}", TEXT, 0, 1.0, None, first, 60)
        return float(first.at or 0.0) - start

    try:
        serve_rounds(one)
    finally:
        engine.shutdown()


def queue_first_audio() -> float:
    from omni_tasks import generate_speech, stream_audio

    start = time.perf_counter()
    sent = generate_speech.delay(input=TEXT, voice="alloy", response_format="pcm", stream=True)
    pieces = stream_audio(sent, timeout_s=60)
    next(pieces)
    first = time.perf_counter() - start
    for _ in pieces:
        pass
    return first


def api_first_audio(client: object) -> float:
    start = time.perf_counter()
    speech = client.audio.speech.with_streaming_response  # type: ignore[attr-defined]
    with speech.create(model="tiny-tts", input=TEXT, voice="alloy", response_format="pcm") as r:
        chunks = r.iter_bytes()
        next(chunks)
        first = time.perf_counter() - start
        for _ in chunks:
            pass
    return first


def burst_rate(concurrency: int, burst: int, logs: Path) -> dict[str, float]:
    """Requests per second of `burst` requests sent at once to one speech worker with
    `concurrency` threads."""
    from omni_tasks import generate_speech
    from omni_tasks.dev.launcher import start_worker

    env = {"OMNI_SPEECH__CONCURRENCY": str(concurrency)}
    worker = start_worker("speech", logs, env=env, name=f"bench-p12-c{concurrency}")
    try:
        worker.wait_ready(600)
        generate_speech.delay(input="Warm up.").get(timeout=60)
        start = time.perf_counter()
        sent = [generate_speech.delay(input=f"Request {i}. {TEXT}") for i in range(burst)]
        results = [r.get(timeout=600) for r in sent]
        wall = time.perf_counter() - start
    finally:
        worker.stop()
    return {
        "requests": burst,
        "wall_s": round(wall, 3),
        "requests_per_s": round(burst / wall, 3),
        "max_batch": max(int(r["max_batch"]) for r in results),
    }


def first_audio(rounds: int, logs: Path) -> dict[str, object]:
    import openai

    from omni_tasks.config import get_config
    from omni_tasks.dev.launcher import free_port, start_api, start_worker
    from workers.runtime import resolve_model

    model = resolve_model(get_config().speech.model, get_config())
    worker = start_worker("speech", logs, name="bench-p12")
    os.environ.pop("OMNI_API_TOKEN", None)
    api = start_api(logs, free_port())
    direct = RoundServer([sys.executable, __file__, "--direct", model], "p12-direct.log")
    try:
        worker.wait_ready(600)
        api.wait_ready()
        client = openai.OpenAI(base_url=f"{api.url}v1", api_key="x", max_retries=0)
        sides = {
            "direct": direct.run,
            "queue": queue_first_audio,
            "api": lambda: api_first_audio(client),
        }
        samples = alternate_rounds(sides, rounds)
    finally:
        direct.close()
        api.stop()
        worker.stop()
    figures = {name: percentiles(values) for name, values in samples.items()}
    added = added_p50(figures, "direct")
    return {
        "first_audio": figures,
        **added,
        "target": f"added p50 <= {TARGET_P50_MS} ms",
        "met": all(v <= TARGET_P50_MS for v in added.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--burst", type=int, default=64)
    parser.add_argument("--direct", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.direct:
        serve_direct(args.direct)
        return
    setup_redis()
    clean_redis()
    logs = RESULTS / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    latency = first_audio(args.rounds, logs)
    clean_redis()
    rates = {f"concurrency_{c}": burst_rate(c, args.burst, logs) for c in (8, 1)}
    ratio = rates["concurrency_8"]["requests_per_s"] / rates["concurrency_1"]["requests_per_s"]
    write_result(
        "p12_speech",
        {
            "model": "tiny-tts (random-weight VITS, 4 speakers, 16 kHz), transformers",
            "request": "two sentences, PCM, one at a time for the first audio",
            "rounds": args.rounds,
            **latency,
            "throughput": rates,
            "concurrency_8_vs_1": round(ratio, 3),
        },
    )
    clean_redis()


if __name__ == "__main__":
    main()
