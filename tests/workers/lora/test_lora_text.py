"""LoRA adapters on both text engines, with the tiny Llama and tiny adapters: vLLM's
multi-LoRA (a `LoRARequest` per request, mixed adapters in one batch) and PEFT's mixed
adapter batches in the transformers engine; several adapters at their scales as one."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from omni_tasks.config import CoreModuleConfig, get_config
from omni_tasks.errors import ProcessingError
from workers.engines.base import TextOutput, TextParams

PROMPT = "The harbour at dawn"
VARIANTS: list[tuple] = [
    (),
    (("pirate", 1.0),),
    (("poet", 1.0),),
    (("pirate", 1.0), ("poet", 0.5)),
]


@pytest.fixture(scope="module")
def config(tiny_llama_dir: Path) -> CoreModuleConfig:
    loras = {"pirate": "tiny-llama-lora-pirate", "poet": "tiny-llama-lora-poet"}
    return replace(get_config(), loras={**loras, "watercolor": "tiny-flux-lora-watercolor"})


def greedy(lora: tuple, tokens: int = 16) -> TextParams:
    return TextParams(max_tokens=tokens, temperature=0.0, lora=lora)


def together(engine: Any, tokens: int, watch: Any = None) -> list[TextOutput]:
    """The variants sent at once from their own threads."""
    outs: dict[int, TextOutput] = {}

    def run(i: int) -> None:
        outs[i] = engine.generate(f"t{i}", PROMPT, greedy(VARIANTS[i], tokens), 60)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(VARIANTS))]
    for thread in threads:
        thread.start()
    while watch is not None and any(t.is_alive() for t in threads):
        watch()
        time.sleep(0.002)
    for thread in threads:
        thread.join(60)
    return [outs[i] for i in range(len(VARIANTS))]


@pytest.fixture(scope="module")
def vllm_engine(config: CoreModuleConfig, tiny_llama_dir: Path) -> Iterator[Any]:
    pytest.importorskip("vllm")
    from workers.engines.vllm_engine import VllmTextEngine
    from workers.lora.text import VllmAdapters

    adapters = VllmAdapters(config, str(tiny_llama_dir))
    eng = VllmTextEngine(
        str(tiny_llama_dir), dtype="float32", max_num_seqs=8, kv_cache_gib=1, adapters=adapters
    )
    yield eng
    eng.shutdown()


def test_vllm_loads_an_adapter_once_and_says_so(vllm_engine) -> None:
    first = vllm_engine.generate("h1", "Hello", greedy((("pirate", 1.0),)), 60)
    again = vllm_engine.generate("h2", "Hello", greedy((("pirate", 1.0),)), 60)
    base = vllm_engine.generate("h3", "Hello", greedy(()), 60)
    assert first.lora[0]["hit"] is False and first.lora[0]["load_s"] > 0
    assert again.lora == [{"name": "pirate", "scale": 1.0, "hit": True, "load_s": 0.0}]
    assert again.text == first.text != base.text and base.lora == []


def test_vllm_runs_different_adapters_in_one_batch(vllm_engine) -> None:
    """Four requests, four adapters (the zero adapter of the one without: see
    workers.lora.text) in vLLM's running batch at once, each text its own."""
    alone = [
        vllm_engine.generate(f"a{i}", PROMPT, greedy(v, 48), 60) for i, v in enumerate(VARIANTS)
    ]
    assert len({out.text for out in alone}) == len(VARIANTS)
    scheduler = vllm_engine._engine.engine_core.engine_core.scheduler
    seen: list[set] = []

    def watch() -> None:  # vLLM's own record of the running batch
        running = list(scheduler.running)
        seen.append({r.lora_request.lora_int_id for r in running if r.lora_request})

    outs = together(vllm_engine, 48, watch)
    assert max(len(ids) for ids in seen) == len(VARIANTS)
    assert [out.text for out in outs] == [out.text for out in alone]


def test_an_adapter_vllm_cannot_run_is_refused_clearly(vllm_engine, config) -> None:
    with pytest.raises(ProcessingError, match="not a PEFT adapter folder"):
        vllm_engine.generate("x", "Hello", greedy((("watercolor", 1.0),)), 60)
    from workers.lora.text import TextAdapters

    low = replace(config, lora=replace(config.lora, max_lora_rank=8))
    with pytest.raises(ProcessingError, match="rank 16 .* above lora.max_lora_rank 8"):
        TextAdapters(low).prepare(VARIANTS[3])


def test_transformers_runs_mixed_adapter_batches_through_peft(config, tiny_llama_dir) -> None:
    from workers.engines.transformers_engine import TransformersTextEngine
    from workers.lora.peft_text import PeftAdapters

    eng = TransformersTextEngine(
        str(tiny_llama_dir), batch_wait_s=0.3, adapters=PeftAdapters(config)
    )
    try:
        alone = [eng.generate(f"a{i}", PROMPT, greedy(v), 60) for i, v in enumerate(VARIANTS)]
        outs = together(eng, 16)
    finally:
        eng.shutdown()
    assert len({out.text for out in alone}) == len(VARIANTS)
    assert [out.text for out in outs] == [out.text for out in alone]
    assert [len(out.lora) for out in outs] == [0, 1, 1, 2]
    assert all(use["hit"] for out in outs for use in out.lora)  # loaded by the solo runs
