"""The process boundary: the producer side (`omni_tasks`) never imports the worker side
(`workers`), not even lazily, and importing it pulls in no engine and connects no
worker signal. Worker processes load the worker side through Celery's `imports`."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
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
        "from omni_tasks import cli\n"
        "from omni_tasks.dev import demo, launcher, redis_server\n"
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


#: The worker side's lower layers, lowest last: what engines and the step loop may import
#: from `workers`. The runtime, handlers, execution, lifecycle, previews and the DiT
#: service sit above them and hand them what they report to.
ENGINE_LAYERS = ("workers.engines", "workers.stepping")
BELOW_ENGINES = (
    "workers.device_thread",
    "workers.resources",
    "workers.progress",
    "workers.lora",
    "workers.models",
    "workers.dit_cache",
)


def _worker_imports_outside(prefixes: tuple[str, ...], allowed: tuple[str, ...]) -> list[str]:
    """`file:line imports module` for each import of a `workers` module outside `allowed`
    made by a module under one of `prefixes`."""
    workers_root = PRODUCER_ROOT.parent / "workers"
    offenders = []
    for path in sorted(workers_root.rglob("*.py")):
        name = _module_name(path, workers_root.parent)
        if not name.startswith(prefixes):
            continue
        offenders += [
            f"{path.relative_to(workers_root.parent)}:{line} imports {module}"
            for line, module in _imported_modules(path)
            if module.startswith("workers") and not module.startswith(allowed)
        ]
    return offenders


def test_engines_and_the_step_loop_import_nothing_above_them() -> None:
    """Counters, progress and previews reach engines through their arguments: engines,
    families and the step loop import only themselves and the layers below them, the
    step loop not even the engines, and those layers import nothing above either."""
    assert _worker_imports_outside(ENGINE_LAYERS, (*ENGINE_LAYERS, *BELOW_ENGINES)) == []
    assert (
        _worker_imports_outside(("workers.stepping",), ("workers.stepping", *BELOW_ENGINES)) == []
    )
    assert _worker_imports_outside(BELOW_ENGINES, (*ENGINE_LAYERS, *BELOW_ENGINES)) == []


def test_the_layer_scan_sees_engines_and_the_step_loop() -> None:
    workers_root = PRODUCER_ROOT.parent / "workers"
    assert len(list((workers_root / "engines").rglob("*.py"))) > 20
    assert len(list((workers_root / "stepping").rglob("*.py"))) > 3


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _run_imports(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements under `node` that can run: all of them, at module level or
    inside functions, but those under `if TYPE_CHECKING:` (type checkers read them;
    Python never runs them)."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            for branch in child.orelse:
                yield from _run_imports(branch)
        else:
            yield from _run_imports(child)


def _import_graph(packages: list[Path]) -> dict[str, set[str]]:
    """Module -> the modules of `packages` it imports (`_run_imports`), absolute or
    relative; `from pkg import name` counts `pkg.name` when that is a module, else
    `pkg`."""
    root = packages[0].parent
    paths = {_module_name(p, root): p for pkg in packages for p in pkg.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in _run_imports(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, *([node.module] if node.module else [])])
                found |= {
                    f"{base}.{a.name}" if f"{base}.{a.name}" in paths else base for a in node.names
                }
        graph[name] = {module for module in found if module in paths and module != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of `graph`: its strongly connected components of more than one
    module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        while work:
            node, edges = work[-1]
            child = next((e for e in edges if e not in index or e in stack), None)
            if child is not None and child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                work.append((child, iter(sorted(graph[child]))))
                continue
            if child is not None:
                low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def test_no_module_of_the_tasks_package_imports_in_a_circle() -> None:
    """`omni_tasks.tasks` has no import cycle, not even through imports inside
    functions: the Celery app names its router by string, and the send path
    (`tasks.sending`) sits below the task class."""
    graph = _import_graph([PRODUCER_ROOT, PRODUCER_ROOT.parent / "workers"])
    assert "omni_tasks.tasks.sending" in graph["omni_tasks.tasks.base"]  # the scan sees it
    tasks = {
        m: {e for e in edges if e.startswith("omni_tasks.tasks")}
        for m, edges in graph.items()
        if m.startswith("omni_tasks.tasks")
    }
    assert _cycles(tasks) == []


def test_no_module_of_omni_tasks_or_workers_imports_in_a_circle() -> None:
    graph = _import_graph([PRODUCER_ROOT, PRODUCER_ROOT.parent / "workers"])
    assert len(graph) > 100 and any(m.startswith("workers.") for m in graph)
    assert _cycles(graph) == []


def test_the_cycle_scan_finds_a_cycle_through_a_function_import(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg import b\n")
    (package / "b.py").write_text("def f():\n    from . import c\n")
    (package / "c.py").write_text("import pkg.a\n")
    (package / "d.py").write_text("from pkg.a import something\n")
    typed = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import d\n"
    (package / "e.py").write_text(typed + "else:\n    import pkg.a\n")
    assert _cycles(_import_graph([package])) == [["pkg.a", "pkg.b", "pkg.c"]]
    assert _import_graph([package])["pkg.e"] == {"pkg.a"}  # what runs: not the typed one


#: The request-vocabulary modules, lowest first: each may import only those before it.
VOCABULARY_LAYERS = (
    "omni_tasks.vocabulary",
    "omni_tasks.config",
    "omni_tasks.lora",
    "omni_tasks.requests",
    "omni_tasks.model_registry",
)


def _layer(module: str) -> int | None:
    """The index of the vocabulary layer `module` is in (a package's modules are the
    package), or None."""
    found = [i for i, layer in enumerate(VOCABULARY_LAYERS) if f"{module}.".startswith(f"{layer}.")]
    return found[0] if found else None


def test_the_vocabulary_module_imports_nothing_from_the_project() -> None:
    graph = _import_graph([PRODUCER_ROOT, PRODUCER_ROOT.parent / "workers"])
    assert graph["omni_tasks.vocabulary"] == set()


def test_vocabulary_config_and_requests_import_one_way_even_inside_functions() -> None:
    """vocabulary <- config <- lora <- requests <- model_registry: a module imports only
    its own layer and those below, so none hides an import inside a function to avoid a
    cycle; the config imports nothing of the project but the vocabulary and errors."""
    graph = _import_graph([PRODUCER_ROOT])
    assert "omni_tasks.config" in graph["omni_tasks.lora"]  # the scan sees the layers
    upward = [
        f"{module} imports {target}"
        for module, targets in sorted(graph.items())
        if _layer(module) is not None
        for target in sorted(targets)
        if _layer(target) is not None and _layer(target) > _layer(module)
    ]
    assert upward == []
    config = set().union(*(t for m, t in graph.items() if m.startswith("omni_tasks.config")))
    allowed = ("omni_tasks.config", "omni_tasks.vocabulary", "omni_tasks.errors")
    assert sorted(m for m in config if not m.startswith(allowed)) == []


def test_no_pydantic_validator_reads_the_process_config() -> None:
    """Registries reach validators through pydantic's validation context."""
    readers = [
        f"{path.relative_to(PRODUCER_ROOT.parent)}: {node.name}"
        for path in sorted(PRODUCER_ROOT.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef)
        and any("validator" in ast.unparse(d) for d in node.decorator_list)
        and "get_config" in ast.unparse(node)
    ]
    assert readers == []


