"""Per-request LoRA adapters of the text engines.

A request's adapter set becomes one adapter folder (`prepare`): the registry's folder
for one adapter at scale 1, else a combined adapter (`workers.lora.combine`). Each
folder gets a stable integer id in this process (vLLM's `lora_int_id`).

vLLM (`VllmAdapters`): `enable_lora`, `max_loras`, `max_lora_rank`, `max_cpu_loras`
from the config's `lora` section, and a `LoRARequest` per request; requests with
different adapters share a batch, as vLLM does. The stepping thread loads a missing
adapter with `add_lora` just before the request is added, which is how a request learns
whether its adapter was loaded already (`hit`) or how long loading took (`load_s`).

vLLM 0.32 on CPUs: its PyTorch LoRA kernels (`vllm/lora/ops/torch_ops/lora_ops.py`)
gather the adapter weights with the row's slot index, and a row without adapter has
index -1, which Python indexing turns into the last slot: in a batch that mixes rows
with and without adapters, the rows without one get the adapter of the last slot
(upstream: vllm-project/vllm#48421). GPU kernels skip -1. So on a CPU every request
without adapters runs the zero adapter (`combine.zero_adapter`): no row ever has
index -1, and the zero delta leaves its output exactly the base model's. It takes one of
the `max_loras` slots, so the engine gets one more.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omni_tasks.config import CoreModuleConfig
from omni_tasks.errors import ProcessingError
from omni_tasks.lora import AdapterSet
from workers.lora.cache import AdapterUse
from workers.lora.combine import adapter_rank, combined, zero_adapter
from workers.lora.registry import adapter_path


@dataclass(frozen=True)
class PreparedAdapter:
    """One request's adapters as one folder: what a text engine loads and runs."""

    adapters: AdapterSet
    folder: Path
    int_id: int

    @property
    def name(self) -> str:
        """The engine's name for it (unique per folder in this process)."""
        return f"lora-{self.int_id}"

    def uses(self, hit: bool, load_s: float) -> list[dict[str, Any]]:
        return [AdapterUse(n, s, hit, round(load_s, 6)).to_json() for n, s in self.adapters]


class TextAdapters:
    """Resolves a request's adapter set into one adapter folder with a stable id."""

    def __init__(self, config: CoreModuleConfig) -> None:
        self.config = config
        self.root = config.models_path() / ".lora-combined"
        self._lock = threading.Lock()
        self._ids: dict[Path, int] = {}

    def prepare(self, adapters: AdapterSet) -> PreparedAdapter | None:
        """None without adapters; ProcessingError when they cannot run together."""
        if not adapters:
            return None
        parts = [(adapter_path(name, self.config), scale) for name, scale in adapters]
        if len(parts) == 1 and parts[0][1] == 1.0:
            folder = parts[0][0]
        else:
            folder = combined(parts, self.root)
        rank, most = adapter_rank(folder), self.config.lora.max_lora_rank
        if rank > most:
            names = ", ".join(name for name, _ in adapters)
            raise ProcessingError(
                f"adapters {names}: rank {rank} (the sum of theirs when combined) is above "
                f"lora.max_lora_rank {most}"
            )
        return PreparedAdapter(adapters, folder, self.int_id(folder))

    def int_id(self, folder: Path) -> int:
        with self._lock:
            return self._ids.setdefault(folder, len(self._ids) + 1)


class VllmAdapters(TextAdapters):
    """vLLM's side: engine arguments, `LoRARequest`s, loading (see the module docstring)."""

    def __init__(self, config: CoreModuleConfig, model_dir: str) -> None:
        super().__init__(config)
        self.model_dir = model_dir
        self.zero: PreparedAdapter | None = None  # set on CPUs

    def engine_args(self, is_cpu: bool) -> dict[str, Any]:
        """LoRA arguments of `EngineArgs`; on a CPU, builds the zero adapter first."""
        extra = 0
        if is_cpu:
            folder = zero_adapter(Path(self.model_dir), self.root)
            self.zero = PreparedAdapter((), folder, self.int_id(folder))
            extra = 1  # its slot
        lora = self.config.lora
        return {
            "enable_lora": True,
            "max_loras": lora.max_loras + extra,
            "max_lora_rank": lora.max_lora_rank,
            "max_cpu_loras": lora.max_cpu_loras + extra,
        }

    def request_for(self, engine: Any, prepared: PreparedAdapter | None) -> tuple[Any, list]:
        """(vLLM's `LoRARequest` or None, the request's adapter uses); loads the adapter
        if vLLM does not hold it. Runs on the engine's stepping thread."""
        from vllm.lora.request import LoRARequest

        target = prepared or self.zero
        if target is None:
            return None, []
        lora_request = LoRARequest(target.name, target.int_id, str(target.folder))
        hit, load_s = True, 0.0
        if target.int_id not in engine.list_loras():
            start = time.perf_counter()
            engine.add_lora(lora_request)
            hit, load_s = False, time.perf_counter() - start
        return lora_request, (prepared.uses(hit, load_s) if prepared else [])
