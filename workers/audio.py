"""Audio files from float samples: whole (`encode_audio`) or streamed (`StreamEncoder`).

Samples are float32 in [-1, 1], shaped (channels, n), or 1-D for mono; one or two
channels. The formats are those of OpenAI's speech API:

- wav: 16-bit PCM. Whole files through soundfile; a stream's header says its sizes are
  unknown (0xFFFFFFFF, as streaming TTS servers send), which soundfile and PyAV read to the
  end of the data.
- flac: 16-bit, through soundfile. It does not stream: FLAC's header (STREAMINFO) holds
  the total sample count, which a stream can only leave unknown, and libsndfile (1.2)
  cannot read such a file, so a stream's bytes all come at `close`.
- mp3: libmp3lame through PyAV, at the lowest MP3 rate at or above the audio's (48 kHz at
  most). A whole file carries the encoder's delay (LAME header) so decoders trim it; a
  stream cannot (the header would be rewritten at the end), so it decodes up to ~0.1 s
  longer (the delay, and the last frame's padding).
- opus: libopus in an Ogg container through PyAV, at the audio's rate when Opus takes it
  (8, 12, 16, 24 or 48 kHz), else resampled to 48 kHz. Decoders play Opus at 48 kHz
  whatever rate it was encoded at.
- pcm: raw signed 16-bit little-endian samples, channels interleaved, no header.

No codec is written here: soundfile (libsndfile) and PyAV (FFmpeg) do the encoding.
"""

from __future__ import annotations

import io
import struct
from typing import Any

import numpy as np

from omni_tasks.audio_fields import AUDIO_FORMATS, MEDIA_TYPES

__all__ = ["AUDIO_FORMATS", "MEDIA_TYPES", "StreamEncoder", "encode_audio", "resample"]
#: Formats whose stream hands out bytes as audio is fed (flac's only at close).
STREAMED_FORMATS = ("wav", "mp3", "opus", "pcm")
#: Format -> (PyAV container, codec) of the formats FFmpeg encodes.
_AV_FORMATS = {"mp3": ("mp3", "libmp3lame"), "opus": ("ogg", "libopus")}
#: Bit rate a channel (speech: well above what a voice needs, far below music's).
_BIT_RATES = {"mp3": 64_000, "opus": 32_000}
#: The longest an Ogg page waits for more packets before it is written (microseconds;
#: FFmpeg's default of 1 s would hold a stream's bytes for a second).
_OGG_PAGE_US = "20000"
_LAYOUTS = {1: "mono", 2: "stereo"}


def _as_channels(samples: np.ndarray) -> np.ndarray:
    """(channels, n) float32, C-contiguous; 1-D input is mono."""
    arr = np.asarray(samples, dtype=np.float32)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[0] not in _LAYOUTS:
        raise ValueError(f"audio must be (channels, n) with 1 or 2 channels, not {arr.shape}")
    return np.ascontiguousarray(arr)


def to_pcm16(samples: np.ndarray) -> bytes:
    """Signed 16-bit little-endian bytes, channels interleaved (clipped to [-1, 1])."""
    arr = _as_channels(samples)
    ints = np.rint(np.clip(arr, -1.0, 1.0) * 32767.0).astype("<i2")
    return ints.T.tobytes()


def _frame(arr: np.ndarray, rate: int) -> Any:
    import av

    frame = av.AudioFrame.from_ndarray(arr, format="fltp", layout=_LAYOUTS[arr.shape[0]])
    frame.sample_rate = rate
    return frame


def _resampled(resampler: Any, frame: Any) -> np.ndarray:
    """What `resampler` gives for `frame` (None: its buffered tail), as (channels, n)."""
    parts = [out.to_ndarray() for out in resampler.resample(frame)]
    if not parts:
        return np.zeros((resampler.layout.nb_channels, 0), dtype=np.float32)
    return np.concatenate(parts, axis=1).astype(np.float32, copy=False)


