"""`omni-tasks submit`: one request through `.delay()`, its result printed as JSON, with a
progress bar while it runs (a live `rich` bar on a terminal, one line per change
elsewhere)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping
from typing import IO, Any

from omni_tasks.cli.status import has_rich

#: The state a worker gives a running request while it reports progress (workers/progress.py).
PROGRESS = "PROGRESS"
#: How often `submit` polls the result backend while it waits.
POLL_INTERVAL_S = 0.2
BAR_WIDTH = 24


def _cmd_submit(args: argparse.Namespace) -> int:
    from omni_tasks import generate_image, generate_multimodal, generate_text

    fields = {"prompt": args.prompt, "priority": args.priority}
    for name in ("max_tokens", "width", "height", "steps", "seed", "image"):
        value = getattr(args, name)
        if value is not None:
            fields[name] = value
    task = {"text": generate_text, "image": generate_image, "multimodal": generate_multimodal}
    result = task[args.kind].delay(**fields)
    print(f"submitted {result.id}", file=sys.stderr)
    if args.no_wait:
        return 0
    if sys.stderr.isatty() and has_rich():
        value = wait_with_bar(result, args.timeout)
    else:
        value = wait_with_progress(result, args.timeout, sys.stderr)
    print(json.dumps(value, indent=2))
    return 0


def progress_figures(info: Any) -> tuple[str, int, int] | None:
    """(label, done, total) of a PROGRESS `info`: steps of an image, tokens of a text."""
    if not isinstance(info, Mapping):
        return None
    for done_key, total_key, label in (
        ("step", "steps", "step"),
        ("tokens", "max_tokens", "tokens"),
    ):
        done, total = info.get(done_key), info.get(total_key)
        if isinstance(done, int) and isinstance(total, int) and total > 0:
            return label, done, total
    return None


def wait_with_bar(result: Any, timeout_s: float, console: Any = None) -> Any:
    """The result of `result`, with a live `rich` progress bar on the terminal
    (steps of an image, tokens of a text; a MULTIMODAL request shows each stage)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    deadline = time.monotonic() + timeout_s
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("queued", total=None)
        while time.monotonic() < deadline:
            state, info = _state_of(result)
            if state in result.backend.READY_STATES:
                break
            figures = progress_figures(info) if state == PROGRESS else None
            if figures is not None:
                label, done, total = figures
                bar.update(task, description=label, completed=done, total=total)
            elif state == "STARTED":
                bar.update(task, description="running")
            time.sleep(POLL_INTERVAL_S)
    return result.get(timeout=max(deadline - time.monotonic(), 0.1))


def _state_of(result: Any) -> tuple[str, Any]:
    """The state and info of a request's running stage (a chain's first stage while
    its last has not started)."""
    meta = result.backend.get_task_meta(result.id)
    parent = getattr(result, "parent", None)
    if meta["status"] == "PENDING" and parent is not None:
        first = parent.backend.get_task_meta(parent.id)
        if first["status"] not in ("PENDING", "SUCCESS"):
            return first["status"], first["result"]
    return meta["status"], meta["result"]


def render_progress(info: Any, width: int = BAR_WIDTH) -> str | None:
    """`[########--------] step 4/8` or `... tokens 12/64` for a PROGRESS `info`; None
    for anything else (the bar off a terminal: one line per new figure)."""
    figures = progress_figures(info)
    if figures is None:
        return None
    label, done, total = figures
    filled = min(width, max(0, done * width // total))
    return f"[{'#' * filled}{'-' * (width - filled)}] {label} {done}/{total}"


def wait_with_progress(result: Any, timeout_s: float, stream: IO[str]) -> Any:
    """The result of `result` (an AsyncResult), drawing a bar on `stream` while the
    request reports progress: redrawn in place on a terminal, a line per change otherwise."""
    deadline = time.monotonic() + timeout_s
    tty, shown = stream.isatty(), ""
    while time.monotonic() < deadline:
        meta = result.backend.get_task_meta(result.id)
        if meta["status"] in result.backend.READY_STATES:
            break
        bar = render_progress(meta["result"]) if meta["status"] == PROGRESS else None
        if bar and bar != shown:
            stream.write(f"\r\x1b[K{bar}" if tty else f"{bar}\n")
            stream.flush()
            shown = bar
        time.sleep(POLL_INTERVAL_S)
    if shown and tty:
        stream.write("\n")
    return result.get(timeout=max(deadline - time.monotonic(), 0.1))


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    submit = sub.add_parser("submit", help="enqueue one request and print its result")
    submit.add_argument("kind", choices=["text", "image", "multimodal"])
    submit.add_argument("prompt")
    submit.add_argument("--priority", default="normal", choices=["high", "normal", "low"])
    submit.add_argument("--max-tokens", dest="max_tokens", type=int)
    submit.add_argument("--width", type=int)
    submit.add_argument("--height", type=int)
    submit.add_argument("--steps", type=int)
    submit.add_argument("--seed", type=int)
    submit.add_argument("--image", help="input image (path) for an edit")
    submit.add_argument("--timeout", type=float, default=600.0)
    waiting = submit.add_mutually_exclusive_group()
    waiting.add_argument(
        "--wait", action="store_true", help="wait with a progress bar (the default)"
    )
    waiting.add_argument("--no-wait", action="store_true", help="print the id and return")
    submit.set_defaults(func=_cmd_submit)
