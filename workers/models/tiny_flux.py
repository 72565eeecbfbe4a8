"""Tiny random-weight Flux pipeline, saved so that `FluxPipeline.from_pretrained` loads it.

Every component is the real class (FluxTransformer2DModel, AutoencoderKL, CLIP and T5
encoders and tokenizers, FlowMatchEulerDiscreteScheduler) with tiny dimensions, so the
whole production loading and sampling path runs in well under a second per image on a CPU.
Weights come from fixed seeds; tokenizers are trained on a generated corpus because no
model hub is reachable. The VAE keeps Flux's 8x downsampling and 16 latent channels, so
image sizes must be multiples of 16, as with the real model.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workers.models.atomic import build_atomically
from workers.models.building import save_pipeline, seeded_torch, tiny_t5_settings, token_ids

if TYPE_CHECKING:
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTokenizer, T5TokenizerFast

SEED = 0
# Weights come from torch's global RNG: two builds in one process must not interleave.

# Width of the CLIP and T5 embeddings, which the transformer takes as input.
_TEXT_DIM = 32
_T5_DIM = 32

_WORDS = (
    "a an the of with in on at by and photo painting drawing render portrait landscape "
    "cat dog horse bird fish astronaut robot castle house tree forest river mountain sky "
    "sunset sunrise city night day street ocean beach flower garden red blue green yellow "
    "black white golden silver dark bright small big old new beautiful detailed soft sharp "
    "cinematic lighting style oil watercolor studio high quality riding sitting flying"
).split()
_SYLLABLES = "ka lo mi ne ru sa to vi ze pa qu ex or an ly ist ing ed er tion".split()


def _corpus(n: int = 3000) -> list[str]:
    """Deterministic prompt-like sentences plus every printable ASCII character."""
    rng = random.Random(SEED)
    lines = []
    for _ in range(n):
        words = []
        for _ in range(rng.randint(3, 14)):
            word = (
                rng.choice(_WORDS)
                if rng.random() < 0.8
                else "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3)))
            )
            words.append(word.capitalize() if rng.random() < 0.1 else word)
        lines.append(" ".join(words) + rng.choice(("", ".", ",", "!")))
    lines.append(" ".join(chr(c) for c in range(33, 127)))
    return lines


def _save_clip_tokenizer(corpus: list[str], out: Path) -> int:
    """Train a byte-level BPE with CLIP's `</w>` word suffix; returns the vocab size."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    bos, eos = "<|startoftext|>", "<|endoftext|>"
    tok = Tokenizer(models.BPE(unk_token=eos, end_of_word_suffix="</w>"))
    # Same normalizer / pre-tokenizer that CLIPTokenizer rebuilds around vocab + merges.
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    split = (
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"""
        r"""|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=[bos, eos],
        end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    model = json.loads(tok.to_str())["model"]
    # The trainer breaks count ties in hash order: ids and the order of tied merges vary
    # between runs (the set of merges does not). Canonicalize: order merges by length, then
    # text (parts are always shorter than their merge, so the order stays valid), and number
    # tokens as specials, base symbols, then merge results.
    merges = sorted(
        (tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]),
        key=lambda m: (len(m[0]) + len(m[1]), m),
    )
    merged = list(dict.fromkeys(a + b for a, b in merges))
    base = sorted(set(model["vocab"]) - set(merged) - {bos, eos})
    vocab = {token: i for i, token in enumerate([bos, eos, *base, *merged])}
    # transformers 5.x rebuilds the backend from vocab + merges (tokenizer.json); 4.x's slow
    # CLIPTokenizer reads vocab.json + merges.txt, so write those too.
    CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77).save_pretrained(out)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_txt = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (out / "merges.txt").write_text(merges_txt, encoding="utf-8")
    return len(vocab)


