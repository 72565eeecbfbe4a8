"""What a cached value weighs, and how to copy or move it: the cache's accounting rests on this.

A cache value is a tensor, a `TensorBundle` (a compressed tensor), or a dict / list /
tuple (namedtuples and `torch.Size` included) nesting those, with small immutable
Python leaves (None, bool, int, float, complex, str, enums, dtypes, devices) allowed
anywhere. Anything else (numpy arrays, bytes, arbitrary objects) raises `TypeError`:
the cache could not weigh it honestly.

Weight (`value_nbytes`) = the sum, over every tensor in the value, of
`t.numel() * t.element_size()`. Two consequences, chosen for simplicity:

* A storage shared by two entries of one value (two views of one tensor) is counted
  once per view. The cache never stores such aliases: it stores private copies
  (`move_to(..., copy=True)`, `clone_value`), and a copy of a view, of an expanded
  tensor or of a non-contiguous tensor owns exactly `numel * element_size` bytes; so
  the count of a stored value is also its real footprint.
* Python leaves weigh 0 bytes: they are metadata (a step index, a shape), not payload.
  Dict keys are not traversed (they must be such leaves too).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from typing import Any

import torch

_LEAVES = (type(None), bool, int, float, complex, str, enum.Enum, torch.dtype, torch.device)


class TensorBundle:
    """A cache value leaf made of several tensors (e.g. int8 data + fp32 scales).

    Subclasses list their tensors in `tensors()` (for weighing) and rebuild themselves
    with every tensor mapped in `map_tensors(fn)` (for moving and copying).
    """

    def tensors(self) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> TensorBundle:
        raise NotImplementedError


def tensor_nbytes(t: torch.Tensor) -> int:
    """The bytes of `t`'s elements (not of its whole storage, see the module docstring)."""
    if t.layout is not torch.strided:
        raise TypeError(f"cannot weigh a {t.layout} tensor; densify it first")
    return t.numel() * t.element_size()


def iter_tensors(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor of `value`, depth first; `TypeError` on an unsupported leaf."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, TensorBundle):
        yield from value.tensors()
    elif isinstance(value, dict):
        for item in value.values():
            yield from iter_tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from iter_tensors(item)
    elif not isinstance(value, _LEAVES):
        raise TypeError(
            f"the DiT cache stores tensors and dicts/lists/tuples of them, "
            f"not {type(value).__name__}"
        )


def value_nbytes(value: Any) -> int:
    """Exact weight of `value`: sum of `numel * element_size` of its tensors."""
    return sum(tensor_nbytes(t) for t in iter_tensors(value))


def map_leaves(value: Any, fn: Callable[[torch.Tensor | TensorBundle], Any]) -> Any:
    """`value` rebuilt with `fn` applied to each tensor and each whole bundle.

    Containers are rebuilt, never mutated: lists and tuples keep their type (namedtuples
    included), dict subclasses come back as plain dicts. Python leaves are returned as is.
    """
    if isinstance(value, (torch.Tensor, TensorBundle)):
        return fn(value)
    if isinstance(value, dict):
        return {k: map_leaves(v, fn) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(map_leaves(v, fn) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)([map_leaves(v, fn) for v in value])
    if isinstance(value, _LEAVES):
        return value
    raise TypeError(
        f"the DiT cache stores tensors and dicts/lists/tuples of them, not {type(value).__name__}"
    )


def map_tensors(value: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """`value` rebuilt with `fn` applied to every tensor, inside bundles too."""

    def leaf(x: torch.Tensor | TensorBundle) -> Any:
        return x.map_tensors(fn) if isinstance(x, TensorBundle) else fn(x)

    return map_leaves(value, leaf)


def move_to(value: Any, device: str | torch.device, copy: bool = False) -> Any:
    """`value` with every tensor on `device` (detached).

    With `copy=True` every tensor is a private copy even when it already is on `device`,
    so the result shares no storage with `value` (what the cache stores).
    """
    device = torch.device(device)
    return map_tensors(value, lambda t: t.detach().to(device, copy=copy))


def clone_value(value: Any) -> Any:
    """A deep tensor copy of `value` on the same devices: what `get` hands out."""
    return map_tensors(value, lambda t: t.detach().clone())