def _lookups(path: Path) -> set[str]:
    """The process-wide lookups (`get_config()`, `get_redis()`) a file calls."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            if name in ("get_config", "get_redis"):
                found.add(name)
    return found


#: Where the process config and its Redis client may be looked up: the entry points,
#: which build the contexts everything else is given.
ENTRY_POINTS = {
    "omni_tasks/config": {"get_config"},  # the lookup itself
    "omni_tasks/coordination/client.py": {"get_config", "get_redis"},  # get_redis itself
    "omni_tasks/cli": {"get_config", "get_redis"},  # the commands
    "omni_tasks/dev/demo.py": {"get_config", "get_redis"},
    "omni_tasks/dev/launcher.py": {"get_config"},
    "omni_tasks/api/app.py": {"get_config"},  # the app factory
    "omni_tasks/tasks/context.py": {"get_config"},  # a context with no config attached
    "omni_tasks/tasks/celery_app.py": {"get_config"},  # the Celery settings at import
    "workers/lifecycle/hooks.py": {"get_config"},  # worker_init: the worker's config
    "workers/engines/diffusers_engine.py": {"get_config"},  # an engine built alone
}


def test_only_entry_points_look_up_the_config_or_redis() -> None:
    """Everything else gets the config, the Redis client and the keys it names from its
    constructor, its arguments or its process's context (the worker runtime, the app's
    state, the Celery app's `ProducerContext`, a client's `keyspace`)."""
    repo = PRODUCER_ROOT.parent
    files = [*(repo / "workers").rglob("*.py"), *PRODUCER_ROOT.rglob("*.py")]
    found = {str(path.relative_to(repo)): names for path in files if (names := _lookups(path))}

    def allowed(path: str) -> set[str]:
        return next((v for k, v in ENTRY_POINTS.items() if path.startswith(k)), set())

    assert {f: n for f, n in found.items() if not n <= allowed(f)} == {}


def test_per_task_state_lives_in_context_variables() -> None:
    """The current task, its progress reporter and its hooked request are ContextVars."""
    repo = PRODUCER_ROOT.parent
    for path in [*(repo / "workers").rglob("*.py"), *PRODUCER_ROOT.rglob("*.py")]:
        assert "threading.local" not in path.read_text(), path
