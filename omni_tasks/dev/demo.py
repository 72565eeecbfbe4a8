"""`omni-tasks demo`: Redis, an AR pool, a diffusion pool (a worker for images, one
serving the video model and one the audio model) and a speech pool, a mixed workload
with priorities through `.delay()` (two LoRA image styles, a LoRA text adapter, a short
video, a spoken line and a short sound among it), progress, results, a status summary;
the HTTP API with its playground and operations page (`GET /`) while the pools run;
then it stops everything it started (`--open`: opens the page and keeps it all up until
Ctrl-C)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import webbrowser
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omni_tasks.dev.redis_server import PrivateRedis, start_private_redis

if TYPE_CHECKING:
    from omni_tasks.dev.launcher import ApiProcess, WorkerProcess

#: The demo's LoRA adapters: two image styles and a text adapter, tiny random adapters
#: that the workers build on first use (`workers.models.tiny_lora`).
DEMO_LORAS = {
    "watercolor": "tiny-flux-lora-watercolor",
    "ink": "tiny-flux-lora-ink",
    "pirate": "tiny-llama-lora-pirate",
}
#: The demo's video: short and tiny, so that it adds little to the demo's time.
DEMO_VIDEO = {
    "prompt": "a paper boat on a stream",
    "num_frames": 9,
    "width": 64,
    "height": 64,
    "steps": 4,
    "seed": 5,
    "priority": "normal",
}
#: The demo's spoken line and sound (text-to-audio on the diffusion pool).
DEMO_SPEECH = {
    "input": "Hello from omni-tasks. Every pool answers, and this is the speech pool.",
    "voice": "nova",
    "priority": "high",
}
#: Requests sent once the first picture exists (`_follow_ups`): counted from the start.
FOLLOW_UPS = 3
DEMO_SOUND = {"prompt": "rain on a tin roof", "seconds": 1.0, "steps": 4, "seed": 9}


def _line(text: str = "") -> None:
    print(text, flush=True)


def run_demo(
    out_dir: Path, timeout_s: float = 900.0, open_page: bool = False, port: int = 8000
) -> int:
    out_dir = out_dir.resolve()
    private: PrivateRedis | None = None
    if not os.environ.get("OMNI_REDIS_URL"):
        private = start_private_redis()
        os.environ["OMNI_REDIS_URL"] = private.url
        _line(f"started a private Redis ({private.kind}) at {private.url}")
    else:
        _line(f"using Redis at {os.environ['OMNI_REDIS_URL']}")
    os.environ["OMNI_OUTPUT_DIR"] = str(out_dir / "images")
    _register_demo_loras()
    workers: list[WorkerProcess] = []
    api: ApiProcess | None = None
    try:
        from omni_tasks.config import get_config
        from omni_tasks.dev.launcher import start_worker

        log_dir = out_dir / "logs"
        for queue in ("ar", "diffusion", "speech"):
            workers.append(start_worker(queue, log_dir))
            _line(f"started: celery -A omni_tasks worker -Q {queue}  (log: {log_dir})")
        dit = get_config().diffusion
        workers.append(_start_model_worker(log_dir, dit.video_model, "diffusion-video"))
        workers.append(_start_model_worker(log_dir, dit.audio_model, "diffusion-audio"))
        _line("loading models in the pools (tiny models are built on first start)...")
        start = time.monotonic()
        for worker in workers:
            worker.wait_ready(timeout_s)
        _line(f"pools ready in {time.monotonic() - start:.1f}s")
        api = _start_page(log_dir, port, open_page)
        results = _submit_and_follow(timeout_s)
        _summary(results, out_dir)
        if open_page:
            _stay_up(api.url)
        return 0 if all(r["state"] == "SUCCESS" for r in results) else 1
    finally:
        if api is not None:
            api.stop()
        _stop_workers(workers)
        if private is not None:
            private.stop()
            _line("stopped the private Redis")


def _start_page(log_dir: Path, port: int, open_page: bool) -> ApiProcess:
    """The HTTP API on loopback (no token: nothing but this machine reaches it), and the
    line that points to its page."""
    from omni_tasks.config import get_config
    from omni_tasks.dev.launcher import port_or_free, start_api

    api = start_api(log_dir, port_or_free(port), env={"OMNI_API_TOKEN": ""})
    api.wait_ready()
    token = "the config's api.token" if get_config().api.token else "none needed on loopback"
    _line(f"playground and operations page: {api.url}  (omni-tasks api; token: {token})")
    if open_page:
        webbrowser.open(api.url)
    return api


def _stay_up(url: str) -> None:
    """Keep the pools and the page up for the browser until Ctrl-C."""
    _line(f"the pools and {url} stay up: press Ctrl-C to stop them")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        _line("")


def _stop_workers(workers: list[WorkerProcess], timeout_s: float = 60.0) -> None:
    """Warm shutdown of all the workers at once (each takes a second or two), then each
    one's exit (`WorkerProcess.stop` kills one that does not exit in time)."""
    for worker in workers:
        if worker.proc.poll() is None:
            worker.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for worker in workers:
        try:
            worker.proc.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            pass
        code = worker.stop()
        _line(f"stopped {worker.hostname} (exit {code})")


