"""docs/configuration.md is what `omni_tasks.config.reference.render()` generates, and it
names every field of every config section (`python -m omni_tasks.config.reference`
rewrites it)."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterator

from omni_tasks.config import CoreModuleConfig
from omni_tasks.config.reference import FIELD_DOCS, PAGE, render


def schema_fields(cls: type, prefix: str = "") -> Iterator[str]:
    """Every leaf field's dotted name, walked from the schema itself; a mapping whose
    values are dataclasses (the `models` registry) adds `<section>.<name>.<field>`."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        dotted = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            yield from schema_fields(hints[f.name], dotted + ".")
            continue
        yield dotted
        args = typing.get_args(hints[f.name])
        if len(args) == 2 and dataclasses.is_dataclass(args[1]):
            yield from schema_fields(args[1], dotted + ".<name>.")


def test_the_page_is_what_the_schema_generates() -> None:
    assert PAGE.read_text(encoding="utf-8") == render(), (
        "docs/configuration.md is stale: run `python -m omni_tasks.config.reference`"
    )


def test_every_field_of_every_section_is_on_the_page() -> None:
    page = PAGE.read_text(encoding="utf-8")
    names = list(schema_fields(CoreModuleConfig))
    assert {"scheduler.scheduler_type", "cache.max_memory_gib", "api.token"} <= set(names)
    assert "models.<name>.path" in names
    missing = [name for name in names if f"| `{name}` |" not in page]
    assert not missing, missing


def test_every_section_has_a_heading() -> None:
    hints = typing.get_type_hints(CoreModuleConfig)
    page = PAGE.read_text(encoding="utf-8")
    for f in dataclasses.fields(CoreModuleConfig):
        if dataclasses.is_dataclass(hints[f.name]):
            assert f"## `{f.name}` (`{hints[f.name].__name__}`)" in page


def test_each_description_is_of_a_field_and_each_field_has_one() -> None:
    names = set(schema_fields(CoreModuleConfig))
    assert set(FIELD_DOCS) == names, set(FIELD_DOCS) ^ names
