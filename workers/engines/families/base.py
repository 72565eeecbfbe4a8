"""What the diffusion engine needs to know about one family of diffusers pipelines.

The engine (`workers.engines.diffusers_engine`) runs every family the same way: encode the
prompts (batched, cached by the DiT cache), run the family's own pipeline call with those
embeddings and `output_type="latent"`, its transformer replaced by the step loop's stand-in
(so the transformer calls of many requests run as one batch), then decode. A family says
only what differs between pipelines:

- `load`: the pipeline classes;
- `encode`: which embedding tensors one prompt gives (`embed_keys`), computed for several
  prompts in one call with each prompt's rows as they would be alone;
- `pipeline_kwargs`: the pipeline call's arguments that carry them;
- `row_inputs` / `list_rows`: which transformer arguments have a row per request, so the
  step loop stacks them (everything else is shared by a batch and in its `batch_key`);
- `unpack` / `decode` / `output_fields`: the final latents as the DiT cache keeps them,
  and their pixels (or samples) exactly as the pipeline would give them;
- `call_pipeline`: the pipeline call itself, where a pipeline names its arguments its
  own way;
- `probe_inputs`: zeros of one step's shape, which the resource manager measures;
- what applies: `step_caches`, `edit` (the request's image conditions the prompt); LoRA
  applies wherever the pipeline has diffusers' LoRA loader.

A family object is built per engine around its loaded pipeline (`create_family`).
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from omni_tasks.errors import ConfigError, RequestValidationError
from workers.engines.base import ImageParams

if TYPE_CHECKING:
    import torch
    from PIL import Image

Embeds = dict[str, "torch.Tensor"]
#: Every step-cache mode (`workers.engines.step_cache.STEP_CACHE_MODES`).
ALL_STEP_CACHES = frozenset({"none", "taylorseer", "magcache", "first_block", "pab", "cache_dit"})
#: What a family of each `media` makes, and the task that asks for it.
_MADE = {
    "image": ("images", "generate_image"),
    "video": ("videos", "generate_video"),
    "audio": ("sounds", "generate_audio"),
}


class ModelFamily:
    """One family's pipeline facts, around a loaded pipeline (see the module docstring)."""

    #: The family's name in config (`models.<name>.family`) and in results.
    name: ClassVar[str] = ""
    #: diffusers class names: text-to-image, and the class that takes the request's image
    #: (img2img with `strength`, or an edit pipeline when `edit`); None: no image input.
    pipeline: ClassVar[str] = ""
    image_pipeline: ClassVar[str | None] = None
    edit: ClassVar[bool] = False
    #: Every request needs an input image (an edit model has no text-to-image call).
    needs_image: ClassVar[bool] = False
    #: The embedding tensors of one prompt, in `encode`'s output and `pipeline_kwargs`.
    embed_keys: ClassVar[tuple[str, ...]] = ("prompt_embeds",)
    #: Transformer arguments with one row per request (stacked); `list_rows`: per-row
    #: Python lists (concatenated). All others are shared by a batch.
    row_inputs: ClassVar[tuple[str, ...]] = ("hidden_states", "encoder_hidden_states", "timestep")
    list_rows: ClassVar[tuple[str, ...]] = ()
    step_caches: ClassVar[frozenset[str]] = frozenset({"none"})
    #: The pipeline call's output: "latent" (decoded by `decode`) or "pil" (generic).
    output_type: ClassVar[str] = "latent"
    #: Whether a step's latents can be decoded into a preview.
    previews: ClassVar[bool] = True
    #: What the family makes: "image", "video" (`decode` gives (frames, height, width,
    #: 3) uint8 frames; video requests carry `ImageParams.num_frames`, and an image
    #: request is a one-frame video) or "audio" (a (channels, samples) waveform;
    #: requests carry `ImageParams.audio_seconds`).
    media: ClassVar[str] = "image"
    #: The pipeline output's field that holds its `output_type="latent"` latents.
    output_field: ClassVar[str] = "images"
    #: Text tokens the resource manager's probe assumes.
    probe_text_tokens: ClassVar[int] = 64
    #: CFG runs whenever `guidance` > 1, against the negative prompt or "" (SD3, Sana,
    #: Wan); otherwise true CFG (`negative_text`).
    cfg_by_guidance: ClassVar[bool] = False

    def __init__(self, pipe: Any, device: torch.device, max_sequence_length: int) -> None:
        self.pipe = pipe
        self.device = device
        self.max_sequence_length = max_sequence_length

    # --- loading ---------------------------------------------------------------------------

    @classmethod
    def pipeline_class(cls, with_image: bool = False) -> Any:
        import diffusers

        name = cls.image_pipeline if with_image else cls.pipeline
        if name is None:
            raise RequestValidationError("image", f"the {cls.name} family takes no input image")
        return getattr(diffusers, name)

    @classmethod
    def load_kwargs(cls, path: str) -> dict[str, Any]:
        """Extra `from_pretrained` arguments for the checkpoint at `path` (none)."""
        return {}

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this (the VAE's downsampling x the patch)."""
        return int(self.pipe.vae_scale_factor) * 2

    def check_request(self, params: ImageParams, image: Image.Image | None) -> None:
        """Refuse what this family cannot run, before the request is held: a size its
        VAE cannot take, an image where it takes none (or none where it needs one), a
        step cache it does not run, a video for an image model or the reverse."""
        if params.num_frames is not None and self.media != "video":
            raise RequestValidationError(
                "model", f"the {self.name} family makes images, not videos: send generate_image"
            )
        if (params.audio_seconds is not None) != (self.media == "audio"):
            made, send = _MADE[self.media]
            raise RequestValidationError(
                "model", f"the {self.name} family makes {made}: send {send}"
            )
        for name in ("width", "height"):
            if getattr(params, name) % self.size_multiple:
                raise RequestValidationError(
                    name, f"must be a multiple of {self.size_multiple} for this model"
                )
        if image is not None and self.image_pipeline is None:
            raise RequestValidationError("image", f"the {self.name} family takes no image")
        if image is None and self.needs_image:
            raise RequestValidationError("image", f"the {self.name} family edits an image")
        if params.step_cache.mode not in self.step_caches:
            allowed = ", ".join(sorted(self.step_caches))
            raise ConfigError(
                "step_cache",
                f"{params.step_cache.mode!r} does not run on the {self.name} family"
                f" (it runs: {allowed})",
            )

    # --- encode ----------------------------------------------------------------------------

    def encode(
        self, prompts: Sequence[str], images: Sequence[Any] | None = None, negative: bool = False
    ) -> list[Embeds]:
        """The embeddings of each prompt (one call for all), each as it would be alone.
        `images`: an edit family's input images, one per prompt; `negative`: the prompts
        are negative prompts (which some families encode differently)."""
        raise NotImplementedError

    def negative_text(self, params: ImageParams, true_cfg_scale: float) -> str | None:
        """The negative prompt to encode, or None when the request runs without CFG.
        Default (true CFG, as Flux and Qwen-Image): a non-empty negative prompt and a
        scale above 1; with `cfg_by_guidance`, the negative prompt or "" whenever
        guidance > 1."""
        if self.cfg_by_guidance:
            return (params.negative_prompt or "") if params.guidance > 1 else None
        if params.negative_prompt and true_cfg_scale > 1:
            return params.negative_prompt
        return None

    def check_embeds(self, embeds: Mapping[str, Any], name: str = "embeds") -> Embeds:
        """Embeddings a caller passed: one prompt's tensors, on the engine's device."""
        import torch

        used: Embeds = {}
        for key in self.embed_keys:
            value = embeds.get(key)
            if not isinstance(value, torch.Tensor):
                raise RequestValidationError(name, f"needs a tensor {key!r}")
            if value.dim() < 2 or value.shape[0] != 1:
                raise RequestValidationError(
                    name, f"{key!r} has shape {tuple(value.shape)}, not one prompt's"
                )
            used[key] = value.to(self.device)
        return used

    # --- denoise ---------------------------------------------------------------------------

    def pipeline_kwargs(
        self,
        embeds: Embeds,
        negative: Embeds | None,
        params: ImageParams,
        true_cfg_scale: float,
        image: Image.Image | None,
    ) -> dict[str, Any]:
        """The family's pipeline arguments (the engine adds size, steps, generator, callback
        and output type): the embeddings, guidance, and the image input if any."""
        raise NotImplementedError

    def text_kwargs(self, prompt: str) -> dict[str, Any]:
        """Pipeline arguments that carry the prompt text itself (none: its embeddings do)."""
        return {}

    def call_pipeline(self, pipe: Any, kwargs: dict[str, Any]) -> Any:
        """Run a request's pipeline call (`kwargs`: the engine's arguments, with its step
        callback as `callback_on_step_end`); its `output_field`, the final latents."""
        return getattr(pipe(**kwargs), self.output_field)

    def steps_taken(self, params: ImageParams, with_image: bool) -> int:
        """Denoising steps the pipeline runs: img2img starts late (`get_timesteps`)."""
        if not with_image or self.edit:
            return params.steps
        init_timestep = min(params.steps * params.strength, params.steps)
        return params.steps - int(max(params.steps - init_timestep, 0))

    def align_rows(self, payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The transformer calls of one step, made stackable (as they are: the batch key
        made their shared arguments equal)."""
        return payloads

    def batch_key(
        self, params: ImageParams, embeds: Embeds, image: Image.Image | None = None
    ) -> Hashable:
        """Requests with equal keys may share a step: same size, same text length
        (`image`: the request's input image, which some families append to the step)."""
        return (self.name, params.width, params.height, text_tokens(embeds))

    # --- decode ----------------------------------------------------------------------------

    def latent_shape(self, params: ImageParams) -> tuple[int, ...]:
        """The shape of `unpack`'s latents for a request of `params`' size."""
        raise NotImplementedError

    def unpack(self, latents: torch.Tensor, params: ImageParams) -> torch.Tensor:
        """The pipeline's `output_type="latent"` output as the DiT cache keeps it."""
        return latents

    def decode(self, latents: torch.Tensor) -> Image.Image:
        """`unpack`'s latents to the image the pipeline itself would return."""
        raise NotImplementedError

    def output_fields(self, decoded: Any, params: ImageParams) -> dict[str, Any]:
        """`ImageOutput`'s fields of what `decode` gave: the image, or a video's frames
        with the first as its image (an image request on a video model: just that)."""
        from PIL import Image

        if isinstance(decoded, Image.Image):
            return {"image": decoded}
        frames = decoded if params.num_frames is not None else None
        return {"image": Image.fromarray(decoded[0]), "frames": frames}

    def step_pixels(self, params: ImageParams) -> int:
        """What one step of a request costs, in pixels (the step scheduler ranks by it)."""
        return params.width * params.height * (params.num_frames or 1)

    def shape_label(self, params: ImageParams) -> str:
        """How errors name a request's shape ("64x64 image", "17-frame 64x64 video")."""
        if params.num_frames is None:
            return f"{params.width}x{params.height} image"
        return f"{params.num_frames}-frame {params.width}x{params.height} video"

    def preview(self, latents: torch.Tensor, params: ImageParams) -> Image.Image:
        """The image of a step's latents, as the denoising loop holds them."""
        return self.decode(self.unpack(latents, params))

    # --- resources -------------------------------------------------------------------------

    def probe_inputs(
        self, rows: int, params: ImageParams, opts: dict[str, Any]
    ) -> dict[str, Any] | None:
        """Transformer arguments of one step for `rows` requests of `params`' size, on
        zeros (`opts`: device and dtype); None: this family is not measured."""
        return None


def prompt_rows(**tensors: torch.Tensor) -> list[Embeds]:
    """One prompt's embeddings per row of a batched encoder call, each its own copy (a
    cached row must not keep the whole batch's storage alive)."""
    count = len(next(iter(tensors.values())))
    return [{key: t[i : i + 1].clone() for key, t in tensors.items()} for i in range(count)]


def negative_kwargs(negative: Embeds | None) -> dict[str, Any]:
    """A negative prompt's embeddings as the pipelines name them: `negative_<key>`."""
    return {f"negative_{key}": value for key, value in (negative or {}).items()}


def image_kwargs(params: ImageParams, image: Image.Image | None) -> dict[str, Any]:
    """An img2img pipeline's arguments: the image at the request's size, its strength."""
    if image is None:
        return {}
    return {
        "image": image.convert("RGB").resize((params.width, params.height)),
        "strength": params.strength,
    }


def text_tokens(embeds: Mapping[str, Any]) -> int:
    """The text length of a prompt's embeddings (their sequence axis)."""
    value = embeds.get("prompt_embeds")
    return int(value.shape[1]) if value is not None and value.dim() >= 3 else 0


def pipeline_class_name(path: str | Path) -> str | None:
    """`_class_name` of a checkpoint's model_index.json, or None where there is none."""
    index = Path(path) / "model_index.json"
    try:
        return str(json.loads(index.read_text())["_class_name"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