def _save_t5_tokenizer(corpus: list[str], out: Path, size: int = 1000) -> int:
    """Unigram pieces scored by counting (transformers 5.x's T5 class only takes Unigram).

    tokenizers' UnigramTrainer gives slightly different scores on every run; counting whole
    words and characters is deterministic and enough for a random-weight model.
    """
    from transformers import T5TokenizerFast

    words: Counter[str] = Counter()
    chars: Counter[str] = Counter()
    for line in corpus:
        for word in line.split():
            chars.update(word)
            if word.strip(".,!").isalpha():
                words["\u2581" + word.strip(".,!")] += 1
    pieces = sorted(chars.items(), key=lambda kv: (-kv[1], kv[0]))
    pieces += sorted(words.items(), key=lambda kv: (-kv[1], kv[0]))[: size - 4 - len(pieces)]
    total = sum(count for _, count in pieces)
    # A bare word-start piece is rare, so that "▁word" beats "▁" + "word" pieces.
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -math.log(total))]
    vocab += [(p, round(math.log(count / total), 6)) for p, count in pieces]
    T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512).save_pretrained(out)
    return len(vocab)


def _build_pipeline(out: Path) -> None:
    """Build every component and save the pipeline to `out`."""
    from diffusers import FluxPipeline

    tok_dir = out / "_tokenizers"
    tokenizers = _tokenizers(tok_dir)
    # One RNG stream for all weights: the build order below is part of the format.
    with seeded_torch(SEED):
        components: dict[str, Any] = {
            **_text_encoders(tokenizers),
            "vae": _vae(),
            "transformer": _transformer(),
        }
    for module in components.values():
        module.eval()
    pipe = FluxPipeline(
        scheduler=_scheduler(),
        tokenizer=tokenizers.clip,
        tokenizer_2=tokenizers.t5,
        **components,
    )
    _save(pipe, out, tok_dir / "clip")
    shutil.rmtree(tok_dir)


@dataclass(frozen=True)
class _Tokenizers:
    clip: CLIPTokenizer
    t5: T5TokenizerFast
    clip_vocab: int
    t5_vocab: int


def _tokenizers(tok_dir: Path) -> _Tokenizers:
    """Train both tokenizers on one corpus, save them under `tok_dir` and load them back."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    corpus = _corpus()
    clip_vocab = _save_clip_tokenizer(corpus, tok_dir / "clip")
    t5_vocab = _save_t5_tokenizer(corpus, tok_dir / "t5")
    return _Tokenizers(
        clip=CLIPTokenizer.from_pretrained(tok_dir / "clip"),
        t5=T5TokenizerFast.from_pretrained(tok_dir / "t5"),
        clip_vocab=clip_vocab,
        t5_vocab=t5_vocab,
    )


def _text_encoders(tokenizers: _Tokenizers) -> dict[str, Any]:
    """The CLIP (pooled) and T5 (sequence) text encoders, in that order."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=tokenizers.clip_vocab,
            hidden_size=_TEXT_DIM,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=_TEXT_DIM,
            **token_ids(tokenizers.clip),
        )
    )
    t5 = T5EncoderModel(T5Config(**tiny_t5_settings(tokenizers.t5_vocab, _T5_DIM, d_kv=8)))
    return {"text_encoder": clip, "text_encoder_2": t5}


def _vae() -> AutoencoderKL:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),  # 4 levels: 8x downsampling, like Flux
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=8,
        sample_size=128,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _transformer() -> FluxTransformer2DModel:
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels packed 2x2
        num_layers=2,
        num_single_layers=4,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_T5_DIM,
        pooled_projection_dim=_TEXT_DIM,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
    )


def _scheduler() -> FlowMatchEulerDiscreteScheduler:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def _save(pipe: FluxPipeline, out: Path, clip_dir: Path) -> None:
    """`save_pipeline`, plus CLIP's files for transformers 4.x."""
    save_pipeline(pipe, out)
    # save_pretrained writes tokenizer.json only; keep vocab.json + merges.txt for 4.x.
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(clip_dir / name, out / "tokenizer" / name)


def build_tiny_flux(path: Path) -> Path:
    """Write the tiny Flux pipeline to `path` once (atomically: see `workers.models.atomic`)."""
    return build_atomically(Path(path), "tiny-flux/1", _build_pipeline)
