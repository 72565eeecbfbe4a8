"""`omni-tasks`: the demo, submitting requests, status, the HTTP API, the metrics exporter,
and the tiny offline models."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

#: The state a worker gives a running request while it reports progress (workers/progress.py).
PROGRESS = "PROGRESS"
#: How often `submit` polls the result backend while it waits.
POLL_INTERVAL_S = 0.2
BAR_WIDTH = 24


def _cmd_demo(args: argparse.Namespace) -> int:
    from omni_tasks.dev.demo import run_demo

    return run_demo(Path(args.out), timeout_s=args.timeout, open_page=args.open, port=args.port)


def _cmd_models_build(args: argparse.Namespace) -> int:
    """Runs the worker side's builder in its own process (this one stays torch-free)."""
    from omni_tasks.config import get_config

    root = Path(args.dir).expanduser() if args.dir else get_config().models_path()
    return subprocess.call([sys.executable, "-m", "workers.models", str(root)])


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
    if sys.stderr.isatty() and _has_rich():
        value = wait_with_bar(result, args.timeout)
    else:
        value = wait_with_progress(result, args.timeout, sys.stderr)
    print(json.dumps(value, indent=2))
    return 0


def _has_rich() -> bool:
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


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


#: The newest refused messages `omni-tasks status` lists (the rejected list keeps more).
REJECTIONS_SHOWN = 10


def status_report() -> dict[str, Any]:
    """What `omni-tasks status` shows: the cluster's status, its health and the newest
    rejected messages."""
    from omni_tasks import OmniScheduler
    from omni_tasks.coordination.rejections import list_rejections

    scheduler = OmniScheduler()
    return {
        "status": scheduler.get_status(),
        "health": scheduler.get_health_status(),
        "rejected": list_rejections(REJECTIONS_SHOWN),
    }


def show_status(report: dict[str, Any], as_json: bool = False) -> None:
    """The report as tables (rich, from the api extra), else as JSON."""
    if as_json or not _has_rich():
        print(json.dumps(report, indent=2, default=str))
        return
    from omni_tasks.dev.status_tables import print_report

    print_report(report)


def _cmd_status(args: argparse.Namespace) -> int:
    show_status(status_report(), args.json)
    return 0


def _cmd_api(args: argparse.Namespace) -> int:
    """Serves until interrupted: OpenAI-compatible endpoints and the job API."""
    try:
        from omni_tasks.api import serve
    except ImportError as exc:
        print(
            f"error: the API needs the api extra (pip install 'omni-tasks[api]'): {exc}",
            file=sys.stderr,
        )
        return 2
    print(f"serving the HTTP API on http://{args.host}:{args.port}", file=sys.stderr)
    serve(args.host, args.port, log_level=args.log_level)
    return 0


def _cmd_exporter(args: argparse.Namespace) -> int:
    """Serves until interrupted; the scrapes read Redis, so no figure lives here."""
    from omni_tasks.metrics import serve

    try:
        server, thread = serve(args.port, addr=args.addr)
    except OSError as exc:
        print(f"error: cannot listen on {args.addr}:{args.port} (--port): {exc}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    print(f"serving Prometheus metrics on http://{host}:{port}/metrics", file=sys.stderr)
    try:
        thread.join()
    except KeyboardInterrupt:
        server.shutdown()
    return 0


def _cmd_schemas(args: argparse.Namespace) -> int:
    """The wire contract's JSON Schemas: printed, checked against the files, or written."""
    from omni_tasks.wire_schema import all_schemas, stale_files, write_schemas

    directory = Path(args.dir) if args.dir else None
    where = {"directory": directory} if directory else {}
    if args.write:
        for path in write_schemas(**where):
            print(path)
        return 0
    if args.check:
        stale = stale_files(**where)
        for name in stale:
            print(f"out of date: {name} (run: omni-tasks schemas --write)", file=sys.stderr)
        return 1 if stale else 0
    print(json.dumps(all_schemas(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omni-tasks", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run both pools and a mixed workload, then stop")
    demo.add_argument("--out", default="omni-demo-output", help="images, logs, results")
    demo.add_argument("--timeout", type=float, default=900.0)
    demo.add_argument(
        "--open",
        action="store_true",
        help="open the playground page in a browser; keep everything up until Ctrl-C",
    )
    demo.add_argument("--port", type=int, default=8000, help="the page's port (or a free one)")
    demo.set_defaults(func=_cmd_demo)

    models = sub.add_parser("models", help="tiny random-weight models")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    build = models_sub.add_parser("build", help="write the tiny models (default: models_dir)")
    build.add_argument("--dir", default=None)
    build.set_defaults(func=_cmd_models_build)

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

    status = sub.add_parser("status", help="queues, pools, workers and health from Redis")
    status.add_argument("--json", action="store_true", help="one JSON document, for scripts")
    status.set_defaults(func=_cmd_status)

    api = sub.add_parser("api", help="serve the HTTP API (OpenAI-compatible, jobs)")
    api.add_argument("--host", default="127.0.0.1", help="address to listen on")
    api.add_argument("--port", type=int, default=8000, help="default: 8000")
    api.add_argument("--log-level", default="warning", help="uvicorn's (default: warning)")
    api.set_defaults(func=_cmd_api)

    exporter = sub.add_parser("exporter", help="serve Prometheus metrics read from Redis")
    exporter.add_argument("--port", type=int, default=9808, help="default: 9808")
    exporter.add_argument("--addr", default="0.0.0.0", help="address to listen on")
    exporter.set_defaults(func=_cmd_exporter)

    schemas = sub.add_parser("schemas", help="the wire contract's JSON Schemas (docs/wire.md)")
    action = schemas.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help="write them to --dir")
    action.add_argument("--check", action="store_true", help="exit 1 if --dir is out of date")
    schemas.add_argument("--dir", default=None, help="default: docs/schemas of the source tree")
    schemas.set_defaults(func=_cmd_schemas)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from kombu.exceptions import OperationalError
    from redis import RedisError

    from omni_tasks.config import get_config
    from omni_tasks.coordination.client import redacted
    from omni_tasks.errors import CoreModuleError

    try:
        return int(args.func(args))
    except CoreModuleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (RedisError, OperationalError) as exc:
        # The URLs as logs show them: passwords masked.
        config = get_config()
        urls = " and ".join(dict.fromkeys(redacted(u) for u in (config.redis_url, config.broker)))
        print(f"error: cannot use {urls}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
