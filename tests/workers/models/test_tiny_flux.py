"""The tiny Flux builder (`workers.models.tiny_flux`, through `build_tiny_model`):
idempotent on a complete model, one build under concurrent builders, same bytes
everywhere."""

from __future__ import annotations

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from workers.models import build_tiny_model
from workers.models.atomic import MARKER as COMPLETE_MARKER


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_build_is_idempotent_and_deterministic(tiny_flux_dir: Path, tmp_path: Path) -> None:
    marker = tiny_flux_dir / COMPLETE_MARKER
    mtime = marker.stat().st_mtime_ns
    t0 = time.perf_counter()
    assert build_tiny_model("tiny-flux", tiny_flux_dir) == tiny_flux_dir
    assert time.perf_counter() - t0 < 0.5  # complete model: nothing rebuilt
    assert marker.stat().st_mtime_ns == mtime

    # Two concurrent builders of one fresh path: one build, no temp dirs left behind; and a
    # second build elsewhere gives the same bytes (weights and tokenizers).
    target = tmp_path / "a" / "tiny-flux"
    with ThreadPoolExecutor(max_workers=2) as pool:
        paths = list(pool.map(lambda _: build_tiny_model("tiny-flux", target), range(2)))
    assert paths == [target, target]
    assert sorted(p.name for p in target.parent.iterdir()) == ["tiny-flux"]
    other = build_tiny_model("tiny-flux", tmp_path / "b" / "tiny-flux")
    assert tree_digest(target) == tree_digest(other)
