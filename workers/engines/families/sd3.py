"""Stable Diffusion 3 / 3.5 (`StableDiffusion3Pipeline`, img2img with
`StableDiffusion3Img2ImgPipeline`).

Prompts: two CLIP encoders (pooled and sequence) and T5, all padded to fixed lengths, so
every prompt has the same text length and a batch of prompts encodes each as alone. CFG
runs whenever `guidance` > 1, with the negative prompt or "": the pipeline stacks the
negative and positive rows into one transformer call of two rows per request, which the
step loop stacks with other requests' calls. Latents are (channels, height / 8,
width / 8) images; the transformer patches them itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from workers.engines.base import ImageParams
from workers.engines.families.base import (
    Embeds,
    ModelFamily,
    image_kwargs,
    negative_kwargs,
    prompt_rows,
)
from workers.engines.families.flux import decode_scaled

if TYPE_CHECKING:
    import torch
    from PIL import Image


class SD3Family(ModelFamily):
    name = "sd3"
    pipeline = "StableDiffusion3Pipeline"
    image_pipeline = "StableDiffusion3Img2ImgPipeline"
    embed_keys = ("prompt_embeds", "pooled_prompt_embeds")
    row_inputs = ("hidden_states", "timestep", "encoder_hidden_states", "pooled_projections")
    # No diffusers cache hooks on this transformer; cache-dit wraps any block stack.
    step_caches = frozenset({"none", "cache_dit"})
    cfg_by_guidance = True

    @property
    def probe_text_tokens(self) -> int:  # type: ignore[override]
        return 77 + self.max_sequence_length  # CLIP's 77, then T5's padded length

    def encode(
        self, prompts: Sequence[str], images: Sequence[Any] | None = None, negative: bool = False
    ) -> list[Embeds]:
        """`encode_prompt` of all prompts at once, without CFG: a negative prompt is
        encoded by the same encoders as a prompt."""
        import torch

        with torch.no_grad():
            sequence, _, pooled, _ = self.pipe.encode_prompt(
                prompt=list(prompts),
                prompt_2=None,
                prompt_3=None,
                device=self.device,
                do_classifier_free_guidance=False,
                max_sequence_length=self.max_sequence_length,
            )
        return prompt_rows(prompt_embeds=sequence, pooled_prompt_embeds=pooled)

    def pipeline_kwargs(
        self,
        embeds: Embeds,
        negative: Embeds | None,
        params: ImageParams,
        true_cfg_scale: float,
        image: Image.Image | None,
    ) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            **embeds,
            "guidance_scale": params.guidance,
            "max_sequence_length": self.max_sequence_length,
        }
        kwargs.update(negative_kwargs(negative))
        kwargs.update(image_kwargs(params, image))
        return kwargs

    def batch_key(
        self, params: ImageParams, embeds: Embeds, image: Image.Image | None = None
    ) -> tuple[Any, ...]:
        # The text length is fixed; CFG changes a call's row count, not what it shares.
        return (self.name, params.width, params.height, self.probe_text_tokens)

    def latent_shape(self, params: ImageParams) -> tuple[int, ...]:
        scale = self.pipe.vae_scale_factor
        channels = self.pipe.transformer.config.in_channels
        return (1, channels, params.height // scale, params.width // scale)

    def decode(self, latents: torch.Tensor) -> Image.Image:
        return decode_scaled(self.pipe, latents)

    def probe_inputs(
        self, rows: int, params: ImageParams, opts: dict[str, Any]
    ) -> dict[str, Any] | None:
        import torch

        cfg = self.pipe.transformer.config
        _, channels, height, width = self.latent_shape(params)
        rows *= 2  # CFG: two rows per request
        seq = self.probe_text_tokens
        return {
            "hidden_states": torch.zeros(rows, channels, height, width, **opts),
            "encoder_hidden_states": torch.zeros(rows, seq, cfg.joint_attention_dim, **opts),
            "pooled_projections": torch.zeros(rows, cfg.pooled_projection_dim, **opts),
            "timestep": torch.ones(rows, **opts),
        }
