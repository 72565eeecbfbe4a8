"""The speech pool's text-to-speech engine: a transformers VITS (MMS-TTS) model, batched
across requests and streamed sentence by sentence.

VITS is not autoregressive: one forward pass turns a whole text into a waveform. A
request streams by being cut into pieces (sentences, then at most `MAX_PIECE_CHARS`
characters at a space) that are spoken one after another; each piece's audio goes to the
caller's `on_chunk` as soon as it is made, so the first sentence plays while the rest is
spoken.

Many task threads call `synthesize` at once. Each keeps one piece queued at a time; the
engine's one thread takes every queued piece with the same speaker and speed (VITS takes
one of each a forward pass) up to `max_batch_size`, pads them into one batch, runs one
forward and cuts each row's audio to its own length (`sequence_lengths`). A request's
next piece is queued once its previous one is out, so requests take turns fairly.

Seeds: VITS samples noise for the duration predictor and the prior, drawn for the whole
batch at once, and its decoder reads the padding past a row's end, so the same piece
sounds different in another batch. A seeded request's pieces therefore run alone, piece
k under `torch.manual_seed(seed + k)`: the same (text, speaker, speed, seed) always gives
the same samples on one device. Unseeded pieces batch.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np

from omni_tasks.errors import (
    EngineStoppedError,
    ProcessingError,
    RequestCancelledError,
    RequestTimeoutError,
)
from workers.engines.background import OneModelEngine, settle, wait_for_burst

log = logging.getLogger(__name__)

#: The longest piece spoken in one pass (characters).
MAX_PIECE_CHARS = 200
#: Where a sentence ends: its punctuation and the space after it, or a line break.
_SENTENCE_END = re.compile(r"(?<=[.!?;:\u2026\u3002\uff01\uff1f])\s+|\s*\n\s*")
#: A called-back piece of audio (mono float32), from the engine's thread.
ChunkCallback = Callable[[np.ndarray], None]


def split_text(text: str, max_chars: int = MAX_PIECE_CHARS) -> list[str]:
    """`text` as the pieces it is spoken in: its sentences, each cut at spaces (or
    anywhere, for a longer word) into parts of at most `max_chars` characters."""
    pieces = []
    for sentence in _SENTENCE_END.split(text):
        rest = sentence.strip()
        while len(rest) > max_chars:
            cut = rest.rfind(" ", 1, max_chars + 1)
            cut = cut if cut > 0 else max_chars
            pieces.append(rest[:cut].rstrip())
            rest = rest[cut:].lstrip()
        if rest:
            pieces.append(rest)
    return pieces


@dataclass
class SpeechOutput:
    """A request's audio: mono float32 `samples` at `sample_rate`, made in `chunks`
    pieces. `timings`: first_chunk_s (from the call to the first piece's audio),
    generate_s (the whole call), model_s (forward passes it rode in) and max_batch (the
    most pieces, its own among them, one forward pass ran)."""

    samples: np.ndarray
    sample_rate: int
    chunks: int
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class _Piece:
    """One piece of a request, queued for the engine's thread."""

    rid: str
    ids: list[int]
    speaker_id: int
    speed: float
    seed: int | None
    on_chunk: ChunkCallback
    future: Future = field(default_factory=Future)

    @property
    def group(self) -> tuple:
        """Pieces of one group may share a forward pass (a seeded one shares none)."""
        if self.seed is not None:
            return ("seeded", id(self))
        return (self.speaker_id, self.speed)


class SpeechEngine(OneModelEngine):
    """A transformers VITS model shared by every thread of one worker process."""

    name = "transformers-vits"
    label = "speech engine"

    def __init__(
        self,
        model: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        max_batch_size: int = 8,
        batch_wait_s: float = 0.002,
    ) -> None:
        """`batch_wait_s`: how long the engine's thread waits, after a piece arrives, for
        more (each arrival within that of the last) before it runs a batch."""
        self.device = device = self.pick_device(device)
        self.max_batch_size = max(1, max_batch_size)
        self.batch_wait_s = batch_wait_s
        self._cond = threading.Condition()
        self._queue: deque[_Piece] = deque()
        self._running: list[_Piece] = []
        # Loaded on the engine's thread (OpenMP teams: see workers.engines.background).
        self._start_thread(self._run, "tts-batcher", build=lambda: self._load(model, dtype))
        log.info("speech engine for %s on %s ready in %.1f s", model, device, self.init_s)

    def _load(self, model: str, dtype: str) -> None:
        from transformers import AutoTokenizer, VitsModel

        t0 = time.perf_counter()
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        loaded = VitsModel.from_pretrained(model, dtype=self.torch_dtype(dtype))
        self.model = loaded.to(self.device).eval()
        config = self.model.config
        self.sample_rate: int = int(config.sampling_rate)
        self.num_speakers: int = max(1, int(config.num_speakers))
        self._vocab_size = int(config.vocab_size)
        self.init_s = time.perf_counter() - t0

    def voices(self) -> list[int]:
        """The speaker ids a request may choose."""
        return list(range(self.num_speakers))

    # ------------------------------------------------------------------ callers

    def synthesize(
        self,
        request_id: str,
        text: str,
        speaker_id: int | None,
        speed: float,
        seed: int | None,
        on_chunk: ChunkCallback,
        timeout_s: float,
        cancelled: Callable[[], bool] | None = None,
    ) -> SpeechOutput:
        """Speak `text`, handing each piece's audio to `on_chunk` (from the engine's
        thread, in order: it must not block for long) as it is made; blocks until done.

        `speaker_id` None: speaker 0. ValueError (naming the voice) for a speaker the model
        lacks, or for a text with nothing to speak; RequestTimeoutError once `timeout_s`
        has passed; RequestCancelledError when `cancelled()` (checked between pieces)
        turns true; EngineStoppedError after `shutdown()`.
        """
        self._check_process()
        start = time.perf_counter()
        deadline = time.monotonic() + timeout_s
        speaker = self._check_voice(speaker_id)
        if not speed > 0:
            raise ValueError(f"speed must be above 0, not {speed}")
        pieces = self._tokenize(text)
        chunks: list[np.ndarray] = []
        timings = {"first_chunk_s": 0.0, "model_s": 0.0, "max_batch": 0}
        for k, ids in enumerate(pieces):
            if cancelled is not None and cancelled():
                raise RequestCancelledError(f"request {request_id} was cancelled")
            piece_seed = None if seed is None else seed + k
            piece = _Piece(f"{request_id}#{k}", ids, speaker, float(speed), piece_seed, on_chunk)
            samples, batch, model_s = self._run_piece(piece, deadline, timeout_s)
            chunks.append(samples)
            if k == 0:
                timings["first_chunk_s"] = time.perf_counter() - start
            timings["model_s"] += model_s
            timings["max_batch"] = max(timings["max_batch"], batch)
        timings["generate_s"] = time.perf_counter() - start
        return SpeechOutput(np.concatenate(chunks), self.sample_rate, len(chunks), timings)

    def _check_voice(self, speaker_id: int | None) -> int:
        speaker = 0 if speaker_id is None else speaker_id
        if not 0 <= speaker < self.num_speakers:
            raise ValueError(
                f"voice: speaker {speaker_id} is not one of this model's "
                f"{self.num_speakers} speakers (0-{self.num_speakers - 1})"
            )
        return speaker

    def _tokenize(self, text: str) -> list[list[int]]:
        """The token ids of each piece of `text` that has something to say (the
        tokenizer drops characters outside its vocabulary; id 0 is the blank)."""
        pieces = []
        for part in split_text(text):
            ids = [i for i in self.tokenizer(part)["input_ids"] if i < self._vocab_size]
            if any(ids):
                pieces.append(ids)
        if not pieces:
            raise ValueError("input: no character of the text is one this model can speak")
        return pieces

    def _run_piece(self, piece: _Piece, deadline: float, timeout_s: float) -> tuple:
        """Queue `piece`, wait for it: (its samples, its batch's size, the batch's model
        seconds)."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise RequestTimeoutError(f"{piece.rid} exceeded its timeout of {timeout_s:g} s")
        with self._cond:
            self._raise_if_unavailable()
            self._queue.append(piece)
            self._cond.notify()
        try:
            return piece.future.result(timeout=left)
        except FutureTimeout:
            # Settling the future is the cancel signal: the engine's thread skips it.
            settle(piece.future, exc=RequestTimeoutError(f"{piece.rid} timed out"))
            if piece.future.exception() is None:
                return piece.future.result()  # done in the same instant
            if isinstance(piece.future.exception(), RequestTimeoutError):
                raise RequestTimeoutError(
                    f"{piece.rid} exceeded its timeout of {timeout_s:g} s"
                ) from None
            raise piece.future.exception() from None

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Fail queued and running pieces with EngineStoppedError, stop, free the model.

        Callers are released at once; a running batch ends after its forward pass. Waits
        up to `timeout_s` for that (0: return at once). Idempotent.
        """
        with self._cond:
            self._stopping = True
            pieces = list(self._queue) + list(self._running)
            self._queue.clear()
            self._cond.notify_all()
        for piece in pieces:
            settle(piece.future, exc=EngineStoppedError("speech engine shut down"))
        self._join_thread(timeout_s)

    close = shutdown

    # ------------------------------------------------------------ engine thread

    def _run(self) -> None:
        batch: list[_Piece] = []
        try:
            while (batch := self._next_batch()) is not None:
                try:
                    if batch:
                        self._speak(batch)
                except Exception as exc:  # noqa: BLE001 - reported to every waiter
                    log.exception("speech forward failed for %d pieces", len(batch))
                    for piece in batch:
                        err = ProcessingError(f"speech forward failed: {exc!r}")
                        err.__cause__ = exc
                        settle(piece.future, exc=err)
                finally:
                    with self._cond:
                        self._running = []
        except BaseException as exc:
            self._broken = exc
            log.exception("speech engine thread died; engine is broken")
            with self._cond:
                pieces = [*self._queue, *(batch or [])]
                self._queue.clear()
            for piece in pieces:
                settle(piece.future, exc=ProcessingError(f"speech engine broke: {exc!r}"))
        finally:
            self._close()

    def _next_batch(self) -> list[_Piece] | None:
        """Wait for work, and for the burst it came in; the oldest piece and the queued
        ones of its group (None once stopping)."""

        def arrivals() -> int | None:
            full = len(self._queue) >= self.max_batch_size
            return None if self._stopping or full else len(self._queue)

        with self._cond:
            while not (self._stopping or self._queue):
                self._cond.wait()
            if self.batch_wait_s > 0:
                wait_for_burst(self._cond, arrivals, self.batch_wait_s, 4 * self.batch_wait_s)
            if self._stopping:
                return None
            first = self._queue.popleft()
            batch, rest = [first], deque()
            for piece in self._queue:
                fits = len(batch) < self.max_batch_size and piece.group == first.group
                (batch if fits else rest).append(piece)
            self._queue = rest
            self._running = [p for p in batch if not p.future.done()]
            return self._running

    def _speak(self, batch: list[_Piece]) -> None:
        """One forward pass for `batch`; each piece's audio to its caller."""
        import torch

        first = batch[0]
        enc = self.tokenizer.pad({"input_ids": [p.ids for p in batch]}, return_tensors="pt")
        speaker = first.speaker_id if self.num_speakers > 1 else None
        seeded = first.seed is not None
        t0 = time.perf_counter()
        rng = torch.random.fork_rng(devices=self._rng_devices()) if seeded else nullcontext()
        with torch.inference_mode(), rng:
            if seeded:
                torch.manual_seed(first.seed)
            out = self.model(**enc.to(self.device), speaker_id=speaker, speaking_rate=first.speed)
        waves = out.waveform.float().cpu().numpy()
        lengths = out.sequence_lengths.tolist()
        model_s = time.perf_counter() - t0
        for piece, wave, length in zip(batch, waves, lengths, strict=True):
            if piece.future.done():  # timed out or stopped meanwhile
                continue
            samples = wave[: int(length)].copy()  # not a view pinning the whole batch
            try:
                piece.on_chunk(samples)
            except Exception:  # noqa: BLE001 - a listener's trouble never stops the engine
                log.warning("%s: audio chunk callback failed", piece.rid, exc_info=True)
            settle(piece.future, (samples, len(batch), model_s))
