"""Scale: what omni-tasks' coordination costs one Redis, against bare Celery.

Everything is measured on a private `redis-server` that this script starts (so that
`INFO commandstats` sees only its traffic), with Redis's own figures: calls and usec
per command (`INFO commandstats`, reset with `CONFIG RESETSTAT` between phases), the
server's CPU (`INFO cpu`, used_cpu_sys + used_cpu_user deltas) and `SLOWLOG`.
The harness's own `INFO`/`CONFIG`/`SLOWLOG` calls are left out of every tally.

- A, idle: N real workers doing nothing for a window: `celery -A omni_tasks worker -Q
  probe` (the cheapest real worker: it loads no engine, but runs the heartbeat, the
  reaper, the metrics and the consumer hooks of every omni-tasks worker) against N bare
  Celery workers (`bare_app`, the same broker settings); optionally one diffusion
  worker serving tiny-flux (its heartbeat also sweeps the DiT cache directory).
  Commands per second per idle worker, by command.
- B, per request: M sequential `omni_tasks.probe` requests (no engine), `.apply_async()`
  then `.get()`, against bare Celery's no-op task, with the phase A workers running:
  commands per request, by command, raw and net of the workers' idle traffic.
- C, queued depth: 0, 1, 10k (and, without --quick, 100k) distinct requests waiting in
  the AR queue with no AR worker (copies of one real probe message under their own
  task ids, their ledger entries made old enough for the reaper to check): one reaper pass
  (`Reaper.run_once`) and one health check (`OmniScheduler.get_health_status`, its
  stranded-list scan not cached), timed, with their commands, the bytes Redis sent
  and the slowest commands (SLOWLOG).
- D, simulated workers: 10, 100 and 1,000 worker identities in this process, each
  running the real heartbeat (`bench/scale_sim.py`), then a real reaper pass and health
  check over them.
- E, a busy diffusion worker (tiny-flux): one 128x128, 100-step image alone, then with
  a backlog of lower-priority images held unstarted (the arrival watch at work).

`targets` compares the figures with the budgets against bare Celery; the capacity
model divides 50% of one core by the measured Redis CPU per worker-second and per
request: an extrapolation from this machine's figures, assuming Redis's CPU grows
linearly with the command mix (no pipelining gains, no network).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import scale_sim  # noqa: E402
from common import (  # noqa: E402
    POOL_WORKER_ARGS,
    RESULTS,
    ROOT,
    stop,
    wait_ping,
    write_result,
)
from common import clean_redis as clean  # noqa: E402
from scale_sim import busy_diffusion, distinct_backlog, simulated_workers, timed_pass  # noqa: E402

#: The harness's own measuring commands, left out of the tallies.
OWN = {"config", "slowlog"}
#: INFO calls the harness makes between a reset and its read (workers' reapers call INFO
#: too, so INFO is counted, less these).
OWN_INFO_CALLS = 4
LOGS = RESULTS / "logs"


# -- Redis's own figures ------------------------------------------------------------
class Stats:
    """Counters of one phase: reset, then read back as a delta."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self._cpu = 0.0
        self._out = 0
        self._t = 0.0
        self._own_out = 0
        self.reset()
        self._own_out = self.read()["net_output_bytes"]  # the harness's INFO replies

    def _cpu_now(self) -> float:
        cpu = self.client.info("cpu")
        return float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])

    def reset(self) -> None:
        self.client.config_resetstat()
        self.client.slowlog_reset()
        self._cpu = self._cpu_now()
        self._out = int(self.client.info("stats")["total_net_output_bytes"])
        self._t = time.perf_counter()

    def read(self) -> dict[str, Any]:
        elapsed = time.perf_counter() - self._t
        cpu = self._cpu_now() - self._cpu
        out = int(self.client.info("stats")["total_net_output_bytes"]) - self._out - self._own_out
        commands: dict[str, dict[str, float]] = {}
        for name, row in self.client.info("commandstats").items():
            cmd = name.removeprefix("cmdstat_")
            calls, usec = int(row["calls"]), int(row["usec"])
            if cmd.split("|")[0] in OWN:
                continue
            if cmd == "info":
                usec = int(usec * max(calls - OWN_INFO_CALLS, 0) / calls)
                calls = max(calls - OWN_INFO_CALLS, 0)
            if calls:
                commands[cmd] = {"calls": calls, "usec": usec}
        slow = sorted(self.client.slowlog_get(-1), key=lambda e: -e["duration"])
        slowest = [
            {"usec": e["duration"], "command": _short(e["command"])}
            for e in slow
            if _short(e["command"]).split(" ")[0].lower() not in {"info", *OWN}
        ][:5]
        return {
            "elapsed_s": round(elapsed, 3),
            "redis_cpu_s": round(cpu, 4),
            "net_output_bytes": out,
            "calls": sum(c["calls"] for c in commands.values()),
            "commands": dict(sorted(commands.items(), key=lambda kv: -kv[1]["calls"])),
            "slowest": slowest,
        }


