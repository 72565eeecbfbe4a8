"""LoRA adapters through real pools: an AR worker (vLLM) and two diffusion workers, all
started with a registry of tiny adapters (`OMNI_LORAS`), requests sent with `.delay()`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import clean_redis, start_ready_workers
from helpers import KEYS
from PIL import Image

from omni_tasks import RequestValidationError, generate_image, generate_text, get_config
from omni_tasks.config import set_config
from omni_tasks.coordination import cache_directory, keys
from omni_tasks.coordination.client import get_redis
from omni_tasks.lora import directory_key
from omni_tasks.requests import create_diffusion_request
from omni_tasks.scheduling.policies import create_policy
from omni_tasks.tasks.router import resolve_route

pytestmark = pytest.mark.slow

LORAS = {
    "watercolor": "tiny-flux-lora-watercolor",
    "ink": "tiny-flux-lora-ink",
    "charcoal": "tiny-flux-lora-charcoal",
    "pirate": "tiny-llama-lora-pirate",
    "poet": "tiny-llama-lora-poet",
}
IMAGE = {"width": 64, "height": 64, "steps": 4}
TEXT = {"max_tokens": 16, "temperature": 0.0}


@pytest.fixture(scope="module")
def lora_pools(tiny_models, run_dir: Path) -> Iterator[dict[str, list]]:
    """An AR worker and two diffusion workers whose registry is `LORAS` (so is ours)."""
    original = get_config()
    set_config(replace(original, loras=LORAS))
    clean_redis()
    # Lossless embeddings in the DiT cache: a reused prompt gives the very same pixels.
    env = {"OMNI_LORAS": json.dumps(LORAS), "OMNI_CACHE__ENABLE_COMPRESSION": "false"}
    workers = start_ready_workers(["ar", "diffusion", "diffusion"], run_dir / "lora", env=env)
    by_queue: dict[str, list] = {}
    for worker in workers:
        by_queue.setdefault(worker.queue, []).append(worker)
    yield by_queue
    for worker in workers:
        worker.stop()
    set_config(original)
    clean_redis()


def pixels(result: dict) -> np.ndarray:
    with Image.open(result["image_path"]) as img:
        return np.asarray(img.convert("RGB"), dtype=np.int16)


def image(**fields) -> dict:
    return generate_image.delay(**{**IMAGE, **fields}).get(timeout=180)


def text(prompt: str, **fields) -> dict:
    return generate_text.delay(prompt=prompt, **TEXT, **fields).get(timeout=180)


def test_a_text_request_with_an_adapter(lora_pools) -> None:
    base = text("Once upon a time")
    first = text("Once upon a time", lora=["pirate"])
    again = text("Once upon a time", lora="pirate")
    assert first["text"] != base["text"] and again["text"] == first["text"]
    assert base["lora"] == []
    (use,) = first["lora"]
    assert use["name"] == "pirate" and use["scale"] == 1.0 and use["hit"] is False
    assert use["load_s"] > 0
    assert again["lora"][0]["hit"] is True and again["lora"][0]["load_s"] == 0.0


def test_mixed_adapters_in_one_ar_batch_keep_their_own_outputs(lora_pools) -> None:
    """Sent together, the four share vLLM's batches; each text is the one it gets alone.
    (On CPUs the request without adapters runs vLLM's zero adapter: see workers.lora.text.)"""
    variants = [[], ["pirate"], ["poet"], ["pirate", {"name": "poet", "scale": 0.5}]]
    prompt = "The harbour at dawn"
    alone = [text(prompt, lora=v)["text"] for v in variants]
    assert len(set(alone)) == 4
    for _ in range(2):
        sent = [generate_text.delay(prompt=prompt, **TEXT, lora=v) for v in variants]
        together = [r.get(timeout=180)["text"] for r in sent]
        assert together == alone


def test_an_image_with_an_adapter_and_at_scale_zero(lora_pools) -> None:
    fields = {"prompt": "a lighthouse at dusk", "seed": 11}
    base = image(**fields)
    styled = image(**fields, lora=["watercolor"])
    other = image(**fields, lora=["ink"])
    zero = image(**fields, lora=[{"name": "watercolor", "scale": 0}])
    assert not np.array_equal(pixels(styled), pixels(base))
    assert not np.array_equal(pixels(styled), pixels(other))
    # A LoRA request never reuses a base-model entry, yet at scale 0 it is the base image.
    assert zero["cache"]["latents"] == "miss"
    assert np.array_equal(pixels(zero), pixels(base))
    assert styled["lora"][0]["name"] == "watercolor" and styled["lora"][0]["hit"] in (True, False)
    repeat = image(**fields, lora=["watercolor"])  # an exact repeat: from the DiT cache
    assert repeat["cache"]["latents"] in ("hit", "shared")
    assert repeat["lora"] == [{"name": "watercolor", "scale": 1.0, "hit": None, "load_s": 0.0}]
    assert np.array_equal(pixels(repeat), pixels(styled))


def test_a_request_goes_to_the_worker_holding_its_adapter(lora_pools) -> None:
    first = image(prompt="charcoal study 1", seed=1, lora=["charcoal"])
    assert first["lora"][0]["hit"] is False
    holders = cache_directory.holders(
        get_redis(), directory_key("charcoal", get_config().diffusion.model)
    )
    assert len(holders) == 1
    holder = holders[0].worker
    assert holder in {w.hostname for w in lora_pools["diffusion"]}
    request = create_diffusion_request("charcoal study 2", seed=2, lora=["charcoal"], **IMAGE)
    route = resolve_route(request, "dit", create_policy(get_config()), get_redis())
    assert route.queue == KEYS.worker_queue(holder)
    for i in range(2, 6):  # a new prompt each time: only the adapter is known
        result = image(prompt=f"charcoal study {i}", seed=i, lora=["charcoal"])
        assert result["lora"][0]["hit"] is True
    assert (
        len(
            cache_directory.holders(
                get_redis(), directory_key("charcoal", get_config().diffusion.model)
            )
        )
        == 1
    )
    stats = cache_directory.adapter_stats(get_redis(), "diffusion")
    assert stats["hits"] >= 4 and stats["misses"] >= 1 and stats["load_s_sum"] > 0


def test_concurrent_images_with_different_adapters(lora_pools) -> None:
    sets = [[], ["watercolor"], ["ink"], ["watercolor", "ink"]]
    fields = {"prompt": "a quiet street", "seed": 3}
    alone = [pixels(image(**fields, lora=s)) for s in sets]
    with ThreadPoolExecutor(max_workers=4) as pool:
        fresh = {**fields, "seed": 4}
        together = list(pool.map(lambda s: pixels(image(**fresh, lora=s)), sets))
    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            assert not np.array_equal(alone[i], alone[j])
            assert not np.array_equal(together[i], together[j])


def test_an_unknown_adapter_is_refused_before_anything_is_sent(lora_pools) -> None:
    client = get_redis()
    before = sum(client.llen(k) for k in keys.queue_keys("diffusion"))
    with pytest.raises(RequestValidationError) as err:
        generate_image.delay(prompt="a fox", lora=["watercolor", "sepia"], **IMAGE)
    assert err.value.field == "lora.1.name" and "sepia" in str(err.value)
    with pytest.raises(RequestValidationError) as err:
        generate_text.delay(prompt="hi", lora=[{"name": "pirate", "scale": "1"}])
    assert err.value.field == "lora.0.scale"
    assert sum(client.llen(k) for k in keys.queue_keys("diffusion")) == before
