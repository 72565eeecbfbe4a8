"""The diffusion model registry, producer side: which model a request runs on, whether
the config knows it, and the queue its DiT stage goes to.

Each diffusion worker serves one model (`diffusion.model`); workers of several models
share the pool's queue (`diffusion`) and each also reads its model's own queue
(`keys.model_queue`: `diffusion.<model>`). A request names its model (`model=`, default
the pool's `diffusion.model`). The names it may use are the config's
`diffusion_models()`: the `models` registry plus that default. An unknown name is
refused (`RequestValidationError`, field `model`) before anything is enqueued, and by
the worker for a message no producer checked. A TEXT request's `model` is not checked
here: the AR pool serves one model, and the HTTP API answers for it.

A VIDEO request that names no model runs on `diffusion.video_model` (or
`video_image_model` with an input image). A video model makes images too (one frame); a
VIDEO request for a registry entry whose `family` is an image family is refused here
(field `model`); without a family the worker refuses it, from the checkpoint's.

The entries and their name rules belong to the config (`omni_tasks.config.registry`,
importable from here too); `check_model` runs where requests enter (a task's
`build_request`, the HTTP API), after the request model has checked its shape.
"""

from __future__ import annotations

from omni_tasks.config import CoreModuleConfig
from omni_tasks.config.registry import MAX_MODEL_NAME_CHARS as MAX_MODEL_NAME_CHARS
from omni_tasks.config.registry import MODEL_NAME_RE as MODEL_NAME_RE
from omni_tasks.config.registry import ModelEntry as ModelEntry
from omni_tasks.config.registry import model_name_problem as model_name_problem
from omni_tasks.config.registry import validate_registry as validate_registry
from omni_tasks.coordination import keys
from omni_tasks.errors import RequestValidationError
from omni_tasks.requests import COMPLETION_FIELDS, DIT_TYPES, OmniRequest, RequestType

#: The families whose models make videos and sounds (`workers.engines.families`); the
#: rest, images.
VIDEO_FAMILIES = frozenset({"wan", "wan-i2v"})
AUDIO_FAMILIES = frozenset({"stable-audio"})


def runs_dit_model(request: OmniRequest) -> bool:
    """Whether `model` names the diffusion model: DIFFUSION, IMAGE, VIDEO and MULTIMODAL
    (whose DiT stage renders what its AR stage wrote)."""
    return request.request_type in DIT_TYPES


def dit_model(request: OmniRequest, config: CoreModuleConfig) -> str:
    """The diffusion model a request's DiT stage runs on: its own, else the pool's
    default for its kind."""
    return request.model or default_model(
        request.request_type.value, request.image is not None, config
    )


def default_model(request_type: str, with_image: bool, config: CoreModuleConfig) -> str:
    """The model a request of `request_type` (a value) runs on when it names none."""
    dit = config.diffusion
    if request_type == RequestType.VIDEO.value:
        return dit.video_image_model if with_image else dit.video_model
    if request_type == RequestType.AUDIO.value:
        return dit.audio_model
    return dit.model


#: Sampling fields the transformers text engine has no equivalent for.
TRANSFORMERS_REFUSES = ("n", "presence_penalty", "frequency_penalty", "logprobs")


def check_model(request: OmniRequest, config: CoreModuleConfig) -> None:
    """Refuse a request whose DiT stage names a model the config does not register, or
    that asks the AR pool's engine for what it cannot do (named, never ignored)."""
    if config.ar.engine == "transformers":
        for name in TRANSFORMERS_REFUSES:
            if getattr(request, name) != COMPLETION_FIELDS[name]:
                raise RequestValidationError(
                    name, "the AR pool's transformers engine cannot honour it; use vLLM"
                )
    if request.request_type is RequestType.SPEECH:
        check_speech(request, config)
    if not runs_dit_model(request):
        return
    known = config.diffusion_models()
    if request.model is not None and request.model not in known:
        raise RequestValidationError(
            "model",
            f"unknown diffusion model {request.model!r}; registered: {', '.join(sorted(known))} "
            "(the config's `models` and `diffusion.model`)",
        )
    name = dit_model(request, config)
    family = known[name].family
    if family is None:
        return
    if request.request_type is RequestType.VIDEO and family not in VIDEO_FAMILIES:
        raise RequestValidationError(
            "model", f"{name!r} ({family}) makes images, not videos: send generate_image"
        )
    audio = request.request_type is RequestType.AUDIO
    if audio != (family in AUDIO_FAMILIES):
        made = "sounds" if family in AUDIO_FAMILIES else "pictures"
        raise RequestValidationError(
            "model", f"{name!r} ({family}) makes {made}: send the task of that kind"
        )


def check_speech(request: OmniRequest, config: CoreModuleConfig) -> None:
    """Refuse a speech request for another model than the speech pool's, or in a voice
    the config does not name (a speaker id, "2", is checked by the worker against its
    model's speakers)."""
    speech = config.speech
    if request.model is not None and request.model != speech.model:
        raise RequestValidationError(
            "model", f"the speech pool serves {speech.model!r}, not {request.model!r}"
        )
    voice = request.voice
    if voice is not None and not voice.isdigit() and voice not in speech.voices:
        raise RequestValidationError(
            "voice",
            f"unknown voice {voice!r}; voices: {', '.join(speech.voices)} (or a speaker id)",
        )


def model_queues(config: CoreModuleConfig) -> dict[str, str]:
    """Registered model -> its queue in the diffusion pool (`keys.model_queue`)."""
    pool = config.diffusion.queue
    return {name: keys.model_queue(pool, name) for name in config.diffusion_models()}
