"""A batch's input file, line by line: what refuses the whole batch, and each line's
requests.

`parse` checks what OpenAI checks when a batch is created: every line is a JSON object
with a string `custom_id` (unique in the file), `method` POST, a `url` this API serves
in batches and an object `body`; any of these wrong fails the whole batch, with the
lines named in `errors`. `build` turns one line's body into its requests with the
endpoint's own body models, so a line is checked exactly like the same call over HTTP;
a body that fails is that line's error (the error file), not the batch's. Every
request runs at the low priority class; streaming is refused. The request ids come
from the batch id and the line's index, so building a line again (a batch resumed by
another process) names the same requests, which the producer's id check never runs
twice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from omni_tasks.api.errors import APIError, body_error, invalid, request_error
from omni_tasks.api.idempotency import CallKey
from omni_tasks.api.openai_images import ImageOptions, _requests
from omni_tasks.api.openai_text import ChatBody, CompletionBody
from omni_tasks.config import CoreModuleConfig, Registries
from omni_tasks.errors import RequestValidationError
from omni_tasks.model_registry import check_model
from omni_tasks.requests import OmniRequest

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
IMAGES = "/v1/images/generations"
ENDPOINTS = (CHAT, COMPLETIONS, IMAGES)
#: OpenAI's bound on the requests of one batch.
MAX_LINES = 50_000
#: How many of a refused file's problems `errors` lists.
MAX_ERRORS = 100
#: The class every batch request runs at: interactive traffic passes it.
BATCH_PRIORITY = "low"


@dataclass(frozen=True)
class Line:
    """One request line: its index among the file's requests, its line number."""

    index: int
    number: int
    custom_id: str
    url: str
    body: dict[str, Any]


@dataclass
class Parsed:
    lines: list[Line] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Built:
    """A line's record (what its outcome needs) and its requests, or its error."""

    record: dict[str, Any]
    requests: list[OmniRequest]
    error: APIError | None = None


def batch_error(code: str, message: str, number: int | None, param: str | None = None) -> dict:
    return {"code": code, "message": message, "param": param, "line": number}


def parse(content: str) -> Parsed:
    """Every request line of `content`, or the problems that fail the whole batch."""
    parsed, seen = Parsed(), set()
    for number, text in enumerate(content.splitlines(), start=1):
        if not text.strip():
            continue
        line, problem = _line(text, number, len(parsed.lines))
        if problem is None and line is not None and line.custom_id in seen:
            problem = batch_error(
                "duplicate_custom_id",
                f"custom_id {line.custom_id!r} appears more than once; each must be unique",
                number,
                "custom_id",
            )
        if problem is not None:
            if len(parsed.errors) < MAX_ERRORS:
                parsed.errors.append(problem)
            continue
        assert line is not None
        seen.add(line.custom_id)
        parsed.lines.append(line)
    if not parsed.lines and not parsed.errors:
        parsed.errors.append(batch_error("empty_file", "the input file has no request", None))
    if len(parsed.lines) > MAX_LINES:
        message = f"the input file has {len(parsed.lines)} requests; at most {MAX_LINES}"
        parsed.errors.append(batch_error("too_many_requests", message, None))
    return parsed


def _line(text: str, number: int, index: int) -> tuple[Line | None, dict | None]:
    try:
        data = json.loads(text)
    except ValueError as exc:
        return None, batch_error("invalid_json_line", f"not valid JSON: {exc}", number)
    if not isinstance(data, dict):
        return None, batch_error("invalid_json_line", "each line must be a JSON object", number)
    custom_id = data.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        message = "custom_id: a non-empty string is required"
        return None, batch_error("missing_required_parameter", message, number, "custom_id")
    if data.get("method", "POST") != "POST":
        message = f"method: must be POST, not {data.get('method')!r}"
        return None, batch_error("invalid_method", message, number, "method")
    url = data.get("url")
    if url is None:
        message = f"url: required, one of {list(ENDPOINTS)}"
        return None, batch_error("missing_required_parameter", message, number, "url")
    if url not in ENDPOINTS:
        message = f"url: {url!r} cannot be batched here; one of {list(ENDPOINTS)}"
        return None, batch_error("invalid_url", message, number, "url")
    body = data.get("body")
    if not isinstance(body, dict):
        message = "body: a JSON object (the endpoint's request body) is required"
        return None, batch_error("missing_required_parameter", message, number, "body")
    return Line(index, number, custom_id, url, body), None


def request_base(batch_id: str, index: int) -> str:
    """The request id of a line's (first) request: stable for the batch and the line."""
    return f"{batch_id}-{index}"


def build(
    line: Line, batch_id: str, text_models: set[str] | None, config: CoreModuleConfig
) -> Built:
    """The line's requests, checked like the endpoint checks them against `config`'s
    registry (`text_models`: the text models live AR workers serve, None when none is
    live: the request then waits in its queue)."""
    record: dict[str, Any] = {"custom_id": line.custom_id, "url": line.url, "ids": []}
    try:
        if line.body.get("stream"):
            raise invalid("stream", "streaming is not available in a batch")
        if line.url == IMAGES:
            made = _image_requests(line, batch_id, record, config)
        else:
            registries = Registries.from_config(config)
            made = [_text_request(line, batch_id, record, text_models, registries)]
    except APIError as exc:
        return Built(record, [], exc)
    record["ids"] = [r.request_id for r in made]
    record["type"] = made[0].request_type.value
    return Built(record, made)


def _text_request(
    line: Line,
    batch_id: str,
    record: dict[str, Any],
    text_models: set[str] | None,
    registries: Registries,
) -> OmniRequest:
    kind = ChatBody if line.url == CHAT else CompletionBody
    try:
        body = kind.model_validate(line.body)
    except ValidationError as exc:
        raise body_error(exc.errors()) from None
    omni = body.to_request(
        BATCH_PRIORITY, request_base(batch_id, line.index), registries=registries
    )
    if text_models is not None and body.model not in text_models:
        served = sorted(text_models)
        raise APIError(
            404,
            f"model {body.model!r} is not served here; live workers serve {served}",
            param="model",
            code="model_not_found",
        )
    record["model"] = body.model
    return omni


def _image_requests(
    line: Line, batch_id: str, record: dict[str, Any], config: CoreModuleConfig
) -> list[OmniRequest]:
    try:
        options = ImageOptions.model_validate(line.body)
    except ValidationError as exc:
        raise body_error(exc.errors()) from None
    key = CallKey(request_base(batch_id, line.index))
    made = _requests(options, BATCH_PRIORITY, None, key, registries=Registries.from_config(config))
    try:
        for omni in made:
            check_model(omni, config)
    except RequestValidationError as exc:
        raise request_error(exc) from None
    record.update(
        prompt=options.prompt,
        response_format=options.response_format or "b64_json",
        output_format=options.output_format,
        output_compression=options.output_compression,
        describe=options.describe(),
    )
    return made
