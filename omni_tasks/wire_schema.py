"""The JSON Schemas of the wire contract (`docs/wire.md`): each public task's kwargs and
result, and the failure a caller reads. Generated from the request model
(`omni_tasks.requests.OmniRequest`), the result dataclasses (`omni_tasks.results`) and
the error classes (`omni_tasks.errors`); `omni-tasks schemas --write` writes them under
`docs/schemas/`, and a test keeps the checked-in files in step with the code.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from omni_tasks import errors, results
from omni_tasks.audio_fields import DEFAULT_AUDIO_GUIDANCE, DEFAULT_AUDIO_SECONDS
from omni_tasks.requests import MAX_SEED, SIDE_MULTIPLE, OmniRequest

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
#: Where the checked-in schemas live in a source tree.
DEFAULT_DIR = Path(__file__).resolve().parents[1] / "docs" / "schemas"

#: The request fields by what uses them; every field of `OmniRequest` is in one group.
COMMON = ("request_id", "request_type", "prompt", "priority", "model", "created_at")
COMMON_TAIL = ("timeout_s", "lora", "seed")
TEXT = ("max_tokens", "temperature", "top_p", "stop")
COMPLETION = ("n", "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs", "stream")
IMAGE = ("negative_prompt", "width", "height", "steps", "guidance", "true_cfg_scale")
IMAGE_TAIL = ("step_cache", "step_cache_params", "partial_images")
EDIT = ("image", "strength")
VIDEO = ("num_frames", "fps", "image")
AUDIO_FILE = ("response_format", "sample_rate")
SPEECH = ("input", "voice", "speed", *AUDIO_FILE, "stream")
AUDIO = ("negative_prompt", "steps", "guidance", "seconds", *AUDIO_FILE)
FIELDS_OF_TYPE = {
    "text": COMMON + TEXT + COMPLETION + COMMON_TAIL,
    "chat": tuple(n for n in COMMON if n != "prompt")
    + ("messages",)
    + TEXT
    + COMPLETION
    + COMMON_TAIL,
    "diffusion": COMMON + IMAGE + IMAGE_TAIL + COMMON_TAIL,
    "image": COMMON + IMAGE + EDIT + IMAGE_TAIL + COMMON_TAIL,
    "multimodal": COMMON + TEXT + IMAGE + IMAGE_TAIL + COMMON_TAIL,
    "video": COMMON + IMAGE + VIDEO + IMAGE_TAIL + COMMON_TAIL,
    "speech": tuple(n for n in COMMON if n != "prompt") + SPEECH + ("timeout_s", "seed"),
    "audio": COMMON + AUDIO + ("step_cache", "step_cache_params", "timeout_s", "seed"),
}
#: Defaults a request type has of its own (`audio_fields.audio_aliases`).
TYPE_DEFAULTS = {"audio": {"guidance": DEFAULT_AUDIO_GUIDANCE, "seconds": DEFAULT_AUDIO_SECONDS}}
#: The field a request type cannot do without (the rest: `prompt`).
INPUT_OF_TYPE = {"chat": "messages", "speech": "input"}

#: The public tasks: name -> (request types it takes, result class).
TASKS: dict[str, tuple[tuple[str, ...], type]] = {
    "omni_tasks.generate_text": (("text",), results.TextResult),
    "omni_tasks.generate_chat": (("chat",), results.TextResult),
    "omni_tasks.generate_image": (("diffusion", "image"), results.ImageResult),
    "omni_tasks.generate_multimodal": (("multimodal",), results.MultimodalResult),
    "omni_tasks.generate_video": (("video",), results.VideoResult),
    "omni_tasks.generate_audio": (("audio",), results.AudioResult),
    "omni_tasks.generate_speech": (("speech",), results.SpeechResult),
    "omni_tasks.probe": (("text",), results.ProbeResult),
}

#: What the wire adds to the model's own field schemas.
NOTES: dict[str, dict[str, Any]] = {
    "request_id": {
        "description": "Leave it out: the request id is the task id. If given, it must "
        "equal the task id, or the message is refused (RequestValidationError, field "
        "request_id). The same id with the same request is an idempotent repeat; with "
        "a different request, a conflict."
    },
    "request_type": {"description": "Optional: the task decides it (see the enum)."},
    "prompt": {"description": "Not blank."},
    "messages": {
        "description": "Chat requests: OpenAI's messages ({role, content}), rendered with "
        "the model's chat template on the worker (or `ar.chat_template`); a model without "
        "one refuses them (RequestValidationError, field messages)."
    },
    "n": {"description": "Completions of the one prompt, in `choices`; vLLM engine only."},
    "logprobs": {
        "description": "Log-probabilities of the sampled tokens, in `choices[].logprobs`, "
        "with `top_logprobs` alternatives each; vLLM engine only."
    },
    "priority": {
        "description": "The priority class. It orders a message sent without a broker "
        "priority; with an integer broker priority (1-9), that one applies."
    },
    "model": {
        "description": "Image and multimodal requests: the diffusion model, a name of the "
        "workers' `models` registry or their default `diffusion.model` (left out: that "
        "default). Only a worker serving it runs the request; an unregistered name is "
        "refused (RequestValidationError, field model). Text requests: the AR pool's "
        "model, not checked by workers. Speech requests: the speech pool's model "
        "(`speech.model`); another is refused."
    },
    "input": {"description": "Speech requests: the text to speak (OpenAI's `input`)."},
    "voice": {
        "description": "Speech requests: a voice of the workers' `speech.voices` (the "
        "default config: alloy, echo, fable, nova), or a speaker id of the model "
        '("2"). Left out: `speech.default_voice`. An unknown voice is refused '
        "(RequestValidationError, field voice)."
    },
    "speed": {"description": "Speech requests: the speaking rate (1 normal)."},
    "response_format": {
        "description": "Speech and audio requests: the file's format. pcm: raw signed "
        "16-bit little-endian samples, channels interleaved."
    },
    "sample_rate": {
        "description": "Speech and audio requests: the file's sample rate (resampled). "
        "Left out: the model's own. Opus takes 8, 12, 16, 24 or 48 kHz."
    },
    "seconds": {
        "description": "Audio requests: the sound's length in seconds. Left out: 2. "
        "(A video request's `seconds` becomes num_frames.)"
    },
    "stream": {
        "description": "Text requests: write the text while it is generated, for "
        "`omni_tasks.stream_text` and the HTTP API's streams; speech requests: write the "
        "audio file's bytes as they are made, for `omni_tasks.stream_audio`. Changes "
        "nothing in the result."
    },
    "created_at": {
        "description": "When the client sent the request, in Unix seconds: "
        "timings.queued_s is measured from it. Left out, the first omni-tasks process "
        "that validates the message sets it (the worker, or the step that re-routes a "
        "message), so queued_s counts only from there."
    },
    "width": {"multipleOf": SIDE_MULTIPLE},
    "height": {"multipleOf": SIDE_MULTIPLE},
    "seed": {
        "description": f"0..{MAX_SEED}. Left out: derived from the request id (a new id, "
        "a new seed; the same id, the same image)."
    },
    "image": {
        "description": "The input image of an edit, or the first frame of an "
        "image-to-video request, inline: base64 PNG/JPEG/WebP or a "
        "data: URL, at most 16 MiB and 16 MP. A file path is refused."
    },
    "true_cfg_scale": {
        "description": "True classifier-free guidance against negative_prompt, which it "
        "requires; 1 turns it off. Left out: the pool's default (4)."
    },
    "num_frames": {
        "description": "Video requests: frames, 4k+1 (5, 9, ..., 81: the video VAE's); "
        "others are refused (RequestValidationError, field num_frames). Left out: 17. "
        "Python callers may give `seconds` instead, rounded to the nearest 4k+1 frames."
    },
    "fps": {"description": "Video requests: frames per second of the MP4."},
    "lora": {"description": "Adapter names from the workers' registry, or {name, scale}."},
    "timeout_s": {"description": "Seconds from created_at; capped by the config."},
}

#: The `args` an error is stored with (`exc_message`), beyond a single message.
ERROR_ARGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "RequestValidationError": (("field", "message"), ("errors",)),
    "ConfigError": (("field", "message"), ()),
    "RequestConflictError": (("request_id", "message"), ()),
    "BrokerUnavailableError": (("request_id", "message"), ("may_be_accepted",)),
}
ARG_SCHEMAS: dict[str, dict[str, Any]] = {
    "errors": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
        },
        "description": "Every bad field, when there is more than one.",
    },
    "may_be_accepted": {
        "type": "boolean",
        "description": "Whether the request may have been accepted (and may run).",
    },
}


def _not_null(field: dict[str, Any]) -> dict[str, Any]:
    """A field optional in the model that this task requires: its non-null variant."""
    variants = [v for v in field.get("anyOf", []) if v.get("type") != "null"]
    if len(variants) != 1:
        return field
    rest = {k: v for k, v in field.items() if k not in ("anyOf", "default")}
    return {**variants[0], **rest}


def request_schema(task: str) -> dict[str, Any]:
    """The JSON Schema of `task`'s kwargs (only the fields its request types use)."""
    types, _ = TASKS[task]
    model = OmniRequest.model_json_schema()
    names = [n for t in types for n in FIELDS_OF_TYPE[t]]
    properties = {n: {**model["properties"][n], **NOTES.get(n, {})} for n in dict.fromkeys(names)}
    properties["request_type"] = {"enum": list(types), **NOTES["request_type"]}
    for name, default in TYPE_DEFAULTS.get(types[0], {}).items():
        properties[name] = {**properties[name], "default": default}
    needed = INPUT_OF_TYPE.get(types[0], "prompt")
    properties[needed] = _not_null(properties[needed])
    schema: dict[str, Any] = {
        "$schema": SCHEMA_DIALECT,
        "title": f"{task} kwargs",
        "description": f"The keyword arguments (kwargs) of a {task} message, as JSON.",
        "type": "object",
        "properties": properties,
        "required": [needed],
        "additionalProperties": False,
    }
    used = {ref for p in properties.values() for ref in _refs(p)}
    defs = {k: v for k, v in model.get("$defs", {}).items() if k in used}
    if defs:
        schema["$defs"] = defs
    if "image" in types:
        is_edit = {"properties": {"request_type": {"const": "image"}}, "required": ["request_type"]}
        schema["if"], schema["then"] = is_edit, {"required": ["image"]}
    return schema


