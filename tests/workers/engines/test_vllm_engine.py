"""VllmTextEngine on the tiny random-weight Llama: real in-process vLLM, no mocks.

The `TextEngine` contract it shares with TransformersTextEngine is checked in
`test_text_engines.py`; here is what only vLLM has. One engine per module (vLLM allows
one live in-process engine per process); the last test closes it and builds its own.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from test_text_engines import GREEDY, PROMPTS

from omni_tasks.errors import EngineStoppedError, ProcessingError
from workers.engines.base import TextParams

pytest.importorskip("vllm")

from workers.engines.vllm_engine import VllmTextEngine  # noqa: E402


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: Path) -> Iterator[VllmTextEngine]:
    # float32: bf16 rounding would make greedy text depend on the batch composition.
    eng = VllmTextEngine(str(tiny_llama_dir), dtype="float32", max_num_seqs=32, kv_cache_gib=1)
    yield eng
    eng.shutdown()


def test_engine_runs_in_process_with_its_kv_cache_size(engine: VllmTextEngine) -> None:
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


def test_a_burst_at_an_idle_engine_shares_its_first_step_on_the_reserved_threads(
    engine: VllmTextEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eight requests a few ms apart reach the idle engine: its first step runs all of
    them, on all CPUs but one (the stepping thread's torch threads)."""
    import torch

    steps: list[tuple[int, int]] = []
    real_step = engine._engine.step

    def step() -> Any:
        steps.append((engine._engine.get_num_unfinished_requests(), torch.get_num_threads()))
        return real_step()

    monkeypatch.setattr(engine._engine, "step", step)
    monkeypatch.setattr(engine, "burst_gap_s", 0.05)  # generous on a loaded test machine

    def call(i: int) -> Any:
        time.sleep(0.005 * i)
        return engine.generate(f"burst-{i}", PROMPTS[i], GREEDY, 30)

    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(call, range(8)))
    assert [o.completion_tokens for o in outs] == [24] * 8
    assert steps[0][0] == 8
    assert {threads for _, threads in steps} == {max(1, len(os.sched_getaffinity(0)) - 1)}


def test_second_live_engine_is_refused(engine: VllmTextEngine, tiny_llama_dir: Path) -> None:
    with pytest.raises(ProcessingError, match="already"):
        VllmTextEngine(str(tiny_llama_dir))


def test_n_choices_each_with_their_own_text_and_tokens(engine: VllmTextEngine) -> None:
    params = TextParams(max_tokens=12, temperature=1.0, seed=7, n=3)
    out = engine.generate("n3", PROMPTS[6], params, 30)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert out.text == out.choices[0].text
    assert out.completion_tokens == 36 == sum(c.completion_tokens for c in out.choices)
    assert len({c.text for c in out.choices}) > 1  # sampled apart
    again = engine.generate("n3-again", PROMPTS[6], params, 30)
    assert [c.text for c in again.choices] == [c.text for c in out.choices]  # the seed


def test_streamed_choices_join_to_their_final_texts(engine: VllmTextEngine) -> None:
    pieces: dict[int, list[str]] = {}

    def on_delta(index: int, text: str) -> None:
        pieces.setdefault(index, []).append(text)

    params = TextParams(max_tokens=16, temperature=1.0, seed=3, n=2)
    out = engine.generate("n2s", PROMPTS[7], params, 30, on_delta=on_delta)
    assert {i: "".join(p) for i, p in pieces.items()} == {c.index: c.text for c in out.choices}
    plain = engine.generate("n2", PROMPTS[7], params, 30)
    assert [c.text for c in plain.choices] == [c.text for c in out.choices]


@pytest.mark.parametrize("streamed", [False, True])
def test_logprobs_of_each_sampled_token_with_its_top_alternatives(
    engine: VllmTextEngine, streamed: bool
) -> None:
    """Greedy: each sampled token is the likeliest, so it heads its own top list."""
    params = TextParams(max_tokens=10, temperature=0, logprobs=2)
    on_delta = (lambda index, text: None) if streamed else None
    out = engine.generate("lp", PROMPTS[8], params, 30, on_delta=on_delta)
    (choice,) = out.choices
    assert choice.logprobs is not None and len(choice.logprobs) == 10
    assert "".join(e["token"] for e in choice.logprobs) == choice.text
    for entry in choice.logprobs:
        top = entry["top_logprobs"]
        assert len(top) == 2 and top[0]["token"] == entry["token"]
        assert top[0]["logprob"] == pytest.approx(entry["logprob"]) and entry["logprob"] <= 0
        assert top[0]["logprob"] >= top[1]["logprob"]
        assert entry["bytes"] == list(entry["token"].encode())


def test_penalties_change_what_is_sampled(engine: VllmTextEngine) -> None:
    base = TextParams(max_tokens=40, temperature=0)
    plain = engine.generate("pen0", PROMPTS[9], base, 30)
    params = TextParams(max_tokens=40, temperature=0, presence_penalty=2.0, frequency_penalty=2.0)
    penalised = engine.generate("pen1", PROMPTS[9], params, 30)
    assert penalised.text != plain.text and penalised.completion_tokens == 40


def test_repeated_step_failures_mark_engine_broken(
    engine: VllmTextEngine, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine.shutdown()  # the shared engine goes first: one live engine per process
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
