"""Decode any supported audio file to mono float32 at the taggers' rate.

The taggers (musicnn) want 16 kHz mono, where mono is the plain average of
the channels, as librosa's ``to_mono`` gave the original models. PyAV's own
stereo-to-mono resampling yields (L+R)/sqrt(2), 1.41x too loud, so frames are
resampled to the target rate *keeping* their channels and averaged here.

Decoding streams frame by frame: a full-rate float copy of a long file is
never made, and ``iter_decode`` hands out fixed-size chunks so an hour-long
recording can be processed in bounded memory. ``max_seconds`` stops early.

Every failure a user's library can produce becomes ``DecodeError`` with a
``kind`` a worker can act on (``vanished`` means the file is gone, not
broken) and a ``reason`` a person can read in the admin.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import av
import numpy as np

from workers.audio.frames import average_channels, float_format, native_planes
from workers.audio.diagnose import (
    AUDIO_SIGNATURES,
    DecodeError,
    check_file,
    container_truncation,
    is_truncated,
    native,
    os_error,
    sniff,
    unopenable,
)

TARGET_SR = 16000

# Packets that fail to decode are skipped (one glitch should not cost the
# whole song) unless more than this share of them fail.
MAX_BAD_PACKET_RATIO = 0.1

#: Test-only poison hook (tests/jobs/test_poison.py; also a tripwire on files
#: that must never be read in tests/library/test_bad_input.py, test_security.py): when this
#: environment variable is set and non-empty, opening a file whose path
#: contains its value calls ``os.abort()``, a real process death (SIGABRT, no
#: exception, no cleanup), as a decoder crash inside FFmpeg would. It is never
#: set in production, and unset (or empty) the hook does nothing.
TEST_ABORT_MARKER_ENV = "EARMARK_TEST_ABORT_MARKER"


@dataclass(frozen=True)
class AudioInfo:
    """What the container says about its audio stream, without decoding.

    ``duration`` is the declared length in seconds (None when the container
    declares none); the safe tag writer compares these fields between the
    original and its rewritten copy.
    """

    duration: float | None
    sample_rate: int
    channels: int
    codec: str
    container: str
    bit_rate: int | None


@dataclass
class DecodedAudio:
    """Mono float32 samples at ``sample_rate`` plus what the source was.

    ``duration`` is the length of ``samples`` in seconds; ``complete`` is
    False when ``max_seconds`` stopped the decode before the end.
    """

    samples: np.ndarray
    sample_rate: int
    info: AudioInfo
    complete: bool = True
    bad_packets: int = 0

    @property
    def duration(self) -> float:
        return len(self.samples) / self.sample_rate

    @property
    def channels(self) -> int:
        return self.info.channels

    @property
    def codec(self) -> str:
        return self.info.codec

    @property
    def source_sample_rate(self) -> int:
        return self.info.sample_rate


# ------------------------------------------------------------------ opening

def _test_abort_hook(path: str) -> None:
    """Die like a crashing decoder on a marked file; only with ``EARMARK_TEST_ABORT_MARKER`` set (tests)."""
    marker = os.environ.get(TEST_ABORT_MARKER_ENV)
    if marker and marker in path:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a test's deliberate crash leaves no core file
        os.abort()


def _open(path: str):
    """Open the container and return (container, first audio stream).

    When FFmpeg refuses the file, its first bytes tell a damaged audio file
    (say an M4A cut before its index) from something that never was audio.
    """
    _test_abort_hook(path)
    check_file(path)
    try:
        container = av.open(path, "r")
    except OSError as exc:  # PyAV's FileNotFoundError, PermissionError...
        raise os_error(exc) from None
    except av.error.FFmpegError:  # invalid data, unexpected end of file...
        raise unopenable(path) from None
    if not container.streams.audio:
        kinds = sorted({s.type for s in container.streams})
        container.close()
        kind = sniff(path)
        if kind and kind not in AUDIO_SIGNATURES:
            raise DecodeError("not_audio", f"not audio: the file is {kind}")
        what = f"only {', '.join(kinds)}" if kinds else "no streams at all"
        raise DecodeError("not_audio", f"not audio: the file has no audio stream ({what})")
    return container, container.streams.audio[0]


def _declared_duration(container, stream) -> float | None:
    """Seconds the file claims to last: the stream's own, else the container's."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / av.time_base
    return None


def _info(container, stream) -> AudioInfo:
    ctx = stream.codec_context
    return AudioInfo(
        duration=_declared_duration(container, stream),
        sample_rate=int(ctx.sample_rate or 0),
        channels=int(ctx.channels or 0),
        codec=ctx.codec.canonical_name,  # "mp3", not the decoder's "mp3float"
        container=container.format.name,
        bit_rate=int(container.bit_rate) if container.bit_rate else None,
    )


