"""Speech on one real speech worker (`celery -A omni_tasks worker -Q speech`, the tiny
VITS) and one `omni-tasks api` process: `generate_speech.delay()` gives an audio file
soundfile decodes, streamed while it is spoken (`stream_audio`); a foreign Celery client
sends it by name; bad fields are refused by name before anything is enqueued, and a
speaker the model lacks by the worker; a high request sent behind 50 queued low ones is
served first; and `/v1/audio/speech` through the official `openai` client, unmodified:
every format decodes, the streamed answer's first bytes come before the audio is done,
Server-Sent Events, 422 for a bad voice or format, and the voices."""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import soundfile
from api_support import ApiServer, api_factory  # noqa: F401
from conftest import clean_redis, start_ready_workers
from helpers import KEYS, eventually, foreign

from omni_tasks import (
    RequestTimeoutError,
    RequestValidationError,
    app,
    cancel,
    generate_speech,
    get_config,
    stream_audio,
)
from omni_tasks.coordination.client import get_redis

pytestmark = pytest.mark.slow
TIMEOUT = 120
RATE = 16000  # the tiny VITS's
#: Many sentences: each is one piece, so the first is heard long before the last.
LONG_TEXT = " ".join(f"This is sentence number {i} of a long answer." for i in range(24))


@pytest.fixture(scope="module")
def speech_worker(tiny_models, run_dir: Path) -> Iterator[str]:
    clean_redis()
    [worker] = start_ready_workers(["speech"], run_dir / "logs-speech")
    yield worker.hostname
    worker.stop()
    clean_redis()


@pytest.fixture(scope="module")
def api(speech_worker: str, api_factory: Any) -> ApiServer:  # noqa: F811
    return api_factory()


def decode(data: bytes, fmt: str) -> tuple[np.ndarray, int]:
    """Mono samples and rate of an audio file of `fmt`, by a real decoder."""
    if fmt == "pcm":
        samples, rate = soundfile.read(
            io.BytesIO(data), format="RAW", subtype="PCM_16", samplerate=RATE, channels=1
        )
        return samples, rate
    if fmt in ("wav", "flac"):
        return soundfile.read(io.BytesIO(data))
    with av.open(io.BytesIO(data)) as container:
        frames = [f.to_ndarray() for f in container.decode(audio=0)]
        rate = container.streams.audio[0].rate
    return np.concatenate(frames, axis=1)[0], rate


def test_speech_through_the_queue(speech_worker: str) -> None:
    text = "Hello there. This is the speech pool. It speaks in pieces!"
    result = generate_speech.delay(input=text, voice="echo").get(timeout=TIMEOUT)
    samples, rate = soundfile.read(result["audio_path"])
    assert rate == result["sample_rate"] == RATE and result["format"] == "wav"
    assert result["duration_s"] == pytest.approx(len(samples) / RATE, abs=1e-3)
    assert result["duration_s"] > 0
    assert (result["voice"], result["speaker"], result["model"]) == ("echo", 1, "tiny-tts")
    assert result["chunks"] == 3 and result["input_chars"] == len(text)
    timings = result["timings"]
    assert 0 < timings["first_chunk_s"] <= timings["generate_s"] <= timings["run_s"]


def test_stream_audio_gives_the_first_bytes_while_the_rest_is_spoken(speech_worker: str) -> None:
    sent = generate_speech.delay(input=LONG_TEXT, voice="nova", response_format="pcm", stream=True)
    pieces, state_at_first = [], None
    for piece in stream_audio(sent, timeout_s=TIMEOUT):
        if not pieces:
            state_at_first = sent.state
        pieces.append(piece)
    assert state_at_first != "SUCCESS" and len(pieces) > 10
    result = sent.get(timeout=TIMEOUT)
    streamed, _ = decode(b"".join(pieces), "pcm")
    whole, _ = decode(Path(result["audio_path"]).read_bytes(), "pcm")
    assert np.array_equal(streamed, whole)  # the stream is the file
    assert get_redis().llen(KEYS.audio_chunks(sent.id)) == len(pieces)  # still readable


