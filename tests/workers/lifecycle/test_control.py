"""The remote-control commands a worker answers (`workers.lifecycle.control`).

Importing `workers.lifecycle` registers the handlers on the process-wide app, which an
application process (this one) must never do, so the command runs in a child process
on the tiny real Flux model; a live worker answering the broadcast is covered by
`tests/integration/test_dit_service.py`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from omni_tasks.coordination import cache_directory
from omni_tasks.coordination.client import get_redis

REPO_ROOT = Path(__file__).resolve().parents[3]
CHILD = r"""
import json
import torch
from celery.worker.control import Panel
from workers.lifecycle import control
from workers.runtime import runtime

replies = {"registered": Panel.meta["dit_cache"].type, "hostname": runtime.hostname}
replies["before"] = control.dit_cache(None)
cache = runtime.dit_cache()
cache.put("k-b", torch.zeros(8), lossless=True)
cache.put("k-a", torch.zeros(4), lossless=True)
replies["after"] = control.dit_cache(None)
runtime.stop()
print(json.dumps(replies))
"""


def test_dit_cache_command_reports_what_the_cache_holds(tiny_flux_dir: Path, redis_client) -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHILD], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    replies = json.loads(done.stdout.strip().splitlines()[-1])
    assert replies["registered"] == "inspect"
    assert replies["before"] == {"keys": [], "stats": {}}  # no DiT cache built yet
    after = replies["after"]
    assert after["keys"] == ["k-a", "k-b"]
    assert after["stats"]["entries"] == 2 and after["stats"]["bytes"] == 48
    # What the command reports is what the Redis directory mirrors for that worker.
    assert cache_directory.held_by(get_redis(), replies["hostname"]) == {"k-a", "k-b"}
