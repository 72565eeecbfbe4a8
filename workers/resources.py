"""The device memory one diffusion worker may use, and what each running request costs.

**Budget.** On CUDA: `max_gpu_utilization` x the device's total memory
(`torch.cuda.mem_get_info`). On a CPU: `max_memory_gib`, bounded by `max_cpu_utilization`
x the system's memory. Out of it come the model's resident bytes (measured once the
model is loaded) and the DiT cache's `cache.max_memory_gib` (its carve-out, whether
filled or not); what is left is what running requests may use (`available_bytes`).

**Cost.** A request's cost depends on its shape (model kind, width, height, text length)
and on the batch it shares a step with. It is measured, never guessed: on first use of a
shape the engine hands a probe (`ShapeProbe`) that builds one step's inputs for 1 and 2
rows and runs the transformer on them once each:

- `row_bytes`: the tensor bytes of one row's inputs (its latents and prompt embeddings,
  what a running request keeps between steps);
- `step_bytes` / `step_row_bytes`: the peak memory a step allocates above what was live
  before it, at one row, and what each further row adds (peak at 2 rows minus peak at 1).
  On CUDA that is `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`.
  A CPU has no allocator peak, so `LiveTensorBytes` tracks it: a dispatch mode that
  sees every tensor the step creates, keeps a weak reference to its storage, and takes
  the largest sum of the storages alive after any operation: the step's real peak of
  tensor memory (the allocator's own slack and Python objects are not counted).

A batch of `b` rows of one shape costs `b * row_bytes + step_bytes + (b - 1) *
step_row_bytes`. A request is charged (`allocate`) what it adds to the batch it joins,
and freed (`deallocate`) when it leaves the running batch (paused or finished); the step
scheduler grows a batch only while `can_allocate` holds. A request whose shape does not
fit even alone is refused at admission with `ResourceError`, before it holds anything;
one whose inputs alone exceed what is left is refused without running the probe.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_iter

from omni_tasks.config import GIB, CoreModuleConfig
from omni_tasks.errors import ResourceError
from workers.device_thread import RunOnDevice, run_here
from workers.dit_cache.sizing import value_nbytes

log = logging.getLogger(__name__)
MIB = 2**20


class Allocatable(Protocol):
    """What the manager needs of a request (a `StepRequest`)."""

    @property
    def request_id(self) -> str: ...

    shape: Hashable | None


@dataclass(frozen=True)
class ShapeProbe:
    """How to measure one shape: `inputs(rows)` builds a step's inputs on the device,
    `forward(inputs)` runs the step; `label` names the shape in errors ("1024x1024
    image", "17-frame 64x64 video")."""

    label: str
    inputs: Callable[[int], dict[str, Any]]
    forward: Callable[[dict[str, Any]], Any]


@dataclass(frozen=True)
class ShapeCost:
    """The measured cost of one shape (see the module docstring)."""

    row_bytes: int
    step_bytes: int
    step_row_bytes: int

    def bytes_for(self, batch: int) -> int:
        if batch <= 0:
            return 0
        return batch * self.row_bytes + self.step_bytes + (batch - 1) * self.step_row_bytes


class LiveTensorBytes(TorchDispatchMode):
    """The peak bytes of tensor storage created, and still alive, inside the mode."""

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        # Sweep first: a freed storage's address may be reused by this very output.
        for key in [k for k, (ref, _) in self._live.items() if ref.expired()]:
            del self._live[key]
        # An output on an input's storage (a view, an in-place op) allocated nothing.
        given = {_storage_ptr(t) for t in tree_iter((args, kwargs))}
        for t in tree_iter(out):
            key = _storage_ptr(t)
            if key and key not in given and key not in self._live:
                storage = t.untyped_storage()
                self._live[key] = (StorageWeakRef(storage), storage.nbytes())
        self.peak = max(self.peak, sum(n for _, n in self._live.values()))
        return out


def _storage_ptr(t: Any) -> int:
    """The address of a dense tensor's storage (0 for anything else)."""
    if isinstance(t, torch.Tensor) and t.layout is torch.strided:
        return int(t.untyped_storage().data_ptr())
    return 0


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """The peak memory `fn` allocates on `device` above what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return max(torch.cuda.max_memory_allocated(device) - before, 0)
    with torch.no_grad(), LiveTensorBytes() as tracker:
        fn()
    return tracker.peak


def device_budget(config: CoreModuleConfig, device: torch.device) -> tuple[int, int]:
    """(total bytes, budget bytes) of `device` under `config`."""
    if device.type == "cuda":
        _, total = torch.cuda.mem_get_info(device)
        return int(total), int(config.max_gpu_utilization * total)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(total), int(min(config.max_memory_gib * GIB, config.max_cpu_utilization * total))


def adapter_budget_bytes(config: CoreModuleConfig) -> int:
    """The carve-out of LoRA adapters loaded into the model (`workers.lora`), like the
    DiT cache's: `lora.memory_gib`, when the config registers adapters at all."""
    return int(config.lora.memory_gib * GIB) if config.loras else 0


def resident_bytes(modules: list[Any], device: torch.device) -> int:
    """The loaded model's memory on `device`: what CUDA has allocated (weights, buffers,
    workspaces), or the tensor bytes of `modules` on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.memory_allocated(device))
    return module_bytes(*modules)


def module_bytes(*modules: Any) -> int:
    """The tensor bytes of the parameters and buffers of `modules` (None skipped)."""
    seen: set[int] = set()
    total = 0
    for module in modules:
        if not isinstance(module, torch.nn.Module):
            continue
        for t in [*module.parameters(), *module.buffers()]:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def _mib(n: int) -> str:
    return f"{n / MIB:.1f} MiB"


class ResourceManager:
    """One worker's device memory budget and the running batch's charges; thread-safe."""

    def __init__(
        self,
        config: CoreModuleConfig,
        device: torch.device | str = "cpu",
        resident_bytes: int = 0,
        run_on: RunOnDevice = run_here,
        cache_usage: Callable[[], int] = lambda: 0,
        adapter_usage: Callable[[], int] = lambda: 0,
    ) -> None:
        """`resident_bytes`: the model's memory on the device; `run_on(fn)` runs a probe
        where the device work of the worker runs (the step loop); `cache_usage` and
        `adapter_usage`: the bytes the DiT cache and the loaded LoRA adapters hold now."""
        self.device = torch.device(device)
        self.total_bytes, self.budget_bytes = device_budget(config, self.device)
        self.cache_reserved_bytes = int(config.cache.max_memory_gib * GIB)
        self.adapter_reserved_bytes = adapter_budget_bytes(config)
        self.adapter_usage = adapter_usage
        self.resident_bytes = int(resident_bytes)
        self.cache_usage = cache_usage
        self.run_on = run_on
        self._lock = threading.Lock()
        self._costs: dict[Hashable, ShapeCost] = {}
        self._charges: dict[str, tuple[Hashable | None, int]] = {}
        self._admitted: set[str] = set()
        if self.available_bytes <= 0:
            log.warning("no device memory is left for requests: %s", self._budget_text())

    @property
    def available_bytes(self) -> int:
        """What running requests may use: the budget less the model, the DiT cache and
        the adapters."""
        return (
            self.budget_bytes
            - self.resident_bytes
            - self.cache_reserved_bytes
            - self.adapter_reserved_bytes
        )

    def cost(self, shape: Hashable) -> ShapeCost | None:
        with self._lock:
            return self._costs.get(shape)

    # --- admission ----------------------------------------------------------------------------

    def measure(self, shape: Hashable, probe: ShapeProbe) -> ShapeCost:
        """The cost of `shape`, measured with `probe` on first use (then kept);
        ResourceError when even one row cannot fit."""
        cost = self.cost(shape)
        if cost is None:
            cost = self.run_on(lambda: self._probe(probe))
            with self._lock:
                cost = self._costs.setdefault(shape, cost)
        self._check_fits(probe.label, cost.bytes_for(1))
        return cost

    def admit(self, request: Allocatable, probe: ShapeProbe | None) -> None:
        """Hold `request` on this worker: ResourceError, at once, if it could never fit."""
        if probe is not None and request.shape is not None:
            try:
                self.measure(request.shape, probe)
            except ResourceError as exc:
                raise ResourceError(f"{request.request_id}: {exc}") from None
        with self._lock:
            self._admitted.add(request.request_id)

    def release(self, request: Allocatable) -> None:
        """`request` no longer held (whatever its end); frees its charge too."""
        with self._lock:
            self._admitted.discard(request.request_id)
            self._charges.pop(request.request_id, None)

    # --- the step scheduler's API --------------------------------------------------------------

    def can_allocate(self, request: Allocatable) -> bool:
        """Whether `request` may join the running batch now. A shape never measured runs
        only alone."""
        with self._lock:
            if request.request_id in self._charges:
                return True
            return self._charge_locked(request) is not None

    def allocate(self, request: Allocatable) -> int:
        """Charge `request` what it adds to the running batch; its bytes. Idempotent;
        ResourceError when it does not fit (ask `can_allocate` first)."""
        with self._lock:
            if request.request_id in self._charges:
                return self._charges[request.request_id][1]
            charge = self._charge_locked(request)
            if charge is None:
                raise ResourceError(
                    f"{request.request_id}: does not fit beside the running batch "
                    f"({_mib(self._used_locked())} of {_mib(self.available_bytes)} in use)"
                )
            self._charges[request.request_id] = (request.shape, charge)
            return charge

    def deallocate(self, request: Allocatable) -> None:
        with self._lock:
            self._charges.pop(request.request_id, None)

    def get_resource_status(self) -> dict[str, Any]:
        """The heartbeat's `resource_status`: used = model + running batch + DiT cache +
        loaded LoRA adapters."""
        cache = int(self.cache_usage())
        adapters = int(self.adapter_usage())
        with self._lock:
            return {
                "device": str(self.device),
                "total_bytes": self.total_bytes,
                "budget_bytes": self.budget_bytes,
                "used_bytes": self.resident_bytes + self._used_locked() + cache + adapters,
                "cache_bytes": cache,
                "adapter_bytes": adapters,
                "running": len(self._admitted),
                "batch": len(self._charges),
            }

    # --- internals ----------------------------------------------------------------------------

    def _used_locked(self) -> int:
        return sum(charge for _, charge in self._charges.values())

    def _charge_locked(self, request: Allocatable) -> int | None:
        """What `request` would add to the running batch, None if it does not fit."""
        cost = self._costs.get(request.shape) if request.shape is not None else None
        if cost is None:
            return None if self._charges else 0
        rows = sum(1 for shape, _ in self._charges.values() if shape == request.shape)
        charge = cost.bytes_for(rows + 1) - cost.bytes_for(rows)
        return charge if self._used_locked() + charge <= self.available_bytes else None

    def _probe(self, probe: ShapeProbe) -> ShapeCost:
        one = probe.inputs(1)
        row = value_nbytes(one)
        self._check_fits(probe.label, row)  # refused before the step is even tried
        step = self._peak(probe, one)
        del one
        two = probe.inputs(2)
        step_row = max(self._peak(probe, two) - step, 0)
        cost = ShapeCost(row, step, step_row)
        log.info("measured %s: %s", probe.label, cost)
        return cost

    def _peak(self, probe: ShapeProbe, inputs: dict[str, Any]) -> int:
        try:
            return peak_bytes(lambda: probe.forward(inputs), self.device)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            raise ResourceError(
                f"a {probe.label} runs this device out of memory; {self._budget_text()}"
            ) from None

    def _check_fits(self, label: str, needed: int) -> None:
        if needed > self.available_bytes:
            raise ResourceError(
                f"a {label} needs {_mib(needed)} of device memory, more than this "
                f"worker can give a request: {self._budget_text()}"
            )

    def _budget_text(self) -> str:
        return (
            f"{_mib(max(self.available_bytes, 0))} left of a {_mib(self.budget_bytes)} budget "
            f"on {self.device} after {_mib(self.resident_bytes)} of model and "
            f"{_mib(self.cache_reserved_bytes)} of DiT cache{self._adapters_text()}"
        )

    def _adapters_text(self) -> str:
        if not self.adapter_reserved_bytes:
            return ""
        return f" and {_mib(self.adapter_reserved_bytes)} of LoRA adapters"