def _short(command: Any) -> str:
    text = command.decode(errors="replace") if isinstance(command, bytes) else str(command)
    return text[:120]


def per(stats: dict[str, Any], divisor: float, top: int = 12) -> dict[str, float]:
    return {
        cmd: round(row["calls"] / divisor, 3)
        for cmd, row in list(stats["commands"].items())[:top]
        if row["calls"] / divisor >= 0.001
    }


# -- workers ------------------------------------------------------------------------
def start_bare(index: int) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "bare_app",
        "worker",
        "-Q",
        "bare",
        "-n",
        f"scale-bare{index}-{os.getpid()}@%h",
        "--loglevel",
        "WARNING",
        *POOL_WORKER_ARGS,
    ]
    LOGS.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        cmd,
        cwd=ROOT / "bench",
        stdout=open(LOGS / f"scale-bare{index}.log", "wb"),  # noqa: SIM115 - the child's
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def idle_window(stats: Stats, workers: int, window_s: float) -> dict[str, Any]:
    time.sleep(3)  # past start-up (mingle, first beats)
    stats.reset()
    time.sleep(window_s)
    got = stats.read()
    got["workers"] = workers
    # Connections each worker holds (the harness's own one left out): Redis's maxclients
    # (10,000 by default) bounds the cluster's size.
    clients = int(stats.client.info("clients")["connected_clients"]) - 1
    got["connections_per_worker"] = round(clients / workers, 1)
    got["calls_per_s_per_worker"] = round(got["calls"] / got["elapsed_s"] / workers, 2)
    got["by_command_per_s_per_worker"] = per(got, got["elapsed_s"] * workers)
    got["redis_cpu_ms_per_s_per_worker"] = round(
        1e3 * got["redis_cpu_s"] / got["elapsed_s"] / workers, 4
    )
    return got


def per_request(stats: Stats, send: Any, count: int, idle: dict[str, Any]) -> dict[str, Any]:
    for _ in range(10):  # warm-up: connections, result subscriptions
        send().get(timeout=60)
    stats.reset()
    for _ in range(count):
        send().get(timeout=60)
    got = stats.read()
    elapsed = got["elapsed_s"]
    # The workers' idle traffic over the same time, from phase A's rates.
    idle_rate = {c: r["calls"] / idle["elapsed_s"] for c, r in idle["commands"].items()}
    net = {
        c: max(r["calls"] - idle_rate.get(c, 0.0) * elapsed, 0.0)
        for c, r in got["commands"].items()
    }
    idle_cpu = idle["redis_cpu_s"] / idle["elapsed_s"] * elapsed
    got.update(
        requests=count,
        calls_per_request_raw=round(got["calls"] / count, 2),
        calls_per_request_net=round(sum(net.values()) / count, 2),
        by_command_per_request_net={
            c: round(n / count, 2)
            for c, n in sorted(net.items(), key=lambda kv: -kv[1])[:15]
            if n / count >= 0.01
        },
        redis_cpu_ms_per_request_net=round(1e3 * max(got["redis_cpu_s"] - idle_cpu, 0) / count, 4),
        redis_usec_per_request_commands=round(
            sum(r["usec"] for r in got["commands"].values()) / count, 1
        ),
        requests_per_s_sequential=round(count / elapsed, 1),
    )
    return got


def stop_all(procs: list[Any]) -> None:
    for p in procs:
        if hasattr(p, "hostname"):
            p.stop(60)
        else:
            stop(p)