def result_schema(task: str) -> dict[str, Any]:
    """The JSON Schema of `task`'s result: every field is always present."""
    _, cls = TASKS[task]
    schema = TypeAdapter(cls).json_schema()
    schema["required"] = list(schema["properties"])
    return {"$schema": SCHEMA_DIALECT, "title": f"{task} result", **schema}


def failure_schema() -> dict[str, Any]:
    """The JSON Schema of a failed task's stored error (`result` of a FAILURE)."""
    variants = [_error_variant(cls) for cls in error_classes()]
    return {
        "$schema": SCHEMA_DIALECT,
        "title": "omni-tasks failure",
        "description": "A failed task's `result` as Celery stores it: the error's type "
        "name, module and args. Other errors (a lost worker, a time limit) have other "
        "modules and a message.",
        "type": "object",
        "required": ["exc_type", "exc_module", "exc_message"],
        "anyOf": variants,
    }


def error_classes() -> list[type[errors.CoreModuleError]]:
    """Every error of `omni_tasks.errors`, base first."""
    found = [v for v in vars(errors).values() if isinstance(v, type)]
    return [c for c in found if issubclass(c, errors.CoreModuleError)]


def _error_variant(cls: type) -> dict[str, Any]:
    required, optional = ERROR_ARGS.get(cls.__name__, (("message",), ()))
    items = [ARG_SCHEMAS.get(n, {"type": "string", "title": n}) for n in required + optional]
    return {
        "properties": {
            "exc_type": {"const": cls.__name__},
            "exc_module": {"const": cls.__module__},
            "exc_message": {
                "type": "array",
                "prefixItems": items,
                "minItems": len(required),
                "maxItems": len(items),
            },
        },
        "description": (cls.__doc__ or "").split("\n\n")[0].strip(),
    }


