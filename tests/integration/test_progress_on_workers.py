"""Progress from a real AR worker: a long text request shows its token count, and `submit`
draws a bar while it waits."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import clean_redis, start_ready_workers
from helpers import state_and_info

from omni_tasks import generate_text
from workers.progress import PROGRESS

TIMEOUT = 120


#: Greedy, this prompt runs to max_tokens on the tiny model (~2 ms a token alone).
LONG = {"prompt": "a very long story", "max_tokens": 1500, "temperature": 0}


@pytest.fixture(scope="module")
def ar_worker(tiny_models, run_dir: Path) -> Iterator[None]:
    clean_redis()
    # Progress written early and often, so a run of a second or two shows several.
    pace = {"OMNI_PROGRESS_FIRST_AFTER_S": "0.2", "OMNI_PROGRESS_INTERVAL_S": "0.1"}
    [worker] = start_ready_workers(["ar"], run_dir / "logs", env=pace)
    yield
    worker.stop()
    clean_redis()


@pytest.mark.slow
def test_a_long_text_request_shows_its_token_count(ar_worker) -> None:
    result = generate_text.delay(**LONG)
    seen: list[dict] = []
    while not result.ready():
        state, info = state_and_info(result)
        if state == PROGRESS and info not in seen:
            seen.append(info)
        time.sleep(0.05)
    out = result.get(TIMEOUT)
    assert out["usage"]["completion_tokens"] == 1500
    assert len(seen) >= 2, seen
    assert all(set(i) == {"tokens", "max_tokens"} and i["max_tokens"] == 1500 for i in seen)
    tokens = [i["tokens"] for i in seen]
    assert tokens == sorted(tokens) and 0 < tokens[0] < tokens[-1] < 1500


@pytest.mark.slow
def test_submit_draws_a_bar_while_it_waits(ar_worker) -> None:
    args = ["text", LONG["prompt"], "--max-tokens", "1200", "--seed", "7", "--timeout", "120"]
    out = subprocess.run(
        [sys.executable, "-m", "omni_tasks.cli", "submit", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert out.returncode == 0, out.stderr
    bars = [line for line in out.stderr.splitlines() if line.startswith("[")]
    assert bars and all(line.endswith("/1200") and " tokens " in line for line in bars), bars
    assert json.loads(out.stdout)["usage"]["completion_tokens"] == 1200  # seeded: no early EOS
