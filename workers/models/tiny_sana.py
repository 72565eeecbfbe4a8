"""Tiny random-weight Sana pipeline, saved so that `SanaPipeline.from_pretrained` loads it.

Every component is the real class (SanaTransformer2DModel, AutoencoderDC, a Gemma2Model
text encoder with a GemmaTokenizer, DPMSolverMultistepScheduler on flow sigmas, as the
Sana checkpoints ship it) with tiny dimensions, so the whole production loading and
sampling path runs in well under a second per image on a CPU. Weights come from fixed
seeds; the tokenizer is a byte-fallback BPE learned from tiny_flux's generated corpus
because no model hub is reachable. The DC-AE keeps Sana's 32x downsampling and 32 latent
channels, so image sizes must be multiples of 32, as with the real model.

Resolution binning: `SanaPipeline` defaults to `use_resolution_binning=True`, which maps a
requested size to the nearest entry of an aspect-ratio table chosen by the transformer's
`sample_size` (16 here, Sana-600M/1600M-512px's: the 512-px table), generates at that
size and resizes the result. Callers wanting exactly the requested size in one pass set
`use_resolution_binning=False`.
"""

from __future__ import annotations

import shutil
from collections import Counter
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workers.models.atomic import build_atomically
from workers.models.building import save_pipeline, seeded_torch, token_ids
from workers.models.tiny_flux import _corpus

if TYPE_CHECKING:
    from diffusers import (
        AutoencoderDC,
        DPMSolverMultistepScheduler,
        SanaTransformer2DModel,
    )
    from transformers import Gemma2Model, GemmaTokenizer

SEED = 0
# Weights come from torch's global RNG: two builds in one process must not interleave.

# Width of the Gemma hidden states, which the transformer takes as caption input (2304).
_TEXT_DIM = 32
_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")  # Gemma's ids 0..4
_SPACE = "\u2581"  # GemmaTokenizer's normalizer turns every " " into "▁"


