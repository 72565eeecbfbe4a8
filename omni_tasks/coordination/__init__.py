"""Everything omni-tasks keeps in Redis besides Celery's own messages and results: the
key names, the Lua scripts, the DiT cache directory, single-flight leases, counters,
rejected messages, and the cluster figures read back from them."""
