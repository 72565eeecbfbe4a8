"""Tools around the system, not part of it: the `omni-tasks` CLI, the demo, starting
worker processes, and a private Redis for the demo, tests and benchmarks."""
