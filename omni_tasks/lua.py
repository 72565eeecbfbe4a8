"""Multi-key Redis updates as Lua scripts: atomic, and one round trip each.

Each script states its keys and arguments. They are registered once per client
(EVALSHA afterwards), which is also cheaper than building a pipeline per task.
"""

from __future__ import annotations

import threading
from typing import Any

import redis

# KEYS[1] revoked flag of the task, KEYS[2] its redelivery counter; ARGV[1] counter TTL
# (s). Returns {revoked (0/1), redeliveries}. A revoked task's counter is not touched.
ADMIT = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {1, 0}
end
local starts = redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[1]))
return {0, starts}
"""

_lock = threading.Lock()
_scripts: dict[tuple[int, str], Any] = {}


def script(client: redis.Redis, source: str) -> Any:
    """The registered script for `client` (cached: registration hashes the source)."""
    key = (id(client), source)
    with _lock:
        found = _scripts.get(key)
        if found is None:
            found = client.register_script(source)
            _scripts[key] = found
        return found