def probe(path: str | os.PathLike) -> AudioInfo:
    """Declared duration and stream parameters, reading headers only.

    Cheap: FFmpeg reads the headers (and, for Ogg, the last page) but decodes
    nothing. Raises DecodeError like ``decode`` for unopenable files.
    """
    container, stream = _open(native(path))
    try:
        return _info(container, stream)
    finally:
        container.close()


# ----------------------------------------------------------------- decoding

class _ChunkBuffer:
    """Collects mono pieces and hands out exactly ``size``-sample chunks."""

    def __init__(self, size: int):
        self.size = size
        self.pieces: list[np.ndarray] = []
        self.count = 0

    def add(self, piece: np.ndarray):
        """Append ``piece``; yield every full chunk now available."""
        self.pieces.append(piece)
        self.count += len(piece)
        while self.count >= self.size:
            joined = np.concatenate(self.pieces)
            yield joined[: self.size]
            rest = joined[self.size:]
            self.pieces = [rest] if len(rest) else []
            self.count = len(rest)

    def rest(self) -> np.ndarray | None:
        """The final partial chunk, if any."""
        if not self.count:
            return None
        return np.concatenate(self.pieces)


class StreamDecoder:
    """Decodes one file frame by frame into mono chunks at ``target_sr``.

    Use ``chunks()`` once; ``info`` is available right after construction,
    ``bad_packets`` and ``complete`` after the chunks are exhausted. The
    container is closed when ``chunks()`` ends or the decoder is closed.
    """

    def __init__(self, path: str | os.PathLike, target_sr: int = TARGET_SR,
                 chunk_seconds: float = 30.0, max_seconds: float | None = None, native_sink=None):
        """``native_sink(planes, rate)``, when given, hears every decoded frame as it is, before
        resampling: one float32 array per channel at the file's own rate (loudness and peaks
        must be measured there, not on the mono analysis signal), from the same demux."""
        self.native_sink = native_sink
        self.path = native(path)
        self.target_sr = int(target_sr)
        self.chunk_size = max(1, int(round(chunk_seconds * target_sr)))
        self.max_samples = None if max_seconds is None else int(round(max_seconds * target_sr))
        self.container, self.stream = _open(self.path)
        self.info = _info(self.container, self.stream)
        self.bad_packets = 0
        self.packets = 0
        self.first_error: str | None = None
        self.source_seconds = 0.0
        self.timeline_end = 0.0
        self.complete = True
        self._resampler = None
        self._resampler_key = None

    def close(self) -> None:
        self.container.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def chunks(self):
        """Yield float32 mono chunks of ``chunk_seconds`` (the last shorter).

        Raises DecodeError mid-way (vanished, unreadable, container damage)
        or at the end (too many bad packets, truncated file).
        """
        buffer = _ChunkBuffer(self.chunk_size)
        emitted = 0
        try:
            for mono in self._mono_pieces():
                if self.max_samples is not None and emitted + buffer.count + len(mono) >= self.max_samples:
                    mono = mono[: self.max_samples - emitted - buffer.count]
                    self.complete = False
                for chunk in buffer.add(mono):
                    emitted += len(chunk)
                    yield chunk
                if not self.complete:
                    break
            last = buffer.rest()
            if last is not None:
                emitted += len(last)
                yield last
        finally:
            self.close()
        self._check_result(emitted)

    def _mono_pieces(self):
        """Yield one mono float32 array per decoded (resampled) frame."""
        for frame in self._frames():
            yield from self._resample(frame)
        if self._resampler is not None:
            for out in self._resampler.resample(None):
                yield average_channels(out)

    def _frames(self):
        """Decoded frames of the audio stream, skipping undecodable packets."""
        try:
            for packet in self.container.demux(self.stream):
                self.packets += 1
                try:
                    frames = packet.decode()
                except (av.error.InvalidDataError, av.error.PatchWelcomeError,
                        av.error.BugError, av.error.UndefinedError) as exc:
                    self._note_bad_packet(exc)
                    continue
                for frame in frames:
                    self._account(frame)
                    if self.native_sink is not None:
                        self.native_sink(native_planes(frame), frame.sample_rate)
                    yield frame
        except OSError as exc:
            raise os_error(exc) from None
        except av.error.FFmpegError as exc:
            raise DecodeError(
                "corrupt",
                f"corrupt: the file is damaged after {self.source_seconds:.1f} s ({exc.strerror or exc})",
            ) from None

    def _account(self, frame) -> None:
        """Track decoded seconds and where the stream's timestamps reached.

        The two differ when damaged data was skipped mid-file: the decode
        then ends at the right time but with seconds missing.
        """
        seconds = frame.samples / (frame.sample_rate or 1)
        self.source_seconds += seconds
        if frame.pts is not None and frame.time_base:
            self.timeline_end = max(self.timeline_end, float(frame.pts * frame.time_base) + seconds)

    def _note_bad_packet(self, exc: Exception) -> None:
        self.bad_packets += 1
        if self.first_error is None:
            message = getattr(exc, "strerror", None) or str(exc)
            self.first_error = f"at {self.source_seconds:.1f} s: {message}"

    def _resample(self, frame):
        """Resample one frame to float planar at the target rate, same channels.

        The resampler is rebuilt if the stream changes layout or rate mid-way
        (it happens in broadcast recordings and some ADTS streams).
        """
        key = (frame.layout.name, frame.sample_rate, frame.format.name)
        if key != self._resampler_key:
            if self._resampler is not None:
                for out in self._resampler.resample(None):
                    yield average_channels(out)
            self._resampler = av.AudioResampler(
                format=float_format(frame), layout=frame.layout.name, rate=self.target_sr
            )
            self._resampler_key = key
        frame.pts = None  # we track time ourselves; gaps in pts must not insert silence
        for out in self._resampler.resample(frame):
            yield average_channels(out)

    def _check_result(self, emitted: int) -> None:
        """Refuse results that are mostly errors or end far too early."""
        if emitted == 0 and self.complete:
            if sniff(self.path) not in AUDIO_SIGNATURES:
                raise DecodeError("not_audio", "not audio: the data is not in any audio format FFmpeg knows")
            detail = f" ({self.first_error})" if self.first_error else ""
            raise DecodeError("corrupt", f"corrupt: no audio could be decoded{detail}")
        if self.bad_packets > max(3, MAX_BAD_PACKET_RATIO * self.packets):
            raise DecodeError(
                "corrupt",
                f"corrupt: {self.bad_packets} of {self.packets} audio packets failed to decode "
                f"(first {self.first_error})",
            )
        if not self.complete:
            return
        declared = self.info.duration
        if declared and is_truncated(self.source_seconds, declared):
            if not is_truncated(self.timeline_end, declared):
                raise DecodeError(
                    "corrupt",
                    f"corrupt: decoded {self.source_seconds:.1f} s of {declared:.1f} s; "
                    "damaged data in the middle was skipped",
                )
            raise DecodeError(
                "truncated", f"truncated: decoded {self.source_seconds:.1f} s of {declared:.1f} s"
            )
        try:
            reason = container_truncation(self.path, self.info.container, self.source_seconds)
        except OSError as exc:  # the file was deleted or moved while it was decoded
            raise os_error(exc) from None
        if reason:
            raise DecodeError("truncated", reason)