def test_a_foreign_client_sends_speech_by_name(speech_worker: str) -> None:
    spec = [
        {
            "task": "omni_tasks.generate_speech",
            "kwargs": {"input": "From afar.", "voice": "fable", "response_format": "flac"},
            "queue": "speech",
        },
        {"task": "omni_tasks.generate_speech", "kwargs": {"input": "x", "voice": "9"}},
    ]
    spec[1]["queue"] = "speech"
    good, bad = foreign("wait", json.dumps(foreign("send", json.dumps(spec))))
    assert good["result"]["format"] == "flac" and good["result"]["speaker"] == 2, good
    samples, rate = soundfile.read(good["result"]["audio_path"])
    assert rate == RATE and len(samples) > 0
    # Speaker 9 passes the producer's check (an id) and is refused by the worker.
    assert bad["error"] == "RequestValidationError" and "voice" in json.dumps(bad)


def test_bad_fields_are_refused_by_name_before_anything_is_sent(speech_worker: str) -> None:
    for fields, name in (
        ({"input": "x", "voice": "bob"}, "voice"),
        ({"input": "x", "response_format": "aac"}, "response_format"),
        ({"input": "x", "speed": 9.0}, "speed"),
        ({"input": "x" * 5000}, "input"),
        ({"input": "x", "model": "tts-1"}, "model"),
        ({"prompt": "x"}, "input"),
        ({"input": "x", "lora": ["ink"]}, "lora"),
    ):
        with pytest.raises(RequestValidationError) as caught:
            generate_speech.delay(**fields)
        assert caught.value.field.split(".")[0] == name, (fields, caught.value)


def test_a_high_request_behind_50_low_ones_is_served_first(speech_worker: str) -> None:
    app.control.cancel_consumer("speech", destination=[speech_worker], reply=True)
    try:
        lows = [generate_speech.delay(input=f"Low {i}.", priority="low") for i in range(50)]
        high = generate_speech.delay(input="High.", priority="high")
    finally:
        app.control.add_consumer("speech", destination=[speech_worker], reply=True)
    started = high.get(timeout=TIMEOUT)["timings"]["started_at"]
    low_starts = sorted(r.get(timeout=TIMEOUT)["timings"]["started_at"] for r in lows)
    # The worker takes a message per free thread, highest priority first: the high
    # request is in its first take, ahead of at least 42 of the 50 low ones.
    concurrency = get_config().speech.concurrency
    assert started <= low_starts[concurrency - 1], (started, low_starts[:concurrency])


def test_the_openai_client_gets_a_wav(api: ApiServer) -> None:
    client = api.openai()
    answer = client.audio.speech.create(
        model="tiny-tts", input="Hello from the API.", voice="alloy", response_format="wav"
    )
    samples, rate = soundfile.read(io.BytesIO(answer.content))
    assert rate == RATE and len(samples) / rate > 0


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3", "opus", "pcm"])
def test_every_response_format_decodes(api: ApiServer, fmt: str) -> None:
    answer = api.openai().audio.speech.create(
        model="tiny-tts", input="Every format.", voice={"id": "echo"}, response_format=fmt
    )
    samples, rate = decode(answer.content, fmt)
    expected = {"mp3": 16000, "opus": 16000}.get(fmt, RATE)
    assert rate in (expected, 48000) and len(samples) > 0  # Opus decoders give 48 kHz


def test_the_streamed_answer_starts_before_the_audio_is_done(api: ApiServer) -> None:
    client = api.openai()
    with client.audio.speech.with_streaming_response.create(
        model="tiny-tts", input=LONG_TEXT, voice="nova", response_format="pcm"
    ) as answer:
        request_id = answer.headers["x-request-id"]
        chunks = answer.iter_bytes()
        first = next(chunks)
        state_at_first = app.AsyncResult(request_id).state
        rest = b"".join(chunks)
    assert first and state_at_first != "SUCCESS"
    whole = Path(app.AsyncResult(request_id).get(timeout=TIMEOUT)["audio_path"]).read_bytes()
    assert first + rest == whole