def _learn_merges(corpus: list[str], n_merges: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Byte-pair merges learned from `corpus`, deterministically; returns (symbols, merges).

    GemmaTokenizer applies BPE to the whole normalized prompt ("a▁red▁fox"); the merges are
    learned on its words ("a", "▁red", "▁fox"), so none spans two words. Pairs are ranked by
    count, then text: unlike tokenizers' BpeTrainer, whose ties follow hash order, every run
    learns the same merges in the same order. Prompts are lowercased first, as Sana does.
    """
    units: Counter[str] = Counter()
    for line in corpus:
        first, *rest = line.lower().split(" ")
        units.update([first, *(_SPACE + word for word in rest)])
    words = [list(unit) for unit in units]
    freqs = list(units.values())
    symbols = sorted({ch for unit in units for ch in unit})

    pairs: Counter[tuple[str, str]] = Counter()
    where: dict[tuple[str, str], set[int]] = {}
    for i, word in enumerate(words):
        for pair in pairwise(word):
            pairs[pair] += freqs[i]
            where.setdefault(pair, set()).add(i)

    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges and pairs:
        best = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[best] < 2:
            break
        merges.append(best)
        a, b = best
        for i in sorted(where.pop(best, ())):
            word = words[i]
            for pair in pairwise(word):
                pairs[pair] -= freqs[i]
                if pairs[pair] <= 0:
                    del pairs[pair]
            merged, j = [], 0
            while j < len(word):
                if j + 1 < len(word) and word[j] == a and word[j + 1] == b:
                    merged.append(a + b)
                    j += 2
                else:
                    merged.append(word[j])
                    j += 1
            words[i] = merged
            for pair in pairwise(merged):
                pairs[pair] += freqs[i]
                where.setdefault(pair, set()).add(i)
    return symbols, merges


def _save_gemma_tokenizer(corpus: list[str], out: Path, n_merges: int = 700) -> int:
    """A GemmaTokenizer (BPE with byte fallback, BOS added); returns the vocab size."""
    from transformers import GemmaTokenizer

    symbols, merges = _learn_merges(corpus, n_merges)
    # Like Gemma's: specials, the 256 byte-fallback tokens, then characters and merges.
    tokens = [*_SPECIALS, *(f"<0x{b:02X}>" for b in range(256)), *symbols]
    tokens += [a + b for a, b in merges]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    GemmaTokenizer(
        vocab=vocab, merges=merges, add_bos_token=True, model_max_length=8192
    ).save_pretrained(out)
    return len(vocab)


def _build_pipeline(out: Path) -> None:
    """Build every component and save the pipeline to `out`."""
    from diffusers import SanaPipeline
    from transformers import GemmaTokenizer

    tok_dir = out / "_tokenizer"
    vocab_size = _save_gemma_tokenizer(_corpus(), tok_dir)
    tokenizer = GemmaTokenizer.from_pretrained(tok_dir)
    # One RNG stream for all weights: the build order below is part of the format.
    with seeded_torch(SEED):
        components: dict[str, Any] = {
            "text_encoder": _text_encoder(tokenizer, vocab_size),
            "vae": _vae(),
            "transformer": _transformer(),
        }
    for module in components.values():
        module.eval()
    pipe = SanaPipeline(scheduler=_scheduler(), tokenizer=tokenizer, **components)
    save_pipeline(pipe, out)
    shutil.rmtree(tok_dir)


def _text_encoder(tokenizer: GemmaTokenizer, vocab_size: int) -> Gemma2Model:
    from transformers import Gemma2Config, Gemma2Model

    return Gemma2Model(
        Gemma2Config(
            vocab_size=vocab_size,
            hidden_size=_TEXT_DIM,
            intermediate_size=64,
            num_hidden_layers=2,  # one sliding-window and one full-attention layer
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            query_pre_attn_scalar=16,
            **token_ids(tokenizer),
        )
    )


def _vae() -> AutoencoderDC:
    from diffusers import AutoencoderDC

    # DC-AE f32c32 as in Sana: 6 levels (32x downsampling), ResBlocks then EfficientViT
    # blocks, batch norm / ReLU in the decoder's first levels and RMS norm / SiLU after.
    res, vit = ("ResBlock",) * 3, ("EfficientViTBlock",) * 3
    return AutoencoderDC(
        in_channels=3,
        latent_channels=32,
        attention_head_dim=8,
        encoder_block_types=res + vit,
        decoder_block_types=res + vit,
        encoder_block_out_channels=(8, 8, 16, 16, 32, 32),
        decoder_block_out_channels=(8, 8, 16, 16, 32, 32),
        encoder_layers_per_block=(1,) * 6,
        decoder_layers_per_block=(1,) * 6,
        encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
        decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
        upsample_block_type="interpolate",
        downsample_block_type="Conv",
        decoder_norm_types=("batch_norm",) * 3 + ("rms_norm",) * 3,
        decoder_act_fns=("relu",) * 3 + ("silu",) * 3,
        scaling_factor=0.41407,  # Sana's
    )


def _transformer() -> SanaTransformer2DModel:
    from diffusers import SanaTransformer2DModel

    return SanaTransformer2DModel(
        in_channels=32,
        out_channels=32,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        num_cross_attention_heads=2,
        cross_attention_head_dim=16,
        cross_attention_dim=32,  # = num_attention_heads * attention_head_dim
        caption_channels=_TEXT_DIM,
        mlp_ratio=2.5,
        sample_size=16,  # resolution binning uses the 512-px aspect-ratio table
        patch_size=1,
    )


def _scheduler() -> DPMSolverMultistepScheduler:
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=3.0,
        solver_order=2,
    )


def build_tiny_sana(path: Path) -> Path:
    """Write the tiny Sana pipeline to `path` once (atomically: see `workers.models.atomic`)."""
    return build_atomically(Path(path), "tiny-sana/1", _build_pipeline)
