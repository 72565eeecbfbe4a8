"""LoRA adapters on the transformer of one diffusion engine, for every model family whose
pipeline has diffusers' LoRA loader (`NoAdapters` for the others).

Loading: diffusers' `load_lora_weights(folder, adapter_name=<registry name>)` on the
pipeline (PEFT backend), which injects the adapter's layers into the transformer. An
adapter with text-encoder weights is refused: the text encoders run for many requests at
once (their prompts are batched), and prompt embeddings are shared across adapter sets.

Kept: an `AdapterCache` bounded by the worker's adapter budget (`lora.memory_gib`, carved
out of its device budget by the `ResourceManager`), costed in the adapter's device bytes.

Applied: a batch's rows share one adapter set (it is part of the step scheduler's batch
key), which `set_adapters(names, scales)` activates before the forward pass; a batch
without adapters runs with the LoRA layers disabled, exactly the base model. Activation
only changes anything when the set differs from the previous batch's. With
`lora.mixed_batches`, rows with different sets share a forward pass (`workers.lora.mixed`).

Threads: loading and unloading change the transformer's modules, so they run on the
step loop's thread, between two steps, and never while a request holds the transformer
alone (`StepLoop.run(..., unshared=True)`); activation runs on the loop thread before each
batch, or in the thread of the request that holds the transformer alone.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

from omni_tasks.config import CoreModuleConfig
from omni_tasks.errors import ProcessingError, RequestValidationError
from omni_tasks.lora import AdapterSet
from workers.device_thread import RunOnDevice, run_here
from workers.lora.cache import AdapterCache, AdapterListener, AdapterUse
from workers.lora.registry import adapter_path

log = logging.getLogger(__name__)
#: Where a transformer call of the step loop carries its request's adapter set.
ADAPTERS_KEY = "_lora_adapters"


class PipelineAdapters:
    """The adapters of one pipeline (see the module docstring)."""

    def __init__(
        self,
        pipe: Any,
        config: CoreModuleConfig,
        budget_bytes: int,
        listener: AdapterListener | None = None,
        run_on: RunOnDevice = run_here,
    ) -> None:
        """`run_on`: runs a change of the transformer where the device work runs (the
        engine's step loop, while no request holds the transformer alone)."""
        self._pipe = pipe
        self._config = config
        self._active: AdapterSet | None = ()  # what the LoRA layers run with now
        self.run_on = run_on
        self.cache = AdapterCache(budget_bytes, self, listener)
        self.mixed_batches = config.lora.mixed_batches

    # --- requests ------------------------------------------------------------------------

    @contextmanager
    def using(self, adapters: AdapterSet, deadline: float) -> Iterator[list[AdapterUse]]:
        """Keep `adapters` loaded meanwhile (loading missing ones); how each was served.
        `deadline` is on `time.monotonic()`."""
        if not adapters:
            yield []
            return
        names = [name for name, _ in adapters]
        served = self.cache.acquire(names, deadline)
        try:
            yield [AdapterUse(n, s, *served[n]) for n, s in adapters]
        finally:
            self.cache.release(names)

    def batch_rows(self, rows: list[AdapterSet]) -> AbstractContextManager[None]:
        """Apply the adapter sets of a batch's rows for its forward pass (loop thread)."""
        if all(row == rows[0] for row in rows):
            self.activate(rows[0])
            return nullcontext()
        from workers.lora.mixed import per_row_deltas

        self.activate(())  # the base pass; each row's deltas are added to it
        return per_row_deltas(self._pipe.transformer, rows)

    def activate(self, adapters: AdapterSet) -> None:
        """Make the LoRA layers run `adapters` at their scales (none: disabled)."""
        if adapters == self._active:
            return
        transformer = self._pipe.transformer
        if not adapters:
            if getattr(transformer, "_hf_peft_config_loaded", False):
                transformer.disable_lora()
        else:
            transformer.enable_lora()
            transformer.set_adapters([n for n, _ in adapters], [s for _, s in adapters])
        self._active = adapters

    # --- AdapterLoader -------------------------------------------------------------------

    def read(self, name: str) -> tuple[int, Path]:
        """The device bytes the adapter will take; refuses text-encoder weights."""
        path = adapter_path(name, self._config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = self._pipe.lora_state_dict(str(path))
        if isinstance(state, tuple):
            state = state[0]
        prefix = f"{self._pipe.transformer_name}."
        other = sorted({k.split(".")[0] for k in state if not k.startswith(prefix)})
        if other:
            raise ProcessingError(
                f"adapter {name!r} has weights for {', '.join(other)}: only transformer "
                "adapters are supported (prompt embeddings are shared across adapters)"
            )
        itemsize = self._pipe.transformer.dtype.itemsize
        return sum(t.numel() for t in state.values()) * itemsize, path

    def used_bytes(self) -> int:
        """The device bytes of the adapters loaded now."""
        return self.cache.used()

    def load(self, name: str, payload: Path, evict: list[str]) -> int:
        return self.run_on(lambda: self._load_here(name, payload, evict))

    def _load_here(self, name: str, path: Path, evict: list[str]) -> int:
        """Unload `evict`, load `name` (on the loop thread, between two steps)."""
        from diffusers.utils import logging as diffusers_logging

        for victim in evict:
            try:
                self._pipe.transformer.delete_adapters(victim)
            except Exception:  # noqa: BLE001 - counted out already; the model lives on
                log.exception("could not unload adapter %r", victim)
        level = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # "no LoRA keys for the text encoder"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # PEFT: "several adapters in one model"
                self._pipe.load_lora_weights(str(path), adapter_name=name)
        finally:
            diffusers_logging.set_verbosity(level)
        self._active = None  # what is active changed: set it again before the next use
        return adapter_bytes(self._pipe.transformer, name)


class NoAdapters:
    """A pipeline without diffusers' LoRA loader: requests naming adapters are refused."""

    mixed_batches = False

    def __init__(self, pipe: Any) -> None:
        self._kind = type(pipe).__name__

    def used_bytes(self) -> int:
        return 0

    @contextmanager
    def using(self, adapters: AdapterSet, deadline: float) -> Iterator[list[AdapterUse]]:
        if adapters:
            raise RequestValidationError("lora", f"{self._kind} has no LoRA support")
        yield []

    def batch_rows(self, rows: list[AdapterSet]) -> AbstractContextManager[None]:
        return nullcontext()

    def activate(self, adapters: AdapterSet) -> None:
        pass


def adapters_for(
    pipe: Any,
    config: CoreModuleConfig,
    budget_bytes: int,
    listener: AdapterListener | None,
    run_on: RunOnDevice,
) -> PipelineAdapters | NoAdapters:
    """An engine's adapters, in its adapter carve-out `budget_bytes` (none where the
    pipeline has no LoRA loader)."""
    if not hasattr(pipe, "load_lora_weights"):
        return NoAdapters(pipe)
    return PipelineAdapters(pipe, config, budget_bytes, listener, run_on)


def adapter_bytes(module: Any, name: str) -> int:
    """The bytes of adapter `name`'s parameters in `module` (PEFT: `...lora_A.<name>...`)."""
    marker = f".{name}."
    return sum(p.numel() * p.element_size() for n, p in module.named_parameters() if marker in n)