def _start_model_worker(log_dir: Path, model: str, name: str) -> WorkerProcess:
    """A diffusion worker serving `model` (a diffusion worker serves one model)."""
    from omni_tasks.dev.launcher import start_worker

    worker = start_worker("diffusion", log_dir, env={"OMNI_DIFFUSION__MODEL": model}, name=name)
    _line(
        f"started: OMNI_DIFFUSION__MODEL={model} celery -A omni_tasks worker -Q diffusion"
        f"  (log: {log_dir})"
    )
    return worker


def _register_demo_loras() -> None:
    """The demo's adapters join the registry, of this process and of the pools it starts."""
    from dataclasses import replace

    from omni_tasks.config import get_config, set_config

    config = get_config()
    loras = {**DEMO_LORAS, **config.loras}
    set_config(replace(config, loras=loras))
    os.environ["OMNI_LORAS"] = json.dumps(loras)


def _lora_jobs() -> list[tuple[str, Any, dict[str, Any]]]:
    """One picture without a style and in each of two styles (same prompt and seed), and
    a text with the text adapter."""
    from omni_tasks import generate_image, generate_text

    picture = {"prompt": "a harbour at dawn", "width": 64, "height": 64, "steps": 4, "seed": 21}
    jobs: list[tuple[str, Any, dict[str, Any]]] = [
        ("base image" if not style else "lora image", generate_image, {**picture, "lora": style})
        for style in ([], ["watercolor"], ["ink"])
    ]
    for _, _, kwargs in jobs:
        kwargs["priority"] = "normal"
    story = {"prompt": "Story 0: once upon a time", "max_tokens": 32, "seed": 0}
    jobs.append(("lora text", generate_text, {**story, "lora": ["pirate"], "priority": "normal"}))
    return jobs


def _workload() -> list[tuple[str, Any, dict[str, Any]]]:
    from omni_tasks import (
        generate_audio,
        generate_image,
        generate_multimodal,
        generate_speech,
        generate_text,
        generate_video,
    )
    from omni_tasks.config import get_config

    jobs: list[tuple[str, Any, dict[str, Any]]] = []
    for i, priority in enumerate(["low", "normal", "high", "low", "normal", "high"]):
        jobs.append(
            (
                "text",
                generate_text,
                {
                    "prompt": f"Story {i}: once upon a time",
                    "max_tokens": 32,
                    "priority": priority,
                    "seed": i,
                },
            )
        )
    for i, (priority, size) in enumerate([("low", 128), ("normal", 64), ("high", 64)]):
        jobs.append(
            (
                "image",
                generate_image,
                {
                    "prompt": f"a red fox, study {i}",
                    "width": size,
                    "height": size,
                    "steps": 4,
                    "seed": 7 + i,
                    "priority": priority,
                },
            )
        )
    jobs.append(
        (
            "multimodal",
            generate_multimodal,
            {
                "prompt": "a lighthouse at dusk",
                "max_tokens": 24,
                "width": 64,
                "height": 64,
                "steps": 4,
                "seed": 3,
                "priority": "normal",
            },
        )
    )
    jobs.append(("video", generate_video, dict(DEMO_VIDEO)))
    jobs.append(("speech", generate_speech, dict(DEMO_SPEECH)))
    jobs.append(("sound", generate_audio, {**DEMO_SOUND, "priority": "low"}))
    if all(name in get_config().loras for name in DEMO_LORAS):
        jobs += _lora_jobs()
    return jobs


def _submit_and_follow(timeout_s: float) -> list[dict[str, Any]]:

    jobs = _workload()
    pending: dict[str, dict[str, Any]] = {}
    for kind, task, kwargs in jobs:
        result = task.delay(**kwargs)
        pending[result.id] = {
            "kind": kind,
            "priority": kwargs["priority"],
            "result": result,
            "kwargs": kwargs,
        }
    _line(
        f"submitted {len(pending)} requests with .delay() (priorities high/normal/low); "
        f"{FOLLOW_UPS} more follow once the first picture exists"
    )
    done: list[dict[str, Any]] = []
    edit_sent = False
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        for task_id, job in list(pending.items()):
            result = job["result"]
            if not result.ready():
                continue
            pending.pop(task_id)
            job["state"] = result.state
            job["value"] = result.result if result.successful() else repr(result.result)
            done.append(job)
            expected = len(done) + len(pending) + (0 if edit_sent else FOLLOW_UPS)
            _progress(job, len(done), expected)
            if job["kind"] == "image" and result.successful() and not edit_sent:
                pending.update(_follow_ups(job["kwargs"], job["value"]["image_path"]))
                edit_sent = True
        time.sleep(0.1)
    for job in pending.values():
        job["state"], job["value"] = "TIMEOUT", None
        done.append(job)
    return done