# -- phase C ------------------------------------------------------------------------
def queued_depth(stats: Stats, depth: int) -> dict[str, Any]:
    import omni_tasks
    from omni_tasks.config import get_config
    from omni_tasks.coordination.client import get_redis
    from omni_tasks.scheduling.omni_scheduler import OmniScheduler
    from workers.lifecycle.reaper import Reaper

    client = get_redis()
    clean()
    if depth:
        # `depth` distinct requests (ledger entries aged past ledger_grace_s), no AR worker.
        distinct_backlog(depth, get_config().ledger_grace_s + 60)
    reaper = Reaper(omni_tasks.app)
    scheduler = OmniScheduler()
    out: dict[str, Any] = {"depth": depth}
    for name, run, cache_key in (
        ("reaper_pass", reaper.run_once, omni_tasks.app.omni.keys.reaper_lock()),
        ("health_check", scheduler.get_health_status, omni_tasks.app.omni.keys.stranded()),
    ):
        client.delete(cache_key)
        run()  # warm-up: connections, scripts
        client.delete(cache_key)
        result, figures = timed_pass(stats, run)
        calls = figures["by_command"]
        out[name] = {
            **figures,
            # LRANGE replies carry nearly all the bytes at depth: their average size.
            "bytes_per_lrange_reply": figures["net_output_bytes"] // calls["lrange"]
            if "lrange" in calls
            else None,
            "result": result if name == "reaper_pass" else {"healthy": result["healthy"]},
        }
    reaper._close()
    out["largest_reply_bytes"] = largest_reply(client)
    return out


def largest_reply(client: Any) -> int:
    """The largest reply a pass can get at this depth: one LRANGE chunk of the queue
    walk's (`queue_walk.CHUNK` messages) or the whole unacked hash (HVALS), measured."""
    from omni_tasks.config import get_config
    from omni_tasks.coordination import keys
    from omni_tasks.coordination.queue_walk import CHUNK

    chunks = [
        sum(len(m) for m in client.lrange(k, -CHUNK, -1))
        for k in keys.queue_keys(get_config().ar.queue)
    ]
    unacked = sum(len(v) for v in client.hvals("unacked"))
    return max([*chunks, unacked])


def scaling_commands(depths: list[dict[str, Any]], name: str) -> dict[str, list[int]]:
    """Commands whose calls grow with the depth (calls at each depth)."""
    cmds = {c for d in depths for c in d[name]["by_command"]}
    grow = {}
    for c in sorted(cmds):
        calls = [d[name]["by_command"].get(c, 0) for d in depths]
        if calls[-1] > calls[0] + 1 and calls[-1] > 1:
            grow[c] = calls
    return grow


