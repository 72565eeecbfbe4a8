"""The model families in one process (`DiffusersEngine` on each tiny checkpoint): the
family is read from the checkpoint, returned embeddings and latents reproduce the
pixels, requests sent together share steps with their own pixels, and the generic
fallback runs a pipeline class with no family module."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import MODELS_CACHE

from omni_tasks.errors import ConfigError, RequestValidationError
from workers.engines.base import ImageParams, StepCacheSettings

FAMILIES = {"tiny-sd3": "sd3", "tiny-qwen-image": "qwen-image", "tiny-sana": "sana"}
PROMPT = "a red fox in the snow"


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def engine(request: pytest.FixtureRequest, tiny_models) -> Iterator:
    from workers.engines.diffusers_engine import DiffusersEngine

    eng = DiffusersEngine(MODELS_CACHE / request.param, max_batch_size=8)
    yield eng
    eng.shutdown()


def array(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int64)


def together(engine, params: list[ImageParams]) -> list:
    outs: dict[int, object] = {}

    def run(i: int) -> None:
        outs[i] = engine.generate(f"r{i}", PROMPT, params[i], 120)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(params))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [outs[i] for i in range(len(params))]


def test_the_family_comes_from_the_checkpoint(engine) -> None:
    name = Path(engine.model).name
    assert engine.family.name == FAMILIES[name]


def test_returned_embeddings_and_latents_give_the_same_pixels(engine) -> None:
    params = ImageParams(width=64, height=64, steps=4, seed=1, negative_prompt="blurry")
    first = engine.generate("a", PROMPT, params, 120)
    assert first.latents is not None and first.embeds
    decoded = engine.generate("b", "ignored", params, 120, latents=first.latents)
    assert decoded.steps_run == 0
    reused = engine.generate("c", "ignored", params, 120, embeds=first.embeds)
    assert np.array_equal(array(first.image), array(decoded.image))
    assert np.array_equal(array(first.image), array(reused.image))


def test_requests_sent_together_share_steps_with_their_own_pixels(engine) -> None:
    params = [ImageParams(width=64, height=64, steps=10, seed=20 + i) for i in range(4)]
    outs = together(engine, params)
    assert max(out.max_batch for out in outs) >= 2
    for p, out in zip(params, outs, strict=True):
        alone = engine.generate("alone", PROMPT, p, 120)
        assert np.abs(array(out.image) - array(alone.image)).max() <= 2


def test_every_step_cache_the_family_lists_runs_and_the_others_are_refused(engine) -> None:
    from workers.engines.step_cache import STEP_CACHE_MODES

    for mode in sorted(STEP_CACHE_MODES):
        params = ImageParams(width=64, height=64, steps=8, step_cache=StepCacheSettings(mode))
        if mode in engine.family.step_caches:
            out = engine.generate(mode, PROMPT, params, 120)
            assert out.denoise_steps == 8 and 1 <= out.steps_run <= 8, mode
        else:
            with pytest.raises(ConfigError, match="step_cache"):
                engine.generate(mode, PROMPT, params, 60)


def test_a_size_the_family_cannot_take_is_refused(engine) -> None:
    with pytest.raises(RequestValidationError, match="multiple"):
        engine.generate("w", PROMPT, ImageParams(width=72, height=64, steps=2), 60)


def test_a_pipeline_without_a_family_module_runs_generic_and_batches(
    tiny_models, caplog: pytest.LogCaptureFixture
) -> None:
    from workers.engines.diffusers_engine import DiffusersEngine

    with caplog.at_level(logging.INFO):
        eng = DiffusersEngine(MODELS_CACHE / "tiny-sd3", family="generic:StableDiffusion3Pipeline")
    try:
        assert eng.family.name == "generic" and eng.family.batched
        assert "shares denoising steps (generic family)" in caplog.text
        params = [ImageParams(width=64, height=64, steps=20, seed=i) for i in range(3)]
        outs = together(eng, params)
        assert max(out.max_batch for out in outs) >= 2
        repeat = eng.generate("again", PROMPT, params[0], 120, latents=outs[0].latents)
        assert np.array_equal(array(repeat.image), array(outs[0].image))
    finally:
        eng.shutdown()


class Sink:
    """A preview sink that keeps what it gets (the worker's publishes to Redis)."""

    def __init__(self, steps: set[int]) -> None:
        self.steps = steps
        self.images: list = []

    def due(self, step: int, total: int) -> bool:
        return step in self.steps

    def publish(self, image, step: int, total: int) -> None:
        self.images.append((step, total, image))


def test_previews_decode_the_family_latents_of_the_steps_asked(engine) -> None:
    from workers.stepping.request import StepTicket

    sink = Sink({2, 4})
    ticket = StepTicket("p", preview=sink)
    params = ImageParams(width=64, height=64, steps=6, seed=2)
    out = engine.generate("p", PROMPT, params, 120, ticket=ticket)
    assert [(step, total) for step, total, _ in sink.images] == [(2, 6), (4, 6)]
    assert all(image.size == out.image.size for _, _, image in sink.images)
    assert not np.array_equal(array(sink.images[0][2]), array(out.image))


def test_qwen_image_shares_steps_across_prompt_lengths(engine) -> None:
    if engine.family.name != "qwen-image":
        pytest.skip("prompts of other families have one text length")
    prompts = ["a fox", "a red fox in the deep winter snow at dusk", "an old castle on a hill"]
    params = ImageParams(width=64, height=64, steps=8, seed=4)
    outs: dict[int, object] = {}

    def run(i: int) -> None:
        outs[i] = engine.generate(f"q{i}", prompts[i], params, 120)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert max(out.max_batch for out in outs.values()) >= 2
    lengths = set()
    for i, prompt in enumerate(prompts):
        alone = engine.generate("alone", prompt, params, 120)
        lengths.add(alone.embeds["prompt_embeds"].shape[1])
        assert np.abs(array(outs[i].image) - array(alone.image)).max() <= 2
    assert len(lengths) == 3


def test_the_resource_manager_measures_each_size_of_the_family(engine) -> None:
    params = ImageParams(width=64, height=64, steps=2, seed=1)
    engine.generate("m", PROMPT, params, 120)
    shape = engine.family.batch_key(params, {"prompt_embeds": None})
    cost = engine.resources.cost(shape)
    assert cost is not None and cost.row_bytes > 0 and cost.step_bytes > 0
    assert cost.bytes_for(4) > cost.bytes_for(1)


def test_a_family_comes_from_config_or_the_checkpoint(tiny_models, tmp_path: Path) -> None:
    from workers.engines.families import FAMILIES, detect, family_class

    assert detect(MODELS_CACHE / "tiny-sd3").name == "sd3"
    assert detect(MODELS_CACHE / "tiny-qwen-image-edit").name == "qwen-image-edit"
    assert detect(MODELS_CACHE / "tiny-sd3", "sana") is FAMILIES["sana"]  # config wins
    assert family_class("generic:SanaPipeline").pipeline == "SanaPipeline"
    with pytest.raises(ConfigError, match="family"):
        family_class("nope")
    (tmp_path / "model_index.json").write_text('{"_class_name": "NoSuchPipeline"}')
    with pytest.raises(ConfigError, match="not a diffusers pipeline"):
        detect(tmp_path)
    (tmp_path / "model_index.json").write_text('{"_class_name": "AuraFlowPipeline"}')
    assert detect(tmp_path).name == "generic"  # no family module: the fallback
