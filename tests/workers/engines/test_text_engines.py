"""The `TextEngine` contract (workers/engines/base.py), checked on both text engines.

VllmTextEngine and TransformersTextEngine on the tiny random-weight Llama: real models,
no mocks. One shared engine per parameter (vLLM allows one live in-process engine per
process); pytest runs every test of one engine before building the next, and the
shutdown test runs last for each: it closes the shared engine and builds its own.
What only one engine has lives in `test_vllm_engine.py` / `test_transformers_engine.py`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from helpers import eventually

from omni_tasks.errors import EngineStoppedError, ProcessingError, RequestTimeoutError
from workers.engines.base import TextEngine, TextOutput, TextParams

GREEDY = TextParams(max_tokens=24, temperature=0.0)
PROMPTS = [f"Request {i}: " + "kati rone suma " * (i % 5) + "tell me" for i in range(16)]

#: max_tokens of a request meant to run far past its timeout (within max_model_len).
LONG_TOKENS = {"vllm": 1900, "transformers": 1500}
#: The timeout that such a request is given in the timeout test.
SHORT_TIMEOUT_S = {"vllm": 0.2, "transformers": 0.3}


def build_engine(name: str, model_dir: Path, **kwargs: Any) -> Any:
    if name == "vllm":
        pytest.importorskip("vllm")
        from workers.engines.vllm_engine import VllmTextEngine

        return VllmTextEngine(str(model_dir), **kwargs)
    from workers.engines.transformers_engine import TransformersTextEngine

    return TransformersTextEngine(str(model_dir), **kwargs)


@pytest.fixture(scope="module", params=["vllm", "transformers"])
def engine(request: pytest.FixtureRequest, tiny_llama_dir: Path) -> Iterator[TextEngine]:
    if request.param == "vllm":
        # float32: bf16 rounding would make greedy text depend on the batch composition.
        eng = build_engine("vllm", tiny_llama_dir, dtype="float32", max_num_seqs=32, kv_cache_gib=1)
    else:
        eng = build_engine("transformers", tiny_llama_dir, max_batch_size=16)
    yield eng
    eng.shutdown()


def test_generate_counts_tokens_and_stops_at_length(
    engine: Any, tiny_llama_dir: Path, request: pytest.FixtureRequest
) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    out = engine.generate("r1", "Hello world", TextParams(max_tokens=16, temperature=0), 30)
    assert isinstance(out, TextOutput)
    assert (out.finish_reason, out.completion_tokens) == ("length", 16)
    assert out.prompt_tokens == len(tok("Hello world").input_ids)  # BOS included
    assert out.text
    assert engine.name == request.node.callspec.params["engine"]


def test_stop_string_ends_with_stop(engine: Any) -> None:
    full = engine.generate("s0", PROMPTS[1], TextParams(max_tokens=40, temperature=0), 30)
    stop = full.text[10:13]
    params = TextParams(max_tokens=40, temperature=0, stop=(stop,))
    out = engine.generate("s1", PROMPTS[1], params, 30)
    assert out.finish_reason == "stop"
    assert out.text == full.text[: full.text.index(stop)]
    assert out.completion_tokens < 40


def test_concurrent_requests_get_their_own_results(engine: Any) -> None:
    # Mixed max_tokens in one batch, and one request id for all: nothing may mix.
    params = [TextParams(max_tokens=24 - (i % 3), temperature=0) for i in range(16)]
    solo = [engine.generate(f"solo-{i}", p, params[i], 30) for i, p in enumerate(PROMPTS)]
    with ThreadPoolExecutor(16) as pool:
        batched = list(
            pool.map(lambda i: engine.generate("same-id", PROMPTS[i], params[i], 60), range(16))
        )
    assert batched == solo
    assert [o.text for o in batched] == [o.text for o in solo]
    assert [o.completion_tokens for o in batched] == [p.max_tokens for p in params]
    assert {o.finish_reason for o in batched} == {"length"}
    assert len({o.text for o in solo}) == len(PROMPTS)


def test_seeded_sampling_is_reproducible(engine: Any) -> None:
    params = TextParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    a = engine.generate("a", PROMPTS[0], params, 30)
    # Seeded requests keep their text in a batch (vLLM) or run alone (transformers).
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda i: engine.generate(f"b{i}", PROMPTS[0], params, 30), range(4)))
    assert len({o.text for o in outs}) == 1
    assert {o.text for o in outs} == {a.text}
    other = engine.generate("c", PROMPTS[0], TextParams(16, 1.0, 0.9, seed=8), 30)
    assert other.text != outs[0].text


def test_timeout_raises_and_aborts(engine: Any) -> None:
    params = TextParams(max_tokens=LONG_TOKENS[engine.name], temperature=0)
    t0 = time.monotonic()
    with pytest.raises(RequestTimeoutError):
        engine.generate("slow", "Hello", params, timeout_s=SHORT_TIMEOUT_S[engine.name])
    assert time.monotonic() - t0 < 2
    # The abandoned request stops early and the engine keeps serving.
    t0 = time.monotonic()
    assert engine.generate("after", "Hello", GREEDY, 30).completion_tokens == 24
    if engine.name == "transformers":
        assert time.monotonic() - t0 < 3  # not stuck behind the abandoned row
    else:
        assert eventually(lambda: not engine._active, 5)  # the aborted one leaves vLLM promptly


def test_bad_request_fails_alone(engine: Any) -> None:
    bad = [
        ("zero", "Hello", TextParams(max_tokens=0)),
        ("neg", "Hello", TextParams(max_tokens=4, temperature=-1.0)),
    ]
    if engine.name == "vllm":
        bad.append(("long", "kati " * 5000, GREEDY))  # longer than max_model_len
    for rid, prompt, params in bad:
        with pytest.raises(ProcessingError):
            engine.generate(rid, prompt, params, 30)
    assert engine.generate("ok", "Hello", GREEDY, 30).finish_reason == "length"
    assert engine.healthy


def test_failure_reaches_callers_and_engine_recovers(
    engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One injected fault around the real model: vLLM's third step, transformers' generate.
    if engine.name == "vllm":
        real_step = engine._engine.step
        calls = {"n": 0}

        def failing_step():
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("injected step failure")
            return real_step()

        monkeypatch.setattr(engine._engine, "step", failing_step)
    else:
        real = engine.model.generate

        def failing_generate(**kwargs):
            monkeypatch.setattr(engine.model, "generate", real)
            raise RuntimeError("injected failure")

        monkeypatch.setattr(engine.model, "generate", failing_generate)
    with pytest.raises(ProcessingError, match="injected"):
        engine.generate("boom", "Hello", TextParams(max_tokens=50, temperature=0), 30)
    assert engine.healthy and engine._thread.is_alive()
    assert engine.generate("ok", "Hello", GREEDY, 30).completion_tokens == 24


def test_progress_reports_the_token_count_and_a_failing_listener_is_harmless(
    engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine, "progress_interval_s", 0.0)  # every step
    seen: list[dict[str, int]] = []

    def listener(info: Any) -> None:
        seen.append(dict(info))
        raise RuntimeError("a listener's bug")  # logged by the engine, never raised

    params = TextParams(max_tokens=200, temperature=0)
    out = engine.generate("p", PROMPTS[2], params, 60, on_progress=listener)
    assert out.finish_reason == "length" and out.completion_tokens == 200
    assert len(seen) >= 20
    assert {i["max_tokens"] for i in seen} == {200}
    tokens = [i["tokens"] for i in seen]
    assert tokens == sorted(tokens) and 0 < tokens[0] and tokens[-1] <= 200
    assert engine.healthy
    assert engine.generate("quiet", PROMPTS[2], GREEDY, 30).completion_tokens == 24


def collect(pieces: dict[int, list[str]]) -> Any:
    """An `on_delta` that keeps each choice's pieces."""

    def on_delta(index: int, text: str) -> None:
        pieces.setdefault(index, []).append(text)

    return on_delta