# -- main ---------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="what `make bench` runs")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--window", type=float, default=None)
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--no-dit", action="store_true", help="skip the tiny-flux worker")
    args = parser.parse_args()
    quick = args.quick
    n_workers = args.workers or (2 if quick else 4)
    window = args.window or (25.0 if quick else 60.0)
    n_requests = args.requests or (500 if quick else 2000)
    depths = [0, 1, 10_000] if quick else [0, 1, 10_000, 100_000]
    sims = [10, 100, 1000]
    sim_window = 12.0 if quick else 30.0
    started = time.monotonic()

    from omni_tasks.dev.redis_server import start_private_redis

    server = start_private_redis()
    os.environ["OMNI_REDIS_URL"] = server.url
    os.environ.setdefault("OMNI_MODELS_DIR", str(ROOT / "tests" / ".models"))
    os.environ.setdefault("OMNI_OUTPUT_DIR", str(RESULTS / "outputs"))
    os.environ["OMNI_SCHEDULER__MAX_QUEUE_SIZE"] = str(10 * max(depths) + 10 * n_requests)
    import bare_app

    import omni_tasks
    from omni_tasks.coordination.client import get_redis
    from omni_tasks.dev.launcher import start_worker

    client = get_redis()
    client.config_set("slowlog-log-slower-than", 0)
    client.config_set("slowlog-max-len", 100_000)
    stats = Stats(client)
    result: dict[str, Any] = {
        "redis": f"private redis-server {client.info('server')['redis_version']}"
    }
    procs: list[Any] = []
    try:
        # The server's own CPU with no client (its cron), subtracted from idle windows.
        stats.reset()
        time.sleep(window / 2)
        empty = stats.read()
        empty_cpu_rate = empty["redis_cpu_s"] / empty["elapsed_s"]
        result["empty_server"] = {
            "elapsed_s": empty["elapsed_s"],
            "redis_cpu_ms_per_s": round(1e3 * empty_cpu_rate, 4),
            "calls": empty["calls"],
        }
        # A + B, bare Celery.
        procs = [start_bare(i) for i in range(n_workers)]
        wait_ping(bare_app.app, n_workers, 180)
        bare_idle = idle_window(stats, n_workers, window)
        bare_req = per_request(
            stats,
            lambda: bare_app.noop.apply_async(kwargs={"prompt": "x"}, queue="bare"),
            n_requests,
            bare_idle,
        )
        stop_all(procs)
        procs = []
        print("bare done", round(time.monotonic() - started), "s", flush=True)
        # A + B, omni-tasks probe workers.
        clean()
        procs = [
            start_worker("probe", LOGS, extra_args=POOL_WORKER_ARGS, name=f"scale-probe{i}")
            for i in range(n_workers)
        ]
        for w in procs:
            w.wait_ready(180)
        omni_idle = idle_window(stats, n_workers, window)
        omni_req = per_request(
            stats,
            lambda: omni_tasks.tasks.probe.apply_async(kwargs={"prompt": "x"}, queue="probe"),
            n_requests,
            omni_idle,
        )
        stop_all(procs)
        procs = []
        print("omni done", round(time.monotonic() - started), "s", flush=True)
        # A, one idle diffusion worker (tiny-flux).
        dit_idle: dict[str, Any] | None = None
        if not args.no_dit:
            clean()
            worker = start_worker("diffusion", LOGS, name="scale-dit")
            procs = [worker]
            try:
                load = time.monotonic()
                worker.wait_ready(240)
                dit_idle = idle_window(stats, 1, window)
                dit_idle["load_s"] = round(time.monotonic() - load, 1)
            except (TimeoutError, RuntimeError) as exc:
                dit_idle = {"error": str(exc)[:500]}
            stop_all(procs)
            procs = []
            print("dit done", round(time.monotonic() - started), "s", flush=True)
        # C, queued depth; D, identities.
        depth_runs = [queued_depth(stats, d) for d in depths]
        sim_runs = []
        for n in sims:
            clean()
            sim_runs.append(simulated_workers(stats, n, sim_window))
        busy: dict[str, Any] | None = None
        if not args.no_dit:
            clean()
            busy = busy_diffusion(stats, LOGS, steps=100)
        clean()
    finally:
        stop_all(procs)
        server.stop()

    for idle in (omni_idle, bare_idle, dit_idle):
        if idle and "redis_cpu_s" in idle:
            idle["redis_cpu_ms_per_s_per_worker_less_empty_server"] = round(
                1e3 * (idle["redis_cpu_s"] / idle["elapsed_s"] - empty_cpu_rate) / idle["workers"],
                4,
            )
    result.update(
        quick=quick,
        worker_settings=" ".join(POOL_WORKER_ARGS),
        phase_a_idle={
            "omni_probe_workers": omni_idle,
            "bare_celery_workers": bare_idle,
            "omni_diffusion_worker_tiny_flux": dit_idle,
            "note": "probe workers load no engine; omni-tasks' idle traffic is the same "
            "for an AR worker (heartbeat every 5 s, reaper every 10 s, metrics)",
        },
        phase_b_per_request={"omni_probe": omni_req, "bare_noop": bare_req},
        phase_c_queued_depth={
            "runs": depth_runs,
            "reaper_commands_growing_with_depth": scaling_commands(depth_runs, "reaper_pass"),
            "health_commands_growing_with_depth": scaling_commands(depth_runs, "health_check"),
            "note": "depth d: d distinct requests in the AR queue (no AR worker), their "
            "ledger entries aged past ledger_grace_s; each pass run once untimed, then "
            "timed; the health check's stranded scan runs uncached",
        },
        phase_d_simulated_workers={
            "runs": sim_runs,
            "note": "real Heartbeat objects (one thread per worker identity, one in "
            f"{scale_sim.DIT_SHARE} a diffusion worker that also sweeps dead ones) for a "
            "window, then one real reaper pass and one health check over them; they "
            "run no Celery consumer, so their commands are omni-tasks' own on top of "
            "Celery's",
        },
        phase_e_busy_diffusion_worker=busy,
        targets=targets(omni_idle, bare_idle, omni_req, bare_req, depth_runs, sim_runs, busy),
        capacity_model=capacity(omni_req, sim_runs, empty_cpu_rate),
        run_s=round(time.monotonic() - started, 1),
    )
    write_result("scale", result)
    summary(result)


def targets(
    omni_idle: dict[str, Any],
    bare_idle: dict[str, Any],
    omni_req: dict[str, Any],
    bare_req: dict[str, Any],
    depth_runs: list[dict[str, Any]],
    sim_runs: list[dict[str, Any]],
    busy: dict[str, Any] | None,
) -> dict[str, Any]:
    """The command budgets against bare Celery measured in the same run."""
    bare = bare_idle["calls_per_s_per_worker"]
    deepest = depth_runs[-1]
    out: dict[str, Any] = {
        "idle_worker_cmd_per_s": {
            "omni": omni_idle["calls_per_s_per_worker"],
            "bare": bare,
            "budget": round(bare + 1, 2),
            "simulated_extra_at_1000": sim_runs[-1]["calls_per_s_per_identity"],
        },
        "request_cmds": {
            "omni": omni_req["calls_per_request_net"],
            "bare": bare_req["calls_per_request_net"],
            "budget": round(bare_req["calls_per_request_net"] + 8, 2),
        },
        "reaper_pass_s_at_deepest": {
            "depth": deepest["depth"],
            "seconds": deepest["reaper_pass"]["seconds"],
            "budget": 0.1,
        },
    }
    if busy:
        run = busy["one_image_alone"]
        background = (run["calls"] - omni_req["calls_per_request_net"]) / run["elapsed_s"]
        out["busy_diffusion_cmd_per_s"] = {
            "omni_less_its_request": round(background, 2),
            "steps_per_s": run["steps_per_s"],
            "budget": round(bare + run["steps_per_s"] + 2, 2),
        }
    for row in out.values():
        measured = row.get("omni", row.get("omni_less_its_request", row.get("seconds")))
        row["met"] = measured <= row["budget"]
    return out