def _follow_ups(kwargs: dict[str, Any], image_path: str) -> dict[str, dict[str, Any]]:
    """Once a picture exists: an edit of it (img2img), an exact repeat (its latents are
    in the DiT cache: decode only) and a new seed of its prompt (embeddings reused)."""
    from omni_tasks import encode_image_file, generate_image

    sent = {
        "image edit": generate_image.delay(
            prompt="the same fox, in winter",
            image=encode_image_file(image_path),  # the demo's workers share this disk
            strength=0.7,
            width=64,
            height=64,
            steps=4,
            seed=11,
            priority="high",
        ),
        "repeat": generate_image.delay(**kwargs),
        "new seed": generate_image.delay(**{**kwargs, "seed": kwargs["seed"] + 100}),
    }
    return {
        r.id: {
            "kind": kind,
            "priority": kwargs["priority"] if kind != "image edit" else "high",
            "result": r,
            "kwargs": kwargs,
        }
        for kind, r in sent.items()
    }


def _progress(job: dict[str, Any], n: int, total: int) -> None:
    value = job["value"]
    if job["state"] != "SUCCESS":
        _line(f"[{n}/{total}] {job['kind']:<10} {job['priority']:<6} {job['state']}: {value}")
        return
    t = value.get("timings", {})
    what = (
        _video_text(value)
        or _audio_text(value)
        or value.get("image_path")
        or repr(value.get("text", ""))[:60]
    )
    if value.get("cache"):
        what += "  cache " + ",".join(f"{k}={v}" for k, v in value["cache"].items())
    if job["kind"].startswith("lora"):
        what += "  lora " + (", ".join(_adapter_text(u) for u in value["lora"]) or "none")
    _line(
        f"[{n}/{total}] {job['kind']:<10} {job['priority']:<6} queued {t.get('queued_s', 0):6.2f}s"
        f" ran {t.get('run_s', 0):5.2f}s  {what}"
    )


def _video_text(value: dict[str, Any]) -> str | None:
    """A video result's MP4 path, frames, fps and duration (None for other results)."""
    if "video_path" not in value:
        return None
    return (
        f"{value['video_path']}  {value['num_frames']} frames at {value['fps']} fps,"
        f" {value['duration_s']:.2f}s"
    )


def _audio_text(value: dict[str, Any]) -> str | None:
    """A speech or audio result's file, length, format and rate (None for others)."""
    if "audio_path" not in value:
        return None
    return (
        f"{value['audio_path']}  {value['duration_s']:.2f}s {value['format']}"
        f" at {value['sample_rate']} Hz"
    )


def _adapter_text(use: dict[str, Any]) -> str:
    if use["hit"] is None:
        how = "the image came from the DiT cache"
    elif use["hit"]:
        how = "loaded already"
    else:
        how = f"loaded in {use['load_s']:.2f}s"
    return f"{use['name']} x{use['scale']:g} ({how})"


def _summary(results: list[dict[str, Any]], out_dir: Path) -> None:
    """The outcome, then the cluster as `omni-tasks status` shows it."""
    from omni_tasks.cli.status import show_status, status_report
    from omni_tasks.config import get_config
    from omni_tasks.coordination.cache_directory import adapter_stats
    from omni_tasks.coordination.client import get_redis

    ok = sum(r["state"] == "SUCCESS" for r in results)
    _line(f"\n{ok}/{len(results)} requests succeeded")
    time.sleep(1.0)  # workers flush their success counters every 0.25 s
    _line("\nthe cluster now (omni-tasks status):")
    show_status(status_report())
    lora = adapter_stats(get_redis(), get_config().diffusion.queue)
    _line(
        f"LoRA adapters: {lora['hits']} hits, {lora['misses']} loads"
        f" ({lora['load_s_sum']:.2f}s loading)"
    )
    report = out_dir / "results.json"
    serial = [{k: v for k, v in r.items() if k not in ("result", "kwargs")} for r in results]
    report.write_text(json.dumps(serial, indent=2, default=str))
    _line(f"images, videos and sounds in {out_dir / 'images'}; results in {report}")
