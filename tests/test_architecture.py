"""The process boundary: the producer side (`omni_tasks`) never imports the worker side
(`workers`), not even lazily, and importing it pulls in no engine and connects no
worker signal. Worker processes load the worker side through Celery's `imports`."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import omni_tasks

PRODUCER_ROOT = Path(omni_tasks.__file__).resolve().parent
HEAVY = ("workers", "torch", "vllm", "diffusers", "transformers", "PIL")


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import statement in a file, nested ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def test_no_producer_module_imports_the_worker_side() -> None:
    sources = sorted(PRODUCER_ROOT.rglob("*.py"))
    assert len(sources) > 20  # the scan sees the whole package
    offenders = [
        f"{path.relative_to(PRODUCER_ROOT.parent)}:{line} imports {module}"
        for path in sources
        for line, module in _imported_modules(path)
        if module == "workers" or module.startswith("workers.")
    ]
    assert offenders == []


def test_the_scan_finds_a_lazy_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from workers.runtime import runtime\n    return runtime\n")
    assert _imported_modules(sample) == [(2, "workers.runtime")]


def test_importing_omni_tasks_loads_no_worker_side_and_connects_no_worker_signal() -> None:
    # Also what tests/test_imports.py checked: the public names import without an engine.
    code = (
        "import json, sys\n"
        "import omni_tasks\n"
        "from omni_tasks import generate_text, generate_image, generate_multimodal, submit\n"
        "from omni_tasks import OmniScheduler, CoreScheduler, CoreModuleConfig\n"
        "from omni_tasks.dev import cli, demo, launcher, redis_server\n"
        "omni_tasks.app.conf.broker_url  # loads the Celery settings too\n"
        "from celery import signals\n"
        "names = ('worker_init', 'worker_process_init', 'worker_ready', 'worker_shutdown',\n"
        "         'worker_shutting_down', 'celeryd_after_setup')\n"
        "print(json.dumps({\n"
        f"  'loaded': [m for m in {HEAVY!r} if m in sys.modules],\n"
        "  'receivers': {n: len(getattr(signals, n).receivers or []) for n in names},\n"
        "}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["loaded"] == []
    assert all(count == 0 for count in report["receivers"].values()), report["receivers"]


def test_worker_processes_load_the_worker_side_through_celery_imports() -> None:
    conf = omni_tasks.app.conf
    assert "workers.entry" in conf.imports
    assert conf.worker_consumer.startswith("workers.lifecycle.")


def test_a_task_body_outside_a_worker_says_where_it_runs() -> None:
    from omni_tasks import ProcessingError

    task = omni_tasks.app.tasks["omni_tasks.generate_text"]
    assert task.handler is None  # nothing registered in an application process
    try:
        task.run(prompt="hi")
    except ProcessingError as exc:
        assert "celery -A omni_tasks worker" in str(exc)
    else:  # pragma: no cover - the assertion below explains
        raise AssertionError("a task body ran without a worker-side handler")


def test_engines_and_the_step_loop_get_what_they_report_to_from_the_worker() -> None:
    """Counters, progress and previews reach engines through their arguments: no engine,
    family or step-loop module imports the worker runtime, previews or handlers."""
    workers_root = PRODUCER_ROOT.parent / "workers"
    sources = sorted(
        [*(workers_root / "engines").rglob("*.py"), *(workers_root / "stepping").rglob("*.py")]
    )
    assert len(sources) > 20
    forbidden = ("workers.runtime", "workers.previews", "workers.handlers")
    offenders = [
        f"{path.relative_to(workers_root.parent)}:{line} imports {module}"
        for path in sources
        for line, module in _imported_modules(path)
        if module in forbidden
    ]
    assert offenders == []
