"""Sana (`SanaPipeline`): a linear-attention DiT on a 32x deep-compression autoencoder.

Prompts: a Gemma2 decoder's last hidden states, padded to `max_sequence_length`, with an
attention mask. A prompt is prefixed with the pipeline's "complex human instruction"
before encoding; a negative prompt is not, so the two are encoded apart (`negative`).
CFG runs whenever `guidance` > 1 (the negative prompt or ""), as two rows of one
transformer call. Latents are (channels, height / 32, width / 32) and patched by the
transformer (patch 1), so sides are multiples of 32. Resolution binning is off: a
request gets exactly its size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from workers.engines.base import ImageParams
from workers.engines.families.base import Embeds, ModelFamily, negative_kwargs, prompt_rows

if TYPE_CHECKING:
    import torch
    from PIL import Image


class SanaFamily(ModelFamily):
    name = "sana"
    pipeline = "SanaPipeline"
    image_pipeline = None
    embed_keys = ("prompt_embeds", "prompt_attention_mask")
    row_inputs = ("hidden_states", "timestep", "encoder_hidden_states", "encoder_attention_mask")
    # No diffusers cache hooks on this transformer; cache-dit wraps any block stack.
    step_caches = frozenset({"none", "cache_dit"})
    cfg_by_guidance = True

    @property
    def size_multiple(self) -> int:
        patch = int(getattr(self.pipe.transformer.config, "patch_size", 1) or 1)
        return int(self.pipe.vae_scale_factor) * patch

    @property
    def probe_text_tokens(self) -> int:  # type: ignore[override]
        return self.max_sequence_length

    def encode(
        self, prompts: Sequence[str], images: Sequence[Any] | None = None, negative: bool = False
    ) -> list[Embeds]:
        """As `SanaPipeline.__call__` encodes: prompts with its default complex human
        instruction (and its token selection), negative prompts plainly."""
        import inspect

        import torch

        with torch.no_grad():
            if negative:
                sequence, mask = self.pipe._get_gemma_prompt_embeds(
                    prompt=list(prompts),
                    device=self.device,
                    dtype=self.pipe.text_encoder.dtype,
                    max_sequence_length=self.max_sequence_length,
                    complex_human_instruction=False,
                )
            else:
                call = inspect.signature(self.pipe.__call__).parameters
                sequence, mask, _, _ = self.pipe.encode_prompt(
                    prompt=list(prompts),
                    do_classifier_free_guidance=False,
                    device=self.device,
                    max_sequence_length=self.max_sequence_length,
                    complex_human_instruction=call["complex_human_instruction"].default,
                )
        return prompt_rows(prompt_embeds=sequence, prompt_attention_mask=mask)

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
            "use_resolution_binning": False,
            "negative_prompt": None,  # its default "" would clash with the embeddings
        }
        kwargs.update(negative_kwargs(negative))
        return kwargs

    def batch_key(
        self, params: ImageParams, embeds: Embeds, image: Image.Image | None = None
    ) -> tuple[Any, ...]:
        return (self.name, params.width, params.height, self.max_sequence_length)

    def latent_shape(self, params: ImageParams) -> tuple[int, ...]:
        scale = self.pipe.vae_scale_factor
        channels = self.pipe.transformer.config.in_channels
        return (1, channels, params.height // scale, params.width // scale)

    def decode(self, latents: torch.Tensor) -> Image.Image:
        """`SanaPipeline.__call__`'s decode, without resolution binning."""
        import torch

        vae = self.pipe.vae
        with torch.no_grad():
            latents = latents.to(vae.dtype)
            image = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
            return self.pipe.image_processor.postprocess(image, output_type="pil")[0]

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
            "encoder_hidden_states": torch.zeros(rows, seq, cfg.caption_channels, **opts),
            "encoder_attention_mask": torch.ones(rows, seq, **opts),
            "timestep": torch.ones(rows, **opts),
        }
