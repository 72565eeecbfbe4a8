"""The outage log every worker loop that talks to Redis shares: one line when Redis goes
away, one per backoff step while it stays away, one when it answers again; against a
real Redis port with nothing listening."""

from __future__ import annotations

import logging
import time

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from omni_tasks.coordination.outage import Outage
from omni_tasks.dev.redis_server import _free_port

LOGGER = "omni.test.outage"


@pytest.fixture()
def unreachable() -> redis.Redis:
    """A client of a port nothing listens on, failing at once (no retries)."""
    return redis.Redis(port=_free_port(), socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_a_burst_of_failures_within_one_step_logs_one_line(caplog, unreachable) -> None:
    outage = Outage("probe", logging.getLogger(LOGGER), first_s=60.0, max_s=60.0)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        results = [outage.run(unreachable.ping) for _ in range(200)]
    assert not any(results)
    (line,) = lines(caplog)
    assert line.startswith("probe: Redis unreachable (ConnectionError: ")
    assert "Traceback" not in caplog.text
    assert outage.down and outage.pause(0.01) == 60.0


def test_each_backoff_step_logs_once_and_the_steps_double_up_to_the_cap(
    caplog, unreachable
) -> None:
    outage = Outage("probe", logging.getLogger(LOGGER), first_s=0.01, max_s=0.04)
    delays = []
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(5):  # a loop that waits what the outage says before each try
            assert not outage.run(unreachable.ping)
            delays.append(outage.pause(1.0))
            time.sleep(delays[-1])
    assert delays == [0.01, 0.02, 0.04, 0.04, 0.04]
    logged = lines(caplog)
    assert len(logged) == 5
    assert all("Redis still unreachable" in line for line in logged[1:])


def test_the_first_success_after_an_outage_logs_reconnected_once(caplog, unreachable) -> None:
    outage = Outage("probe", logging.getLogger(LOGGER))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert outage.run(lambda: None)  # nothing to report while Redis answers
        assert not outage.run(unreachable.ping)
        assert outage.run(lambda: None)
        assert outage.run(lambda: None)
    assert len(lines(caplog)) == 2
    assert lines(caplog)[1].startswith("probe: reconnected to Redis after ")
    assert not outage.down and outage.pause(0.25) == 0.25


def test_a_failure_that_is_not_a_lost_connection_shows_its_traceback_once(caplog) -> None:
    outage = Outage("probe", logging.getLogger(LOGGER), first_s=60.0, max_s=60.0)

    def broken() -> None:
        raise KeyError("not a connection problem")

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(50):
            outage.run(broken)
        outage.run(lambda: None)
    first, last = lines(caplog)
    assert first.startswith("probe failed (KeyError: 'not a connection problem')")
    assert caplog.text.count("Traceback") == 1
    assert last.startswith("probe: working again after ")
