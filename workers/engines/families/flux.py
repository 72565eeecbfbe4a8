"""Flux (FLUX.1 schnell / dev, `FluxPipeline`, img2img with `FluxImg2ImgPipeline`).

Prompts: CLIP's pooled embedding plus T5's sequence, both padded to fixed lengths, so a
batch of prompts encodes each as it would be alone. Latents are packed 2x2 into tokens;
the transformer's rows are the hidden states, timestep, guidance and both embeddings,
while `txt_ids` and `img_ids` depend only on the size and text length (the batch key).
True CFG (a negative prompt with `true_cfg_scale` > 1) runs a second transformer call
per step with the negative embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from workers.engines.base import ImageParams
from workers.engines.families.base import (
    ALL_STEP_CACHES,
    Embeds,
    ModelFamily,
    image_kwargs,
    negative_kwargs,
    prompt_rows,
)

if TYPE_CHECKING:
    import torch
    from PIL import Image


class FluxFamily(ModelFamily):
    name = "flux"
    pipeline = "FluxPipeline"
    image_pipeline = "FluxImg2ImgPipeline"
    embed_keys = ("prompt_embeds", "pooled_prompt_embeds")
    row_inputs = (
        "hidden_states",
        "timestep",
        "guidance",
        "pooled_projections",
        "encoder_hidden_states",
    )
    step_caches = ALL_STEP_CACHES

    @property
    def probe_text_tokens(self) -> int:  # type: ignore[override]
        return self.max_sequence_length  # T5 pads every prompt to it

    def encode(
        self, prompts: Sequence[str], images: Sequence[Any] | None = None, negative: bool = False
    ) -> list[Embeds]:
        """`FluxPipeline.encode_prompt` of all prompts at once."""
        import torch

        with torch.no_grad():
            sequence, pooled, _ = self.pipe.encode_prompt(
                prompt=list(prompts),
                prompt_2=None,
                device=self.device,
                num_images_per_prompt=1,
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
        if negative is not None:
            kwargs.update(negative_kwargs(negative), true_cfg_scale=true_cfg_scale)
        kwargs.update(image_kwargs(params, image))
        return kwargs

    def batch_key(
        self, params: ImageParams, embeds: Embeds, image: Image.Image | None = None
    ) -> tuple[Any, ...]:
        return (self.name, params.width, params.height, self.max_sequence_length)

    def latent_shape(self, params: ImageParams) -> tuple[int, ...]:
        scale = self.pipe.vae_scale_factor
        channels = self.pipe.transformer.config.in_channels // 4
        return (1, channels, params.height // scale, params.width // scale)

    def unpack(self, latents: torch.Tensor, params: ImageParams) -> torch.Tensor:
        """Packed tokens back to (1, channels, height / 8, width / 8)."""
        from diffusers import FluxPipeline

        return FluxPipeline._unpack_latents(
            latents, params.height, params.width, self.pipe.vae_scale_factor
        )

    def decode(self, latents: torch.Tensor) -> Image.Image:
        """`FluxPipeline.__call__`'s decode of unpacked latents, step by step."""
        return decode_scaled(self.pipe, latents)

    def probe_inputs(
        self, rows: int, params: ImageParams, opts: dict[str, Any]
    ) -> dict[str, Any] | None:
        import torch

        cfg = self.pipe.transformer.config
        tokens = (params.width // self.size_multiple) * (params.height // self.size_multiple)
        seq = self.probe_text_tokens
        guided = bool(cfg.guidance_embeds)
        return {
            "hidden_states": torch.zeros(rows, tokens, cfg.in_channels, **opts),
            "encoder_hidden_states": torch.zeros(rows, seq, cfg.joint_attention_dim, **opts),
            "pooled_projections": torch.zeros(rows, cfg.pooled_projection_dim, **opts),
            "timestep": torch.ones(rows, **opts),
            "guidance": torch.full((rows,), 3.5, **opts) if guided else None,
            "txt_ids": torch.zeros(seq, 3, **opts),
            "img_ids": torch.zeros(tokens, 3, **opts),
        }


def decode_scaled(pipe: Any, latents: torch.Tensor) -> Image.Image:
    """A 2D-latent pipeline's decode: undo the VAE's scaling (and shift, where it has one),
    `vae.decode`, then the pipeline's image postprocessing."""
    import torch
    from diffusers.utils.torch_utils import get_module_execution_device

    vae = pipe.vae
    with torch.no_grad():
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        latents = (latents / vae.config.scaling_factor) + shift
        latents = latents.to(get_module_execution_device(vae))
        image = vae.decode(latents, return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="pil")[0]
