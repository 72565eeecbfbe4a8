"""Worker-local DiT cache: byte-bounded, thread-safe, optionally compressed tensor cache.

Lives on the worker side only (it imports torch); the producer (`omni_tasks`) never
imports it. Memory is in GiB (GIB = 2**30 bytes) throughout.
"""

from omni_tasks.config import GIB
from workers.dit_cache.manager import CacheListener, DiTCacheManager

__all__ = ["GIB", "CacheListener", "DiTCacheManager"]
