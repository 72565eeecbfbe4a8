"""OpenAI's image endpoints on the diffusion pool.

- `POST /v1/images/generations` (JSON) -> DIFFUSION requests, one per image (`n`).
- `POST /v1/images/edits` (multipart: `image` + the same fields) -> IMAGE requests.

Diffusion extras ride in the body (the SDKs' `extra_body`): `seed`,
`num_inference_steps`, `guidance_scale`, `negative_prompt`, `true_cfg_scale` (with a
negative prompt), `num_outputs_per_prompt` (vLLM-omni's name for `n`), `priority`,
`step_cache`, `strength` (edits); any other field is refused, named. `stream: true`
answers Server-Sent Events: `partial_images` (0-3) previews decoded from intermediate
latents, then the final image (`sse.image_events`). OpenAI fields with no meaning here
(`quality`, `style`, `background`, `moderation`) are accepted and echoed, never used.
An edit without `size` (or with `auto`) keeps the input image's size, rounded to the
models' multiple of 16 (`input_size`). With an `Idempotency-Key` the images' request
ids come from the key (`idempotency`): a retry answers the same images, run once; a
call that failed part way, or waited past `api.wait_timeout_s` (504), keeps what it
accepted running, for its retry to complete.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.datastructures import UploadFile

from omni_tasks.api.context import config_of, registries_of
from omni_tasks.api.errors import (
    body_error,
    from_failure,
    invalid,
    request_error,
    waited_too_long,
)
from omni_tasks.api.files import base_url_of, file_url, image_b64, image_name, output_root
from omni_tasks.api.hub import ResultHub
from omni_tasks.api.idempotency import CallKey, KeyedCall, call_fingerprint, call_key
from omni_tasks.api.sse import image_events, streaming
from omni_tasks.api.submission import accept, priority_of, withdraw
from omni_tasks.config import Registries
from omni_tasks.errors import RequestValidationError
from omni_tasks.image_input import image_size
from omni_tasks.requests import (
    MAX_SEED,
    MAX_SIDE,
    MIN_SIDE,
    SIDE_MULTIPLE,
    OmniRequest,
    StepCacheMode,
    create_diffusion_request,
    create_image_request,
)

router = APIRouter()

#: Request fields -> the API's names for them, so an error names what the client sent.
PARAM_NAMES = {
    "width": "size",
    "height": "size",
    "steps": "num_inference_steps",
    "guidance": "guidance_scale",
}
MAX_IMAGES = 4


class ImageOptions(BaseModel):
    """The fields of both image endpoints (an edit's come as form fields: coerced)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_IMAGES)
    num_outputs_per_prompt: int | None = Field(None, ge=1, le=MAX_IMAGES)
    size: str | None = None
    response_format: Literal["b64_json", "url"] | None = None
    output_format: Literal["png", "webp", "jpeg"] = "png"
    output_compression: int | None = Field(None, ge=0, le=100)
    user: str | None = None
    stream: bool = False
    partial_images: int = Field(0, ge=0, le=3)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    true_cfg_scale: float | None = None
    priority: Literal["high", "normal", "low"] | None = None
    step_cache: StepCacheMode | None = None
    strength: float | None = None
    timeout_s: float | None = None
    quality: str | None = None
    style: str | None = None
    background: str | None = None
    moderation: str | None = None

    @model_validator(mode="after")
    def _one_count(self) -> ImageOptions:
        """`num_outputs_per_prompt` is vLLM-omni's `n`: either, or both agreeing."""
        extra = self.num_outputs_per_prompt
        if extra is not None and "n" in self.model_fields_set and extra != self.n:
            raise ValueError(f"num_outputs_per_prompt: {extra} differs from n ({self.n})")
        if extra is not None:
            self.n = extra
        return self

    def dimensions(self) -> dict[str, int]:
        if self.size in (None, "auto"):
            return {}
        width, sep, height = self.size.lower().partition("x")
        if not (sep and width.isdigit() and height.isdigit()):
            raise invalid("size", "must be WIDTHxHEIGHT, e.g. 512x512, or auto")
        return {"width": int(width), "height": int(height)}

    def request_fields(self, priority: str, index: int) -> dict[str, Any]:
        """The request's fields for image `index` of `n` (a given seed counts up)."""
        fields: dict[str, Any] = {"priority": priority, **self.dimensions()}
        named = {
            "steps": self.num_inference_steps,
            "guidance": self.guidance_scale,
            "negative_prompt": self.negative_prompt,
            "true_cfg_scale": self.true_cfg_scale,
            "step_cache": self.step_cache,
            "strength": self.strength,
            "timeout_s": self.timeout_s,
            "model": self.model,
            "seed": None if self.seed is None else (self.seed + index) % (MAX_SEED + 1),
        }
        fields.update({k: v for k, v in named.items() if v is not None})
        if self.stream:
            fields["partial_images"] = self.partial_images
        return fields

    def describe(self) -> dict[str, Any]:
        """What OpenAI's image events and responses repeat about the request."""
        size = self.size if self.size not in (None, "auto") else "auto"
        return {
            "size": size,
            "quality": self.quality or "auto",
            "background": self.background or "auto",
            "output_format": self.output_format,
        }


def _requests(
    options: ImageOptions,
    priority: str,
    image: bytes | None,
    key: CallKey,
    *,
    registries: Registries,
) -> list[OmniRequest]:
    """The requests of an image call (one per image), their names checked against
    `registries` (the app's)."""
    if options.stream and options.n != 1:
        sent_as = "n" if options.num_outputs_per_prompt is None else "num_outputs_per_prompt"
        raise invalid(sent_as, "must be 1 when stream is true")
    made = []
    try:
        for i in range(options.n):
            fields = {**options.request_fields(priority, i), "request_id": key.request_id(i)}
            if image is None:
                made.append(
                    create_diffusion_request(options.prompt, registries=registries, **fields)
                )
            else:
                fields = {**input_size(image), **fields}  # a given size wins
                made.append(
                    create_image_request(options.prompt, image, registries=registries, **fields)
                )
    except RequestValidationError as exc:
        raise request_error(exc, PARAM_NAMES) from None
    return made


def input_size(image: bytes) -> dict[str, int]:
    """The size of an edit without `size`: the input's, scaled down to fit `MAX_SIDE`
    and each side rounded to the nearest multiple of `SIDE_MULTIPLE` (16, what the
    models take), at least `MIN_SIDE`. An image that cannot be read is left to the
    request's own validation, which names `image`."""
    try:
        width, height = image_size(image)
    except ValueError:
        return {}
    shrink = min(1.0, MAX_SIDE / max(width, height, 1))

    def side(value: int) -> int:
        rounded = round(value * shrink / SIDE_MULTIPLE) * SIDE_MULTIPLE
        return min(max(rounded, MIN_SIDE), MAX_SIDE)

    return {"width": side(width), "height": side(height)}


async def _serve(request: Request, options: ImageOptions, image: bytes | None = None) -> Response:
    app = request.app.state
    key = call_key(request)
    priority = priority_of(options.priority, request.headers.get("x-priority"))
    made = _requests(options, priority, image, key, registries=registries_of(request))
    await _accept_all(request, key, options, made)
    if options.stream:
        events = image_events(
            app.hub,
            made[0].request_id,
            options.describe,
            options.output_format,
            options.output_compression,
        )
        return streaming(events)
    timeout_s = config_of(request).api.wait_timeout_s
    metas = await _wait_all(app.hub, made, timeout_s, kept=key.base is not None)
    data = [await _image_data(request, options, meta) for meta in metas]
    body = {"created": int(time.time()), "data": data, **options.describe()}
    return JSONResponse(body)


async def _accept_all(
    request: Request, key: CallKey, options: ImageOptions, made: list[OmniRequest]
) -> None:
    """Enqueue every image's request, each admitted on its own (a full queue stops the
    rest). All or nothing without a key: a failure withdraws what was accepted. With
    one, what was accepted stays, and the call's retry under the key completes it."""
    app = request.app.state
    fingerprint = call_fingerprint("images", made, options.model_dump(mode="json"))
    accepted: list[OmniRequest] = []
    ttl_s = config_of(request).result_expires
    async with KeyedCall(app.hub, key, fingerprint, ttl_s) as call:
        try:
            for omni in made:
                await accept(app.workers, omni, model=options.model)
                accepted.append(omni)
                call.accepted = True
        except BaseException:
            if key.base is None:
                for omni in accepted:
                    await withdraw(omni.request_id, omni.request_type)
            raise


async def _wait_all(
    hub: ResultHub, made: list[OmniRequest], timeout_s: float, kept: bool = False
) -> list[dict[str, Any]]:
    """Every request's result; 504 after `timeout_s` (`api.wait_timeout_s`), with all of
    them cancelled, or left to run for the retry of a keyed call (`kept`)."""
    metas = await asyncio.gather(*(hub.wait(r.request_id, timeout_s) for r in made))
    if any(meta is None for meta in metas):
        if not kept:
            for omni in made:
                await withdraw(omni.request_id, omni.request_type)
        raise waited_too_long(timeout_s, [r.request_id for r in made], kept)
    for omni, meta in zip(made, metas, strict=True):
        if meta["status"] != "SUCCESS":  # type: ignore[index]
            raise from_failure(meta.get("result"), omni.request_id)  # type: ignore[union-attr]
    return metas  # type: ignore[return-value]


async def _image_data(request: Request, options: ImageOptions, meta: dict[str, Any]) -> dict:
    result = meta["result"]
    path = result["image_path"]
    extra = {"revised_prompt": options.prompt, "seed": result.get("seed")}
    if options.response_format == "url":
        name = image_name(path, output_root(config_of(request)))
        url = file_url(base_url_of(request), name, options.output_format)
        return {"url": url, **extra}
    data = await image_b64(path, options.output_format, options.output_compression)
    return {"b64_json": data, **extra}


@router.post("/v1/images/generations")
async def generations(options: ImageOptions, request: Request) -> Response:
    return await _serve(request, options)


@router.post("/v1/images/edits")
async def edits(request: Request) -> Response:
    form = await request.form()
    fields: dict[str, Any] = {}
    image: bytes | None = None
    for name, value in form.multi_items():
        if name in ("image", "image[]"):
            if image is None and isinstance(value, UploadFile):
                image = await value.read()
            continue
        if name == "mask":
            raise invalid("mask", "masks are not supported: the whole image is edited")
        if isinstance(value, UploadFile):
            raise invalid(name, "must be a form field, not a file")
        fields[name] = value
    if image is None:
        raise invalid("image", "an edit needs an input image (a PNG, JPEG or WebP file)")
    try:
        options = ImageOptions.model_validate(fields)
    except ValidationError as exc:
        raise body_error(exc.errors()) from None
    return await _serve(request, options, image)
