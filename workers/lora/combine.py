"""PEFT adapter folders made on the worker: several adapters at their scales as one, and
the zero adapter.

vLLM runs one LoRA per request, at scale 1. A request that names several adapters, or
one at another scale, runs one combined adapter whose delta is exactly theirs:
`sum_i scale_i * B_i A_i * alpha_i / r_i`. Each module stacks the adapters' factors,
`A = [A_1; A_2; ...]` and `B = [s_1 B_1, s_2 B_2, ...]` with `s_i` the scale times the
adapter's own scaling, so the rank is the sum of theirs and `lora_alpha = r` (scaling 1).
A module that one adapter lacks gets zeros in its rows. Built once per (folders, scales)
under `models_dir/.lora-combined/`, atomically (`workers.models.atomic`).

The zero adapter (`zero_adapter`): rank 1, all zeros, for one linear layer of the model.
On CPUs the AR pool gives it to requests without adapters (see `workers.lora.text`).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from omni_tasks.errors import ProcessingError
from workers.models.atomic import build_atomically

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT = "lora-combined/1"
_REFUSED = ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern", "layers_pattern")


def read_config(folder: Path) -> dict[str, Any]:
    """A PEFT LoRA adapter's config; ProcessingError for anything else."""
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise ProcessingError(f"{folder} is not a PEFT adapter folder: {exc}") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise ProcessingError(f"{folder} is a {config['peft_type']} adapter, not LoRA")
    return config


def adapter_rank(folder: Path) -> int:
    return int(read_config(folder)["r"])


def combined(parts: list[tuple[Path, float]], root: Path) -> Path:
    """The folder of the adapter equal to `parts` (folder, scale) together."""
    for folder, _ in parts:
        _combinable(folder)  # refused before anything is built
    identity = [(str(p), (p / WEIGHTS_FILE).stat().st_mtime_ns, s) for p, s in parts]
    digest = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:24]
    return build_atomically(root / digest, FORMAT, lambda out: _write_combined(parts, out))


def _write_combined(parts: list[tuple[Path, float]], out: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    configs = [_combinable(folder) for folder, _ in parts]
    weights = [load_file(str(folder / WEIGHTS_FILE)) for folder, _ in parts]
    ranks = [int(c["r"]) for c in configs]
    total = sum(ranks)
    modules = sorted({k.rsplit(".lora_", 1)[0] for w in weights for k in w})
    tensors: dict[str, torch.Tensor] = {}
    for module in modules:
        a_key, b_key = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
        have = [i for i, w in enumerate(weights) if a_key in w]
        a_in = weights[have[0]][a_key].shape[1]
        b_out = weights[have[0]][b_key].shape[0]
        a = torch.zeros(total, a_in, dtype=torch.float32)
        b = torch.zeros(b_out, total, dtype=torch.float32)
        offset = 0
        for i, rank in enumerate(ranks):
            if i in have:
                factor = parts[i][1] * _scaling(configs[i])
                a[offset : offset + rank] = weights[i][a_key].float()
                b[:, offset : offset + rank] = weights[i][b_key].float() * factor
            offset += rank
        tensors[a_key], tensors[b_key] = a, b
    config = {**configs[0], "r": total, "lora_alpha": total, "use_rslora": False}
    config["target_modules"] = sorted({m.rsplit(".", 1)[-1] for m in modules})
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_FILE))
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))


def _combinable(folder: Path) -> dict[str, Any]:
    config = read_config(folder)
    if not (folder / WEIGHTS_FILE).is_file():
        raise ProcessingError(f"{folder} has no {WEIGHTS_FILE}")
    refused = [k for k in _REFUSED if config.get(k)]
    if refused:
        raise ProcessingError(f"{folder}: adapters with {refused[0]} cannot be combined")
    return config


def _scaling(config: dict[str, Any]) -> float:
    rank, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def zero_adapter(model_dir: Path, root: Path) -> Path:
    """A rank-1 adapter of zeros for the causal LM at `model_dir` (no weights are read:
    the model is built on the meta device to learn its first linear layer's shape)."""
    digest = hashlib.sha256(str(Path(model_dir).resolve()).encode()).hexdigest()[:24]
    return build_atomically(
        root / f"zero-{digest}", FORMAT, lambda out: _write_zero(Path(model_dir), out)
    )


def _write_zero(model_dir: Path, out: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    linear = next(
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and "lm_head" not in name
    )
    config = LoraConfig(r=1, lora_alpha=1, target_modules=[linear.rsplit(".", 1)[-1]])
    peft_model = get_peft_model(model, config)
    state = get_peft_model_state_dict(peft_model)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: torch.zeros(v.shape) for k, v in state.items()}, str(out / WEIGHTS_FILE))
    peft_model.peft_config["default"].save_pretrained(str(out))