def iter_decode(path: str | os.PathLike, target_sr: int = TARGET_SR,
                chunk_seconds: float = 30.0, max_seconds: float | None = None, native_sink=None):
    """Yield mono float32 chunks of ``chunk_seconds`` at ``target_sr``.

    Memory stays at about one chunk plus one frame however long the file is.
    Errors found only at the end (truncation, many bad packets) are raised
    after the last chunk, so a caller that must not use a bad file's data
    should hold its results until the generator finishes.
    """
    decoder = StreamDecoder(path, target_sr, chunk_seconds, max_seconds, native_sink)
    yield from decoder.chunks()


def decode(path: str | os.PathLike, target_sr: int = TARGET_SR,
           max_seconds: float | None = None) -> DecodedAudio:
    """Decode a whole file (or its first ``max_seconds``) to mono float32.

    The result array is filled in place from a buffer sized by the declared
    duration, so a long file costs its 16 kHz result and little more.
    """
    decoder = StreamDecoder(path, target_sr, chunk_seconds=10.0, max_seconds=max_seconds)
    expected = decoder.info.duration or 0.0
    if max_seconds is not None:
        expected = min(expected, max_seconds)
    out = _GrowingArray(int(expected * target_sr) + target_sr)
    for chunk in decoder.chunks():
        out.extend(chunk)
    return DecodedAudio(
        samples=out.result(),
        sample_rate=int(target_sr),
        info=decoder.info,
        complete=decoder.complete,
        bad_packets=decoder.bad_packets,
    )


@dataclass
class _GrowingArray:
    """A float32 array that grows by doubling, for results of unknown length."""

    capacity: int
    data: np.ndarray = field(init=False)
    size: int = 0

    def __post_init__(self):
        self.data = np.empty(max(1, self.capacity), dtype=np.float32)

    def extend(self, values: np.ndarray) -> None:
        end = self.size + len(values)
        if end > len(self.data):
            grown = np.empty(max(end, 2 * len(self.data)), dtype=np.float32)
            grown[: self.size] = self.data[: self.size]
            self.data = grown
        self.data[self.size:end] = values
        self.size = end

    def result(self) -> np.ndarray:
        """The filled part; copied only when the buffer is much too large."""
        if self.size < 0.9 * len(self.data):
            return self.data[: self.size].copy()
        return self.data[: self.size]
