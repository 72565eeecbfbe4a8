"""`python -m workers.models DIR`: build every tiny model under DIR (what
`omni-tasks models build` runs)."""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m workers.models DIR", file=sys.stderr)
        return 2
    try:
        from workers.models import build_tiny_models

        built = build_tiny_models(Path(argv[0]).expanduser())
    except ImportError as exc:  # torch and the model libraries are worker-side extras
        print(f"needs the worker extras (pip install 'omni-tasks[diffusion]'): {exc}")
        return 2
    for name, path in built.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
