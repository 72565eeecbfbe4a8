"""TransformersTextEngine on the tiny random-weight Llama: real model, no mocks.

The `TextEngine` contract it shares with VllmTextEngine is checked in
`test_text_engines.py`; here is what only this engine has. The tiny Llama builder is
tested in `tests/workers/models/test_tiny_llama.py`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from omni_tasks.errors import RequestValidationError
from workers.engines.base import TextParams
from workers.engines.transformers_engine import TransformersTextEngine


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: Path) -> Iterator[TransformersTextEngine]:
    eng = TransformersTextEngine(str(tiny_llama_dir), max_batch_size=16)
    yield eng
    eng.shutdown()


def test_runs_on_the_best_device(engine: TransformersTextEngine) -> None:
    import torch

    assert engine.name == "transformers"
    assert engine.device == ("cuda" if torch.cuda.is_available() else "cpu")


def test_a_model_that_fails_to_load_fails_the_constructor(tmp_path: Path) -> None:
    # The model loads on the engine's own thread; its error reaches the caller.
    with pytest.raises(OSError):
        TransformersTextEngine(str(tmp_path / "no-such-model"))


@pytest.mark.parametrize(
    ("field", "params"),
    [
        ("n", TextParams(n=2)),
        ("presence_penalty", TextParams(presence_penalty=0.5)),
        ("frequency_penalty", TextParams(frequency_penalty=-0.5)),
        ("logprobs", TextParams(logprobs=0)),
    ],
)
def test_what_generate_cannot_do_is_refused_by_name(
    engine: TransformersTextEngine, field: str, params: TextParams
) -> None:
    with pytest.raises(RequestValidationError) as refused:
        engine.generate("no", "Hello", params, 30)
    assert refused.value.field == field
