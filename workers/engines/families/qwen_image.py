"""Qwen-Image (`QwenImagePipeline`, img2img with `QwenImageImg2ImgPipeline`).

This module is the worked example of a family: everything a new family writes.

- **Prompts** go through the Qwen2.5-VL text encoder inside a chat template; the pipeline
  drops the template's tokens and keeps each prompt's own, so prompts have different
  lengths. `encode` cuts each prompt's rows out of a padded batch at its own length, with
  an all-ones mask: what the prompt gives alone. Prompts of different lengths still
  share a step: `align_rows` pads each call's text to the longest with a zero mask,
  which the transformer's attention honours (rows as alone, to float rounding).
- **Denoising**: latents are packed 2x2 into tokens. A transformer call's rows are the
  hidden states, timestep, text embeddings and their mask, plus `img_shapes`, a Python
  list with one entry per row; `guidance` is None unless the checkpoint is
  guidance-distilled. True CFG (a negative prompt, `true_cfg_scale` > 1) makes a second
  call per step with the negative embeddings.
- **Latents** are 5D (a frame axis of 1) and normalized by the VAE's per-channel mean and
  std, which `decode` undoes before `vae.decode`, as the pipeline does.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Any

from workers.engines.base import ImageParams
from workers.engines.families.base import (
    ALL_STEP_CACHES,
    Embeds,
    ModelFamily,
    image_kwargs,
    negative_kwargs,
)

if TYPE_CHECKING:
    import torch
    from PIL import Image


class QwenImageFamily(ModelFamily):
    name = "qwen-image"
    pipeline = "QwenImagePipeline"
    image_pipeline = "QwenImageImg2ImgPipeline"
    embed_keys = ("prompt_embeds", "prompt_embeds_mask")
    row_inputs = (
        "hidden_states",
        "timestep",
        "guidance",
        "encoder_hidden_states",
        "encoder_hidden_states_mask",
    )
    list_rows = ("img_shapes",)
    step_caches = ALL_STEP_CACHES  # its transformer has diffusers' cache hooks
    probe_text_tokens = 32

    def encode(
        self, prompts: Sequence[str], images: Sequence[Any] | None = None, negative: bool = False
    ) -> list[Embeds]:
        import torch

        with torch.no_grad():
            embeds, mask = self.pipe.encode_prompt(
                prompt=list(prompts),
                device=self.device,
                max_sequence_length=self.max_sequence_length,
            )
        return [_own_rows(embeds, mask, i) for i in range(len(prompts))]

    def pipeline_kwargs(
        self,
        embeds: Embeds,
        negative: Embeds | None,
        params: ImageParams,
        true_cfg_scale: float,
        image: Image.Image | None,
    ) -> dict[str, Any]:
        guided = bool(self.pipe.transformer.config.guidance_embeds)
        kwargs: dict[str, Any] = {
            **embeds,
            "guidance_scale": params.guidance if guided else None,
            "max_sequence_length": self.max_sequence_length,
            "true_cfg_scale": 1.0,  # no negative: no true CFG (and no warning about it)
        }
        if negative is not None:
            kwargs.update(negative_kwargs(negative), true_cfg_scale=true_cfg_scale)
        kwargs.update(image_kwargs(params, image))
        return kwargs

    def batch_key(
        self, params: ImageParams, embeds: Embeds, image: Image.Image | None = None
    ) -> Hashable:
        return (self.name, params.width, params.height)  # any text lengths: `align_rows`

    def align_rows(self, payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Each call's text padded to the batch's longest, its mask zero on the padding."""
        import torch

        longest = max(int(p["encoder_hidden_states"].shape[1]) for p in payloads)
        aligned = []
        for payload in payloads:
            text = payload["encoder_hidden_states"]
            rows, length = int(text.shape[0]), int(text.shape[1])
            mask = payload.get("encoder_hidden_states_mask")
            if mask is None:
                mask = torch.ones(rows, length, dtype=torch.long, device=text.device)
            pad = longest - length
            aligned.append(
                {
                    **payload,
                    "encoder_hidden_states": torch.nn.functional.pad(text, (0, 0, 0, pad)),
                    "encoder_hidden_states_mask": torch.nn.functional.pad(mask, (0, pad)),
                }
            )
        return aligned

    def latent_shape(self, params: ImageParams) -> tuple[int, ...]:
        scale = self.pipe.vae_scale_factor
        return (1, self.pipe.vae.config.z_dim, 1, params.height // scale, params.width // scale)

    def unpack(self, latents: torch.Tensor, params: ImageParams) -> torch.Tensor:
        """Packed tokens back to (1, channels, 1, height / 8, width / 8)."""
        from diffusers import QwenImagePipeline

        return QwenImagePipeline._unpack_latents(
            latents, params.height, params.width, self.pipe.vae_scale_factor
        )

    def decode(self, latents: torch.Tensor) -> Image.Image:
        return decode_normalized(self.pipe, latents)

    def probe_inputs(
        self, rows: int, params: ImageParams, opts: dict[str, Any]
    ) -> dict[str, Any] | None:
        import torch

        cfg = self.pipe.transformer.config
        side = self.size_multiple
        height, width = params.height // side, params.width // side
        seq = self.probe_text_tokens
        return {
            "hidden_states": torch.zeros(rows, height * width, cfg.in_channels, **opts),
            "encoder_hidden_states": torch.zeros(rows, seq, cfg.joint_attention_dim, **opts),
            "encoder_hidden_states_mask": torch.ones(
                rows, seq, dtype=torch.long, device=opts["device"]
            ),
            "timestep": torch.ones(rows, **opts),
            "img_shapes": [[(1, height, width)]] * rows,
        }


def _own_rows(embeds: torch.Tensor, mask: torch.Tensor | None, i: int) -> Embeds:
    """Prompt `i`'s rows cut at its own length (own storage), with an all-ones mask."""
    import torch

    length = int(mask[i].sum()) if mask is not None else embeds.shape[1]
    row = embeds[i : i + 1, :length].clone()
    ones = torch.ones(1, length, dtype=torch.long, device=row.device)
    return {"prompt_embeds": row, "prompt_embeds_mask": ones}


def decode_normalized(pipe: Any, latents: torch.Tensor) -> Image.Image:
    """`QwenImagePipeline.__call__`'s decode of unpacked latents, step by step."""
    import torch

    vae = pipe.vae
    with torch.no_grad():
        latents = latents.to(vae.dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(
            latents.device, latents.dtype
        )
        latents = latents / std + mean
        image = vae.decode(latents, return_dict=False)[0][:, :, 0]
        return pipe.image_processor.postprocess(image, output_type="pil")[0]