@pytest.mark.parametrize("stop", [(), ("e",)])
def test_streamed_pieces_join_to_the_final_text(engine: Any, stop: tuple[str, ...]) -> None:
    """Many pieces, one per step or so, and joined they are the result's text exactly
    (with a stop string too: what could still be cut is held back)."""
    pieces: dict[int, list[str]] = {}
    params = TextParams(max_tokens=64, temperature=0, stop=stop)
    out = engine.generate("st", PROMPTS[4], params, 60, on_delta=collect(pieces))
    plain = engine.generate("st-plain", PROMPTS[4], params, 60)
    assert "".join(pieces[0]) == out.text == plain.text
    assert list(pieces) == [0]
    if not stop:
        assert out.completion_tokens == 64 and len(pieces[0]) >= 64 / 4


def test_a_failing_stream_reader_never_fails_the_request(engine: Any) -> None:
    def broken(index: int, text: str) -> None:
        raise RuntimeError("a reader's bug")

    out = engine.generate("sb", PROMPTS[5], GREEDY, 30, on_delta=broken)
    assert out.completion_tokens == 24 and engine.healthy


def test_chat_messages_are_rendered_with_the_chat_template(
    engine: Any, tiny_llama_dir: Path
) -> None:
    """The prompt is the template's rendering: its token count is the rendering's (one
    BOS, from the template), and the text is what the rendered ids give as a prompt."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "kati rone suma"},
    ]
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok(rendered, add_special_tokens=False).input_ids
    assert rendered.startswith("<s><|system|>") and rendered.endswith("<|assistant|>\n")
    out = engine.generate("chat", messages, GREEDY, 30)
    assert out.prompt_tokens == len(ids)
    as_prompt = engine.generate("chat-text", rendered[len("<s>") :], GREEDY, 30)
    assert (as_prompt.prompt_tokens, as_prompt.text) == (len(ids), out.text)


def test_a_model_without_a_chat_template_refuses_chat_unless_configured(
    engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from omni_tasks.errors import RequestValidationError

    tokenizer = engine._tokenizer if engine.name == "vllm" else engine.tokenizer
    monkeypatch.setattr(tokenizer, "chat_template", None)
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(RequestValidationError) as refused:
        engine.generate("no-template", messages, GREEDY, 30)
    assert refused.value.field == "messages" and "chat_template" in str(refused.value)
    monkeypatch.setattr(
        engine, "chat_template", "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    plain = tokenizer("hi", add_special_tokens=False).input_ids  # no BOS: not in it
    assert engine.generate("own-template", messages, GREEDY, 30).prompt_tokens == len(plain)


def test_shutdown_stops_inflight_requests(engine: Any, tiny_llama_dir: Path) -> None:
    name = engine.name
    engine.shutdown()  # the shared engine goes first: one live vLLM engine per process
    with pytest.raises(EngineStoppedError):
        engine.generate("late", "Hello", GREEDY, 30)

    if name == "vllm":
        eng = build_engine(name, tiny_llama_dir, dtype="float32", kv_cache_gib=0.25)

        def started() -> bool:
            return len(eng._active) == 8  # all 8 in vLLM's running batch
    else:
        eng = build_engine(name, tiny_llama_dir, max_batch_size=4)

        def started() -> bool:
            return bool(eng._running) and len(eng._running) + len(eng._queue) == 8  # all in

    results: list[tuple[BaseException | None, float]] = []

    def call(i: int) -> None:
        try:
            eng.generate(f"long-{i}", PROMPTS[i], TextParams(max_tokens=LONG_TOKENS[name]), 120)
            results.append((None, time.monotonic()))
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
            results.append((exc, time.monotonic()))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    assert eventually(started, 10)
    t0 = time.monotonic()
    eng.shutdown()
    for t in threads:
        t.join(5)
    stop_s = time.monotonic() - t0
    assert len(results) == 8
    assert all(isinstance(e, EngineStoppedError) for e, _ in results), results
    assert max(at for _, at in results) - t0 < 1.0  # callers are released at once
    assert stop_s < 5
    assert not eng._thread.is_alive()
    assert not eng.healthy
    if name == "transformers":
        assert eng.model is None
    with pytest.raises(EngineStoppedError):
        eng.generate("late", "Hello", GREEDY, 30)
    eng.shutdown()  # idempotent


# Run in a process of its own: it needs an engine that runs one sequence at a time, and
# vLLM allows one live engine per process.
URGENT_FIRST = """
import json, sys, threading, time
from workers.engines.base import TextParams
name, model = sys.argv[1], sys.argv[2]
if name == "vllm":
    from workers.engines.vllm_engine import VllmTextEngine
    engine = VllmTextEngine(model, dtype="float32", max_num_seqs=1, kv_cache_gib=1)
