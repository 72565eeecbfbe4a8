"""LoRA adapters on the tiny Flux engine: loaded with diffusers' `load_lora_weights`,
kept under a small adapter budget, batched by adapter set, published to Redis."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from omni_tasks.config import GIB, CoreModuleConfig, get_config
from omni_tasks.coordination import cache_directory
from omni_tasks.coordination.client import get_redis
from omni_tasks.errors import ProcessingError, ResourceError
from omni_tasks.lora import directory_key
from workers.engines.base import ImageOutput, ImageParams, StepCacheSettings
from workers.engines.diffusers_engine import DiffusersEngine
from workers.lora.diffusion import PipelineAdapters, adapter_bytes
from workers.lora.directory import AdapterDirectoryListener
from workers.lora.registry import adapter_path

STYLES = ("watercolor", "ink", "charcoal", "pastel")
WORKER = "lora-engine-test"
PROMPT = "a lighthouse at dusk"
WC = (("watercolor", 1.0),)
INK = (("ink", 1.0),)


def registry(tmp: Path, flux_dir: Path) -> dict[str, str]:
    loras = {style: f"tiny-flux-lora-{style}" for style in STYLES}
    loras["with-text"] = str(text_encoder_adapter(tmp / "with-text", flux_dir))
    return loras


def text_encoder_adapter(out: Path, flux_dir: Path) -> Path:
    """An adapter with weights for the CLIP text encoder, in diffusers' format."""
    from diffusers import FluxPipeline
    from peft import LoraConfig, get_peft_model_state_dict
    from transformers import CLIPTextModel

    encoder = CLIPTextModel.from_pretrained(flux_dir / "text_encoder")
    encoder.add_adapter(LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    FluxPipeline.save_lora_weights(out, text_encoder_lora_layers=get_peft_model_state_dict(encoder))
    return out


@pytest.fixture(scope="module")
def config(tiny_flux_dir: Path, tmp_path_factory) -> CoreModuleConfig:
    """The registry, with an adapter budget of two and a half tiny adapters."""
    base = replace(get_config(), loras=registry(tmp_path_factory.mktemp("loras"), tiny_flux_dir))
    return replace(base, lora=replace(base.lora, memory_gib=2.5 * tensor_bytes(base) / GIB))


def tensor_bytes(config: CoreModuleConfig) -> int:
    """What one tiny adapter weighs in float32 (they all have the same shapes)."""
    from safetensors import safe_open

    file = adapter_path("watercolor", config) / "pytorch_lora_weights.safetensors"
    with safe_open(str(file), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) * 4 for k in f.keys())  # noqa: SIM118


@pytest.fixture(scope="module")
def engine(config: CoreModuleConfig, tiny_flux_dir: Path) -> Iterator[DiffusersEngine]:
    listener = AdapterDirectoryListener(get_redis(), WORKER, "diffusion", config.diffusion.model)
    eng = DiffusersEngine(tiny_flux_dir, config=config, adapter_listener=listener)
    yield eng
    eng.shutdown()


def generate(engine: DiffusersEngine, lora=(), seed: int = 1, **extra) -> ImageOutput:
    params = ImageParams(seed=seed, lora=tuple(lora), **extra)
    return engine.generate(f"r{seed}-{lora}", PROMPT, params, 60)


def pixels(out: ImageOutput) -> np.ndarray:
    return np.asarray(out.image, dtype=np.int16)


def test_an_adapter_changes_the_image_and_at_scale_zero_it_is_the_base(engine) -> None:
    base = generate(engine)
    styled = generate(engine, WC)
    zero = generate(engine, (("watercolor", 0.0),))
    assert np.abs(pixels(styled) - pixels(base)).mean() > 1.0
    assert np.array_equal(pixels(zero), pixels(base))
    assert base.lora == [] and styled.lora[0]["name"] == "watercolor"
    assert zero.lora == [{"name": "watercolor", "scale": 0.0, "hit": True, "load_s": 0.0}]
    assert np.array_equal(pixels(generate(engine)), pixels(base))  # LoRA layers off again


def test_scales_and_adapter_sets_each_give_their_own_image(engine) -> None:
    images = [
        pixels(generate(engine, lora))
        for lora in (WC, (("watercolor", 0.5),), INK, (("ink", 1.0), ("watercolor", 1.0)))
    ]
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            assert not np.array_equal(images[i], images[j])
    assert np.array_equal(pixels(generate(engine, WC)), images[0])


def test_only_requests_with_the_same_adapters_share_a_step(engine) -> None:
    jobs = [(WC, 1), (WC, 2), (INK, 3), (INK, 4), ((), 5), ((), 6)]
    alone = [pixels(generate(engine, lora, seed)) for lora, seed in jobs]
    outs: dict[int, ImageOutput] = {}

    def run(i: int) -> None:
        outs[i] = generate(engine, *jobs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert all(outs[i].max_batch <= 2 for i in outs)  # never beside another adapter set
    assert any(outs[i].max_batch == 2 for i in outs)
    for i, want in enumerate(alone):
        assert np.abs(pixels(outs[i]) - want).max() <= 2  # a batch's float rounding only


def test_adapters_are_evicted_least_recently_used_under_a_small_budget(
    engine, redis_client
) -> None:
    for style in ("pastel", "ink", "charcoal"):
        assert generate(engine, ((style, 1.0),)).lora[0]["hit"] is False or style == "ink"
    adapters = engine.adapters
    assert adapters.cache.loaded() == ["ink", "charcoal"]  # pastel went first
    transformer = engine.family.pipe.transformer
    assert adapter_bytes(transformer, "pastel") == 0 < adapter_bytes(transformer, "charcoal")
    status = engine.resources.get_resource_status()
    assert 0 < status["adapter_bytes"] <= engine.resources.adapter_reserved_bytes
    assert status["adapter_bytes"] == adapter_bytes(transformer, "ink") * 2
    assert engine.resources.available_bytes == (
        engine.resources.budget_bytes
        - engine.resources.resident_bytes
        - engine.resources.cache_reserved_bytes
        - engine.resources.adapter_reserved_bytes
    )
    assert [
        h.worker
        for h in cache_directory.holders(
            get_redis(), directory_key("charcoal", get_config().diffusion.model)
        )
    ] == [WORKER]
    assert (
        cache_directory.holders(get_redis(), directory_key("pastel", get_config().diffusion.model))
        == []
    )
    again = generate(engine, (("pastel", 1.0),))
    assert again.lora[0]["hit"] is False and again.lora[0]["load_s"] > 0


def test_a_step_cache_request_runs_with_its_adapter(engine) -> None:
    cached = StepCacheSettings(mode="taylorseer")
    plain = generate(engine, (), step_cache=cached)
    styled = generate(engine, WC, step_cache=cached)
    assert not np.array_equal(pixels(plain), pixels(styled))
    assert np.array_equal(pixels(generate(engine, (), step_cache=cached)), pixels(plain))
    assert np.array_equal(pixels(generate(engine, WC)), pixels(generate(engine, WC)))


def test_text_encoder_weights_and_oversized_adapters_are_refused(engine, config) -> None:
    with pytest.raises(ProcessingError, match="text_encoder: only transformer adapters"):
        generate(engine, (("with-text", 1.0),))
    tiny_budget = PipelineAdapters(engine.family.pipe, config, budget_bytes=1000)
    with pytest.raises(ResourceError, match="'watercolor' needs"):
        with tiny_budget.using(WC, time.monotonic() + 5):
            pass
