"""What the tiny-model builders share: a seeded torch RNG and the token ids configs take."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def seeded_torch(seed: int) -> Iterator[None]:
    """Torch's global RNG seeded with `seed` meanwhile, the caller's state restored after.

    Module constructors draw from the global RNG, so weights depend on the order they are
    built in; `workers.models.atomic` serializes builds in one process for the same reason.
    """
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def save_pipeline(pipe: Any, out: Path) -> None:
    """`pipe.save_pretrained(out)` in safetensors, without transformers' progress bars
    ("Writing model shards" per component) or diffusers' warnings (a component left out
    on purpose, such as an edit pipeline's processor, saved apart)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        pipe.save_pretrained(out, safe_serialization=True)
    finally:
        diffusers_logging.set_verbosity(verbosity)
        if bars:
            transformers_logging.enable_progress_bar()


def token_ids(tokenizer: Any) -> dict[str, int | None]:
    """A tokenizer's BOS / EOS / pad ids, as model and generation configs name them."""
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def tiny_t5_settings(vocab_size: int, d_model: int, d_kv: int) -> dict[str, Any]:
    """The settings of the tiny T5-style text encoders (Flux's and SD3's T5, Wan's
    UMT5): two layers of four heads, gated GELU, no dropout, T5's special ids."""
    return {
        "vocab_size": vocab_size,
        "d_model": d_model,
        "d_kv": d_kv,
        "d_ff": 64,
        "num_layers": 2,
        "num_heads": 4,
        "relative_attention_num_buckets": 8,
        "dropout_rate": 0.0,
        "feed_forward_proj": "gated-gelu",
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
    }
