"""How the diffusion pool serves one request with reuse.

1. an exact repeat: the final latents and the encoded files (an image's PNG; a video's
   MP4, thumbnail and spritesheet; a sound's file in its format) are in this worker's DiT
   cache, stored together; the files are returned as they are (no denoising, no decode,
   no encode);
2. otherwise join the request's single flight: if an identical request is being
   computed on any worker, wait for it and reuse its image;
3. otherwise compute, reusing cached prompt embeddings when the prompt is known
   (a new seed of a known prompt skips the text encoders), then cache embeddings
   (compressed when `cache.enable_compression` is on: a small, documented error) and
   the final latents with the decoded image (always lossless, so an exact repeat
   returns the identical image) and publish the outcome to the waiters.
Every lookup is counted per pool and per worker in Redis; the directory of cached keys
is kept exact by the cache's listener.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from PIL import Image

from omni_tasks.coordination import cache_directory, single_flight
from omni_tasks.coordination.cache_directory import DiTKeys, dit_keys
from omni_tasks.coordination.outage import Outage
from omni_tasks.requests import OmniRequest
from workers.audio import encode_audio
from workers.engines.base import ImageOutput, ImageParams
from workers.images import encode_png
from workers.lora.cache import AdapterUse
from workers.lora.directory import count_uses
from workers.runtime import runtime
from workers.stepping.request import StepTicket
from workers.videos import video_files

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
#: Lookup counts and hits are advisory: while Redis is away they are dropped, one line
#: per backoff step.
_outage = Outage("DiT cache counts", log)


@dataclass
class Rendered:
    image: Image.Image | None  # None for a sound
    steps_run: int
    timings: dict[str, float]
    cache: dict[str, str] = field(default_factory=dict)
    denoise_steps: int = 0
    preemptions: int = 0
    max_batch: int = 0
    lora: list[dict[str, Any]] = field(default_factory=list)
    #: The encoded files by suffix: "png" (the image, or a video's first frame), and a
    #: video's "mp4" and "jpg" (spritesheet); a sound's one file, its format the suffix.
    files: dict[str, bytes] = field(default_factory=dict)
    #: A sound's (model's sample rate, channels), as the model made it.
    audio: tuple[int, int] | None = None

    @property
    def png(self) -> bytes | None:
        return self.files.get("png")


def _count(kind: str, hit: bool) -> None:
    queue = runtime.config.diffusion.queue
    _outage.run(cache_directory.count_lookup, runtime.redis, queue, runtime.hostname, kind, hit)


def _record_hit(key: str) -> None:
    _outage.run(cache_directory.record_hit, runtime.redis, runtime.hostname, key)


def render(
    request: OmniRequest,
    prompt: str,
    params: ImageParams,
    timeout_s: float,
    init_image: Image.Image | None = None,
    ticket: StepTicket | None = None,
) -> Rendered:
    engine = runtime.diffusion_engine()
    cache = runtime.dit_cache()
    keys: DiTKeys = dit_keys(request, runtime.config, prompt)
    started = time.perf_counter()
    final = cache.get(keys.latents)
    _count("latents", final is not None)
    if final is not None:
        _record_hit(keys.latents)
        return _unrun_adapters(_from_final(final, started), params)

    deadline = time.monotonic() + timeout_s
    # Named by this worker: if it dies, the redelivery and the waiters take over at once.
    flight, shared = single_flight.join(
        runtime.redis, keys.latents, deadline, holder=runtime.hostname
    )
    if shared is not None:
        return _unrun_adapters(_from_outcome(shared), params)
    assert flight is not None
    try:
        embeds = cache.get(keys.embeddings)
        _count("embeddings", embeds is not None)
        if embeds is not None:
            _record_hit(keys.embeddings)
        remaining = max(deadline - time.monotonic(), 0.001)
        out: ImageOutput = engine.generate(
            request.request_id, prompt, params, remaining, init_image, embeds=embeds, ticket=ticket
        )
        if embeds is None and out.embeds is not None:
            cache.put(keys.embeddings, out.embeds)
        files = encoded_files(out, request)
        if out.latents is not None:  # lossless: an exact repeat gives the identical files
            cache.put(keys.latents, _final(out, files), lossless=True)
        info = {"latents": "miss", "embeddings": "hit" if embeds is not None else "miss"}
        count_uses(runtime.redis, runtime.config.diffusion.queue, out.lora)
        flight.publish(_outcome(out, info, files))
    except BaseException:
        flight.release()
        raise
    return Rendered(
        out.image,
        out.steps_run,
        out.timings,
        info,
        denoise_steps=out.denoise_steps,
        preemptions=out.preemptions,
        max_batch=out.max_batch,
        lora=out.lora,
        files=files,
        audio=_audio_facts(out),
    )


def encoded_files(out: ImageOutput, request: OmniRequest) -> dict[str, bytes]:
    """The files of a computed output: a PNG, a video's (`workers.videos`), or a sound
    in the request's format and rate (`workers.audio`)."""
    if out.audio is not None:
        assert out.sample_rate is not None
        fmt = request.response_format
        return {fmt: encode_audio(out.audio, out.sample_rate, fmt, request.sample_rate)}
    if out.frames is not None:
        return video_files(out.frames, request.fps)
    assert out.image is not None
    return {"png": encode_png(out.image)}


