"""The wire contract's JSON Schemas (docs/wire.md, docs/schemas/): generated from the code
and checked in. The files match what the code generates; what omni-tasks producers send
is valid under them; what they refuse, they refuse too; every error crosses the wire as
its own type with its fields, in the stored form the failure schema describes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from omni_tasks import (
    ConfigError,
    RequestValidationError,
    create_diffusion_request,
    create_image_request,
    create_multimodal_request,
    create_text_request,
    errors,
    generate_image,
    generate_text,
)
from omni_tasks.cli import main
from omni_tasks.requests import OmniRequest
from omni_tasks.tasks import app
from omni_tasks.wire_schema import (
    DEFAULT_DIR,
    TASKS,
    all_schemas,
    error_classes,
    stale_files,
)

PNG_1PX = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmM"
    "IQAAAABJRU5ErkJggg=="
)


def schema(name: str) -> Draft202012Validator:
    found = json.loads((DEFAULT_DIR / name).read_text())
    Draft202012Validator.check_schema(found)
    return Draft202012Validator(found)


def test_the_checked_in_schemas_are_what_the_code_generates() -> None:
    assert sorted(p.name for p in DEFAULT_DIR.glob("*.json")) == sorted(all_schemas())
    assert stale_files() == [], "run: omni-tasks schemas --write"


def test_the_cli_prints_checks_and_writes_them(tmp_path: Path, capsys) -> None:
    assert main(["schemas", "--check"]) == 0
    assert main(["schemas", "--check", "--dir", str(tmp_path)]) == 1  # nothing there
    assert main(["schemas", "--write", "--dir", str(tmp_path)]) == 0
    assert main(["schemas", "--check", "--dir", str(tmp_path)]) == 0
    capsys.readouterr()
    assert main(["schemas"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == all_schemas()
    for name, generated in printed.items():
        assert json.loads((tmp_path / name).read_text()) == generated


def test_every_request_field_is_in_some_schema() -> None:
    schemas = all_schemas()
    names = [t.removeprefix("omni_tasks.") for t in TASKS]
    described = {field for n in names for field in schemas[f"{n}.request.json"]["properties"]}
    assert described == set(OmniRequest.model_fields)


@pytest.mark.parametrize(
    ("task", "sent"),
    [
        ("generate_text", create_text_request("hi", max_tokens=8, stop=["."], priority="low")),
        ("generate_image", create_image_request("blue", PNG_1PX, strength=0.5, width=32)),
        ("generate_image", create_diffusion_request("a fox", negative_prompt="dull")),
        ("generate_multimodal", create_multimodal_request("a lighthouse", steps=2, seed=4)),
        ("probe", create_text_request("ping")),
    ],
    ids=["text", "edit", "diffusion", "multimodal", "probe"],
)
def test_what_producers_send_is_valid(task: str, sent: OmniRequest) -> None:
    message = sent.to_message()
    assert list(schema(f"{task}.request.json").iter_errors(message)) == []


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"width": 33}, "width"),
        ({"max_tokens": "16"}, "max_tokens"),
        ({"prompt": ""}, "prompt"),
        ({"priority": "urgent"}, "priority"),
        ({"unknown": 1}, "unknown"),
        ({"steps": 0}, "steps"),
        ({"seed": -1}, "seed"),
        ({"request_type": "image"}, "image"),  # an edit needs its input image
    ],
)
def test_what_the_schema_refuses_the_producer_refuses(changes: dict, field: str) -> None:
    message = {"prompt": "a fox", **changes}
    assert list(schema("generate_image.request.json").iter_errors(message))
    with pytest.raises(RequestValidationError) as info:
        generate_image.build_request(message)
    assert info.value.field == field


def test_a_text_task_takes_no_image_fields_in_its_schema() -> None:
    text = schema("generate_text.request.json")
    assert list(text.iter_errors({"prompt": "hi", "width": 64}))
    assert list(text.iter_errors({"prompt": "hi", "request_type": "diffusion"}))
    assert not list(text.iter_errors({"prompt": "hi", "created_at": 1.5, "seed": 3}))


def sample(cls: type[errors.CoreModuleError]) -> errors.CoreModuleError:
    if cls is RequestValidationError:
        return cls("width", "must be a multiple of 16")
    if cls is ConfigError:
        return cls("ar.queue", "must not be empty")
    if cls is errors.RequestConflictError:
        return cls("req_001")
    if cls is errors.BrokerUnavailableError:
        return cls("req_001", "request req_001 not sent: cannot reach Redis", True)
    return cls(f"{cls.__name__} happened")


@pytest.mark.parametrize("cls", error_classes(), ids=lambda c: c.__name__)
def test_every_error_crosses_the_wire_as_itself(cls: type) -> None:
    backend = app.backend
    error = sample(cls)
    stored = json.loads(json.dumps(backend.prepare_exception(error)))  # as JSON in Redis
    assert list(schema("failure.json").iter_errors(stored)) == []
    back = backend.exception_to_python(stored)
    assert type(back) is cls and str(back) == str(error) and back.args == error.args
    assert getattr(back, "field", None) == getattr(error, "field", None)


def test_all_validation_errors_survive_the_wire() -> None:
    with pytest.raises(RequestValidationError) as info:
        generate_text.build_request({"prompt": "", "max_tokens": 0})
    many = info.value
    assert len(many.errors) == 2
    stored = json.loads(json.dumps(app.backend.prepare_exception(many)))
    assert stored["exc_message"][:2] == [many.field, many.message]
    assert list(schema("failure.json").iter_errors(stored)) == []
    back: Any = app.backend.exception_to_python(stored)
    assert back.errors == many.errors and back.field == many.field
