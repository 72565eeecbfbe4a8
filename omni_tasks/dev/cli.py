"""Re-exports `omni_tasks.cli` for the tests that still import this path (removed once
they import `omni_tasks.cli`)."""

import sys

from omni_tasks.cli.parser import build_parser, main
from omni_tasks.cli.status import show_status, status_report
from omni_tasks.cli.submit import render_progress, wait_with_bar, wait_with_progress

__all__ = [
    "build_parser",
    "main",
    "render_progress",
    "show_status",
    "status_report",
    "wait_with_bar",
    "wait_with_progress",
]

if __name__ == "__main__":
    sys.exit(main())