else:
    from workers.engines.transformers_engine import TransformersTextEngine
    engine = TransformersTextEngine(model, max_batch_size=1, batch_wait_s=0)
done, lock = [], threading.Lock()
def run(rid, rank, tokens=48):
    engine.generate(rid, "tell me a story", TextParams(tokens, 0.0, rank=rank), 120)
    with lock:
        done.append(rid)
first = threading.Thread(target=run, args=("low-0", 2, 800))  # still running below
first.start()
running = (lambda: engine._active) if name == "vllm" else (lambda: engine._running)
while first.is_alive() and not running():  # low-0 holds the one sequence first
    time.sleep(0.01)
later = [threading.Thread(target=run, args=(f"low-{i}", 2)) for i in (1, 2, 3)]
later.append(threading.Thread(target=run, args=("high", 0)))
for t in later:
    t.start()
for t in [first, *later]:
    t.join()
engine.shutdown()
print("ORDER " + json.dumps(done))
"""


@pytest.mark.parametrize("name", ["vllm", "transformers"])
def test_the_most_urgent_class_is_served_first(name: str, tiny_llama_dir: Path) -> None:
    """One sequence at a time; three low-class requests, then a high-class one, queue
    behind a running low-class request: the high one is served before them."""
    import json
    import subprocess
    import sys

    if name == "vllm":
        pytest.importorskip("vllm")
    out = subprocess.run(
        [sys.executable, "-c", URGENT_FIRST, name, str(tiny_llama_dir)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("ORDER ")]
    assert lines, out.stdout[-2000:] + out.stderr[-2000:]
    order = json.loads(lines[-1][len("ORDER ") :])
    assert sorted(order) == ["high", "low-0", "low-1", "low-2", "low-3"]
    assert order.index("high") < min(order.index(f"low-{i}") for i in (1, 2, 3)), order
