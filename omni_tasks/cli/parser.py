"""`omni-tasks`: the demo, submitting requests, status, the HTTP API, the metrics exporter,
and the tiny offline models."""

from __future__ import annotations

import argparse
import sys

from omni_tasks.cli import serve, status, submit, tools


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omni-tasks", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    tools.register(sub)
    submit.register(sub)
    status.register(sub)
    serve.register(sub)
    tools.register_schemas(sub)
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
