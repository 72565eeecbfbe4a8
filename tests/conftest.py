"""Shared fixtures: tiny real models (built once per session)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

MODELS_CACHE = Path(os.environ.get("OMNI_TEST_MODELS_DIR", Path(__file__).parent / ".models"))


@pytest.fixture(scope="session")
def tiny_llama_dir() -> Path:
    from workers.models import build_tiny_model

    return build_tiny_model("tiny-llama", MODELS_CACHE / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_flux_dir() -> Path:
    from workers.models import build_tiny_model

    return build_tiny_model("tiny-flux", MODELS_CACHE / "tiny-flux")
