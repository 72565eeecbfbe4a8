"""Tiny random-weight SD3 / SD3.5 pipeline, saved so that
`StableDiffusion3Pipeline.from_pretrained` loads it.

Every component is the real class (SD3Transformer2DModel, AutoencoderKL with 16 latent
channels, two CLIPTextModelWithProjection encoders and a T5EncoderModel with their
tokenizers, FlowMatchEulerDiscreteScheduler) with tiny dimensions, in the layout of the
SD3.5-Medium checkpoints (query/key RMS norms, one dual-attention layer). Weights come
from fixed seeds; the tokenizers are tiny_flux's, trained on its generated corpus. The
VAE keeps SD3's 8x downsampling and the transformer its 2x2 patches, so image sizes must
be multiples of 16, as with the real model.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workers.models.atomic import build_atomically
from workers.models.building import save_pipeline, seeded_torch, tiny_t5_settings, token_ids
from workers.models.tiny_flux import _Tokenizers, _tokenizers

if TYPE_CHECKING:
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

SEED = 0
# Weights come from torch's global RNG: two builds in one process must not interleave.

# As in SD3, the two CLIP encoders differ in width (768 and 1280 there); their hidden states
# are concatenated and zero-padded to the T5 width (4096), their projections concatenated
# into the pooled vector (2048).
_CLIP_DIMS = (16, 24)
_T5_DIM = 48


def _build_pipeline(out: Path) -> None:
    """Build every component and save the pipeline to `out`."""
    from diffusers import StableDiffusion3Pipeline

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
    pipe = StableDiffusion3Pipeline(
        scheduler=_scheduler(),
        tokenizer=tokenizers.clip,
        tokenizer_2=tokenizers.clip,
        tokenizer_3=tokenizers.t5,
        **components,
    )
    _save(pipe, out, tok_dir / "clip")
    shutil.rmtree(tok_dir)


def _text_encoders(tokenizers: _Tokenizers) -> dict[str, Any]:
    """The two CLIP encoders (with projection) and the T5 encoder, in that order."""
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    clips = [
        CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=tokenizers.clip_vocab,
                hidden_size=dim,
                intermediate_size=2 * dim,
                num_hidden_layers=2,  # SD3 takes the penultimate hidden state
                num_attention_heads=4,
                max_position_embeddings=77,
                projection_dim=dim,
                **token_ids(tokenizers.clip),
            )
        )
        for dim in _CLIP_DIMS
    ]
    t5 = T5EncoderModel(T5Config(**tiny_t5_settings(tokenizers.t5_vocab, _T5_DIM, d_kv=12)))
    return {"text_encoder": clips[0], "text_encoder_2": clips[1], "text_encoder_3": t5}


def _vae() -> AutoencoderKL:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),  # 4 levels: 8x downsampling, like SD3
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=8,
        sample_size=128,
        scaling_factor=1.5305,  # SD3's
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _transformer() -> SD3Transformer2DModel:
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=16,  # the default image size is sample_size * 8 = 128
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=_T5_DIM,
        caption_projection_dim=16,  # = num_attention_heads * attention_head_dim
        pooled_projection_dim=sum(_CLIP_DIMS),
        pos_embed_max_size=64,  # latents up to 128 x 128: images up to 1024 x 1024
        dual_attention_layers=(0,),  # SD3.5 Medium's MMDiT-X blocks
        qk_norm="rms_norm",  # SD3.5's
    )


def _scheduler() -> FlowMatchEulerDiscreteScheduler:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


def _save(pipe: StableDiffusion3Pipeline, out: Path, clip_dir: Path) -> None:
    """`save_pipeline`, plus CLIP's files for transformers 4.x."""
    save_pipeline(pipe, out)
    # save_pretrained writes tokenizer.json only; keep vocab.json + merges.txt for 4.x.
    for folder in ("tokenizer", "tokenizer_2"):
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(clip_dir / name, out / folder / name)


def build_tiny_sd3(path: Path) -> Path:
    """Write the tiny SD3 pipeline to `path` once (atomically: see `workers.models.atomic`)."""
    return build_atomically(Path(path), "tiny-sd3/1", _build_pipeline)
