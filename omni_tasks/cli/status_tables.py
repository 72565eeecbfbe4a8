"""`omni-tasks status` for people: the cluster report as `rich` tables (pools, queues
per priority level, diffusion models with their workers and queued requests, workers
and the model each serves, DiT cache, the newest refused messages, health). `--json`
prints the same report for scripts."""

from __future__ import annotations

import json
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from omni_tasks.config import GIB

COUNTERS = ("processed", "failed", "expired", "cancelled", "rejected", "duplicates", "recovered")


def print_report(report: dict[str, Any], console: Console | None = None) -> None:
    """Print `{"status": OmniScheduler.get_status(), "health": get_health_status(),
    "rejected": the newest records of the rejected list}`."""
    console = console or Console()
    status, health = report["status"], report["health"]
    workers = status["resource_status"]["workers"]
    tables = [
        pools_table(status, workers),
        queues_table(status["queues"]),
        models_table(status.get("models") or {}),
        workers_table(workers),
        cache_table(status, workers),
    ]
    if report.get("rejected"):
        tables.append(rejections_table(report["rejected"]))
    for table in tables:
        console.print(table)
    verdict = "[green]healthy[/green]" if health["healthy"] else "[red]unhealthy[/red]"
    console.print(f"Health: {verdict}")
    for issue, advice in zip(health["issues"], health["recommendations"], strict=False):
        console.print(f"  [red]-[/red] {issue}\n    [dim]{advice}[/dim]")


def pools_table(status: dict[str, Any], workers: list[dict[str, Any]]) -> Table:
    table = Table(title="Pools")
    for name in ("pool", "workers", "queued", *COUNTERS, "mean s"):
        table.add_column(name, justify="left" if name == "pool" else "right")
    for queue, stats in status["pools"].items():
        live = [w for w in workers if queue in (w.get("queues") or [])]
        queued = sum(int(n) for n in status["queues"].get(queue, {}).values())
        done = int(stats["processed"])
        mean = f"{float(stats['run_s_sum']) / done:.3f}" if done else "-"
        counts = [str(stats.get(name, 0)) for name in COUNTERS]
        table.add_row(queue, str(len(live)), str(queued), *counts, mean)
    return table


def queues_table(queues: dict[str, dict[Any, int]]) -> Table:
    """Waiting messages per priority level (0 highest); only the levels in use."""
    levels = sorted({int(lv) for lv_counts in queues.values() for lv, n in lv_counts.items() if n})
    table = Table(title="Queues (waiting, by priority level; 0 is served first)")
    table.add_column("queue")
    for level in levels:
        table.add_column(f"level {level}" if level >= 0 else "any level", justify="right")
    table.add_column("total", justify="right")
    for queue, counts in queues.items():
        by_level = {int(lv): int(n) for lv, n in counts.items()}
        row = [str(by_level.get(level, 0)) for level in levels]
        table.add_row(queue, *row, str(sum(by_level.values())))
    return table


def models_table(models: dict[str, dict[str, Any]]) -> Table:
    """Each diffusion model: the live workers serving it and what waits in its queue
    (a model no worker serves keeps its requests waiting)."""
    table = Table(title="Diffusion models (registered or served)")
    for name in ("model", "workers", "queued"):
        table.add_column(name, justify="right" if name == "queued" else "left")
    for model, info in models.items():
        hosts = info.get("workers") or []
        queued = sum(int(n) for n in (info.get("queued") or {}).values())
        table.add_row(model, ", ".join(hosts) or "[red]none[/red]", str(queued))
    return table


def workers_table(workers: list[dict[str, Any]]) -> Table:
    table = Table(title="Workers (live heartbeats)")
    for name in ("worker", "queues", "models", "slots", "beat", "running", "device memory"):
        table.add_column(name)
    now = time.time()
    for worker in workers:
        resources = worker.get("resource_status") or {}
        beat = worker.get("beat")
        age = f"{now - float(beat):.0f}s ago" if beat else "-"
        used, budget = int(resources.get("used_bytes", 0)), int(resources.get("budget_bytes", 0))
        memory = f"{used / GIB:.2f} / {budget / GIB:.2f} GiB" if budget else "-"
        table.add_row(
            str(worker.get("hostname", "?")),
            ", ".join(worker.get("queues") or []),
            ", ".join(_models(worker.get("models")).values()),
            str(worker.get("concurrency", "-")),
            age,
            str(resources.get("running", "-")),
            memory,
        )
    return table


def cache_table(status: dict[str, Any], workers: list[dict[str, Any]]) -> Table:
    table = Table(title="DiT cache")
    for name in ("hit rate", "entries", "size", "capacity"):
        table.add_column(name, justify="right")
    entries = sum(int(w.get("dit_cache_entries", 0)) for w in workers)
    capacity = sum(int(w.get("dit_cache_max_bytes", 0)) for w in workers)
    table.add_row(
        f"{float(status['cache_hit_rate']):.0%}",
        str(entries),
        f"{float(status['memory_usage']):.3f} GiB",
        f"{capacity / GIB:.3f} GiB",
    )
    return table


def rejections_table(records: list[dict[str, Any]]) -> Table:
    """The newest refused messages: a malformed one, or one whose id holds another
    request (its sender waits on that id and gets the other request's result)."""
    table = Table(title="Refused messages (newest first)")
    for name in ("when", "task id", "task", "queue", "reason"):
        table.add_column(name)
    now = time.time()
    for record in records:
        table.add_row(
            f"{now - float(record.get('time') or now):.0f}s ago",
            str(record.get("task_id") or "-"),
            str(record.get("task") or "-"),
            str(record.get("queue") or "-"),
            str(record.get("reason") or ""),
        )
    return table


def _models(raw: Any) -> dict[str, str]:
    if isinstance(raw, dict):
        return raw
    try:
        found = json.loads(raw or "{}")
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}
