"""Tools around the system, not part of it: the demo, starting worker processes and the
API for the demo, tests and benchmarks, and private Redis servers (one, restartable, or a
Sentinel setup). The `omni-tasks` command lives in `omni_tasks.cli`."""
