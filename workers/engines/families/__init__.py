"""Model families of the diffusion engine: one module per family of diffusers pipelines.

`FAMILIES` names them; `family_class` finds one by name (`ConfigError` for an unknown
name) and `detect` by a checkpoint's pipeline class (its model_index.json). A pipeline
class with no family module runs through `generic.GenericFamily`.
"""

from __future__ import annotations

from pathlib import Path

from omni_tasks.errors import ConfigError
from workers.engines.families.base import ModelFamily, pipeline_class_name
from workers.engines.families.flux import FluxFamily
from workers.engines.families.generic import GenericFamily, check_rows
from workers.engines.families.qwen_image import QwenImageFamily
from workers.engines.families.qwen_image_edit import QwenImageEditFamily
from workers.engines.families.sana import SanaFamily
from workers.engines.families.sd3 import SD3Family
from workers.engines.families.stable_audio import StableAudioFamily
from workers.engines.families.wan import WanFamily, WanImageToVideoFamily

FAMILIES: dict[str, type[ModelFamily]] = {
    family.name: family
    for family in (
        FluxFamily,
        SD3Family,
        QwenImageFamily,
        QwenImageEditFamily,
        SanaFamily,
        WanFamily,
        WanImageToVideoFamily,
        StableAudioFamily,
    )
}


def family_class(name: str) -> type[ModelFamily]:
    """The family called `name` ("generic:<PipelineClass>" for the fallback); ConfigError
    naming `family` for an unknown one."""
    if name.startswith("generic:"):
        return GenericFamily.for_pipeline(name.split(":", 1)[1])
    try:
        return FAMILIES[name]
    except KeyError:
        known = ", ".join(sorted(FAMILIES))
        raise ConfigError("family", f"{name!r} is not a model family; known: {known}") from None


def family_of_pipeline(class_name: str) -> type[ModelFamily] | None:
    """The family whose text-to-image or image pipeline is `class_name`, if any."""
    for family in FAMILIES.values():
        if class_name in (family.pipeline, family.image_pipeline):
            return family
    return None


def detect(path: str | Path, family: str | None = None) -> type[ModelFamily]:
    """The family of the checkpoint at `path`: `family` when given, else the one of its
    model_index.json's pipeline class (Flux where the checkpoint names none)."""
    if family:
        return family_class(family)
    class_name = pipeline_class_name(path)
    if class_name is None:
        return FluxFamily
    found = family_of_pipeline(class_name)
    if found is None:
        import diffusers

        if not hasattr(diffusers, class_name):
            raise ConfigError("family", f"{class_name!r} is not a diffusers pipeline class")
        return GenericFamily.for_pipeline(class_name)
    return found


__all__ = [
    "FAMILIES",
    "GenericFamily",
    "ModelFamily",
    "check_rows",
    "detect",
    "family_class",
    "family_of_pipeline",
]
