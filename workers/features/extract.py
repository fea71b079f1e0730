"""One entry point for all features: ``analyze(native, rate)`` or ``FeatureAnalyzer`` chunk by chunk.

``FeatureAnalyzer(rate, channels)`` takes the decoded stream at its native rate and channel
count (``add(chunk)``, chunks shaped ``(frames, channels)`` or 1-D for mono, float or int) and
feeds the loudness meter (all channels, native rate) and, from the channel mean, the tempo
tracker and key detector (decimated to ~11 kHz). ``result()`` gives ``Features``, whose
``to_json()`` is what a database JSON field stores and ``tags()`` the tag values to write.

Anything not measurable is None with a sentence in ``reasons[name]`` ("loudness", "tempo",
"key"): silence, a clip shorter than a 400 ms block (loudness), 6 s (tempo) or 3 s (key),
no steady beat, no tonal centre. A clipped signal is measured as it is (``clipped`` says so).
Imports numpy and scipy (and numba for the K-weighting, through ``kernels``).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from . import key as key_mod
from . import loudness as loud
from . import tempo as tempo_mod
from .frontend import Decimator

# Bumped whenever a method, a threshold or a profile changes, so stored features can be recomputed.
FEATURES_VERSION = "2:bs1770-4+tp4x/tiltflux-sqrt-fraccomb-prior125-subdiv/chroma-kk-h5"


@dataclass(frozen=True)
class Features:
    version: str
    seconds: float
    rate: int
    channels: int
    loudness_lufs: float | None
    track_gain_db: float | None          # ReplayGain 2.0: -18 LUFS - loudness
    sample_peak: float                   # linear, 1.0 = full scale
    true_peak: float                     # linear, BS.1770-4 Annex 2
    clipped: bool
    bpm: float | None
    bpm_confidence: float
    key: str | None                      # "A minor"
    key_short: str | None                # "Am" (ID3 TKEY form)
    key_camelot: str | None              # "8A"
    key_open: str | None                 # "1m"
    key_confidence: float
    tuning_cents: float
    album_data: dict = field(repr=False, default_factory=dict)   # loudness.histogram(): album gain input
    reasons: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        """Plain JSON types only (floats, strings, None, the album histogram)."""
        out = asdict(self)
        for k, v in out.items():
            if isinstance(v, float) and not np.isfinite(v):
                out[k] = None
        return out

    @classmethod
    def from_json(cls, data: dict) -> Features:
        return cls(**{k: data.get(k) for k in cls.__dataclass_fields__})

    def tags(self) -> dict[str, str]:
        """Tag values: REPLAYGAIN_TRACK_* (ReplayGain 2.0), BPM (rounded), INITIALKEY (short form)."""
        tags = {}
        if self.track_gain_db is not None:
            tags["REPLAYGAIN_TRACK_GAIN"] = f"{self.track_gain_db:+.2f} dB"
            tags["REPLAYGAIN_TRACK_PEAK"] = f"{self.true_peak:.6f}"
            tags["REPLAYGAIN_REFERENCE_LOUDNESS"] = f"{loud.REFERENCE_LUFS:.2f} LUFS"
        if self.bpm is not None:
            tags["BPM"] = str(int(round(self.bpm)))
        if self.key_short is not None:
            tags["INITIALKEY"] = self.key_short
        return tags


class FeatureAnalyzer:
    """Feed the native-rate decode chunk by chunk; memory stays bounded (block energies, onset envelope)."""

    def __init__(self, rate: int, channels: int, tonal_seconds: float | None = None):
        """``tonal_seconds`` bounds how much of the track tempo and key look at (None: all of it)."""
        if int(rate) <= 0 or int(channels) <= 0:
            raise ValueError(f"need a positive sample rate and channel count, got {rate} Hz, {channels} channels")
        self.rate, self.channels = int(rate), int(channels)
        self._loudness = loud.LoudnessMeter(self.rate, self.channels)
        self._tempo = tempo_mod.TempoTracker(self.rate)
        self._key = key_mod.KeyDetector(self.rate)
        self._decimator = Decimator(self.rate)  # one decimation feeds both
        self._tonal_left = None if tonal_seconds is None else int(tonal_seconds * self.rate)

    def add(self, chunk: np.ndarray) -> None:
        x = np.asarray(chunk)
        if x.ndim == 1:
            x = x[:, None]
        if x.ndim != 2 or x.shape[1] != self.channels:
            raise ValueError(f"chunk shape {np.shape(chunk)} does not fit {self.channels} channels")
        if not len(x):
            return
        self._loudness.add(x)
        if self._tonal_left is not None:
            if self._tonal_left <= 0:
                return
            x = x[: self._tonal_left]
            self._tonal_left -= len(x)
        low = self._decimator.process(x)
        self._tempo.add_decimated(low)
        self._key.add_decimated(low)

    def result(self) -> Features:
        lo = self._loudness.result()
        te = self._tempo.result()
        ke = self._key.result()
        reasons = {name: r for name, r in (("loudness", lo.reason), ("tempo", te.reason), ("key", ke.reason)) if r}
        return Features(
            version=FEATURES_VERSION, seconds=round(lo.seconds, 3), rate=self.rate, channels=self.channels,
            loudness_lufs=None if lo.integrated_lufs is None else round(lo.integrated_lufs, 2),
            track_gain_db=None if lo.track_gain_db is None else round(lo.track_gain_db, 2),
            sample_peak=round(lo.sample_peak, 6), true_peak=round(lo.true_peak, 6),
            clipped=lo.sample_peak >= 0.9999,
            bpm=te.bpm, bpm_confidence=te.confidence,
            key=ke.name, key_short=ke.short, key_camelot=ke.camelot, key_open=ke.open_key,
            key_confidence=ke.confidence, tuning_cents=ke.tuning_cents,
            album_data=lo.histogram, reasons=reasons)


# Tempo and key look at the first five minutes, loudness at all of it: a longer track's tempo and
# key are rarely one value (a DJ mix, a suite), and an hour's onset envelope and chroma would cost
# ~150 MB at the end of the file; five minutes covers any intro.
TONAL_SECONDS = 300.0


class StreamMeasure:
    """A decoder's native-rate sink (``measure(planes, rate)``) that never breaks the decode it rides on.

    The analyzer starts at the first frame's rate and channel count. A stream
    that changes either mid-way, or anything the analyzer raises, ends the
    measurement with a reason: the tags of the networks still get written.
    ``seconds`` is the time spent here, for the tagger's timings. Frames
    (a few ms each) are gathered into blocks of ``block`` samples first: the
    filters' cost per call would otherwise outweigh their work.
    """

    def __init__(self, block: int = 1 << 16):
        self.analyzer: FeatureAnalyzer | None = None
        self.format: tuple[int, int] | None = None
        self.failure = ""
        self.seconds = 0.0
        self.block, self.pending, self.count = block, [], 0

    def __call__(self, planes: list[np.ndarray], rate: int) -> None:
        """One decoded frame: a float32 array per channel (``workers.audio.frames.native_planes``)."""
        if self.failure:
            return
        started = time.perf_counter()
        try:
            here = (int(rate), len(planes))
            if self.analyzer is None:
                self.analyzer, self.format = FeatureAnalyzer(*here, tonal_seconds=TONAL_SECONDS), here
            elif here != self.format:
                self.failure = (f"not measurable: the stream changes from {self.format[0]} Hz, {self.format[1]} "
                                f"channels to {here[0]} Hz, {here[1]} channels mid-way")
                return
            self.pending.append(planes)
            self.count += len(planes[0])
            if self.count >= self.block:
                self._flush()
        except Exception as exc:  # noqa: BLE001 - a measurement error is a reason, not a failed tag job
            self.failure = f"not measurable: {type(exc).__name__}: {exc}"
        finally:
            self.seconds += time.perf_counter() - started

    def _flush(self) -> None:
        """The pending frames as one (frames, channels) block: channel-major, handed over transposed."""
        if self.pending:
            block = np.empty((self.format[1], self.count), dtype=np.float32)
            for c, row in enumerate(block):
                np.concatenate([planes[c] for planes in self.pending], out=row)
            self.pending, self.count = [], 0
            self.analyzer.add(block.T)

    def result(self, complete: bool = True) -> dict:
        """``Features.to_json()``; or ``{"version", "reasons": {"all": why}}`` when nothing could be measured."""
        why = self.failure or ("" if complete else "not measurable: only part of the file was decoded")
        if not why and self.analyzer is None:
            why = "not measurable: no audio was decoded"
        if not why:
            started = time.perf_counter()
            try:
                self._flush()
                return self.analyzer.result().to_json()
            except Exception as exc:  # noqa: BLE001 - as in __call__
                why = f"not measurable: {type(exc).__name__}: {exc}"
            finally:
                self.seconds += time.perf_counter() - started
        return {"version": FEATURES_VERSION, "reasons": {"all": why}}


def analyze(native: np.ndarray, rate: int, chunk_frames: int = 1 << 16) -> Features:
    """All features of one decoded track: ``native`` is (frames, channels) or mono (frames,)."""
    x = np.asarray(native)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"audio must be (frames, channels) with at least one channel, got {np.shape(native)}")
    analyzer = FeatureAnalyzer(rate, x.shape[1])
    for i in range(0, len(x), chunk_frames):
        analyzer.add(x[i:i + chunk_frames])
    return analyzer.result()


def album(tracks: list[Features]) -> loud.AlbumLoudness:
    """Album loudness, gain (``.gain_db``) and peak of several tracks' features, gated together."""
    return loud.album([t.album_data for t in tracks], peaks=[t.true_peak for t in tracks])
