"""The `omni-tasks` command line, run as a user runs it (its own process, the test Redis
named by OMNI_REDIS_URL in the environment it inherits)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time
import uuid

from helpers import message_kwargs, queued_messages, where

from omni_tasks import generate_text
from omni_tasks.cli.submit import render_progress, wait_with_progress


def omni_tasks_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "omni_tasks.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_help_runs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "omni_tasks.cli", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0
    for command in ("demo", "models", "submit", "status", "api", "exporter"):
        assert command in out.stdout


def test_status_prints_the_cluster_as_json(redis_client) -> None:
    generate_text.delay(prompt="waiting", priority="high")
    out = omni_tasks_cli("status", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    status, health = report["status"], report["health"]
    assert status["queue_size"] == 1
    assert sum(status["queues"]["ar"].values()) == 1
    assert status["resource_status"] == {"workers": [], "used_bytes": 0, "budget_bytes": 0}
    assert set(status["pools"]) == {"ar", "diffusion", "speech"}
    assert health["healthy"] is False  # no worker runs in this test
    assert any("'ar'" in issue for issue in health["issues"])  # work waits, no worker


def test_status_prints_tables_for_people(redis_client) -> None:
    generate_text.delay(prompt="waiting", priority="high")
    generate_text.delay(prompt="waiting too", priority="low")
    out = omni_tasks_cli("status")
    assert out.returncode == 0, out.stderr
    for title in ("Pools", "Queues", "Workers", "DiT cache", "Health: unhealthy"):
        assert title in out.stdout, out.stdout
    queues = out.stdout[out.stdout.index("Queues") :]
    assert "level 0" in queues and "level 9" in queues  # only the levels in use
    assert "level 5" not in queues
    assert "no live worker consumes queue 'ar'" in out.stdout


def test_status_lists_the_newest_refused_messages(redis_client) -> None:
    from omni_tasks.coordination.rejections import record_rejection

    reason = "request_id: 'taken' was accepted before for a different request"
    name = "omni_tasks.generate_text"
    record_rejection(redis_client, reason, task_id="taken", task_name=name, queue="ar")
    out = omni_tasks_cli("status", "--json")
    (record,) = json.loads(out.stdout)["rejected"]
    assert (record["task_id"], record["reason"]) == ("taken", reason)
    out = omni_tasks_cli("status")
    table = out.stdout[out.stdout.index("Refused messages") :]
    assert "taken" in table and "different request" in table


def test_submit_of_a_bad_field_exits_2_naming_it(redis_client) -> None:
    out = omni_tasks_cli("submit", "image", "a fox", "--width", "72", "--no-wait")
    assert out.returncode == 2
    assert "error: width:" in out.stderr
    assert "multiple of 16" in out.stderr
    assert queued_messages(redis_client, "diffusion") == []  # nothing was sent


def test_submit_without_waiting_enqueues_and_prints_the_id(redis_client) -> None:
    out = omni_tasks_cli(
        "submit", "text", "once upon a time", "--max-tokens", "12", "--priority", "low", "--no-wait"
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr.startswith("submitted ")
    task_id = out.stderr.split()[1]
    assert where(redis_client, task_id)[0] == "ar"
    ((_, message),) = queued_messages(redis_client, "ar")
    kwargs = message_kwargs(message)
    assert (kwargs["prompt"], kwargs["max_tokens"], kwargs["priority"]) == (
        "once upon a time",
        12,
        "low",
    )


def test_submit_multimodal_sends_its_first_stage(redis_client) -> None:
    out = omni_tasks_cli("submit", "multimodal", "a lighthouse", "--steps", "2", "--no-wait")
    assert out.returncode == 0, out.stderr
    task_id = out.stderr.split()[1]
    assert where(redis_client, task_id + ".prompt")[0] == "ar"


def test_usage_errors_exit_2_before_anything_runs(redis_client) -> None:
    out = omni_tasks_cli("submit", "video", "a fox")
    assert out.returncode == 2 and "invalid choice" in out.stderr
    out = omni_tasks_cli()
    assert out.returncode == 2 and "required" in out.stderr


def test_the_progress_bar_shows_steps_or_tokens() -> None:
    assert render_progress({"step": 4, "steps": 8}, width=16) == "[########--------] step 4/8"
    assert render_progress({"tokens": 12, "max_tokens": 64}, width=16) == (
        "[###-------------] tokens 12/64"
    )
    assert render_progress({"tokens": 0, "max_tokens": 64}, width=4) == "[----] tokens 0/64"
    assert render_progress({"tokens": 70, "max_tokens": 64}, width=4) == "[####] tokens 70/64"
    for info in (None, "text", {}, {"step": 1}, {"tokens": 1, "max_tokens": 0}):
        assert render_progress(info) is None


def test_waiting_draws_each_new_figure_then_returns_the_result(redis_client) -> None:
    """The figures a worker writes (state PROGRESS, then SUCCESS) into the real result
    backend, read back by the CLI's wait: one line per new figure on a non-terminal."""
    from celery.result import AsyncResult

    from omni_tasks import app

    task_id = uuid.uuid4().hex
    figures = [{"tokens": 8, "max_tokens": 32}, {"tokens": 8, "max_tokens": 32}]
    figures.append({"tokens": 24, "max_tokens": 32})

    def worker_side() -> None:
        for info in figures:  # a worker's pace: the wait reads each state it writes
            time.sleep(0.3)
            app.backend.store_result(task_id, info, "PROGRESS")
        time.sleep(0.3)
        app.backend.store_result(task_id, {"text": "done"}, "SUCCESS")

    writer = threading.Thread(target=worker_side)
    writer.start()
    stream = io.StringIO()
    try:
        result = wait_with_progress(AsyncResult(task_id, app=app), 30, stream)
    finally:
        writer.join()
    assert result == {"text": "done"}
    assert stream.getvalue().splitlines() == [
        render_progress(figures[0]),
        render_progress(figures[2]),
    ]


def test_on_a_terminal_waiting_draws_a_rich_bar(redis_client) -> None:
    from celery.result import AsyncResult
    from rich.console import Console

    from omni_tasks import app
    from omni_tasks.cli.submit import wait_with_bar

    task_id = uuid.uuid4().hex

    def worker_side() -> None:
        for step in (2, 6):  # a worker's pace: the bar reads each state it writes
            time.sleep(0.3)
            app.backend.store_result(task_id, {"step": step, "steps": 8}, "PROGRESS")
        time.sleep(0.3)
        app.backend.store_result(task_id, {"image_path": "x.png"}, "SUCCESS")

    writer = threading.Thread(target=worker_side)
    writer.start()
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=100)
    try:
        result = wait_with_bar(AsyncResult(task_id, app=app), 30, console=console)
    finally:
        writer.join()
    assert result == {"image_path": "x.png"}
    drawn = screen.getvalue()
    assert "step" in drawn and "6/8" in drawn
