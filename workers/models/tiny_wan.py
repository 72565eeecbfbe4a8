"""Tiny random-weight Wan 2.1 pipelines, saved so that `WanPipeline.from_pretrained`
(`tiny-wan`, text-to-video) and `WanImageToVideoPipeline.from_pretrained`
(`tiny-wan-i2v`, image-to-video) load them.

Every component is the real class with tiny dimensions: `WanTransformer3DModel` (1x2x2
patches, query/key RMS norms across heads), `AutoencoderKLWan` (the causal 3D VAE:
8x spatial and 4x temporal compression, so a video has 4k+1 frames and sides that are
multiples of 16, as with the real model), a `UMT5EncoderModel` with tiny_flux's T5
tokenizer, and `UniPCMultistepScheduler` with Wan's flow shift. The image-to-video
pipeline adds a `CLIPVisionModel` image encoder with its processor, and a transformer
that takes the image's VAE latents beside the noise (36 input channels) and the CLIP
image embedding through its added cross-attention. Weights come from fixed seeds.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workers.models.atomic import build_atomically
from workers.models.building import save_pipeline, seeded_torch, tiny_t5_settings
from workers.models.tiny_flux import _tokenizers

if TYPE_CHECKING:
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

SEED = 0
_TEXT_DIM = 32
_IMAGE_DIM = 16
_LATENT_CHANNELS = 16
#: The Wan 2.1 shift for 480p (5.0 is its 720p one).
_FLOW_SHIFT = 3.0
#: The text encoder's padded prompt length (Wan's is 512; the pipeline default 226).
MAX_SEQUENCE_LENGTH = 64


def _text_encoder(vocab: int) -> Any:
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(UMT5Config(**tiny_t5_settings(vocab, _TEXT_DIM, d_kv=8)))


def _vae() -> AutoencoderKLWan:
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(
        base_dim=8,
        z_dim=_LATENT_CHANNELS,
        dim_mult=[1, 1, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],  # 4x in time, 8x in space
    )


def _transformer(image: bool) -> WanTransformer3DModel:
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        # image-to-video: the noise, then the image's latents and their frame mask (4)
        in_channels=2 * _LATENT_CHANNELS + 4 if image else _LATENT_CHANNELS,
        out_channels=_LATENT_CHANNELS,
        text_dim=_TEXT_DIM,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        image_dim=_IMAGE_DIM if image else None,
    )


def _image_encoder() -> Any:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    return CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=_IMAGE_DIM,
            projection_dim=_IMAGE_DIM,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            intermediate_size=32,
            patch_size=8,
        )
    )


def _scheduler() -> Any:
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        num_train_timesteps=1000,
        flow_shift=_FLOW_SHIFT,
    )


def _build(out: Path, image: bool) -> None:
    """Build every component and save the pipeline to `out`."""
    from diffusers import WanImageToVideoPipeline, WanPipeline

    tok_dir = out / "_tokenizers"
    tokenizers = _tokenizers(tok_dir)
    # One RNG stream for all weights: the build order below is part of the format.
    with seeded_torch(SEED):
        components: dict[str, Any] = {
            "text_encoder": _text_encoder(tokenizers.t5_vocab),
            "vae": _vae(),
            "transformer": _transformer(image),
        }
        if image:
            components["image_encoder"] = _image_encoder()
    for module in components.values():
        module.eval()
    if image:
        from transformers import CLIPImageProcessor

        components["image_processor"] = CLIPImageProcessor(crop_size=32, size=32)
        pipe = WanImageToVideoPipeline(
            tokenizer=tokenizers.t5, scheduler=_scheduler(), **components
        )
    else:
        pipe = WanPipeline(tokenizer=tokenizers.t5, scheduler=_scheduler(), **components)
    save_pipeline(pipe, out)
    shutil.rmtree(tok_dir)


def build_tiny_wan(path: Path) -> Path:
    """Write the tiny text-to-video Wan pipeline to `path` once (atomically)."""
    return build_atomically(Path(path), "tiny-wan/1", lambda out: _build(out, image=False))


def build_tiny_wan_i2v(path: Path) -> Path:
    """Write the tiny image-to-video Wan pipeline to `path` once (atomically)."""
    return build_atomically(Path(path), "tiny-wan-i2v/1", lambda out: _build(out, image=True))
