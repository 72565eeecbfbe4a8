"""Wan 2.1 / 2.2 video (`WanPipeline` text-to-video; `WanImageToVideoPipeline`
image-to-video as its own family, `wan-i2v`, since its checkpoints are their own).

Prompts: UMT5's last hidden states, each trimmed to its tokens and zero-padded to the
pipeline's fixed length, so a batch of prompts encodes each as alone. CFG runs whenever
`guidance` > 1, with the negative prompt or "": a second transformer call per step with
the negative embeddings, as the pipeline makes it. Latents are (channels, frames,
height / 8, width / 8) for 4k+1 frames (the causal VAE keeps the first frame and
compresses the rest 4x in time); the transformer patches them 1x2x2. Requests that share
a step have the same frame count and size. An image request is a one-frame video (as
Wan makes text-to-image), so images and videos share one worker, its step scheduler
ranking both (a high image preempts a low video at a step).

Decode is the pipeline's (the VAE's latent mean and std undone, `vae.decode`, the video
processor's postprocessing) as uint8 frames. The causal VAE decodes latent frame by
latent frame with a bounded cache, and tiles large frames (`enable_tiling`), so decode
memory does not grow with the frame count. A preview decodes the first latent frame
alone, which the causal VAE turns into exactly the video's first frame.

Two-expert Wan 2.2 checkpoints (A14B: `transformer_2` with a boundary ratio) are
refused at load: the step loop stands in for one transformer.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Any

from omni_tasks.errors import ConfigError, RequestValidationError
from workers.engines.base import ImageParams
from workers.engines.families.base import Embeds, ModelFamily, negative_kwargs, prompt_rows

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

#: The prompt length the pipeline call pads every prompt to (its `max_sequence_length`
#: default, and Wan's own).
TEXT_TOKENS = 512


class WanFamily(ModelFamily):
    name = "wan"
    pipeline = "WanPipeline"
    media = "video"
    row_inputs = ("hidden_states", "timestep", "encoder_hidden_states")
    output_field = "frames"
    probe_text_tokens = TEXT_TOKENS
    cfg_by_guidance = True

    def __init__(self, pipe: Any, device: torch.device, max_sequence_length: int) -> None:
        if getattr(pipe, "transformer_2", None) is not None:
            raise ConfigError(
                "family", "two-expert Wan 2.2 checkpoints (transformer_2) are not served yet"
            )
        super().__init__(pipe, device, TEXT_TOKENS)
        pipe.vae.enable_tiling()  # only frames above the tile size are tiled

    @classmethod
    def load_kwargs(cls, path: str) -> dict[str, Any]:
        """The VAE in float32 whatever the pipeline's dtype, as Wan's authors run it (a
        bf16 decode bands smooth gradients); it is small beside the transformer."""
        import warnings

        import torch
        from diffusers import AutoencoderKLWan

        with warnings.catch_warnings():  # diffusers 0.42 renames torch_dtype to dtype
            warnings.simplefilter("ignore", FutureWarning)
            vae = AutoencoderKLWan.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32)
        return {"vae": vae}

    @property
    def size_multiple(self) -> int:
        patch = self.pipe.transformer.config.patch_size
        return int(self.pipe.vae_scale_factor_spatial) * int(patch[1])

    @property
    def frame_step(self) -> int:
        """Frame counts are `frame_step` * k + 1 (the VAE's temporal compression)."""
        return int(self.pipe.vae_scale_factor_temporal)

    def check_request(self, params: ImageParams, image: Image.Image | None) -> None:
        super().check_request(params, image)
        frames = params.num_frames or 1
        if (frames - 1) % self.frame_step:
            raise RequestValidationError(
                "num_frames", f"must be {self.frame_step}k+1 for this model, got {frames}"
            )

    def encode(
        self, prompts: Sequence[str], images: Sequence[Any] | None = None, negative: bool = False
    ) -> list[Embeds]:
        """`encode_prompt` of all prompts at once, without CFG (a negative prompt is
        encoded by the same encoder)."""
        import torch

        with torch.no_grad():
            embeds, _ = self.pipe.encode_prompt(
                prompt=list(prompts),
                do_classifier_free_guidance=False,
                max_sequence_length=self.max_sequence_length,
                device=self.device,
            )
        return prompt_rows(prompt_embeds=embeds)

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
            **negative_kwargs(negative),
            "guidance_scale": params.guidance,
            "num_frames": params.num_frames or 1,
            "max_sequence_length": self.max_sequence_length,
        }
        if image is not None:
            kwargs["image"] = image.convert("RGB")
        return kwargs

    def steps_taken(self, params: ImageParams, with_image: bool) -> int:
        return params.steps  # an input image conditions the video: every step runs

    def batch_key(
        self, params: ImageParams, embeds: Embeds, image: Image.Image | None = None
    ) -> Hashable:
        return (self.name, params.num_frames, params.width, params.height)

    def latent_frames(self, params: ImageParams) -> int:
        return ((params.num_frames or 1) - 1) // self.frame_step + 1

    def latent_shape(self, params: ImageParams) -> tuple[int, ...]:
        scale = self.pipe.vae_scale_factor_spatial
        channels = self.pipe.vae.config.z_dim
        frames = self.latent_frames(params)
        return (1, channels, frames, params.height // scale, params.width // scale)

    def decode(self, latents: torch.Tensor) -> np.ndarray:  # type: ignore[override]
        """The video as the pipeline returns it: (frames, height, width, 3) uint8."""
        import numpy as np

        video = self._vae_decode(latents)
        frames = self.pipe.video_processor.postprocess_video(video, output_type="np")[0]
        return np.asarray((frames * 255).round(), dtype=np.uint8)

    def preview(self, latents: torch.Tensor, params: ImageParams) -> Image.Image:
        """The first frame: the causal VAE decodes the first latent frame alone to it."""
        from PIL import Image

        first = self.decode(self.unpack(latents, params)[:, :, :1])
        return Image.fromarray(first[0])

    def _vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        import torch
        from diffusers.utils.torch_utils import get_module_execution_device

        vae = self.pipe.vae
        latents = latents.to(get_module_execution_device(vae), dtype=vae.dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents)
        std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents)
        with torch.no_grad():
            return vae.decode(latents / std + mean, return_dict=False)[0]

    def probe_inputs(
        self, rows: int, params: ImageParams, opts: dict[str, Any]
    ) -> dict[str, Any] | None:
        import torch

        cfg = self.pipe.transformer.config
        _, _, frames, height, width = self.latent_shape(params)
        return {
            "hidden_states": torch.zeros(rows, cfg.in_channels, frames, height, width, **opts),
            "encoder_hidden_states": torch.zeros(rows, TEXT_TOKENS, cfg.text_dim, **opts),
            "timestep": torch.ones(rows, **opts),
        }


class WanImageToVideoFamily(WanFamily):
    """Wan image-to-video: the input image's VAE latents ride beside the noise (the
    pipeline builds them per request), its CLIP embedding enters each step's added
    cross-attention. Every request needs an image."""

    name = "wan-i2v"
    pipeline = "WanImageToVideoPipeline"
    image_pipeline = "WanImageToVideoPipeline"
    needs_image = True
    row_inputs = (
        "hidden_states",
        "timestep",
        "encoder_hidden_states",
        "encoder_hidden_states_image",
    )

    def probe_inputs(
        self, rows: int, params: ImageParams, opts: dict[str, Any]
    ) -> dict[str, Any] | None:
        import torch

        inputs = super().probe_inputs(rows, params, opts) or {}
        encoder = getattr(self.pipe, "image_encoder", None)
        if encoder is not None:
            vision = encoder.config
            tokens = (vision.image_size // vision.patch_size) ** 2 + 1
            width = self.pipe.transformer.config.image_dim
            inputs["encoder_hidden_states_image"] = torch.zeros(rows, tokens, width, **opts)
        return inputs
