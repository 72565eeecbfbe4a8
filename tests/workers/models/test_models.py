"""The tiny model registry and its command (`workers.models`, `python -m workers.models
DIR`): builds every tiny model under DIR, skipping complete ones; says what is missing
when the worker extras are not installed."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from workers.models import TINY_MODELS, build_tiny_model
from workers.models.atomic import MARKER

REPO_ROOT = Path(__file__).resolve().parents[3]


def run_module(*args: str, prelude: str = "") -> subprocess.CompletedProcess[str]:
    """`python -m workers.models ARGS`, after `prelude` when one is given."""
    if prelude:
        code = (
            f"{prelude}\nimport runpy, sys\nsys.argv = ['workers.models', *{list(args)!r}]\n"
            "runpy.run_module('workers.models', run_name='__main__', alter_sys=True)\n"
        )
        command = [sys.executable, "-c", code]
    else:
        command = [sys.executable, "-m", "workers.models", *args]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def test_the_command_lists_every_tiny_model_and_skips_complete_ones(
    tiny_models: dict[str, Path],
) -> None:
    root = tiny_models["tiny-llama"].parent
    markers = {name: (root / name / MARKER).stat().st_mtime_ns for name in TINY_MODELS}
    started = time.monotonic()
    done = run_module(str(root))
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 60  # nothing was rebuilt
    lines = done.stdout.splitlines()
    assert lines == [f"{name}: {root / name}" for name in TINY_MODELS]
    assert set(TINY_MODELS) == {
        "tiny-llama",
        "tiny-flux",
        "tiny-sd3",
        "tiny-qwen-image",
        "tiny-qwen-image-edit",
        "tiny-sana",
        "tiny-wan",
        "tiny-wan-i2v",
        "tiny-tts",
        "tiny-stable-audio",
    }
    assert {name: (root / name / MARKER).stat().st_mtime_ns for name in TINY_MODELS} == markers


def test_the_command_needs_one_directory() -> None:
    done = run_module()
    assert done.returncode == 2
    assert "usage: python -m workers.models DIR" in done.stderr


def test_the_command_says_what_is_missing_without_the_worker_extras(tmp_path: Path) -> None:
    # A machine without the worker-side packages: importing them fails.
    absent = "import sys\nfor name in ('torch', 'tokenizers', 'transformers', 'diffusers'):\n"
    absent += "    sys.modules[name] = None\n"
    done = run_module(str(tmp_path / "models"), prelude=absent)
    assert done.returncode == 2, done.stderr
    assert "needs the worker extras (pip install 'omni-tasks[diffusion]')" in done.stdout
    assert not (tmp_path / "models" / "tiny-llama").exists()  # nothing half-written


def test_an_unknown_tiny_model_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown tiny model 'tiny-gpt'; known: tiny-llama"):
        build_tiny_model("tiny-gpt", tmp_path / "tiny-gpt")
    assert not (tmp_path / "tiny-gpt").exists()
