"""Writing a model folder so that readers never see half of one.

The folder is written to a temporary sibling, marked complete (the marker file is
written last and names the format version), then renamed into place. An advisory file
lock (kept in the system temp directory, not beside the model) makes concurrent
builders on one host wait for the first instead of building twice; a builder on
another host that wins the rename is accepted. Builds inside one process are
serialized too: the tiny builders seed torch's global RNG.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

MARKER = ".tiny-model-complete"
_PROCESS_LOCK = threading.Lock()


def is_complete(path: Path, version: str) -> bool:
    try:
        return (Path(path) / MARKER).read_text().strip() == version
    except OSError:
        return False


def build_atomically(path: Path, version: str, write: Callable[[Path], None]) -> Path:
    """Run `write(folder)` and move the folder to `path`, unless `path` is complete."""
    path = Path(path)
    if is_complete(path, version):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]
    lock_path = Path(tempfile.gettempdir()) / f"omni-tasks-build-{digest}.lock"
    with _PROCESS_LOCK, open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if is_complete(path, version):  # another builder finished meanwhile
                return path
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
            try:
                write(tmp)
                _make_readable(tmp)
                (tmp / MARKER).write_text(version + "\n")
                if path.exists():  # an incomplete or outdated folder
                    shutil.rmtree(path)
                try:
                    os.replace(tmp, path)
                except OSError:
                    if not is_complete(path, version):  # not another host's finished build
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return path


def _make_readable(root: Path) -> None:
    """mkdtemp and safetensors create owner-only modes; give the usual 755 / 644."""
    root.chmod(0o755)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o755)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o644)
