"""Audio encoding (`workers.audio`): every format, whole and streamed, read back by real
decoders (soundfile for wav / flac / pcm, PyAV for mp3 / opus) from synthetic sine waves."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
import soundfile

from workers.audio import (
    AUDIO_FORMATS,
    MEDIA_TYPES,
    STREAMED_FORMATS,
    StreamEncoder,
    encode_audio,
    encoded_rate,
    resample,
    to_pcm16,
)


def sine(rate: int, seconds: float, channels: int = 1, hz: float = 440.0) -> np.ndarray:
    """A half-scale sine, (channels, n) float32 (channel c a little higher in pitch)."""
    t = np.arange(int(rate * seconds)) / rate
    waves = [0.5 * np.sin(2 * np.pi * (hz + 110 * c) * t) for c in range(channels)]
    return np.stack(waves).astype(np.float32)


def decode(data: bytes, fmt: str, pcm_rate: int = 0, pcm_channels: int = 1) -> tuple:
    """(sample rate, channels, frames) of `data` as a decoder reads it."""
    if fmt in ("wav", "flac", "pcm"):
        raw = {"format": "RAW", "subtype": "PCM_16", "samplerate": pcm_rate}
        kwargs = dict(raw, channels=pcm_channels) if fmt == "pcm" else {}
        samples, rate = soundfile.read(io.BytesIO(data), always_2d=True, **kwargs)
        return rate, samples.shape[1], samples.shape[0]
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        frames = [f.to_ndarray() for f in container.decode(stream)]
        rate, channels = stream.rate, stream.channels
    return rate, channels, sum(f.shape[1] for f in frames)


def decoded_rate(fmt: str, rate: int) -> int:
    """What a decoder plays `fmt` at: Opus always at 48 kHz."""
    return 48_000 if fmt == "opus" else encoded_rate(fmt, rate)


def assert_decodes_like(data: bytes, fmt: str, rate: int, channels: int, seconds: float) -> None:
    got_rate, got_channels, frames = decode(data, fmt, rate, channels)
    assert (got_rate, got_channels) == (decoded_rate(fmt, rate), channels)
    # An mp3 stream keeps the encoder's delay and the last frame's padding (a whole file
    # has them in its LAME header, for decoders to trim).
    slack = 0.15 if fmt == "mp3" else 0.03
    assert frames / got_rate == pytest.approx(seconds, abs=slack)


def test_every_format_has_a_media_type() -> None:
    assert set(MEDIA_TYPES) == set(AUDIO_FORMATS)
    assert MEDIA_TYPES["opus"] == "audio/ogg" and MEDIA_TYPES["mp3"] == "audio/mpeg"


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("fmt", AUDIO_FORMATS)
def test_a_whole_file_round_trips_through_a_decoder(fmt: str, channels: int) -> None:
    data = encode_audio(sine(24_000, 1.0, channels), 24_000, fmt)
    assert_decodes_like(data, fmt, 24_000, channels, 1.0)


def test_mono_may_be_one_dimensional_and_pcm_is_the_raw_s16le_samples() -> None:
    wave = sine(16_000, 0.25)[0]
    data = encode_audio(wave, 16_000, "pcm")
    assert data == to_pcm16(wave) and len(data) == 2 * wave.size
    ints = np.frombuffer(data, dtype="<i2")
    assert ints.max() == round(0.5 * 32767) and np.abs(ints / 32767 - wave).max() < 1e-4


@pytest.mark.parametrize("fmt", AUDIO_FORMATS)
def test_out_rate_changes_the_encoded_rate(fmt: str) -> None:
    data = encode_audio(sine(16_000, 0.5), 16_000, fmt, out_rate=24_000)
    assert_decodes_like(data, fmt, 24_000, 1, 0.5)


def test_rates_a_codec_lacks_are_raised_to_one_it_has() -> None:
    assert encoded_rate("opus", 22_050) == 48_000  # Opus: 8/12/16/24/48 kHz only
    assert encoded_rate("opus", 16_000) == 16_000
    assert encoded_rate("mp3", 20_000) == 22_050  # the next MP3 rate up
    assert encoded_rate("mp3", 96_000) == 48_000  # the highest
    assert encoded_rate("wav", 22_050) == 22_050
    data = encode_audio(sine(22_050, 0.5), 22_050, "mp3", out_rate=20_000)
    assert_decodes_like(data, "mp3", 22_050, 1, 0.5)


def test_resampling_changes_the_rate_and_keeps_the_duration() -> None:
    wave = sine(16_000, 1.0, hz=200.0)
    up = resample(wave, 16_000, 48_000)
    assert up.dtype == np.float32 and up.shape[0] == 1
    assert abs(up.shape[1] - 48_000) <= 16
    # The same tone: every third sample of the 48 kHz signal is close to the original.
    assert np.abs(up[0, ::3][100:15_000] - wave[0, 100:15_000]).max() < 0.05
    down = resample(wave[0], 16_000, 8_000)
    assert down.ndim == 1 and abs(down.size - 8_000) <= 16


def stream(fmt: str, pieces: list[np.ndarray], rate: int, out_rate: int | None = None) -> list:
    """Every bytes object a stream of `pieces` returns, close's last."""
    enc = StreamEncoder(fmt, rate, out_rate)
    chunks = [enc.feed(piece) for piece in pieces]
    return [*chunks, enc.close()]


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("fmt", AUDIO_FORMATS)
def test_a_streams_bytes_join_into_one_file_a_decoder_reads(fmt: str, channels: int) -> None:
    wave = sine(16_000, 1.2, channels)
    pieces = np.array_split(wave, 6, axis=1)
    chunks = stream(fmt, pieces, 16_000)
    assert_decodes_like(b"".join(chunks), fmt, 16_000, channels, 1.2)


