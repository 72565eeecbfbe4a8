"""The `omni-tasks` command: one module per command group (`submit`, `status`, `serve`
for the HTTP API and the metrics exporter, `tools` for the demo, the tiny models and the
wire schemas), assembled in `parser`."""

from omni_tasks.cli.parser import build_parser, main

__all__ = ["build_parser", "main"]
