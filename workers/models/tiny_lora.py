"""Tiny random LoRA adapters for the tiny Llama and the tiny diffusion models, saved in
the standard formats so that workers load them with the real loading code.

A name says what to build: `<tiny model>-lora-<style>` (`tiny-flux-lora-ink`,
`tiny-sd3-lora-ink`, `tiny-qwen-image-lora-ink`, `tiny-qwen-image-edit-lora-ink`,
`tiny-sana-lora-ink`, `tiny-wan-lora-ink`, `tiny-llama-lora-pirate`); the style seeds
the weights, so every host builds the same adapter for the same name.

- Diffusion models: PEFT `LoraConfig` on the transformer's attention projections, saved
  with the pipeline class's `save_lora_weights` (`pytorch_lora_weights.safetensors`,
  keys under `transformer.`), which diffusers' `load_lora_weights` reads back.
- Llama: `get_peft_model(...).save_pretrained` (`adapter_config.json` +
  `adapter_model.safetensors`), which vLLM's `LoRARequest` and PEFT read.

PEFT's usual init makes `lora_B` zero (a delta of nothing); here both factors are drawn
at random and `lora_B` is scaled up (`DELTA_GAIN`), so an adapter visibly changes what
the base model makes: another style of noise, or other words.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from workers.models.atomic import build_atomically
from workers.models.building import seeded_torch

FORMAT_VERSION = 1
FLUX_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj")
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: Tiny diffusion model -> (pipeline class, transformer class, LoRA target modules).
DIFFUSION_BASES = {
    "tiny-flux": ("FluxPipeline", "FluxTransformer2DModel", FLUX_TARGETS),
    "tiny-sd3": ("StableDiffusion3Pipeline", "SD3Transformer2DModel", FLUX_TARGETS),
    "tiny-qwen-image": ("QwenImagePipeline", "QwenImageTransformer2DModel", FLUX_TARGETS),
    "tiny-qwen-image-edit": ("QwenImageEditPipeline", "QwenImageTransformer2DModel", FLUX_TARGETS),
    "tiny-sana": ("SanaPipeline", "SanaTransformer2DModel", ("to_q", "to_k", "to_v")),
    "tiny-wan": ("WanPipeline", "WanTransformer3DModel", ("to_q", "to_k", "to_v", "to_out.0")),
}
#: Adapter-name prefix -> the tiny base model it adapts.
PREFIXES = {f"{base}-lora-": base for base in (*DIFFUSION_BASES, "tiny-llama")}
RANKS = {"tiny-llama": 8}
DELTA_GAIN = {"tiny-llama": 1.0}
DIFFUSION_RANK, DIFFUSION_GAIN = 4, 4.0


def tiny_lora_base(name: str) -> str | None:
    """The tiny base model a tiny adapter name adapts (None: not a tiny adapter name)."""
    for prefix, base in PREFIXES.items():
        if name.startswith(prefix) and len(name) > len(prefix):
            return base
    return None


def build_tiny_lora(name: str, path: Path, base_dir: Path) -> Path:
    """Build tiny adapter `name` at `path` for the tiny base model at `base_dir`, unless a
    complete one is there (atomically: see `workers.models.atomic`)."""
    base = tiny_lora_base(name)
    if base is None:
        known = ", ".join(f"{p}<style>" for p in PREFIXES)
        raise ValueError(f"{name!r} is not a tiny adapter name; use {known}")
    seed = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)
    if base == "tiny-llama":
        write = functools.partial(_write_llama, Path(base_dir), seed=seed)
    else:
        write = functools.partial(_write_diffusion, base, Path(base_dir), seed=seed)
    return build_atomically(Path(path), f"tiny-lora/{FORMAT_VERSION}", write)


def _peft_config(rank: int, targets: tuple[str, ...]):  # noqa: ANN202 - peft's LoraConfig
    from peft import LoraConfig

    return LoraConfig(
        r=rank, lora_alpha=rank, target_modules=list(targets), init_lora_weights=False
    )


def _scale_deltas(module, gain: float) -> None:  # noqa: ANN001 - any torch module
    import torch

    with torch.no_grad():
        for name, param in module.named_parameters():
            if "lora_B" in name:
                param.mul_(gain)


def _write_diffusion(base: str, base_dir: Path, out: Path, *, seed: int) -> None:
    import diffusers
    from peft import get_peft_model_state_dict

    pipeline, model, targets = DIFFUSION_BASES[base]
    transformer = getattr(diffusers, model).from_pretrained(base_dir, subfolder="transformer")
    with seeded_torch(seed):
        transformer.add_adapter(_peft_config(DIFFUSION_RANK, targets))
    _scale_deltas(transformer, DIFFUSION_GAIN)
    layers = get_peft_model_state_dict(transformer)
    out.mkdir(parents=True, exist_ok=True)
    getattr(diffusers, pipeline).save_lora_weights(out, transformer_lora_layers=layers)


def _write_llama(base_dir: Path, out: Path, *, seed: int) -> None:
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with seeded_torch(seed):
        peft_model = get_peft_model(model, _peft_config(RANKS["tiny-llama"], LLAMA_TARGETS))
    _scale_deltas(peft_model, DELTA_GAIN["tiny-llama"])
    peft_model.peft_config["default"].base_model_name_or_path = "tiny-llama"
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out, save_embedding_layers=False)  # no hub lookup
    (out / "README.md").unlink(missing_ok=True)  # PEFT's model-card template
