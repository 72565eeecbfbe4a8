"""Worker-local DiT cache: byte-bounded, thread-safe, optionally compressed tensor cache.

Lives on the worker side only (it imports torch); the producer (`omni_tasks`) never
imports it. GB = 2**30 bytes throughout.
"""

from omni_tasks.config import GB
from workers.dit_cache.manager import CacheListener, DiTCacheManager

__all__ = ["GB", "CacheListener", "DiTCacheManager"]
