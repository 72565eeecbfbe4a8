"""Streamed text: the pieces of a text request's output, written to Redis as they come.

An engine hands each step's new text of a streamed request (`OmniRequest.stream`) to its
`TextStream` (a `DeltaCallback`) from its own thread. That only appends to a buffer: one
writer thread per process takes whatever every stream has buffered and writes it in one
pipelined round trip (per key: RPUSH of its pieces, EXPIRE, and a PUBLISH that wakes
readers). So a step costs no Redis call, a burst of steps becomes one write, and a slow
or absent reader never slows the engine: readers follow the list by position, from
another process, whenever they like (`omni_tasks.streaming`, the HTTP API).

A run starts its list afresh (a message given back after a worker died runs again from
the first token), and `close()` waits for the run's last pieces to be written before the
task stores its result: a reader that sees the result final has every piece already.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from omni_tasks.coordination.keyspace import KeySpace
from omni_tasks.coordination.outage import Outage
from omni_tasks.requests import OmniRequest
from workers.engines.base import DeltaCallback

log = logging.getLogger(__name__)
_outage = Outage("text stream", log)

#: How long a request's pieces stay readable after its last write.
DELTA_TTL_S = 3600
#: The longest a finished run waits for its last pieces to be written.
CLOSE_TIMEOUT_S = 5.0


class DeltaWriter:
    """The process's writer of streamed text: one daemon thread, started on first use."""

    def __init__(self, client: Callable[[], Any]) -> None:
        """`client()`: the Redis client the pieces are written to (the worker's)."""
        self._client = client
        self._cond = threading.Condition()
        self._pending: dict[str, list[str]] = {}  # key -> encoded pieces, in order
        self._fresh: set[str] = set()  # keys whose run starts: deleted before writing
        self._writing: set[str] = set()
        self._thread: threading.Thread | None = None
        self.writes = 0

    def start_run(self, key: str) -> None:
        with self._cond:
            self._fresh.add(key)
            self._pending.setdefault(key, [])
            self._ensure_thread()
            self._cond.notify_all()

    def add(self, key: str, index: int, text: str) -> None:
        """Buffer one piece (from an engine's thread: no I/O, never raises)."""
        self.add_piece(key, {"i": index, "t": text})

    def add_piece(self, key: str, fields: dict[str, object]) -> None:
        """Buffer one piece of any stream, as JSON (no I/O, never raises)."""
        piece = json.dumps(fields, separators=(",", ":"))
        with self._cond:
            self._pending.setdefault(key, []).append(piece)
            self._cond.notify_all()

    def flush(self, key: str, timeout_s: float = CLOSE_TIMEOUT_S) -> bool:
        """Wait until every piece buffered for `key` is written; whether it was."""
        with self._cond:
            return self._cond.wait_for(
                lambda: key not in self._pending and key not in self._writing, timeout_s
            )

    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="omni-deltas", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._pending))
                batch, self._pending = self._pending, {}
                fresh, self._fresh = self._fresh & batch.keys(), self._fresh - batch.keys()
                self._writing = set(batch)
            try:
                _outage.run(self._write, batch, fresh)  # logged once per outage
            finally:
                with self._cond:
                    self._writing = set()
                    self._cond.notify_all()

    def _write(self, batch: dict[str, list[str]], fresh: set[str]) -> None:
        pipe = self._client().pipeline(transaction=False)
        for key, pieces in batch.items():
            if key in fresh:
                pipe.delete(key)
            if pieces:
                pipe.rpush(key, *pieces)
                pipe.expire(key, DELTA_TTL_S)
                pipe.publish(key, len(pieces))
        pipe.execute()
        self.writes += 1


class TextStream:
    """One run's stream of a request: the `DeltaCallback` its engine calls."""

    def __init__(self, key: str, writer: DeltaWriter) -> None:
        """`key`: the request's list (`KeySpace.text_deltas`), emptied as the run starts."""
        self.key = key
        self._writer = writer
        writer.start_run(self.key)

    def __call__(self, index: int, text: str) -> None:
        self._writer.add(self.key, index, text)

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        if not self._writer.flush(self.key, timeout_s):
            log.warning("%s: streamed text not all written in %.1f s", self.key, timeout_s)


class AudioStream(TextStream):
    """One run's stream of a speech request's audio file: its bytes, piece by piece
    (`KeySpace.audio_chunks`, read by `omni_tasks.stream_audio`)."""

    def __init__(self, key: str, writer: DeltaWriter) -> None:
        """`key`: the request's list (`KeySpace.audio_chunks`)."""
        super().__init__(key, writer)
        self._index = 0

    def write(self, data: bytes) -> None:
        if data:
            piece = {"i": self._index, "b": base64.b64encode(data).decode("ascii")}
            self._writer.add_piece(self.key, piece)
            self._index += 1


@contextmanager
def streaming(
    request: OmniRequest, writer: DeltaWriter, keys: KeySpace
) -> Iterator[DeltaCallback | None]:
    """The request's stream while it runs (None unless it asked to be streamed), under
    the worker's `keys`; its last pieces are written when this exits."""
    if not request.stream:
        yield None
        return
    stream = TextStream(keys.text_deltas(request.request_id), writer)
    try:
        yield stream
    finally:
        stream.close()