def _refs(node: Any) -> Iterable[str]:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str):
            yield ref.rsplit("/", 1)[-1]
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def all_schemas() -> dict[str, dict[str, Any]]:
    """File name -> schema, for every file under `docs/schemas/`."""
    _check_groups()
    found: dict[str, dict[str, Any]] = {}
    for task in TASKS:
        short = task.removeprefix("omni_tasks.")
        found[f"{short}.request.json"] = request_schema(task)
        found[f"{short}.result.json"] = result_schema(task)
    found["failure.json"] = failure_schema()
    return found


def _check_groups() -> None:
    """Every request field is in a group, so no field is left out of the schemas."""
    grouped = {n for names in FIELDS_OF_TYPE.values() for n in names}
    missing = set(OmniRequest.model_fields) - grouped
    if missing:
        raise RuntimeError(f"request fields in no schema group (wire_schema.py): {missing}")


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=False) + "\n"


def stale_files(directory: Path = DEFAULT_DIR) -> list[str]:
    """The schema files under `directory` that differ from the code (or are missing)."""
    stale = []
    for name, schema in all_schemas().items():
        path = directory / name
        if not path.is_file() or path.read_text() != render(schema):
            stale.append(name)
    return stale


def write_schemas(directory: Path = DEFAULT_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in all_schemas().items():
        path = directory / name
        path.write_text(render(schema))
        written.append(path)
    return written
