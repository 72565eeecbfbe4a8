"""Stable Audio (`StableAudioPipeline`, Stable Audio Open): text-to-audio.

Prompts: T5's last hidden states at the tokenizer's padded length, with their attention
mask (`prompt_embeds`, `attention_mask`, as the pipeline call takes them). The pipeline
itself projects them (`projection_model`) and zeroes the padding, so a request whose
embeddings come from the DiT cache runs the pipeline's own path; a negative prompt's
padding is zeroed before, as the pipeline zeroes it. The seconds conditioning (start 0,
end the request's seconds, through the projection's number conditioners: one small
layer) is made by the pipeline call, so cached embeddings do not depend on the length.

CFG as Stable Audio does it: whenever guidance > 1, against the negative prompt if there
is one, else against zeros (the pipeline's own unconditional input); either way two rows
per transformer call.

Latents are (1, channels, sample_size) whatever the length: Stable Audio denoises its
whole window and cuts the clip after decoding. Every request of one model thus has one
shape, and requests share a step whatever their seconds, steps or guidance (the seconds
ride in each row's conditioning). The transformer takes one timestep per call, which
broadcasts over the call's rows; stacked, each row gets its call's (`align_rows`).

Decode is the pipeline's: the Oobleck VAE, then the clip cut to its seconds, a
(channels, samples) float32 waveform at the VAE's `sampling_rate`. No previews: a
partly denoised waveform is noise, and the step count says how far a request is.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Any

from omni_tasks.errors import RequestValidationError
from workers.engines.base import ImageParams
from workers.engines.families.base import (
    Embeds,
    ModelFamily,
    negative_kwargs,
    prompt_rows,
    text_tokens,
)

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

#: The pixels that cost what one latent frame costs a step: one 16x16 patch, an image
#: DiT's token (what the step scheduler ranks requests by).
TOKEN_PIXELS = 256


class StableAudioFamily(ModelFamily):
    name = "stable-audio"
    pipeline = "StableAudioPipeline"
    media = "audio"
    output_field = "audios"
    previews = False
    embed_keys = ("prompt_embeds", "attention_mask")
    row_inputs = ("hidden_states", "timestep", "encoder_hidden_states", "global_hidden_states")

    def __init__(self, pipe: Any, device: torch.device, max_sequence_length: int) -> None:
        import warnings

        super().__init__(pipe, device, max_sequence_length)
        # The scheduler's last step goes to sigma 0, below its Brownian tree's sigma_min:
        # torchsde says so at every request ("Should have ta>=t0"); the noise is as the
        # real pipeline's.
        warnings.filterwarnings(
            "ignore", message="Should have t", category=UserWarning, module="torchsde"
        )

    @property
    def size_multiple(self) -> int:
        return 1  # a sound has no width or height

    @property
    def sample_rate(self) -> int:
        return int(self.pipe.vae.config.sampling_rate)

    @property
    def audio_channels(self) -> int:
        return int(self.pipe.vae.config.audio_channels)

    @property
    def max_seconds(self) -> float:
        """The model's window: every clip is denoised at this length, then cut."""
        frames = int(self.pipe.transformer.config.sample_size)
        return frames * int(self.pipe.vae.hop_length) / self.sample_rate

    def check_request(self, params: ImageParams, image: Image.Image | None) -> None:
        super().check_request(params, image)
        seconds = params.audio_seconds or 0.0
        if not 0 < seconds <= self.max_seconds:
            raise RequestValidationError(
                "seconds", f"must be above 0 and at most {self.max_seconds:.2f} for this model"
            )

    def shape_label(self, params: ImageParams) -> str:
        return f"{params.audio_seconds or 0:g} s sound"

    def step_pixels(self, params: ImageParams) -> int:
        return int(self.pipe.transformer.config.sample_size) * TOKEN_PIXELS

    # --- encode ----------------------------------------------------------------------------

    def encode(
        self, prompts: Sequence[str], images: Sequence[Any] | None = None, negative: bool = False
    ) -> list[Embeds]:
        """T5's hidden states and mask for all prompts at once, each padded to the
        tokenizer's length as the pipeline pads it (so each row is as alone)."""
        import torch

        tokenizer = self.pipe.tokenizer
        tokens = tokenizer(
            list(prompts),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        ids = tokens.input_ids.to(self.device)
        mask = tokens.attention_mask.to(self.device)
        with torch.no_grad():
            hidden = self.pipe.text_encoder(ids, attention_mask=mask)[0]
        if negative:  # the pipeline's own: a negative prompt's padding is the null embed
            hidden = torch.where(mask.to(torch.bool).unsqueeze(2), hidden, 0.0)
        return prompt_rows(prompt_embeds=hidden, attention_mask=mask)

    def negative_text(self, params: ImageParams, true_cfg_scale: float) -> str | None:
        """The negative prompt under CFG (guidance > 1); without one the pipeline runs
        CFG against zeros, which need no encoder."""
        return params.negative_prompt if params.guidance > 1 and params.negative_prompt else None

    # --- denoise ---------------------------------------------------------------------------

    def pipeline_kwargs(
        self,
        embeds: Embeds,
        negative: Embeds | None,
        params: ImageParams,
        true_cfg_scale: float,
        image: Image.Image | None,
    ) -> dict[str, Any]:
        return {
            **embeds,
            **negative_kwargs(negative),
            "guidance_scale": params.guidance,
            "audio_start_in_s": 0.0,
            "audio_end_in_s": params.audio_seconds,
        }

    def call_pipeline(self, pipe: Any, kwargs: dict[str, Any]) -> Any:
        """The call without an image's size, its step callback the pipeline's older
        `callback(step, timestep, latents)`, run after every step."""
        kwargs = {k: v for k, v in kwargs.items() if k not in ("width", "height")}
        on_step_end = kwargs.pop("callback_on_step_end", None)
        if on_step_end is not None:

            def callback(step: int, timestep: Any, latents: torch.Tensor) -> None:
                on_step_end(pipe, step, timestep, {"latents": latents})

            kwargs.update(callback=callback, callback_steps=1)
        return super().call_pipeline(pipe, kwargs)

    def steps_taken(self, params: ImageParams, with_image: bool) -> int:
        return params.steps

    def align_rows(self, payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """A call's one timestep repeated for each of its rows, when calls are stacked."""
        if len(payloads) < 2:
            return payloads
        aligned = []
        for payload in payloads:
            rows = int(payload["hidden_states"].shape[0])
            timestep = payload["timestep"].reshape(-1)
            aligned.append({**payload, "timestep": timestep.expand(rows)})
        return aligned

    def batch_key(
        self, params: ImageParams, embeds: Embeds, image: Image.Image | None = None
    ) -> Hashable:
        return (self.name, text_tokens(embeds))

    # --- decode ----------------------------------------------------------------------------

    def latent_shape(self, params: ImageParams) -> tuple[int, ...]:
        cfg = self.pipe.transformer.config
        return (1, int(cfg.in_channels), int(cfg.sample_size))

    def decode(self, latents: torch.Tensor) -> np.ndarray:  # type: ignore[override]
        """The whole window's waveform, (channels, samples) float32, as the VAE gives it
        (`output_fields` cuts it to the request's seconds)."""
        import torch
        from diffusers.utils.torch_utils import get_module_execution_device

        vae = self.pipe.vae
        latents = latents.to(get_module_execution_device(vae), dtype=vae.dtype)
        with torch.no_grad():
            audio = vae.decode(latents).sample
        return audio[0].float().cpu().numpy()

    def output_fields(self, decoded: Any, params: ImageParams) -> dict[str, Any]:
        """The clip cut to its seconds (the pipeline's `audio_end_in_s` cut)."""
        end = int((params.audio_seconds or 0.0) * self.sample_rate)
        return {"image": None, "audio": decoded[:, :end], "sample_rate": self.sample_rate}

    def preview(self, latents: torch.Tensor, params: ImageParams) -> Image.Image:
        raise NotImplementedError("a sound has no preview")

    # --- resources -------------------------------------------------------------------------

    def probe_inputs(
        self, rows: int, params: ImageParams, opts: dict[str, Any]
    ) -> dict[str, Any] | None:
        import torch
        from diffusers.models.embeddings import get_1d_rotary_pos_embed

        cfg = self.pipe.transformer.config
        _, channels, frames = self.latent_shape(params)
        tokens = int(self.pipe.tokenizer.model_max_length) + 2  # the text, then start and end
        width = int(cfg.cross_attention_input_dim)
        half = int(cfg.attention_head_dim) // 2  # the pipeline's `rotary_embed_dim`
        rotary = get_1d_rotary_pos_embed(
            half, frames + 1, use_real=True, repeat_interleave_real=False
        )
        return {
            "hidden_states": torch.zeros(rows, channels, frames, **opts),
            "timestep": torch.ones(rows, **opts),
            "encoder_hidden_states": torch.zeros(rows, tokens, width, **opts),
            "global_hidden_states": torch.zeros(rows, 1, int(cfg.global_states_input_dim), **opts),
            "rotary_embedding": tuple(part.to(opts["device"]) for part in rotary),
        }
