"""Running one validated request on this worker's engines; results are JSON dicts."""

from __future__ import annotations

import time
from typing import Any

from omni_tasks.config import get_config
from omni_tasks.dit_keys import step_cache_of
from omni_tasks.requests import OmniRequest, ProcessingStage, RequestType
from workers.dit_service import render
from workers.engines.base import ImageParams, StepCacheSettings, TextParams
from workers.images import decode_image, save_png
from workers.runtime import runtime

IMAGE_PROMPT_TEMPLATE = "Write a short, vivid prompt for an image of: {prompt}\nImage prompt:"


def timeout_for(request: OmniRequest) -> float:
    """The engine-side limit: the request's own timeout, capped by the config."""
    config = get_config()
    cap = float(min(config.scheduler.timeout_seconds, config.request_timeout))
    return min(request.timeout_s or cap, cap)


def _text_params(request: OmniRequest) -> TextParams:
    return TextParams(
        max_tokens=request.max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        seed=request.seed,
        stop=tuple(request.stop),
    )


def _generate_text(request: OmniRequest, prompt: str) -> tuple[Any, str, float]:
    engine = runtime.text_engine()
    start = time.perf_counter()
    out = engine.generate(request.request_id, prompt, _text_params(request), timeout_for(request))
    return out, engine.name, time.perf_counter() - start


def run_text(request: OmniRequest) -> dict[str, Any]:
    request.update_processing_stage(ProcessingStage.AR_GENERATION)
    out, engine, gen_s = _generate_text(request, request.prompt)
    request.update_processing_stage(ProcessingStage.COMPLETED)
    return {
        "request_id": request.request_id,
        "request_type": request.request_type.value,
        "text": out.text,
        "usage": _usage(out),
        "finish_reason": out.finish_reason,
        "engine": engine,
        "timings": {"generate_s": round(gen_s, 6)},
    }


def run_image(request: OmniRequest, prompt: str | None = None) -> dict[str, Any]:
    request.update_processing_stage(ProcessingStage.DIT_GENERATION)
    init_image = None
    if request.request_type is RequestType.IMAGE and request.image:
        init_image = decode_image(request.image)
    config = get_config()
    mode, mode_params = step_cache_of(request, config)
    params = ImageParams(
        width=request.width,
        height=request.height,
        steps=request.steps,
        guidance=request.guidance,
        seed=int(request.seed or 0),
        negative_prompt=request.negative_prompt,
        strength=request.strength,
        step_cache=StepCacheSettings(mode=mode, params=mode_params),
    )
    start = time.perf_counter()
    out = render(request, prompt or request.prompt, params, timeout_for(request), init_image)
    gen_s = time.perf_counter() - start
    request.update_processing_stage(ProcessingStage.POSTPROCESSING)
    path = save_png(out.image, config.output_path(), request.request_id)
    request.update_processing_stage(ProcessingStage.COMPLETED)
    timings = {k: round(v, 6) for k, v in out.timings.items()}
    timings["generate_s"] = round(gen_s, 6)
    return {
        "request_id": request.request_id,
        "request_type": request.request_type.value,
        "image_path": str(path),
        "width": out.image.width,
        "height": out.image.height,
        "seed": params.seed,
        "steps": request.steps,
        "steps_run": out.steps_run,
        "step_cache": mode,
        "cache": out.cache,
        "engine": runtime.diffusion_engine().name,
        "timings": timings,
    }


def run_multimodal_prompt(request: OmniRequest) -> dict[str, Any]:
    """AR stage: the text model writes the prompt the DiT stage renders."""
    request.update_processing_stage(ProcessingStage.AR_GENERATION)
    template = IMAGE_PROMPT_TEMPLATE.format(prompt=request.prompt)
    out, engine, gen_s = _generate_text(request, template)
    written = " ".join(out.text.split())
    return {
        "request_id": request.request_id,
        "text": out.text,
        "image_prompt": written or request.prompt,
        "usage": _usage(out),
        "finish_reason": out.finish_reason,
        "engine": engine,
        "timings": {"generate_s": round(gen_s, 6)},
    }


def run_multimodal_render(request: OmniRequest, prompt_result: dict[str, Any]) -> dict[str, Any]:
    """DiT stage: render the written prompt; the result carries both stages' figures."""
    started = time.time()
    ar = prompt_result.get("timings", {})
    ar_queued, ar_run = float(ar.get("queued_s", 0.0)), float(ar.get("run_s", 0.0))
    dit_queued = max(0.0, started - request.created_at - ar_queued - ar_run)
    result = run_image(request, prompt=str(prompt_result.get("image_prompt") or request.prompt))
    dit_run = time.time() - started
    result.update(
        text=prompt_result.get("text", ""),
        image_prompt=prompt_result.get("image_prompt"),
        usage=prompt_result.get("usage", {}),
        finish_reason=prompt_result.get("finish_reason"),
        stages={"ar": ar, "dit": {"queued_s": round(dit_queued, 6), "run_s": round(dit_run, 6)}},
    )
    result["timings"].update(
        queued_s=round(ar_queued + dit_queued, 6), run_s=round(ar_run + dit_run, 6)
    )
    return result


def _usage(out: Any) -> dict[str, int]:
    return {
        "prompt_tokens": out.prompt_tokens,
        "completion_tokens": out.completion_tokens,
        "total_tokens": out.prompt_tokens + out.completion_tokens,
    }
