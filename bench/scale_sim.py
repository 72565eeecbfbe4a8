"""The parts of `bench/scale.py` that simulate a large cluster on one machine, and the
busy diffusion worker.

- Simulated workers: `count` worker identities in this process, each running the real
  `workers.lifecycle.heartbeat.Heartbeat` in its own thread (the real beat, index entry
  and, for diffusion identities, the real dead-worker sweep), for a window; then one
  real reaper pass and one real health check over them. One Python process carries a
  thousand of them because a beat is a few commands every five seconds.
- A deep backlog of distinct requests: `depth` messages with their own task ids and
  ledger entries, aged past `ledger_grace_s` (what a reaper pass faces when a pool
  falls behind).
- A busy diffusion worker: a real `celery -A omni_tasks worker -Q diffusion` serving
  tiny-flux runs one image of `steps` denoising steps alone, then the same with a
  backlog of lower-priority images held unstarted (the arrival watch reads the queue);
  commands per second and per step, by command.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

#: Share of simulated identities that run the diffusion stage (they sweep dead workers).
DIT_SHARE = 4


def simulated_workers(stats: Any, count: int, window_s: float) -> dict[str, Any]:
    """`count` real heartbeats in threads for `window_s`, then a reaper pass and a
    health check over them (see the module docstring)."""
    import omni_tasks
    from omni_tasks.coordination.client import get_redis
    from omni_tasks.scheduling.omni_scheduler import OmniScheduler
    from workers.lifecycle.heartbeat import Heartbeat
    from workers.lifecycle.reaper import Reaper
    from workers.runtime import WorkerIdentity, WorkerRuntime

    beats = []
    for i in range(count):
        dit = i % DIT_SHARE == 0
        runtime = WorkerRuntime()
        runtime.attach(
            WorkerIdentity(
                hostname=f"sim{i}-{uuid.uuid4().hex[:6]}@scale",
                queues=["diffusion" if dit else "ar"],
                stages=["dit"] if dit else ["ar"],
                pool_type="threads",
                concurrency=32,
            )
        )
        beats.append(Heartbeat(runtime))
    started = time.perf_counter()
    for beat in beats:  # spread over one interval, as workers started at random times
        beat.start()
        time.sleep(min(5.0 / count, 0.05))
    spread_s = time.perf_counter() - started
    stats.reset()
    time.sleep(window_s)
    got = stats.read()
    for beat in beats:
        beat.stop()
    client, reaper_lock = get_redis(), omni_tasks.app.omni.keys.reaper_lock
    client.delete(reaper_lock())
    passes = {}
    for name, run in (
        ("reaper_pass", Reaper(omni_tasks.app).run_once),
        ("health_check", OmniScheduler().get_health_status),
    ):
        client.delete(reaper_lock())
        passes[name] = timed_pass(stats, run)[1]
    per_s = got["calls"] / got["elapsed_s"] / count
    return {
        "identities": count,
        "diffusion_identities": len(range(0, count, DIT_SHARE)),
        "start_spread_s": round(spread_s, 1),
        "window_s": got["elapsed_s"],
        "calls_per_s_per_identity": round(per_s, 3),
        "by_command_per_s_per_identity": {
            c: round(r["calls"] / got["elapsed_s"] / count, 3) for c, r in got["commands"].items()
        },
        "redis_cpu_ms_per_s": round(1e3 * got["redis_cpu_s"] / got["elapsed_s"], 3),
        **passes,
    }


def timed_pass(stats: Any, run: Any) -> tuple[Any, dict[str, Any]]:
    """Run `run` once between two reads of Redis's counters: (its result, its time and
    commands, the bytes Redis sent)."""
    stats.reset()
    started = time.perf_counter()
    result = run()
    took = time.perf_counter() - started
    got = stats.read()
    return result, {
        "seconds": round(took, 4),
        "calls": got["calls"],
        "by_command": {c: r["calls"] for c, r in got["commands"].items()},
        "usec_per_call": {c: round(r["usec"] / r["calls"], 1) for c, r in got["commands"].items()},
        "redis_cpu_s": got["redis_cpu_s"],
        "net_output_bytes": got["net_output_bytes"],
        "slowest": got["slowest"][:3],
    }


def distinct_backlog(depth: int, age_s: float) -> None:
    """`depth` distinct requests queued in the AR pool, each with its ledger time
    `age_s` ago (copies of one real probe message under new task ids)."""
    import omni_tasks
    from omni_tasks.config import get_config
    from omni_tasks.coordination import keys
    from omni_tasks.coordination.client import get_redis

    client, space = get_redis(), omni_tasks.app.omni.keys
    omni_tasks.tasks.probe.apply_async(kwargs={"prompt": "x"})
    queue = get_config().ar.queue
    key = next(k for k in keys.queue_keys(queue) if client.llen(k))
    message = json.loads(client.lindex(key, 0))
    newest = time.time() - age_s
    client.zadd(space.ledger_open(), {message["headers"]["id"]: newest}, xx=True)
    for start in range(0, depth - 1, 5000):
        ids = [uuid.uuid4().hex for _ in range(min(5000, depth - 1 - start))]
        copies = []
        for task_id in ids:
            message["headers"]["id"] = task_id
            message["properties"]["correlation_id"] = task_id
            copies.append(json.dumps(message))
        # Each RPUSH lands nearer the tail (consumed sooner): published earlier.
        times = {task_id: newest - 1e-4 * (start + i + 1) for i, task_id in enumerate(ids)}
        pipe = client.pipeline(transaction=False)
        pipe.rpush(key, *copies)
        pipe.zadd(space.ledger_open(), times)
        pipe.execute()


def busy_diffusion(stats: Any, log_dir: Any, steps: int) -> dict[str, Any]:
    """A real tiny-flux worker: one image of `steps` steps alone, then the same with
    lower-priority images held unstarted; commands per second and per step."""
    from omni_tasks import generate_image
    from omni_tasks.dev.launcher import start_worker

    worker = start_worker("diffusion", log_dir, name="scale-busy")
    try:
        worker.wait_ready(300)
        ask = {"width": 128, "height": 128, "steps": steps}
        generate_image.delay(prompt="warm-up", seed=0, **{**ask, "steps": 2}).get(600)
        time.sleep(6)  # past the warm-up's own writes
        alone = _busy_window(stats, lambda: [generate_image.delay(prompt="alone", seed=1, **ask)])

        def with_backlog() -> list[Any]:
            first = generate_image.delay(prompt="running", seed=2, priority="normal", **ask)
            time.sleep(1.0)
            backlog = [
                generate_image.delay(prompt=f"held {i}", seed=3 + i, priority="low", **ask)
                for i in range(12)
            ]
            return [first, *backlog]

        held = _busy_window(stats, with_backlog)
    finally:
        worker.kill()  # the backlog is not worth waiting for; the harness cleans Redis
    return {"one_image_alone": alone, "with_unstarted_backlog": held}


def _busy_window(stats: Any, send: Any) -> dict[str, Any]:
    """Run what `send` sends; count Redis's commands until the first result is back."""
    stats.reset()
    results = send()
    out = results[0].get(600)
    got = stats.read()
    steps = int(out["denoise_steps"])
    elapsed = got["elapsed_s"]
    return {
        "requests_sent": len(results),
        "elapsed_s": elapsed,
        "denoise_steps": steps,
        "steps_per_s": round(steps / elapsed, 2),
        "calls": got["calls"],
        "calls_per_s": round(got["calls"] / elapsed, 2),
        "calls_per_step": round(got["calls"] / steps, 2),
        "by_command": {c: r["calls"] for c, r in got["commands"].items()},
    }
