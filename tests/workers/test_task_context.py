"""The current task is per task thread: code below the handler sees its own task, nested
runs restore the outer one, and a thread the task starts (the step loop) sees none."""

from __future__ import annotations

import threading

from workers import task_context


def test_the_current_task_is_the_running_threads_own() -> None:
    seen: dict[str, object] = {}
    assert task_context.current_task_id() is None
    with task_context.running("outer", 3):
        with task_context.running("inner"):
            seen["inner"] = (task_context.current_task_id(), task_context.current_level())
        seen["outer"] = (task_context.current_task_id(), task_context.current_level())
        other = threading.Thread(target=lambda: seen.update(other=task_context.current_task_id()))
        other.start()
        other.join()
        assert task_context.running_task_ids() == ["outer"]
    assert seen == {"inner": ("inner", None), "outer": ("outer", 3), "other": None}
    assert task_context.current_task_id() is None and task_context.running_task_ids() == []


def test_two_task_threads_each_see_their_own_task() -> None:
    inside = threading.Barrier(2)
    seen: dict[str, str | None] = {}

    def run(task_id: str) -> None:
        with task_context.running(task_id):
            inside.wait(5)  # both are running at once
            seen[task_id] = task_context.current_task_id()
            inside.wait(5)

    threads = [threading.Thread(target=run, args=(t,)) for t in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen == {"a": "a", "b": "b"}
