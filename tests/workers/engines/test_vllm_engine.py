"""VllmTextEngine on the tiny random-weight Llama: real in-process vLLM, no mocks.

One engine per module (vLLM allows one live in-process engine per process); the
shutdown test runs last and builds its own engine after the shared one is closed.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from omni_tasks.errors import EngineStoppedError, ProcessingError, RequestTimeoutError
from workers.engines.base import TextOutput, TextParams

pytest.importorskip("vllm")

from workers.engines.vllm_engine import VllmTextEngine  # noqa: E402

GREEDY = TextParams(max_tokens=24, temperature=0.0)
PROMPTS = [f"Request {i}: " + "kati rone suma " * (i % 5) + "tell me" for i in range(16)]


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: Path) -> Iterator[VllmTextEngine]:
    # float32: bf16 rounding would make greedy text depend on the batch composition.
    eng = VllmTextEngine(str(tiny_llama_dir), dtype="float32", max_num_seqs=32, kv_cache_gib=1)
    yield eng
    eng.shutdown()


def test_generate_counts_tokens_and_stops_at_length(
    engine: VllmTextEngine, tiny_llama_dir: Path
) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    out = engine.generate("r1", "Hello world", TextParams(max_tokens=16, temperature=0), 30)
    assert isinstance(out, TextOutput)
    assert out.finish_reason == "length"
    assert out.completion_tokens == 16
    assert out.prompt_tokens == len(tok("Hello world").input_ids)  # BOS included
    assert out.text
    assert engine.name == "vllm"
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"


def test_greedy_matches_transformers(engine: VllmTextEngine, tiny_llama_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    enc = tok(PROMPTS[3], return_tensors="pt")
    with torch.inference_mode():
        ids = model.generate(**enc, max_new_tokens=24, do_sample=False)
    expected = tok.decode(ids[0, enc.input_ids.shape[1] :], skip_special_tokens=True)
    assert engine.generate("hf", PROMPTS[3], GREEDY, 30).text == expected


def test_stop_string_ends_with_stop(engine: VllmTextEngine) -> None:
    full = engine.generate("s0", PROMPTS[1], TextParams(max_tokens=40, temperature=0), 30)
    stop = full.text[10:13]
    first = full.text.index(stop)
    params = TextParams(max_tokens=40, temperature=0, stop=(stop,))
    out = engine.generate("s1", PROMPTS[1], params, 30)
    assert out.finish_reason == "stop"
    assert out.text == full.text[:first]
    assert out.completion_tokens < 40


def test_concurrent_requests_get_their_own_results(engine: VllmTextEngine) -> None:
    solo = [engine.generate(f"solo-{i}", p, GREEDY, 30) for i, p in enumerate(PROMPTS)]
    # The same request id for all: outputs must still not mix.
    with ThreadPoolExecutor(16) as pool:
        batched = list(pool.map(lambda p: engine.generate("same-id", p, GREEDY, 60), PROMPTS))
    assert [o.text for o in batched] == [o.text for o in solo]
    assert len({o.text for o in solo}) == len(PROMPTS)
    assert all(o.completion_tokens == GREEDY.max_tokens for o in batched)


def test_seeded_sampling_is_reproducible(engine: VllmTextEngine) -> None:
    params = TextParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    a = engine.generate("a", PROMPTS[0], params, 30)
    with ThreadPoolExecutor(4) as pool:  # seeded requests keep their text in a batch
        others = list(
            pool.map(lambda i: engine.generate(f"b{i}", PROMPTS[0], params, 30), range(4))
        )
    assert {o.text for o in others} == {a.text}


def test_timeout_raises_and_aborts(engine: VllmTextEngine) -> None:
    params = TextParams(max_tokens=1900, temperature=0)
    t0 = time.monotonic()
    with pytest.raises(RequestTimeoutError):
        engine.generate("slow", "Hello", params, timeout_s=0.2)
    assert time.monotonic() - t0 < 2
    # The aborted request leaves the engine promptly and the engine keeps serving.
    assert engine.generate("after", "Hello", GREEDY, 30).completion_tokens == 24
    deadline = time.monotonic() + 5
    while engine._active and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not engine._active


def test_bad_request_fails_alone(engine: VllmTextEngine) -> None:
    with pytest.raises(ProcessingError):
        engine.generate("long", "kati " * 5000, GREEDY, 30)  # longer than max_model_len
    with pytest.raises(ProcessingError):
        engine.generate("neg", "Hello", TextParams(max_tokens=4, temperature=-1.0), 30)
    assert engine.generate("ok", "Hello", GREEDY, 30).finish_reason == "length"
    assert engine.healthy


def test_step_failure_reaches_callers_and_engine_recovers(
    engine: VllmTextEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_step = engine._engine.step
    calls = {"n": 0}

    def failing_step():  # one injected fault in the real engine's step
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected step failure")
        return real_step()

    monkeypatch.setattr(engine._engine, "step", failing_step)
    with pytest.raises(ProcessingError, match="injected"):
        engine.generate("boom", "Hello", TextParams(max_tokens=50, temperature=0), 30)
    assert engine.healthy and engine._thread.is_alive()
    assert engine.generate("ok", "Hello", GREEDY, 30).completion_tokens == 24


def test_second_live_engine_is_refused(engine: VllmTextEngine, tiny_llama_dir: Path) -> None:
    with pytest.raises(ProcessingError, match="already"):
        VllmTextEngine(str(tiny_llama_dir))


def test_shutdown_stops_inflight_requests(engine: VllmTextEngine, tiny_llama_dir: Path) -> None:
    engine.shutdown()  # the shared engine goes first: one live engine per process
    with pytest.raises(EngineStoppedError):
        engine.generate("late", "Hello", GREEDY, 30)

    eng = VllmTextEngine(str(tiny_llama_dir), dtype="float32", kv_cache_gib=0.25)
    errors: list[tuple[BaseException | None, float]] = []

    def call(i: int) -> None:
        try:
            eng.generate(f"long-{i}", PROMPTS[i], TextParams(max_tokens=1900), 120)
            errors.append((None, time.monotonic()))
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
            errors.append((exc, time.monotonic()))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while len(eng._active) < 8 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(eng._active) == 8
    time.sleep(0.2)
    t0 = time.monotonic()
    eng.shutdown()
    for t in threads:
        t.join(5)
    stop_s = time.monotonic() - t0
    assert all(isinstance(e, EngineStoppedError) for e, _ in errors), errors
    assert len(errors) == 8
    assert max(at for _, at in errors) - t0 < 1.0  # callers are released at once
    assert stop_s < 5
    assert not eng._thread.is_alive()
    assert not eng.healthy
    with pytest.raises(EngineStoppedError):
        eng.generate("late", "Hello", GREEDY, 30)
    eng.shutdown()  # idempotent


def test_repeated_step_failures_mark_engine_broken(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    eng = VllmTextEngine(str(tiny_llama_dir), dtype="float32", kv_cache_gib=0.25)

    def broken_step():
        raise RuntimeError("device lost")

    monkeypatch.setattr(eng._engine, "step", broken_step)
    for _ in range(3):
        with pytest.raises(ProcessingError, match="device lost"):
            eng.generate("x", "Hello", GREEDY, 30)
    eng._thread.join(5)
    assert not eng.healthy and not eng._thread.is_alive()
    # Broken, not stopped: the task must fail rather than requeue its message forever.
    with pytest.raises(ProcessingError) as info:
        eng.generate("y", "Hello", GREEDY, 30)
    assert not isinstance(info.value, EngineStoppedError)
    eng.shutdown()
    VllmTextEngine(str(tiny_llama_dir), kv_cache_gib=0.25).shutdown()  # the slot is free again
