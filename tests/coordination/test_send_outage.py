"""A `.delay()` whose Redis goes away (docs/wire.md, "Sending"): it raises a
`SchedulerError` that says whether the request may have been accepted, and a request
it was refused never runs, not after `ledger_grace_s` nor after a reaper pass.

The producer runs as its own process (`tests/send_outage_client.py`) against a private
Redis with AOF of its own, which it stops and starts again around the accepting
step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

CLIENT = Path(__file__).parent.parent / "send_outage_client.py"
NOTHING = {"queued": 0, "ledger": False, "open": False, "admitted": False, "fingerprint": False}


@pytest.fixture(scope="module")
def outcome() -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(CLIENT)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=CLIENT.parent.parent,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_redis_away_before_the_send_refuses_it_and_accepts_nothing(outcome: dict) -> None:
    refused = outcome["down_before"]
    assert refused["error"] == "BrokerUnavailableError" and refused["may_be_accepted"] is False
    assert "nothing was accepted" in refused["message"]
    assert outcome["down-before"] == NOTHING


def test_redis_lost_at_the_accepting_step_leaves_nothing_that_could_run(outcome: dict) -> None:
    refused = outcome["down_at_accept"]
    assert refused["error"] == "BrokerUnavailableError", refused
    assert outcome["down-at-accept"] == NOTHING  # not queued, not in the ledger


def test_redis_lost_right_after_acceptance_leaves_one_message(outcome: dict) -> None:
    sent = outcome["down_after_accept"]
    # The request was accepted: the caller has its id, or an error saying it may run.
    assert sent.get("id") == "down-after-accept" or sent.get("may_be_accepted") is True, sent
    held = outcome["down-after-accept"]
    assert held["queued"] == 1 and held["open"] and held["admitted"] and held["fingerprint"]


def test_a_reaper_pass_publishes_nothing_again(outcome: dict) -> None:
    # The accepted request is queued (not lost); the refused ones left nothing to recover.
    assert outcome["ledger_grace_s"] < 1  # its grace passed before the pass
    assert outcome["reaper"]["recovered"] == 0, outcome["reaper"]
