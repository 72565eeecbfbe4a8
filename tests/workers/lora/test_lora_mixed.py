"""`lora.mixed_batches`: requests with different adapter sets share a denoising step, each
row with its own LoRA deltas, and each image is the one it gets alone."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from omni_tasks.config import get_config
from workers.engines.base import ImageOutput, ImageParams
from workers.engines.diffusers_engine import DiffusersEngine

STYLES = ("watercolor", "ink")
SETS = [
    (),
    (("watercolor", 1.0),),
    (("ink", 1.0),),
    (("watercolor", 0.5),),
    (("ink", 0.5), ("watercolor", 1.0)),
    (("watercolor", 0.0),),
]


@pytest.fixture(scope="module")
def engine(tiny_flux_dir: Path) -> Iterator[DiffusersEngine]:
    base = get_config()
    config = replace(
        base,
        loras={style: f"tiny-flux-lora-{style}" for style in STYLES},
        lora=replace(base.lora, mixed_batches=True),
    )
    eng = DiffusersEngine(tiny_flux_dir, config=config)
    yield eng
    eng.shutdown()


def generate(engine: DiffusersEngine, lora: tuple, seed: int) -> ImageOutput:
    return engine.generate(f"m{seed}", "a quiet harbour", ImageParams(seed=seed, lora=lora), 60)


def pixels(out: ImageOutput) -> np.ndarray:
    return np.asarray(out.image, dtype=np.int16)


def test_rows_with_different_adapters_share_a_step_and_keep_their_images(engine) -> None:
    alone = [generate(engine, lora, seed) for seed, lora in enumerate(SETS)]
    assert all(out.max_batch == 1 for out in alone)
    outs: dict[int, ImageOutput] = {}

    def run(i: int) -> None:
        outs[i] = generate(engine, SETS[i], i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(SETS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert max(out.max_batch for out in outs.values()) >= 4  # sets mixed in one step
    for i, want in enumerate(alone):
        assert np.abs(pixels(outs[i]) - pixels(want)).max() <= 2, SETS[i]
    # At scale 0 the deltas add nothing: the base image of the same seed, exactly.
    assert np.array_equal(pixels(generate(engine, (), 5)), pixels(alone[5]))