def resample(samples: np.ndarray, rate: int, out_rate: int) -> np.ndarray:
    """`samples` at `out_rate` (PyAV's `AudioResampler`, FFmpeg's swresample); 1-D in,
    1-D out."""
    arr = _as_channels(samples)
    if rate == out_rate:
        return np.asarray(samples, dtype=np.float32)
    import av

    resampler = av.AudioResampler(format="fltp", layout=_LAYOUTS[arr.shape[0]], rate=out_rate)
    out = np.concatenate(
        [_resampled(resampler, _frame(arr, rate)), _resampled(resampler, None)], axis=1
    )
    return out[0] if np.ndim(samples) == 1 else out


def encoded_rate(fmt: str, rate: int) -> int:
    """The rate `fmt` is encoded at for audio at `rate`: mp3 the lowest MP3 rate at or
    above it (48 kHz at most); opus the rate itself when Opus takes it, else 48 kHz."""
    if fmt not in _AV_FORMATS:
        return rate
    import av

    rates = sorted(av.codec.Codec(_AV_FORMATS[fmt][1], "w").audio_rates or ())
    if rate in rates or not rates:
        return rate
    if fmt == "opus":
        return 48_000
    return next((r for r in rates if r >= rate), rates[-1])


def _check_format(fmt: str) -> None:
    if fmt not in AUDIO_FORMATS:
        raise ValueError(f"unknown audio format {fmt!r}; known: {', '.join(AUDIO_FORMATS)}")


def encode_audio(
    samples: np.ndarray, sample_rate: int, fmt: str, out_rate: int | None = None
) -> bytes:
    """A whole `fmt` file of `samples` (at `sample_rate`), resampled to `out_rate` when
    given; mp3 and opus may change the rate further (see `encoded_rate`)."""
    _check_format(fmt)
    rate = encoded_rate(fmt, out_rate or sample_rate)
    arr = resample(_as_channels(samples), sample_rate, rate)
    if fmt == "pcm":
        return to_pcm16(arr)
    if fmt in ("wav", "flac"):
        import soundfile

        buf = io.BytesIO()
        soundfile.write(buf, arr.T, rate, subtype="PCM_16", format=fmt.upper())
        return buf.getvalue()
    encoder = _AvEncoder(fmt, rate, arr.shape[0], io.BytesIO())
    encoder.encode(arr)
    encoder.finish()
    return encoder.sink.getvalue()


def wav_stream_header(sample_rate: int, channels: int) -> bytes:
    """A 16-bit PCM WAV header whose RIFF and data sizes say "unknown" (0xFFFFFFFF)."""
    unknown = 0xFFFFFFFF
    block = 2 * channels
    fmt_chunk = struct.pack("<HHIIHH", 1, channels, sample_rate, sample_rate * block, block, 16)
    return (
        b"RIFF"
        + struct.pack("<I", unknown)
        + b"WAVEfmt "
        + struct.pack("<I", len(fmt_chunk))
        + fmt_chunk
        + b"data"
        + struct.pack("<I", unknown)
    )


class _Drain:
    """A write-only file for a PyAV container: what it writes waits here until drained.
    Without `seek` FFmpeg treats it as a pipe and never rewrites what it has written."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def write(self, data: bytes) -> int:
        self.buf += data
        return len(data)

    def drain(self) -> bytes:
        out = bytes(self.buf)
        self.buf.clear()
        return out


class _AvEncoder:
    """One PyAV output container with one audio stream, writing into `sink`."""

    def __init__(self, fmt: str, rate: int, channels: int, sink: Any) -> None:
        import av

        container, codec = _AV_FORMATS[fmt]
        self.sink = sink
        self.rate = encoded_rate(fmt, rate)
        options = {"page_duration": _OGG_PAGE_US} if container == "ogg" else {}
        self.container = av.open(sink, mode="w", format=container, options=options)
        self.stream = self.container.add_stream(codec, rate=self.rate, layout=_LAYOUTS[channels])
        self.stream.bit_rate = _BIT_RATES[fmt] * channels
        self.samples = 0

    def encode(self, arr: np.ndarray) -> None:
        """Encode `arr` (already at `self.rate`); the stream's encoder re-frames it."""
        if arr.shape[1] == 0:
            return
        frame = _frame(arr, self.rate)
        frame.pts = self.samples
        self.samples += arr.shape[1]
        self.container.mux(self.stream.encode(frame))

    def finish(self) -> None:
        self.container.mux(self.stream.encode(None))
        self.container.close()