def capacity(
    omni_req: dict[str, Any], sim_runs: list[dict[str, Any]], empty_cpu_rate: float
) -> dict[str, Any]:
    """What one Redis at 50% of a core carries: Redis CPU per idle worker-second (the
    largest simulation, less the server's own cron) and per request (phase B)."""
    largest = sim_runs[-1]
    idle_cpu = max(largest["redis_cpu_ms_per_s"] / 1e3 - empty_cpu_rate, 0.0)
    per_worker = idle_cpu / largest["identities"]
    per_request = omni_req["redis_cpu_ms_per_request_net"] / 1e3
    carried = {
        f"requests_per_s_with_{n}_workers": round((0.5 - n * per_worker) / per_request)
        for n in (100, 1000)
        if n * per_worker < 0.5
    }
    return {
        "redis_cpu_ms_per_worker_s": round(1e3 * per_worker, 5),
        "redis_cpu_ms_per_request": round(1e3 * per_request, 4),
        "redis_cpu_s_per_1000_requests": round(1e3 * per_request, 3),
        "workers_at_50pct_cpu": int(0.5 / per_worker) if per_worker else None,
        "requests_per_s_at_50pct_cpu": round(0.5 / per_request),
        **carried,
        "note": "linear extrapolation on this machine (2 shared cores, loopback, one "
        "sequential producer): a worker's share from the simulated workers' window, a "
        "request's from phase B, net of idle traffic",
    }


def summary(r: dict[str, Any]) -> None:
    a, b = r["phase_a_idle"], r["phase_b_per_request"]
    print("\n== scale summary")
    for side, key in (("omni", "omni_probe_workers"), ("bare", "bare_celery_workers")):
        x = a[key]
        print(
            f"idle {side}: {x['calls_per_s_per_worker']} cmd/s/worker "
            f"{x['by_command_per_s_per_worker']}"
        )
    dit = a["omni_diffusion_worker_tiny_flux"]
    if dit and "calls_per_s_per_worker" in dit:
        print(
            f"idle dit: {dit['calls_per_s_per_worker']} cmd/s {dit['by_command_per_s_per_worker']}"
        )
    for side, key in (("omni", "omni_probe"), ("bare", "bare_noop")):
        x = b[key]
        print(
            f"per request {side}: {x['calls_per_request_net']} cmd (raw "
            f"{x['calls_per_request_raw']}) {x['by_command_per_request_net']}"
        )
    for run in r["phase_c_queued_depth"]["runs"]:
        print(
            f"depth {run['depth']}: reaper {run['reaper_pass']['seconds']}s "
            f"{run['reaper_pass']['calls']} cmd, health {run['health_check']['seconds']}s "
            f"{run['health_check']['calls']} cmd, largest reply {run['largest_reply_bytes']} B"
        )
    print("reaper grows:", r["phase_c_queued_depth"]["reaper_commands_growing_with_depth"])
    print("health grows:", r["phase_c_queued_depth"]["health_commands_growing_with_depth"])
    for s in r["phase_d_simulated_workers"]["runs"]:
        print(
            f"simulated {s['identities']}: {s['calls_per_s_per_identity']} cmd/s each, "
            f"reaper {s['reaper_pass']['seconds']}s {s['reaper_pass']['calls']} cmd, "
            f"health {s['health_check']['seconds']}s"
        )
    busy = r["phase_e_busy_diffusion_worker"]
    if busy:
        for name, run in busy.items():
            print(f"busy {name}: {run['calls_per_s']} cmd/s at {run['steps_per_s']} steps/s")
    for name, row in r["targets"].items():
        print("target", name, row)
    print("capacity:", r["capacity_model"])
    print("run", r["run_s"], "s")


if __name__ == "__main__":
    main()
