"""`omni-tasks status`: the cluster's status, its health and the newest refused messages,
as tables on a terminal with `rich` (the api extra), else as JSON."""

from __future__ import annotations

import argparse
import json
from typing import Any

#: The newest refused messages `omni-tasks status` lists (the rejected list keeps more).
REJECTIONS_SHOWN = 10


def has_rich() -> bool:
    """Whether `rich` (the api extra) is installed for tables and progress bars."""
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


def status_report() -> dict[str, Any]:
    """What `omni-tasks status` shows: the cluster's status, its health and the newest
    rejected messages."""
    from omni_tasks import OmniScheduler
    from omni_tasks.coordination.rejections import list_rejections

    scheduler = OmniScheduler()
    return {
        "status": scheduler.get_status(),
        "health": scheduler.get_health_status(),
        "rejected": list_rejections(scheduler.redis, REJECTIONS_SHOWN),
    }


def show_status(report: dict[str, Any], as_json: bool = False) -> None:
    """The report as tables (rich, from the api extra), else as JSON."""
    if as_json or not has_rich():
        print(json.dumps(report, indent=2, default=str))
        return
    from omni_tasks.cli.status_tables import print_report

    print_report(report)


def _cmd_status(args: argparse.Namespace) -> int:
    show_status(status_report(), args.json)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = sub.add_parser("status", help="queues, pools, workers and health from Redis")
    status.add_argument("--json", action="store_true", help="one JSON document, for scripts")
    status.set_defaults(func=_cmd_status)
