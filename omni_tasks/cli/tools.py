"""The commands around the system: `omni-tasks demo` (from `omni_tasks.dev`), `omni-tasks
models build` (the tiny offline models) and `omni-tasks schemas` (the wire contract)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def _cmd_demo(args: argparse.Namespace) -> int:
    from omni_tasks.dev.demo import run_demo

    return run_demo(Path(args.out), timeout_s=args.timeout, open_page=args.open, port=args.port)


def _cmd_models_build(args: argparse.Namespace) -> int:
    """Runs the worker side's builder in its own process (this one stays torch-free)."""
    from omni_tasks.config import get_config

    root = Path(args.dir).expanduser() if args.dir else get_config().models_path()
    return subprocess.call([sys.executable, "-m", "workers.models", str(root)])


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


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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


def register_schemas(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    schemas = sub.add_parser("schemas", help="the wire contract's JSON Schemas (docs/wire.md)")
    action = schemas.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help="write them to --dir")
    action.add_argument("--check", action="store_true", help="exit 1 if --dir is out of date")
    schemas.add_argument("--dir", default=None, help="default: docs/schemas of the source tree")
    schemas.set_defaults(func=_cmd_schemas)
