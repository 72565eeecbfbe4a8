"""Starting `celery -A omni_tasks worker -Q <queue>` processes: the command line a user
types, a log per worker, readiness read from its heartbeat in Redis, and a worker that
exits early reported with its log. (Workers that really serve: the end-to-end tests.)"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from helpers import KEYS

from omni_tasks.dev.launcher import start_worker


def test_a_worker_that_exits_is_reported_with_its_log(redis_client, tmp_path: Path) -> None:
    worker = start_worker("ar", tmp_path / "logs", extra_args=["--pool", "bogus"])
    try:
        assert worker.proc.args == [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "omni_tasks",
            "worker",
            "-Q",
            "ar",
            "-n",
            worker.hostname,
            "--loglevel",
            "INFO",
            "--pool",
            "bogus",
        ]
        name, _, node = worker.hostname.partition("@")
        assert name.startswith("ar-") and len(name) == len("ar-") + 6
        assert node == os.uname().nodename
        assert worker.log_path == tmp_path / "logs" / f"{name}.log"
        with pytest.raises(RuntimeError, match=f"worker {worker.hostname} exited with 2") as info:
            worker.wait_ready(60)
        assert "'bogus' is not one of" in str(info.value)  # the log tail comes along
        assert "'bogus' is not one of" in worker.log_tail()
        assert not worker.is_ready()
    finally:
        assert worker.stop() == 2
    assert worker.stop() == 2  # stopping an exited worker again is harmless


def test_ready_means_its_heartbeat_is_in_redis(redis_client, tmp_path: Path) -> None:
    worker = start_worker("diffusion", tmp_path, extra_args=["--pool", "bogus"], name="dit")
    try:
        assert worker.hostname.startswith("dit-")
        redis_client.hset(KEYS.worker(worker.hostname), "hostname", worker.hostname)
        assert worker.is_ready()
        worker.wait_ready(5)  # returns at once: the heartbeat is there
    finally:
        worker.kill()
    assert worker.proc.poll() is not None


def test_log_tail_of_a_missing_log_is_empty(tmp_path: Path) -> None:
    worker = start_worker("ar", tmp_path, extra_args=["--pool", "bogus"])
    worker.kill()
    worker.stop()
    worker.log_path.unlink()
    assert worker.log_tail() == ""
