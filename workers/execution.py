"""Running one validated request on this worker's engines; each stage returns its typed
result (`omni_tasks.results`)."""

from __future__ import annotations

import time
from typing import Any

from omni_tasks.coordination.cache_directory import step_cache_of
from omni_tasks.errors import ProcessingError
from omni_tasks.requests import COMPLETION_TYPES, OmniRequest, RequestType
from omni_tasks.results import (
    AudioResult,
    ImageResult,
    MultimodalResult,
    PromptResult,
    TextResult,
    Usage,
    VideoResult,
)
from omni_tasks.scheduling.policies import create_policy
from omni_tasks.tasks.sending import request_deadline
from workers import previews, progress, task_context
from workers.audio import encoded_rate
from workers.dit_service import Rendered, render
from workers.engines.base import ImageParams, StepCacheSettings, TextParams, TextPrompt
from workers.images import decode_image, save_output, save_png
from workers.runtime import runtime
from workers.stepping.request import StepTicket
from workers.text_stream import streaming
from workers.videos import SPRITESHEET, THUMBNAIL, VIDEO

IMAGE_PROMPT_TEMPLATE = "Write a short, vivid prompt for an image of: {prompt}\nImage prompt:"


def timeout_for(request: OmniRequest) -> float:
    """The engine-side limit: what is left until the request's deadline (its creation
    plus `timeout_s`), or the config's cap for a request without a timeout."""
    deadline = request_deadline(request, runtime.config.request_time_cap_s)
    if deadline is None:
        return float(runtime.config.request_time_cap_s)
    return max(deadline - time.time(), 0.0)


def _text_params(request: OmniRequest) -> TextParams:
    return TextParams(
        max_tokens=request.max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        seed=request.seed,
        stop=tuple(request.stop),
        rank=runtime.config.scheduler.class_rank(request.priority),
        # A MULTIMODAL request's adapters style its image: the DiT stage runs them.
        lora=request.adapters if request.request_type in COMPLETION_TYPES else (),
        n=request.n,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        logprobs=request.top_logprobs if request.logprobs else None,
    )


def _generate_text(request: OmniRequest, prompt: TextPrompt) -> tuple[Any, str, float]:
    engine = runtime.text_engine()
    start = time.perf_counter()
    with streaming(request, runtime.deltas, runtime.keys) as on_delta:
        out = engine.generate(
            request.request_id,
            prompt,
            _text_params(request),
            timeout_for(request),
            on_progress=progress.callback(),
            on_delta=on_delta,
        )
    return out, engine.name, time.perf_counter() - start


def _text_input(request: OmniRequest) -> TextPrompt:
    """A chat request's messages ({role, content}, with `name` when given), else its
    prompt."""
    if request.messages is None:
        return str(request.prompt)
    return [m.model_dump(exclude_none=True) for m in request.messages]


def run_text(request: OmniRequest) -> TextResult:
    """A TEXT or CHAT request."""
    out, engine, gen_s = _generate_text(request, _text_input(request))
    return TextResult(
        request_id=request.request_id,
        request_type=request.request_type.value,
        text=out.text,
        usage=_usage(out),
        finish_reason=out.finish_reason,
        engine=engine,
        model=runtime.config.ar.model,
        timings={"generate_s": round(gen_s, 6)},
        lora=out.lora,
        choices=[vars(c) for c in out.choices],
    )


def _render(
    request: OmniRequest, prompt: str | None = None
) -> tuple[Rendered, ImageParams, str, dict[str, float]]:
    """Run a DiT request (image, video or sound) through the DiT service: what it
    rendered, its settings, its step-cache mode and its timings."""
    # Only the types that take one have an image (`INPUT_IMAGE_TYPES`, validated).
    init_image = decode_image(request.image) if request.image else None
    config = runtime.config
    mode, mode_params = step_cache_of(request, config)
    if request.step_cache is None and not runtime.diffusion_engine().runs_step_cache(mode):
        # The pool's default where this worker's family runs it (a video worker beside
        # image workers with `taylorseer`); a mode the request names is checked as asked.
        # Its DiT cache keys then say what ran: no step cache.
        request = request.model_copy(update={"step_cache": "none", "step_cache_params": None})
        mode, mode_params = "none", {}
    video = request.request_type is RequestType.VIDEO
    audio = request.request_type is RequestType.AUDIO
    params = ImageParams(
        width=request.width,
        height=request.height,
        steps=request.steps,
        guidance=request.guidance,
        seed=int(request.seed or 0),
        negative_prompt=request.negative_prompt,
        true_cfg_scale=request.true_cfg_scale,
        strength=request.strength,
        step_cache=StepCacheSettings(mode=mode, params=mode_params),
        lora=request.adapters,
        num_frames=request.num_frames if video else None,
        audio_seconds=request.seconds if audio else None,
    )
    timeout_s = timeout_for(request)
    ticket = StepTicket(
        request.request_id,
        priority_class=request.priority,
        continuing=request.request_type is RequestType.MULTIMODAL,
        level=_delivered_level(request),
        cancelled=task_context.revoked_check(),
        on_progress=progress.callback(),
        preview=previews.previewer_for(request, runtime.redis),
    )
    start = time.perf_counter()
    out = render(request, prompt or request.prompt, params, timeout_s, init_image, ticket)
    timings = {k: round(v, 6) for k, v in out.timings.items()}
    timings["generate_s"] = round(time.perf_counter() - start, 6)
    return out, params, mode, timings


