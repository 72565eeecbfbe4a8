"""How device work is handed to the thread that drives the device.

A diffusion engine's step loop owns its device: the text encoders, a shape's memory
probe and a LoRA adapter load all run on the loop thread between two steps
(`StepLoop.run`). The objects that need it receive a `RunOnDevice` when they are built;
`run_here` serves where no such thread exists (tests, scripts).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

T = TypeVar("T")


class RunOnDevice(Protocol):
    """Runs `fn` on the device thread and returns its result (or raises its error)."""

    def __call__(self, fn: Callable[[], T], /) -> T: ...


def run_here(fn: Callable[[], T]) -> T:
    """Run `fn` in the calling thread: for a device no other thread drives."""
    return fn()
