"""Running a speech request on this worker's speech engine: its voice resolved to a
speaker, its audio encoded as it is made (and streamed, when asked), its file written.

The engine makes the audio in pieces (sentences) and hands each over as soon as it is
made; each is encoded at once (`workers.audio.StreamEncoder`) and, for a streamed
request, written to the request's Redis list (`AudioStream`), so a listener hears the
first sentence while the rest is spoken. The file under `output_dir` is the whole audio
encoded once more, with exact lengths in its header (a streamed WAV's header says its
length is unknown).
"""

from __future__ import annotations

import time
from typing import Any

from omni_tasks.config import CoreModuleConfig
from omni_tasks.config.schema import SpeechConfig
from omni_tasks.errors import RequestValidationError
from omni_tasks.requests import OmniRequest
from omni_tasks.results import SpeechResult
from workers import task_context
from workers.audio import StreamEncoder, encode_audio, encoded_rate
from workers.execution import timeout_for
from workers.images import save_output
from workers.runtime import runtime
from workers.text_stream import AudioStream


def resolve_voice(voice: str | None, speech: SpeechConfig, speakers: int) -> tuple[str, int]:
    """(voice name, speaker id) of a request's `voice`: a name of `speech.voices`, a
    speaker id ("2"), or None for the pool's default voice. `RequestValidationError`
    (field `voice`) for one the model does not have."""
    name = voice if voice is not None else speech.voice_name()
    if name.isdigit():
        speaker = int(name)
    elif name in speech.voices:
        speaker = speech.voices[name]
    else:
        raise RequestValidationError(
            "voice", f"unknown voice {name!r}; voices: {list(speech.voices)}"
        )
    if speaker >= max(speakers, 1):
        raise RequestValidationError(
            "voice", f"{name!r} is speaker {speaker}; the model has {speakers} speaker(s)"
        )
    return name, speaker


class _Chunks:
    """What the engine calls with each piece of audio: encode it and stream the bytes,
    noting when the first ones went out."""

    def __init__(self, encoder: StreamEncoder, stream: AudioStream | None, start: float) -> None:
        self._encoder, self._stream, self._start = encoder, stream, start
        self.first_chunk_s: float | None = None

    def __call__(self, samples: Any) -> None:
        data = self._encoder.feed(samples)
        if self._stream is not None:
            self._stream.write(data)
        if self.first_chunk_s is None:
            self.first_chunk_s = time.perf_counter() - self._start

    def close(self) -> None:
        tail = self._encoder.close()
        if self._stream is not None:
            self._stream.write(tail)


def run_speech(request: OmniRequest) -> SpeechResult:
    """A SPEECH request: its audio file under `output_dir`, streamed as it is made when
    the request asked (`stream`)."""
    config = runtime.config
    engine = runtime.speech_engine()
    voice, speaker = resolve_voice(request.voice, config.speech, engine.num_speakers)
    start = time.perf_counter()
    stream = (
        AudioStream(runtime.keys.audio_chunks(request.request_id), runtime.deltas)
        if request.stream
        else None
    )
    encoder = StreamEncoder(request.response_format, engine.sample_rate, request.sample_rate)
    chunks = _Chunks(encoder, stream, start)
    try:
        out = _synthesize(engine, request, speaker, chunks)
        chunks.close()
    finally:
        if stream is not None:  # its last bytes written before the result is stored
            stream.close()
    generate_s = time.perf_counter() - start
    return _result(request, config, out, voice, speaker, chunks, generate_s)


def _synthesize(engine: Any, request: OmniRequest, speaker: int, chunks: _Chunks) -> Any:
    """The engine's run; its ValueError about the input ("input: ...") names the field."""
    try:
        return engine.synthesize(
            request.request_id,
            str(request.input),
            speaker,
            request.speed,
            request.seed,
            chunks,
            timeout_for(request),
            cancelled=task_context.revoked_check(),
        )
    except ValueError as exc:
        field, sep, message = str(exc).partition(": ")
        if sep and field in ("input", "voice", "speed"):
            raise RequestValidationError(field, message) from None
        raise


def _result(
    request: OmniRequest,
    config: CoreModuleConfig,
    out: Any,
    voice: str,
    speaker: int,
    chunks: _Chunks,
    generate_s: float,
) -> SpeechResult:
    started = time.perf_counter()
    fmt = request.response_format
    data = encode_audio(out.samples, out.sample_rate, fmt, request.sample_rate)
    path = save_output(data, config.output_path(), request.request_id, fmt)
    timings = {k: round(float(v), 6) for k, v in out.timings.items() if k != "max_batch"}
    timings.update(
        first_chunk_s=round(chunks.first_chunk_s or generate_s, 6),
        generate_s=round(generate_s, 6),
        encode_s=round(time.perf_counter() - started, 6),
    )
    return SpeechResult(
        request_id=request.request_id,
        request_type=request.request_type.value,
        audio_path=str(path),
        format=fmt,
        sample_rate=encoded_rate(fmt, request.sample_rate or out.sample_rate),
        duration_s=round(len(out.samples) / out.sample_rate, 6),
        model=config.speech.model,
        voice=voice,
        speaker=speaker,
        engine=runtime.speech_engine().name,
        chunks=int(out.chunks),
        input_chars=len(request.input or ""),
        timings=timings,
        max_batch=int(out.timings.get("max_batch", 1)),
    )
