"""The long-running services: `omni-tasks api` (OpenAI-compatible endpoints and the job
API) and `omni-tasks exporter` (Prometheus metrics read from Redis)."""

from __future__ import annotations

import argparse
import sys


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


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    api = sub.add_parser("api", help="serve the HTTP API (OpenAI-compatible, jobs)")
    api.add_argument("--host", default="127.0.0.1", help="address to listen on")
    api.add_argument("--port", type=int, default=8000, help="default: 8000")
    api.add_argument("--log-level", default="warning", help="uvicorn's (default: warning)")
    api.set_defaults(func=_cmd_api)

    exporter = sub.add_parser("exporter", help="serve Prometheus metrics read from Redis")
    exporter.add_argument("--port", type=int, default=9808, help="default: 9808")
    exporter.add_argument("--addr", default="0.0.0.0", help="address to listen on")
    exporter.set_defaults(func=_cmd_exporter)
