"""Adapter folders the workers make: tiny adapters in the standard formats, several
adapters at their scales as one exact PEFT adapter, and the zero adapter."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from omni_tasks.errors import ProcessingError
from workers.lora.combine import combined, zero_adapter
from workers.models.tiny_lora import build_tiny_lora, tiny_lora_base


def delta(folder: Path, module: str) -> torch.Tensor:
    """B @ A * lora_alpha / r of one module: what the adapter adds to its weight."""
    config = json.loads((folder / "adapter_config.json").read_text())
    weights = load_file(str(folder / "adapter_model.safetensors"))
    a, b = weights[f"{module}.lora_A.weight"], weights[f"{module}.lora_B.weight"]
    return b @ a * (config["lora_alpha"] / config["r"])


@pytest.fixture(scope="module")
def adapters(tiny_models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-loras")
    names = ("tiny-llama-lora-pirate", "tiny-llama-lora-poet", "tiny-flux-lora-ink")
    return {n: build_tiny_lora(n, root / n, tiny_models[tiny_lora_base(n)]) for n in names}


def test_tiny_adapters_are_saved_in_the_standard_formats(adapters, tiny_models, tmp_path) -> None:
    llama, flux = adapters["tiny-llama-lora-pirate"], adapters["tiny-flux-lora-ink"]
    config = json.loads((llama / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    assert config["base_model_name_or_path"] == "tiny-llama"
    keys = load_file(str(flux / "pytorch_lora_weights.safetensors"))
    assert keys and all(k.startswith("transformer.") and ".lora_" in k for k in keys)
    # The style seeds the weights: another build of the same name is the same adapter.
    again = build_tiny_lora("tiny-flux-lora-ink", tmp_path / "ink", tiny_models["tiny-flux"])
    assert (again / "pytorch_lora_weights.safetensors").read_bytes() == (
        flux / "pytorch_lora_weights.safetensors"
    ).read_bytes()
    with pytest.raises(ValueError, match="not a tiny adapter name"):
        build_tiny_lora("tiny-sd-lora-x", tmp_path / "x", tmp_path)


def test_a_combined_adapter_adds_the_scaled_deltas_exactly(adapters, tmp_path) -> None:
    pirate, poet = adapters["tiny-llama-lora-pirate"], adapters["tiny-llama-lora-poet"]
    both = combined([(pirate, 1.0), (poet, -0.5)], tmp_path)
    config = json.loads((both / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["lora_alpha"] == 16
    assert combined([(pirate, 1.0), (poet, -0.5)], tmp_path) == both  # built once
    modules = {
        k.rsplit(".lora_", 1)[0] for k in load_file(str(pirate / "adapter_model.safetensors"))
    }
    assert len(modules) == 14  # 7 projections x 2 layers
    for module in modules:
        want = delta(pirate, module) - 0.5 * delta(poet, module)
        assert torch.allclose(delta(both, module), want, atol=1e-6)
    scaled = combined([(poet, 2.0)], tmp_path)
    module = sorted(modules)[0]
    assert torch.allclose(delta(scaled, module), 2 * delta(poet, module), atol=1e-6)


def test_adapters_that_cannot_be_combined_are_refused(adapters, tmp_path) -> None:
    dora = tmp_path / "dora"
    dora.mkdir()
    pirate = adapters["tiny-llama-lora-pirate"]
    config = json.loads((pirate / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    (dora / "adapter_model.safetensors").write_bytes(
        (pirate / "adapter_model.safetensors").read_bytes()
    )
    with pytest.raises(ProcessingError, match="use_dora cannot be combined"):
        combined([(pirate, 1.0), (dora, 1.0)], tmp_path / "out")
    with pytest.raises(ProcessingError, match="not a PEFT adapter folder"):
        combined([(adapters["tiny-flux-lora-ink"], 0.5)], tmp_path / "out")


def test_the_zero_adapter_is_rank_one_and_all_zeros(tiny_llama_dir, tmp_path) -> None:
    folder = zero_adapter(tiny_llama_dir, tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    weights = load_file(str(folder / "adapter_model.safetensors"))
    assert config["r"] == 1 and weights
    assert all(not t.any() for t in weights.values())
    assert math.prod(next(iter(weights.values())).shape) > 0