class StreamEncoder:
    """One audio file handed out piece by piece as samples arrive.

    Every `feed` returns the bytes that can be sent now (maybe none: an encoder or muxer
    may hold some until it has a whole frame or page) and `close` the rest; joined, they
    are one file of `fmt`. pcm, wav and mp3 return bytes from the first feed on; opus
    once an Ogg page is full (its header pages come with the first feed); flac only at
    `close` (see the module docstring). Not thread-safe: one stream, one writer.
    """

    def __init__(self, fmt: str, sample_rate: int, out_rate: int | None = None) -> None:
        _check_format(fmt)
        self.fmt = fmt
        self.sample_rate = sample_rate
        #: The rate of the encoded audio (see `encoded_rate`).
        self.rate = encoded_rate(fmt, out_rate or sample_rate)
        self.samples_in = 0  # at `sample_rate`
        self.channels: int | None = None  # set by the first feed
        self.closed = False
        self._resampler: Any = None
        self._held: list[np.ndarray] = []  # flac: everything, until close
        self._av: _AvEncoder | None = None

    @property
    def duration_s(self) -> float:
        """Seconds of audio fed so far."""
        return self.samples_in / self.sample_rate

    def feed(self, samples: np.ndarray) -> bytes:
        """Encode `samples` (at `sample_rate`); returns the bytes ready to send."""
        if self.closed:
            raise ValueError("feed after close")
        arr = _as_channels(samples)
        start = self._start(arr.shape[0])
        self.samples_in += arr.shape[1]
        return start + self._encode(self._to_rate(arr))

    def close(self) -> bytes:
        """The rest of the file (a stream never fed is a file of no samples)."""
        if self.closed:
            return b""
        start = self._start(self.channels or 1)
        self.closed = True
        tail = b""
        if self._resampler is not None:
            tail = self._encode(_resampled(self._resampler, None))
        if self.fmt == "flac":
            held = np.concatenate(self._held, axis=1)
            return start + tail + encode_audio(held, self.rate, "flac")
        if self._av is not None:
            self._av.finish()
            tail += self._av.sink.drain()
        return start + tail

    def _start(self, channels: int) -> bytes:
        """Set up on the first call (the channel count is known then); the header of a
        wav stream."""
        if self.channels is not None:
            if channels != self.channels:
                raise ValueError(f"a {self.channels}-channel stream was fed {channels} channels")
            return b""
        self.channels = channels
        self._held = [np.zeros((channels, 0), dtype=np.float32)]
        if self.rate != self.sample_rate:
            import av

            self._resampler = av.AudioResampler(
                format="fltp", layout=_LAYOUTS[channels], rate=self.rate
            )
        if self.fmt in _AV_FORMATS:
            self._av = _AvEncoder(self.fmt, self.rate, channels, _Drain())
        return wav_stream_header(self.rate, channels) if self.fmt == "wav" else b""

    def _to_rate(self, arr: np.ndarray) -> np.ndarray:
        if self._resampler is None or arr.shape[1] == 0:
            return arr
        return _resampled(self._resampler, _frame(arr, self.sample_rate))

    def _encode(self, arr: np.ndarray) -> bytes:
        """`arr` (at `rate`) in the stream's format: what is ready of it."""
        if self.fmt in ("pcm", "wav"):
            return to_pcm16(arr)
        if self.fmt == "flac":
            self._held.append(arr)
            return b""
        assert self._av is not None
        self._av.encode(arr)
        return self._av.sink.drain()