def test_server_sent_events_end_with_done_and_usage(api: ApiServer) -> None:
    body = {"model": "tiny-tts", "input": "One. Two.", "voice": "alloy"}
    body |= {"stream_format": "sse", "response_format": "pcm"}
    with api.client() as http:
        answer = http.post("/v1/audio/speech", json=body)
    assert answer.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in answer.text.splitlines() if line[:6] == "data: "]
    deltas, done = events[:-1], events[-1]
    assert {e["type"] for e in deltas} == {"speech.audio.delta"} and len(deltas) >= 2
    samples, _ = decode(b"".join(base64.b64decode(e["audio"]) for e in deltas), "pcm")
    assert len(samples) > 0
    assert done["type"] == "speech.audio.done"
    assert done["usage"] == {"input_tokens": 9, "output_tokens": 2, "total_tokens": 11}


def test_bad_voice_format_or_model_answer_by_name(api: ApiServer) -> None:
    import openai

    client = api.openai()
    for bad, status, name in (
        ({"voice": "bob"}, 422, "voice"),
        ({"response_format": "aac"}, 422, "response_format"),
        ({"speed": 9.0}, 422, "speed"),
        ({"model": "tts-1"}, 404, "model"),
    ):
        fields: dict[str, Any] = {"model": "tiny-tts", "input": "x", "voice": "alloy", **bad}
        with pytest.raises(openai.APIStatusError) as caught:
            client.audio.speech.create(**fields)
        assert caught.value.status_code == status
        assert caught.value.body["param"] == name, caught.value.body


def test_the_voices_are_listed(api: ApiServer) -> None:
    with api.client() as http:
        listed = http.get("/v1/audio/voices").json()
    assert [(v["id"], v["speaker_id"]) for v in listed["data"]] == [
        ("alloy", 0),
        ("echo", 1),
        ("fable", 2),
        ("nova", 3),
    ]
    assert listed["default"] == "alloy" and listed["model"] == "tiny-tts"
    assert "tiny-tts" in {m.id for m in api.openai().models.list()}


def test_time_to_first_audio_is_reported(speech_worker: str) -> None:
    begun = time.time()
    result = generate_speech.delay(input=LONG_TEXT).get(timeout=TIMEOUT)
    assert result["timings"]["first_chunk_s"] < result["timings"]["generate_s"] / 5
    assert result["timings"]["started_at"] >= begun - 1


def test_a_speech_job_links_its_audio_file(api: ApiServer) -> None:
    with api.client() as http:
        job = http.post(
            "/v1/jobs",
            json={"type": "speech", "input": "A job.", "voice": "fable", "response_format": "mp3"},
            headers={"Prefer": "wait=60"},
        ).json()
        assert job["status"] == "succeeded", job
        assert job["result"]["format"] == "mp3" and "audio_path" not in job["result"]
        answer = http.get(job["audio_url"])
        assert answer.headers["content-type"] == "audio/mpeg"
        samples, _ = decode(answer.content, "mp3")
        assert len(samples) > 0
        refused = http.post("/v1/jobs", json={"type": "speech", "prompt": "x"})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "input"


def test_a_long_speech_is_cancelled_between_pieces_or_expires(speech_worker: str) -> None:
    running = generate_speech.delay(input=LONG_TEXT * 3, priority="high")
    assert eventually(lambda: running.state == "STARTED", 30, 0.005)
    cancel(running.id)
    assert eventually(lambda: running.state == "REVOKED", 30, 0.02)
    with pytest.raises(RequestTimeoutError):
        generate_speech.delay(input=LONG_TEXT * 3, timeout_s=0.5).get(TIMEOUT)


def test_prometheus_and_the_status_count_the_speech_pool(speech_worker: str) -> None:
    from prometheus_client import generate_latest

    from omni_tasks import OmniScheduler
    from omni_tasks.metrics import registry

    generate_speech.delay(input="Counted.").get(timeout=TIMEOUT)

    def processed() -> float:
        text = generate_latest(registry()).decode()
        line = 'omni_requests_total{outcome="processed",pool="speech"} '
        found = [row for row in text.splitlines() if row.startswith(line)]
        return float(found[0].split()[-1]) if found else 0.0

    assert eventually(lambda: processed() > 0, 10)
    status = OmniScheduler().get_status()
    assert status["pools"]["speech"]["processed"] > 0
    workers = status["resource_status"]["workers"]
    assert any(w["hostname"] == speech_worker for w in workers), workers
