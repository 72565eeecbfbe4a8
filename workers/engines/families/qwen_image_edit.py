"""Qwen-Image-Edit (`QwenImageEditPipeline`): Qwen-Image that edits an input image.

The input image enters twice, as the pipeline does it: resized to about a megapixel
(keeping its aspect ratio) it is encoded with the prompt by the Qwen2.5-VL encoder (so a
prompt's embeddings depend on its image, and the DiT cache keys them by both), and its
VAE latents are packed and appended to each step's hidden states, the transformer's
output for them dropped. Everything else is Qwen-Image's. Requests that share a step
need the same output size and input-image size (text lengths may differ, as for
Qwen-Image).
Every request needs an image: the family has no text-to-image pipeline.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Any

from omni_tasks.errors import RequestValidationError
from workers.engines.base import ImageParams
from workers.engines.families.base import Embeds
from workers.engines.families.qwen_image import QwenImageFamily, _own_rows

if TYPE_CHECKING:
    from PIL import Image

#: The pixel area the pipeline resizes an input image to (`calculate_dimensions`).
CONDITION_AREA = 1024 * 1024


class QwenImageEditFamily(QwenImageFamily):
    name = "qwen-image-edit"
    pipeline = "QwenImageEditPipeline"
    image_pipeline = "QwenImageEditPipeline"
    edit = True
    step_caches = frozenset({"none"})  # not yet measured with the appended image tokens
    #: An edit needs its image: `DiffusersEngine` refuses a request without one.
    needs_image = True

    @classmethod
    def load_kwargs(cls, path: str) -> dict[str, Any]:
        """The checkpoint's Qwen2-VL processor, built without a video processor where
        torchvision is missing (transformers cannot load one then; edits send no video)."""
        from pathlib import Path

        from workers.models.tiny_qwen_image import load_qwen_vl_processor

        folder = Path(path) / "processor"
        return {"processor": load_qwen_vl_processor(folder)} if folder.is_dir() else {}

    def encode(
        self, prompts: Sequence[str], images: Sequence[Any] | None = None, negative: bool = False
    ) -> list[Embeds]:
        """Each prompt with its image, as `QwenImageEditPipeline.__call__` encodes it."""
        import torch

        if images is None or any(image is None for image in images):
            raise RequestValidationError("image", "an edit model needs an input image")
        rows = []
        with torch.no_grad():
            for prompt, image in zip(prompts, images, strict=True):
                embeds, mask = self.pipe.encode_prompt(
                    prompt=[prompt],
                    image=self.prompt_image(image),
                    device=self.device,
                    max_sequence_length=self.max_sequence_length,
                )
                rows.append(_own_rows(embeds, mask, 0))
        return rows

    def prompt_image(self, image: Image.Image) -> Image.Image:
        """The input image as the pipeline hands it to the text encoder."""
        width, height = self.condition_size(image)
        return self.pipe.image_processor.resize(image.convert("RGB"), height, width)

    def condition_size(self, image: Image.Image) -> tuple[int, int]:
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

        width, height, _ = calculate_dimensions(CONDITION_AREA, image.width / image.height)
        return int(width), int(height)

    def pipeline_kwargs(
        self,
        embeds: Embeds,
        negative: Embeds | None,
        params: ImageParams,
        true_cfg_scale: float,
        image: Image.Image | None,
    ) -> dict[str, Any]:
        if image is None:
            raise RequestValidationError("image", "an edit model needs an input image")
        kwargs = super().pipeline_kwargs(embeds, negative, params, true_cfg_scale, None)
        kwargs["image"] = image.convert("RGB")
        return kwargs

    def batch_key(
        self, params: ImageParams, embeds: Embeds, image: Image.Image | None = None
    ) -> Hashable:
        condition = self.condition_size(image) if image is not None else None
        return (self.name, params.width, params.height, condition)  # any text lengths

    def probe_inputs(
        self, rows: int, params: ImageParams, opts: dict[str, Any]
    ) -> dict[str, Any] | None:
        """A step with a square megapixel input image's latents appended."""
        import torch

        inputs = super().probe_inputs(rows, params, opts) or {}
        side = self.size_multiple
        condition = int(CONDITION_AREA**0.5) // side
        extra = torch.zeros(rows, condition * condition, inputs["hidden_states"].shape[2], **opts)
        inputs["hidden_states"] = torch.cat([inputs["hidden_states"], extra], dim=1)
        height, width = params.height // side, params.width // side
        inputs["img_shapes"] = [[(1, height, width), (1, condition, condition)]] * rows
        return inputs
