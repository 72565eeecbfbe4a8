"""`omni-tasks`: the demo, submitting requests, status, and the tiny offline models."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def _cmd_demo(args: argparse.Namespace) -> int:
    from omni_tasks.dev.demo import run_demo

    return run_demo(Path(args.out), timeout_s=args.timeout)


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
    print(json.dumps(result.get(timeout=args.timeout), indent=2))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from omni_tasks import OmniScheduler

    scheduler = OmniScheduler()
    report = {"status": scheduler.get_status(), "health": scheduler.get_health_status()}
    print(json.dumps(report, indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omni-tasks", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run both pools and a mixed workload, then stop")
    demo.add_argument("--out", default="omni-demo-output", help="images, logs, results")
    demo.add_argument("--timeout", type=float, default=900.0)
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
    submit.add_argument("--no-wait", action="store_true")
    submit.set_defaults(func=_cmd_submit)

    status = sub.add_parser("status", help="queues, pools, workers and health from Redis")
    status.set_defaults(func=_cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from omni_tasks.errors import CoreModuleError

    try:
        return int(args.func(args))
    except CoreModuleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
