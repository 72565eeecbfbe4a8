"""TransformersTextEngine on the tiny random-weight Llama: real model, no mocks.

The tiny Llama builder is tested in `tests/workers/models/test_tiny_llama.py`."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from omni_tasks.errors import EngineStoppedError, ProcessingError, RequestTimeoutError
from workers.engines.base import TextOutput, TextParams
from workers.engines.transformers_engine import TransformersTextEngine

GREEDY = TextParams(max_tokens=24, temperature=0.0)
PROMPTS = [f"Request {i}: " + "kati rone suma " * (i % 5) + "tell me" for i in range(16)]


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: Path) -> Iterator[TransformersTextEngine]:
    eng = TransformersTextEngine(str(tiny_llama_dir), max_batch_size=16)
    yield eng
    eng.shutdown()


def test_generate_counts_tokens_and_stops_at_length(
    engine: TransformersTextEngine, tiny_llama_dir: Path
) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    out = engine.generate("r1", "Hello world", TextParams(max_tokens=16, temperature=0), 30)
    assert isinstance(out, TextOutput)
    assert (out.finish_reason, out.completion_tokens) == ("length", 16)
    assert out.prompt_tokens == len(tok("Hello world").input_ids)
    assert out.text
    assert engine.name == "transformers"
    import torch

    assert engine.device == ("cuda" if torch.cuda.is_available() else "cpu")


def test_stop_string_ends_with_stop(engine: TransformersTextEngine) -> None:
    full = engine.generate("s0", PROMPTS[1], TextParams(max_tokens=40, temperature=0), 30)
    stop = full.text[10:13]
    params = TextParams(max_tokens=40, temperature=0, stop=(stop,))
    out = engine.generate("s1", PROMPTS[1], params, 30)
    assert out.finish_reason == "stop"
    assert out.text == full.text[: full.text.index(stop)]
    assert out.completion_tokens < 40


def test_concurrent_requests_get_their_own_results(engine: TransformersTextEngine) -> None:
    # Mixed max_tokens in one batch, and one request id for all: nothing may mix.
    params = [TextParams(max_tokens=24 - (i % 3), temperature=0) for i in range(16)]
    solo = [engine.generate(f"solo-{i}", p, params[i], 30) for i, p in enumerate(PROMPTS)]
    with ThreadPoolExecutor(16) as pool:
        batched = list(
            pool.map(lambda i: engine.generate("same-id", PROMPTS[i], params[i], 60), range(16))
        )
    assert batched == solo
    assert [o.completion_tokens for o in batched] == [p.max_tokens for p in params]
    assert {o.finish_reason for o in batched} == {"length"}
    assert len({o.text for o in solo}) == len(PROMPTS)


def test_seeded_sampling_is_reproducible(engine: TransformersTextEngine) -> None:
    params = TextParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    with ThreadPoolExecutor(4) as pool:  # seeded requests run alone, so batching is moot
        outs = list(pool.map(lambda i: engine.generate(f"b{i}", PROMPTS[0], params, 30), range(4)))
    assert len({o.text for o in outs}) == 1
    other = engine.generate("c", PROMPTS[0], TextParams(16, 1.0, 0.9, seed=8), 30)
    assert other.text != outs[0].text


def test_timeout_raises(engine: TransformersTextEngine) -> None:
    t0 = time.monotonic()
    with pytest.raises(RequestTimeoutError):
        engine.generate("slow", "Hello", TextParams(max_tokens=1500, temperature=0), 0.3)
    assert time.monotonic() - t0 < 2
    # The abandoned row stops early, so the next request is not stuck behind it.
    t0 = time.monotonic()
    assert engine.generate("after", "Hello", GREEDY, 30).completion_tokens == 24
    assert time.monotonic() - t0 < 3


def test_bad_max_tokens_rejected(engine: TransformersTextEngine) -> None:
    with pytest.raises(ProcessingError):
        engine.generate("zero", "Hello", TextParams(max_tokens=0), 30)
    assert engine.healthy


def test_generate_failure_reaches_callers_and_engine_recovers(
    engine: TransformersTextEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = engine.model.generate

    def failing_generate(**kwargs):  # one injected fault around the real model
        monkeypatch.setattr(engine.model, "generate", real)
        raise RuntimeError("injected failure")

    monkeypatch.setattr(engine.model, "generate", failing_generate)
    with pytest.raises(ProcessingError, match="injected"):
        engine.generate("boom", "Hello", GREEDY, 30)
    assert engine.healthy and engine._thread.is_alive()
    assert engine.generate("ok", "Hello", GREEDY, 30).completion_tokens == 24


def test_shutdown_stops_inflight_requests(tiny_llama_dir: Path) -> None:
    eng = TransformersTextEngine(str(tiny_llama_dir), max_batch_size=4)
    results: list[tuple[BaseException | None, float]] = []

    def call(i: int) -> None:
        try:
            eng.generate(f"long-{i}", PROMPTS[i], TextParams(max_tokens=1500), 120)
            results.append((None, time.monotonic()))
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
            results.append((exc, time.monotonic()))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]  # 4 run, 4 wait
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while not eng._running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert eng._running
    time.sleep(0.2)
    t0 = time.monotonic()
    eng.shutdown()
    for t in threads:
        t.join(5)
    stop_s = time.monotonic() - t0
    assert len(results) == 8
    assert all(isinstance(e, EngineStoppedError) for e, _ in results), results
    assert max(at for _, at in results) - t0 < 1.0
    assert stop_s < 5
    assert not eng._thread.is_alive() and eng.model is None
    with pytest.raises(EngineStoppedError):
        eng.generate("late", "Hello", GREEDY, 30)