def _audio_facts(out: ImageOutput) -> tuple[int, int] | None:
    if out.audio is None or out.sample_rate is None:
        return None
    return (int(out.sample_rate), int(out.audio.shape[0]))


def _unrun_adapters(rendered: Rendered, params: ImageParams) -> Rendered:
    """A reused image ran no adapter: its `lora` entries say so (`hit` null)."""
    rendered.lora = [AdapterUse(name, scale, None).to_json() for name, scale in params.lora]
    return rendered


_FILE = "file:"
_AUDIO = "audio"  # a sound's (sample rate, channels)


def _final(out: ImageOutput, files: dict[str, bytes]) -> dict[str, torch.Tensor]:
    """What an exact repeat reuses: the final latents, and the encoded files beside
    them (bytes as uint8), so the repeat skips the VAE decode and the encode."""
    import torch

    assert out.latents is not None
    found = {"latents": out.latents}
    for suffix, data in files.items():
        found[_FILE + suffix] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    facts = _audio_facts(out)
    if facts is not None:
        found[_AUDIO] = torch.tensor(facts, dtype=torch.int64)
    return found


def _from_final(final: dict[str, torch.Tensor], started: float) -> Rendered:
    files = {
        key[len(_FILE) :]: value.cpu().numpy().tobytes()
        for key, value in final.items()
        if key.startswith(_FILE)
    }
    total = round(time.perf_counter() - started, 6)
    timings = {"total_s": total, "encode_s": 0.0, "denoise_s": 0.0, "decode_s": 0.0}
    info = {"latents": "hit", "embeddings": "skipped", "image": "hit"}
    facts = final.get(_AUDIO)
    audio = (int(facts[0]), int(facts[1])) if facts is not None else None
    return Rendered(_png_image(files), 0, timings, info, files=files, audio=audio)


def _png_image(files: dict[str, bytes]) -> Image.Image | None:
    """The image of the files' PNG (none for a sound), opened lazily: its size is read,
    its pixels only if used."""
    png = files.get("png")
    return Image.open(io.BytesIO(png)) if png is not None else None


def _outcome(out: ImageOutput, info: dict[str, str], files: dict[str, bytes]) -> str:
    return json.dumps(
        {
            "files": {k: base64.b64encode(v).decode("ascii") for k, v in files.items()},
            "steps_run": out.steps_run,
            "timings": out.timings,
            "cache": info,
            "audio": _audio_facts(out),
        }
    )


def _from_outcome(raw: str) -> Rendered:
    data: dict[str, Any] = json.loads(raw)
    files = {k: base64.b64decode(v) for k, v in data["files"].items()}
    audio = data.get("audio")
    return Rendered(
        _png_image(files),
        0,
        {},
        {"latents": "shared", "embeddings": "skipped", "shared_steps_run": str(data["steps_run"])},
        files=files,
        audio=(int(audio[0]), int(audio[1])) if audio else None,
    )