def run_image(request: OmniRequest, prompt: str | None = None) -> ImageResult:
    out, params, mode, timings = _render(request, prompt)
    config = runtime.config
    path = save_png(out.png or out.image, config.output_path(), request.request_id)
    return ImageResult(
        request_id=request.request_id,
        request_type=request.request_type.value,
        image_path=str(path),
        width=out.image.width,
        height=out.image.height,
        step_cache=mode,
        **_dit_fields(request, out, params, timings),
    )


def run_video(request: OmniRequest) -> VideoResult:
    """A VIDEO request: its MP4, thumbnail and spritesheet under `output_dir`."""
    out, params, _, timings = _render(request)
    config = runtime.config
    folder = config.output_path()
    paths = {
        suffix: str(save_output(data, folder, request.request_id, suffix))
        for suffix, data in out.files.items()
    }
    frames = int(request.num_frames or 1)
    return VideoResult(
        request_id=request.request_id,
        request_type=request.request_type.value,
        video_path=paths[VIDEO],
        thumbnail_path=paths[THUMBNAIL],
        spritesheet_path=paths[SPRITESHEET],
        num_frames=frames,
        fps=request.fps,
        duration_s=round(frames / request.fps, 6),
        width=out.image.width,
        height=out.image.height,
        **_dit_fields(request, out, params, timings),
    )


def run_audio(request: OmniRequest) -> AudioResult:
    """An AUDIO request: its sound in `response_format` under `output_dir`, at
    `sample_rate` (None: the model's own; mp3 and opus may take the next rate their
    codec has, `workers.audio.encoded_rate`)."""
    out, params, _, timings = _render(request)
    config = runtime.config
    fmt = request.response_format
    if out.audio is None or fmt not in out.files:
        raise ProcessingError(f"{request.request_id}: the model made no {fmt} sound")
    path = save_output(out.files[fmt], config.output_path(), request.request_id, fmt)
    rate, channels = out.audio
    samples = int(float(request.seconds or 0.0) * rate)  # the pipeline's cut
    return AudioResult(
        request_id=request.request_id,
        request_type=request.request_type.value,
        audio_path=str(path),
        format=fmt,
        sample_rate=encoded_rate(fmt, request.sample_rate or rate),
        duration_s=round(samples / rate, 6),
        channels=channels,
        **_dit_fields(request, out, params, timings),
    )


def _dit_fields(
    request: OmniRequest, out: Rendered, params: ImageParams, timings: dict[str, float]
) -> dict[str, Any]:
    """What every DiT result says of its run: seed and steps, what the DiT cache and the
    step loop did, the model (the one this worker serves) and the adapters."""
    return {
        "seed": params.seed,
        "steps": request.steps,
        "steps_run": out.steps_run,
        "cache": out.cache,
        "engine": runtime.diffusion_engine().name,
        "model": runtime.config.diffusion.model,
        "timings": timings,
        "denoise_steps": out.denoise_steps,
        "preemptions": out.preemptions,
        "max_batch": out.max_batch,
        "lora": out.lora,
    }


def _delivered_level(request: OmniRequest) -> int:
    """The level its message came at (0 highest), else what the policy gives it."""
    delivered = task_context.current_level()
    if delivered is not None:
        return int(delivered)
    return create_policy(runtime.config).level(request, "dit")


def run_multimodal_prompt(request: OmniRequest) -> PromptResult:
    """AR stage: the text model writes the prompt the DiT stage renders."""
    template = IMAGE_PROMPT_TEMPLATE.format(prompt=request.prompt)
    out, engine, gen_s = _generate_text(request, template)
    written = " ".join(out.text.split())
    return PromptResult(
        request_id=request.request_id,
        text=out.text,
        image_prompt=written or request.prompt,
        usage=_usage(out),
        finish_reason=out.finish_reason,
        engine=engine,
        timings={"generate_s": round(gen_s, 6)},
    )


def run_multimodal_render(
    request: OmniRequest, prompt_result: dict[str, Any] | None
) -> MultimodalResult:
    """DiT stage: render the written prompt; the result carries both stages' figures.

    The request started when its AR stage did: `timings.started_at` is that moment and
    `timings.queued_s` is `started_at - created_at`, as for every request; `run_s` sums
    the stages' runs, and the wait between them is `stages.dit.queued_s`."""
    started = time.time()
    if not prompt_result:
        raise ProcessingError(f"{request.request_id}: the DiT stage got no AR stage result")
    prompt = PromptResult.from_json(prompt_result)
    ar = prompt.timings
    ar_queued, ar_run = float(ar.get("queued_s", 0.0)), float(ar.get("run_s", 0.0))
    ar_started = float(ar.get("started_at", request.created_at + ar_queued))
    dit_queued = max(0.0, started - ar_started - ar_run)
    image = run_image(request, prompt=prompt.image_prompt or request.prompt)
    dit_run = time.time() - started
    result = MultimodalResult(
        **vars(image),
        text=prompt.text,
        image_prompt=prompt.image_prompt,
        usage=prompt.usage,
        finish_reason=prompt.finish_reason,
        stages={"ar": ar, "dit": {"queued_s": round(dit_queued, 6), "run_s": round(dit_run, 6)}},
    )
    result.timings.update(
        queued_s=round(max(0.0, ar_started - request.created_at), 6),
        run_s=round(ar_run + dit_run, 6),
        started_at=round(ar_started, 6),
    )
    return result


def _usage(out: Any) -> Usage:
    return Usage.of(out.prompt_tokens, out.completion_tokens)
