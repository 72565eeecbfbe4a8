"""What the tiny-model builders share: a seeded torch RNG and the token ids configs take."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
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


def token_ids(tokenizer: Any) -> dict[str, int | None]:
    """A tokenizer's BOS / EOS / pad ids, as model and generation configs name them."""
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