@pytest.mark.parametrize("fmt", ["pcm", "wav", "mp3", "opus"])
def test_the_first_feed_returns_bytes_before_the_audio_is_all_there(fmt: str) -> None:
    assert fmt in STREAMED_FORMATS
    pieces = np.array_split(sine(24_000, 2.0), 10, axis=1)
    chunks = stream(fmt, pieces, 24_000)
    assert chunks[0]
    # Most of the file comes out before close, not all at the end.
    assert sum(map(len, chunks[:-1])) > sum(map(len, chunks)) / 2


def test_a_wav_stream_says_its_sizes_are_unknown_and_decoders_read_to_the_end() -> None:
    pieces = np.array_split(sine(16_000, 0.5), 3, axis=1)
    data = b"".join(stream("wav", pieces, 16_000))
    assert data[4:8] == b"\xff\xff\xff\xff" and data[40:44] == b"\xff\xff\xff\xff"
    assert_decodes_like(data, "wav", 16_000, 1, 0.5)
    with av.open(io.BytesIO(data)) as container:
        frames = sum(f.samples for f in container.decode(audio=0))
    assert frames == 8_000


@pytest.mark.parametrize("fmt", AUDIO_FORMATS)
def test_a_resampling_stream_keeps_the_duration(fmt: str) -> None:
    pieces = np.array_split(sine(16_000, 1.0), 5, axis=1)
    enc = StreamEncoder(fmt, 16_000, out_rate=22_050)
    data = b"".join([*(enc.feed(p) for p in pieces), enc.close()])
    assert enc.duration_s == pytest.approx(1.0)
    assert_decodes_like(data, fmt, enc.rate, 1, 1.0)


def test_flac_streams_only_at_close_and_a_stream_never_fed_is_an_empty_file() -> None:
    chunks = stream("flac", np.array_split(sine(16_000, 0.5), 3, axis=1), 16_000)
    assert not any(chunks[:-1]) and chunks[-1]
    empty = StreamEncoder("wav", 16_000).close()
    assert decode(empty, "wav") == (16_000, 1, 0)


def test_bad_input_is_refused_clearly() -> None:
    with pytest.raises(ValueError, match="unknown audio format 'ogg'"):
        encode_audio(sine(16_000, 0.1), 16_000, "ogg")
    with pytest.raises(ValueError, match="1 or 2 channels"):
        encode_audio(np.zeros((3, 100), np.float32), 16_000, "wav")
    enc = StreamEncoder("pcm", 16_000)
    enc.feed(sine(16_000, 0.1))
    with pytest.raises(ValueError, match="1-channel stream was fed 2"):
        enc.feed(sine(16_000, 0.1, 2))
    enc.close()
    with pytest.raises(ValueError, match="after close"):
        enc.feed(sine(16_000, 0.1))
