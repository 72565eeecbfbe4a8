"""Per-request LoRA adapters of the transformers engine, through PEFT.

The first adapter wraps the engine's model in a `PeftModel` (`PeftModel.from_pretrained`);
later ones are added with `load_adapter`. A batch then runs with `adapter_names`, one per
row (`"__base__"` for a row without adapters): PEFT's mixed-adapter batches, so requests
with different adapters share a `generate` call. At most `lora.max_cpu_loras` adapters
stay loaded (an `AdapterCache` costed one per adapter), least recently used out first.
Everything here runs on the engine's batching thread, which owns the model.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from omni_tasks.config import CoreModuleConfig
from workers.lora.cache import AdapterCache
from workers.lora.text import PreparedAdapter, TextAdapters

BASE = "__base__"  # PEFT's name for "no adapter" in `adapter_names`


class PeftAdapters(TextAdapters):
    """The adapters of one transformers model (see the module docstring)."""

    def __init__(self, config: CoreModuleConfig) -> None:
        super().__init__(config)
        self.base: Any = None  # the engine's model, set once it is loaded
        self.peft_model: Any = None  # the PeftModel around it, once an adapter is in
        self._folders: dict[str, Path] = {}
        self.cache = AdapterCache(config.lora.max_cpu_loras, self)

    def model(self) -> Any:
        """What generates: the PeftModel once it exists, else the base model."""
        return self.peft_model if self.peft_model is not None else self.base

    def acquire(
        self, rows: list[PreparedAdapter | None], deadline: float
    ) -> tuple[dict[str, Any], list[list[dict[str, Any]]], list[str]]:
        """Load the rows' adapters: (generate kwargs, each row's uses, names to release)."""
        wanted = {p.name: p for p in rows if p is not None}
        for name, prepared in wanted.items():
            self._folders[name] = prepared.folder
        served = self.cache.acquire(list(wanted), deadline)
        uses = [[] if p is None else p.uses(*served[p.name]) for p in rows]
        if self.peft_model is None:
            return {}, uses, list(wanted)
        names = [BASE if p is None else p.name for p in rows]
        return {"adapter_names": names}, uses, list(wanted)

    # --- AdapterLoader -------------------------------------------------------------------

    def read(self, name: str) -> tuple[int, Path]:
        return 1, self._folders[name]

    def load(self, name: str, folder: Path, evict: list[str]) -> int:
        from peft import PeftModel

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for victim in evict:
                self.peft_model.delete_adapter(victim)
            if self.peft_model is None:
                self.peft_model = PeftModel.from_pretrained(self.base, folder, adapter_name=name)
                self.peft_model.eval()
            else:
                self.peft_model.load_adapter(folder, adapter_name=name)
        self._keep_active_adapter()
        return 1

    def _keep_active_adapter(self) -> None:
        """PEFT needs its active adapter to exist even when rows name theirs."""
        loaded = list(self.peft_model.peft_config)
        if loaded and self.peft_model.active_adapter not in loaded:
            self.peft_model.set_adapter(loaded[0])
