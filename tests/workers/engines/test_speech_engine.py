"""The speech engine (`workers.engines.speech_engine`) on the real tiny VITS
(`workers.models.tiny_tts`): streaming by sentence, batching across threads, seeds,
voices, timeouts, cancellation and shutdown."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from omni_tasks.errors import EngineStoppedError, RequestCancelledError, RequestTimeoutError
from workers.engines.speech_engine import MAX_PIECE_CHARS, SpeechEngine, split_text
from workers.models.tiny_tts import NUM_SPEAKERS, SAMPLING_RATE, build_tiny_tts

#: Samples a token lasts at speed 1 (the tiny model's fixed durations: 2 frames of 256).
TOKEN_SAMPLES = 2 * 256
LONG_TEXT = " ".join(f"Sentence number {n} is spoken on its own." for n in range(8))


@pytest.fixture(scope="module")
def tts_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_tts(tmp_path_factory.mktemp("models") / "tiny-tts")


@pytest.fixture(scope="module")
def engine(tts_path: Path) -> Iterator[SpeechEngine]:
    eng = SpeechEngine(str(tts_path), batch_wait_s=0.01)
    yield eng
    eng.shutdown()


class Chunks:
    """An `on_chunk` that keeps each piece and when it came."""

    def __init__(self) -> None:
        self.samples: list[np.ndarray] = []
        self.at: list[float] = []

    def __call__(self, samples: np.ndarray) -> None:
        self.samples.append(samples)
        self.at.append(time.monotonic())


def speak(engine: SpeechEngine, text: str, **kwargs: object) -> tuple:
    """(output, chunks) of one `synthesize` call; speaker 0, speed 1, no seed by default."""
    args = {"speaker_id": 0, "speed": 1.0, "seed": None, "timeout_s": 30.0, **kwargs}
    chunks = Chunks()
    out = engine.synthesize("req", text, on_chunk=chunks, **args)  # type: ignore[arg-type]
    return out, chunks


def test_the_built_checkpoint_loads_with_from_pretrained(tts_path: Path) -> None:
    from transformers import AutoTokenizer, VitsModel, VitsTokenizer

    model = VitsModel.from_pretrained(tts_path)
    assert model.config.num_speakers == NUM_SPEAKERS
    assert model.config.sampling_rate == SAMPLING_RATE
    tokenizer = VitsTokenizer.from_pretrained(tts_path)
    assert isinstance(AutoTokenizer.from_pretrained(tts_path), VitsTokenizer)
    ids = tokenizer("Hi!")["input_ids"]  # lowercased, a blank (0) around each character
    assert ids[0::2] == [0, 0, 0, 0] and len(ids) == 7
    assert build_tiny_tts(tts_path) == tts_path  # complete: not built again


def test_a_sentence_gives_float32_audio_at_the_models_rate(engine: SpeechEngine) -> None:
    assert (engine.name, engine.sample_rate) == ("transformers-vits", SAMPLING_RATE)
    assert engine.num_speakers == NUM_SPEAKERS and engine.voices() == [0, 1, 2, 3]
    out, chunks = speak(engine, "Hello there.")
    assert out.samples.dtype == np.float32 and out.samples.ndim == 1
    assert out.sample_rate == SAMPLING_RATE and out.chunks == 1 == len(chunks.samples)
    assert out.samples.size == (2 * len("hello there.") + 1) * TOKEN_SAMPLES
    assert np.abs(out.samples).max() > 0
    assert set(out.timings) >= {"first_chunk_s", "generate_s", "max_batch"}


def test_a_long_text_streams_in_pieces_the_first_before_the_end(engine: SpeechEngine) -> None:
    out, chunks = speak(engine, LONG_TEXT)
    assert out.chunks == len(chunks.samples) == 8
    assert np.array_equal(np.concatenate(chunks.samples), out.samples)
    assert chunks.at == sorted(chunks.at) and chunks.at[0] < chunks.at[-1]
    assert 0 < out.timings["first_chunk_s"] < out.timings["generate_s"]


def test_text_is_cut_at_sentences_then_at_spaces() -> None:
    assert split_text("One. Two!  Three?\nFour; five") == [
        "One.",
        "Two!",
        "Three?",
        "Four;",
        "five",
    ]
    words = " ".join(["word"] * 120)
    pieces = split_text(words)
    assert all(len(p) <= MAX_PIECE_CHARS for p in pieces) and " ".join(pieces) == words
    assert split_text("x" * 450) == ["x" * 200, "x" * 200, "x" * 50]
    assert split_text("  \n ") == []


def test_concurrent_requests_share_forward_passes(engine: SpeechEngine) -> None:
    texts = [" ".join(["word"] * (2 + 3 * i)) + "." for i in range(8)]
    outs: dict[int, object] = {}
    start = threading.Barrier(8)

    def run(i: int) -> None:
        start.wait()
        outs[i] = speak(engine, texts[i])[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(out.timings["max_batch"] for out in outs.values()) > 1  # type: ignore[attr-defined]
    for i, text in enumerate(texts):  # each its own text's length out of the padded batch
        tokens = 2 * len(text) + 1
        assert outs[i].samples.size == tokens * TOKEN_SAMPLES  # type: ignore[attr-defined]


def test_speed_divides_the_length(engine: SpeechEngine) -> None:
    slow, _ = speak(engine, "Slowly now.", speed=0.5)
    fast, _ = speak(engine, "Slowly now.", speed=2.0)
    assert slow.samples.size == 4 * fast.samples.size


def test_the_same_seed_gives_the_same_samples(engine: SpeechEngine) -> None:
    first, _ = speak(engine, LONG_TEXT, seed=7, speaker_id=2)
    again, _ = speak(engine, LONG_TEXT, seed=7, speaker_id=2)
    other, _ = speak(engine, LONG_TEXT, seed=8, speaker_id=2)
    assert np.array_equal(first.samples, again.samples)
    assert not np.array_equal(first.samples, other.samples)
    assert first.timings["max_batch"] == 1  # seeded pieces run alone


def test_a_speaker_the_model_lacks_is_refused_as_a_voice(engine: SpeechEngine) -> None:
    with pytest.raises(ValueError, match="voice"):
        speak(engine, "Hi.", speaker_id=NUM_SPEAKERS)
    with pytest.raises(ValueError, match="voice"):
        speak(engine, "Hi.", speaker_id=-1)
    with pytest.raises(ValueError, match="nothing|no character"):
        speak(engine, "\u4f60\u597d")  # no character in the vocabulary
    default, _ = speak(engine, "Hi.", speaker_id=None, seed=1)
    zero, _ = speak(engine, "Hi.", speaker_id=0, seed=1)
    assert np.array_equal(default.samples, zero.samples)


def test_a_request_past_its_timeout_raises(engine: SpeechEngine) -> None:
    with pytest.raises(RequestTimeoutError, match="timeout"):
        speak(engine, LONG_TEXT * 4, timeout_s=0.05)
    with pytest.raises(RequestTimeoutError):
        speak(engine, "Hi.", timeout_s=0)
    assert speak(engine, "Still serving.")[0].chunks == 1


def test_a_cancelled_request_stops_between_pieces(engine: SpeechEngine) -> None:
    chunks = Chunks()

    def cancelled() -> bool:
        return len(chunks.samples) >= 2

    with pytest.raises(RequestCancelledError):
        engine.synthesize("req", LONG_TEXT, 0, 1.0, None, chunks, 30.0, cancelled=cancelled)
    assert len(chunks.samples) == 2


def test_shutdown_stops_callers_with_engine_stopped(tts_path: Path) -> None:
    eng = SpeechEngine(str(tts_path))
    errors: list[BaseException] = []
    first = threading.Event()

    def on_chunk(samples: np.ndarray) -> None:
        first.set()
        time.sleep(0.01)

    def run() -> None:
        try:
            eng.synthesize("req", LONG_TEXT * 20, 0, 1.0, None, on_chunk, 60.0)
        except BaseException as exc:  # noqa: BLE001 - examined below
            errors.append(exc)

    caller = threading.Thread(target=run)
    caller.start()
    assert first.wait(30)
    eng.close()
    caller.join(30)
    assert len(errors) == 1 and isinstance(errors[0], EngineStoppedError)
    assert not eng.healthy
    with pytest.raises(EngineStoppedError):
        speak(eng, "Hi.")
