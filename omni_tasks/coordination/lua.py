"""The Lua scripts of `scripts/`: multi-key Redis updates, atomic and one round trip each.

Each `scripts/<name>.lua` starts with a header that lists its KEYS, ARGV and the keys it
touches. They are read once, and registered once per Redis client (`Scripts`, built with
the client in `client.py`), so every later call is an EVALSHA.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import redis

SCRIPTS_DIR = Path(__file__).with_name("scripts")


def _read_sources() -> Mapping[str, str]:
    return MappingProxyType({p.stem: p.read_text() for p in sorted(SCRIPTS_DIR.glob("*.lua"))})


#: Script name (the file's stem) -> Lua source.
SOURCES: Mapping[str, str] = _read_sources()


class Scripts:
    """Every script, registered on one client: `scripts.admit_redelivery(keys=, args=)`."""

    def __init__(self, client: redis.Redis) -> None:
        self._registered = {name: client.register_script(src) for name, src in SOURCES.items()}

    def __getattr__(self, name: str) -> Any:
        try:
            return self._registered[name]
        except KeyError:
            raise AttributeError(f"no Lua script {name!r} in {SCRIPTS_DIR}") from None
