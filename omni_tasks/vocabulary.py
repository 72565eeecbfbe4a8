"""The words every other module speaks (docs/glossary.md), as types and constants.

A leaf: it imports nothing from the project, so the config, the request models and the
workers can all use it without importing one another.
"""

from __future__ import annotations

import re
import typing
from enum import Enum
from typing import Literal

#: A priority class: what a request asks for (`priority=`), ordered by the scheduler's
#: weights into a rank (0 first) and mapped onto a broker level (0-9).
PriorityClass = Literal["high", "normal", "low"]
PRIORITY_CLASSES: tuple[PriorityClass, ...] = ("high", "normal", "low")

#: A pipeline stage: "ar" runs on the AR pool, "dit" on the diffusion pool, "tts" on the
#: speech pool.
Stage = Literal["ar", "dit", "tts"]
STAGES: tuple[Stage, ...] = ("ar", "dit", "tts")

#: Step-level DiT acceleration modes a request may name (the diffusion pool implements each).
StepCacheMode = Literal["none", "taylorseer", "magcache", "first_block", "pab", "cache_dit"]
STEP_CACHE_MODES: tuple[str, ...] = typing.get_args(StepCacheMode)

#: The Celery execution pools a pool's workers may run (`--pool`): its pool type.
POOL_TYPES = ("threads", "solo", "prefork")

#: The unit of every memory setting and figure (`*_gib`): GiB, 2**30 bytes, as devices
#: report it.
GIB = 2**30

#: LoRA adapter names: they travel in messages and name Redis keys and vLLM adapters.
ADAPTER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class RequestType(Enum):
    """What a request asks for; each type has its task and its pipeline stages."""

    TEXT = "text"
    CHAT = "chat"  # a `messages` list, rendered with the model's chat template
    IMAGE = "image"  # an input image: edit / img2img
    MULTIMODAL = "multimodal"  # AR stage writes the image prompt, DiT stage renders it
    DIFFUSION = "diffusion"  # text-to-image
    VIDEO = "video"  # frames from a prompt, or from a prompt and a first image
    SPEECH = "speech"  # text-to-speech: the `input` text spoken in a `voice`
    AUDIO = "audio"  # text-to-audio: a sound from a prompt, on a diffusion model


def valid_adapter_name(name: str) -> bool:
    """Whether `name` can name a LoRA adapter (`ADAPTER_NAME_RE`)."""
    return bool(ADAPTER_NAME_RE.match(name))
