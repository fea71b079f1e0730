"""ITU-R BS.1770-4 / EBU R128 loudness, true peak and ReplayGain 2.0, measured streaming.

``LoudnessMeter(rate, channels)`` takes ``add(chunk)`` with chunks shaped ``(frames, channels)``
(any float or int dtype; ints are scaled to [-1, 1)) and gives ``result()``, a ``Loudness``:

* **Integrated loudness** (LUFS): K-weighting (the BS.1770 pre-filter shelf and RLB high-pass),
  designed for the signal's own sample rate with the bilinear-transform formulas that reproduce
  the standard's 48 kHz coefficients exactly (libebur128's); 400 ms blocks every 100 ms (75 %
  overlap); channel weights 1.0, surround 1.41 (``Ls``/``Rs`` of 5.1, the back and side pairs of
  7.1) and 0 for the LFE, in the SMPTE/FFmpeg channel order (L R C LFE Ls Rs [Lb Rb]); the
  absolute gate at -70 LUFS and the relative gate 10 LU below the absolutely gated loudness.
  Only the per-block energies are kept (8 bytes per 100 ms: 0.3 MB for an hour), never the audio.
* **Sample peak** and **true peak** (BS.1770-4 Annex 2: 4x oversampling by a polyphase FIR
  interpolator, 12 taps a phase; 2x at 88.2/96 kHz and none from 176.4 kHz, where the
  samples are already that dense), both linear (1.0 = full scale) with ``*_dbfs`` helpers.
* **ReplayGain 2.0**: track gain = -18 LUFS - integrated loudness; ``album(...)`` gives the
  album gain and peak from several tracks' ``histogram``s.

**Album data** (``Loudness.histogram``, JSON-ready, a few kB): the track's block energies that
passed the absolute gate, binned by block loudness in 0.1 LU steps from -70 LUFS::

    {"format": "bs1770-blocks/1", "floor": -70.0, "step": 0.1,
     "bins": [[index, count, energy_sum], ...]}      # sparse, index ascending

``energy_sum`` is the sum of the bins' weighted mean-square block energies (the ``z`` of
BS.1770, so a block's loudness is ``-0.691 + 10 log10(z)``). Album loudness gates all the
tracks' blocks together, as if the album were one file: the relative gate comes from the exact
energy sum of every block, and a bin passes it when its mean block loudness does (bins are
0.1 LU wide, so the album value is within a few hundredths of an LU of gating every block).

A signal is *not measurable* (``integrated_lufs`` None and a ``reason``) when it is shorter
than one 400 ms block or every block is below -70 LUFS (silence). Imports numpy and scipy,
and numba for the K-weighting loop (``kernels``).
"""
from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field

import numpy as np
from scipy import signal

REFERENCE_LUFS = -18.0  # ReplayGain 2.0
ABSOLUTE_GATE = -70.0
RELATIVE_GATE = -10.0
HIST_FORMAT = "bs1770-blocks/1"
HIST_STEP = 0.1
MIN_RATE = 8000


def k_weighting_sos(rate: float) -> np.ndarray:
    """The two K-weighting biquads for ``rate`` as second-order sections (libebur128's design)."""
    f0, gain, q = 1681.974450955533, 3.999843853973347, 0.7071752369554196
    k = math.tan(math.pi * f0 / rate)
    vh = 10.0 ** (gain / 20.0)
    vb = vh ** 0.4996667741545416
    a0 = 1.0 + k / q + k * k
    shelf = [(vh + vb * k / q + k * k) / a0, 2.0 * (k * k - vh) / a0, (vh - vb * k / q + k * k) / a0,
             1.0, 2.0 * (k * k - 1.0) / a0, (1.0 - k / q + k * k) / a0]
    f0, q = 38.13547087602444, 0.5003270373238773
    k = math.tan(math.pi * f0 / rate)
    a0 = 1.0 + k / q + k * k
    highpass = [1.0, -2.0, 1.0, 1.0, 2.0 * (k * k - 1.0) / a0, (1.0 - k / q + k * k) / a0]
    return np.array([shelf, highpass])


def channel_weights(channels: int) -> np.ndarray:
    """BS.1770 weights in SMPTE order: 5.1 = L R C LFE Ls Rs, 7.1 adds the back pair; others all 1.0."""
    if channels == 6:
        return np.array([1.0, 1.0, 1.0, 0.0, 1.41, 1.41])
    if channels == 8:
        return np.array([1.0, 1.0, 1.0, 0.0, 1.41, 1.41, 1.41, 1.41])
    return np.ones(channels)


def oversampling(rate: float) -> int:
    return 4 if rate < 88200 else 2 if rate < 176400 else 1


def _interpolator(factor: int) -> np.ndarray:
    """A polyphase interpolation FIR, 12 taps a phase (the length of BS.1770-4 Annex 2's)."""
    taps = 12 * factor
    return signal.firwin(taps, 0.9 / factor, window=("kaiser", 6.0)) * factor


def lufs(energy: float) -> float:
    return -0.691 + 10.0 * math.log10(energy) if energy > 0 else -math.inf


def to_dbfs(linear: float) -> float:
    return 20.0 * math.log10(linear) if linear > 0 else -math.inf


def _as_float(chunk: np.ndarray) -> np.ndarray:
    """Float samples as they are (float32 stays float32, in any memory order); ints scaled to [-1, 1)."""
    a = np.asarray(chunk)
    if a.dtype.kind in "iu":
        info = np.iinfo(a.dtype)
        scale = float(max(-info.min, info.max + 1))
        return (a.astype(np.float64) - (0 if a.dtype.kind == "i" else scale / 2)) / (scale if a.dtype.kind == "i"
                                                                                     else scale / 2)
    return a if a.dtype in (np.float32, np.float64) else a.astype(np.float64)


@dataclass(frozen=True)
class Loudness:
    """One track's measurement; ``reason`` says why ``integrated_lufs`` is None."""
    integrated_lufs: float | None
    sample_peak: float
    true_peak: float
    seconds: float
    histogram: dict = field(repr=False)
    reason: str | None = None

    @property
    def track_gain_db(self) -> float | None:
        """ReplayGain 2.0 track gain: the dB that bring this track to -18 LUFS."""
        return None if self.integrated_lufs is None else REFERENCE_LUFS - self.integrated_lufs

    @property
    def true_peak_dbtp(self) -> float:
        return to_dbfs(self.true_peak)

    @property
    def sample_peak_dbfs(self) -> float:
        return to_dbfs(self.sample_peak)


@dataclass(frozen=True)
class AlbumLoudness:
    integrated_lufs: float | None
    peak: float  # the loudest of the tracks' peaks given (true peaks by default)
    reason: str | None = None

    @property
    def gain_db(self) -> float | None:
        return None if self.integrated_lufs is None else REFERENCE_LUFS - self.integrated_lufs


class LoudnessMeter:
    """Feed ``add((frames, channels) chunk)`` as often as wanted, then ``result()`` once."""

    def __init__(self, rate: int, channels: int, weights: np.ndarray | None = None):
        if rate <= 0 or channels <= 0:
            raise ValueError(f"need a positive rate and channel count, got {rate} Hz, {channels} channels")
        self.rate, self.channels = int(rate), int(channels)
        self.weights = channel_weights(channels) if weights is None else np.asarray(weights, dtype=float)
        if len(self.weights) != channels:
            raise ValueError("one weight per channel")
        self._supported = self.rate >= MIN_RATE  # the 1.7 kHz shelf needs room below Nyquist
        from .kernels import kweighted_energy  # numba: only a measuring process pays for importing it

        self._kweighted_energy = kweighted_energy
        self._sos = k_weighting_sos(max(rate, MIN_RATE))
        self._zi = np.zeros((self._sos.shape[0], 2, channels))
        self._pos = 0               # frames seen
        self._hops = 0              # complete 100 ms hops
        self._partial = 0.0         # weighted energy of the hop under way
        self._hop_energy: list[float] = []   # the last three complete hops' weighted energies
        self._hop_len: list[int] = []
        self._blocks = array("d")  # mean-square weighted energy of each 400 ms block
        self._sample_peak = 0.0
        self._factor = oversampling(rate)
        self._fir = _interpolator(self._factor) if self._factor > 1 else None
        self._hist_len = 0 if self._fir is None else len(self._fir) // self._factor - 1
        self._history = np.zeros((self._hist_len, channels))
        if self._fir is not None:  # _phases[k, p]: tap k of phase p (output p/factor after input n)
            self._phases = self._fir.reshape(-1, self._factor)
            self._gain = float(np.max(np.abs(self._phases).sum(axis=0)))  # the most one output can exceed its inputs
        self._history_ax = np.zeros(self._hist_len)
        self._true_peak = 0.0

    def _boundary(self, k: int) -> int:
        """Absolute frame index where hop ``k`` ends (hops are 100 ms, rounded down to a frame)."""
        return (k * self.rate) // 10

    def add(self, chunk: np.ndarray) -> None:
        x = _as_float(chunk)
        if x.ndim == 1:
            x = x[:, None]
        if x.ndim != 2 or x.shape[1] != self.channels:
            raise ValueError(f"chunk shape {x.shape} does not fit {self.channels} channels")
        if not len(x):
            return
        if not np.all(np.isfinite(x)):
            x = np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0)
        if not self._supported:
            self._sample_peak = max(self._sample_peak, float(np.abs(x).max()))
            self._pos += len(x)
            return
        e, ax = np.empty(len(x)), np.empty(len(x))  # per frame: weighted K-filtered energy, max |sample|
        self._kweighted_energy(x, self._sos, self._zi, self.weights, e, ax)
        self._sample_peak = max(self._sample_peak, float(ax.max()))
        self._peaks(x, ax)
        start, end = self._pos, self._pos + len(x)
        ends = []  # where in this chunk each 100 ms hop it completes ends
        while self._boundary(self._hops + len(ends) + 1) <= end:
            ends.append(self._boundary(self._hops + len(ends) + 1) - start)
        starts = [0, *ends] if not ends or ends[-1] < len(e) else [0, *ends[:-1]]
        for k, piece in enumerate(np.add.reduceat(e, starts)):  # one sum per piece: cheaper than a cumsum
            self._partial += float(piece)
            if k < len(ends):
                self._close_hop(self._boundary(self._hops + 1) - self._boundary(self._hops))
        self._pos = end

    def _close_hop(self, length: int) -> None:
        self._hop_energy.append(self._partial)
        self._hop_len.append(length)
        self._partial = 0.0
        self._hops += 1
        if len(self._hop_energy) == 4:
            self._blocks.append(sum(self._hop_energy) / sum(self._hop_len))
            del self._hop_energy[0], self._hop_len[0]

    def _peaks(self, x: np.ndarray, ax: np.ndarray) -> None:
        """True peak of ``x``: the interpolator runs only where it could beat the peak so far.

        An interpolated sample is a 12-tap sum, so it is at most ``sum |taps|`` times the largest
        of its 12 input samples; outputs whose inputs are all far below the running peak are skipped
        (on music nearly all of them), which is the same maximum as oversampling everything.
        """
        if self._fir is None:
            self._true_peak = self._sample_peak
            return
        taps = self._hist_len + 1
        ext = np.concatenate([self._history, x])
        ext_ax = np.concatenate([self._history_ax, ax])
        self._history = ext[len(ext) - self._hist_len:]
        self._history_ax = ext_ax[len(ext_ax) - self._hist_len:]
        bound = max(self._true_peak, float(ax.max()) if len(ax) else 0.0)
        # output n interpolates ext[n - hist_len .. n]: only outputs within reach of a loud input can beat it
        hits = np.flatnonzero(ext_ax > bound / self._gain)
        reach = np.zeros(len(ext) + taps, dtype=bool)
        for k in range(taps):
            reach[hits + k] = True
        cand = np.flatnonzero(reach[self._hist_len:len(ext)]) + self._hist_len
        best = bound
        for i in range(0, len(cand), 8192):
            n = cand[i:i + 8192]
            window = ext[n[:, None] - np.arange(taps)[None, :]]          # (m, taps, channels)
            y = np.tensordot(window, self._phases, axes=([1], [0]))  # (m, channels, phases); 4x einsum's speed
            best = max(best, float(np.max(np.abs(y))))
        self._true_peak = max(best, self._sample_peak)

    def result(self) -> Loudness:
        if self._fir is not None and self._pos:  # flush the interpolator's delay line
            tail, tail_ax = self._history.copy(), self._history_ax.copy()
            self._peaks(np.zeros((self._hist_len, self.channels)), np.zeros(self._hist_len))
            self._history, self._history_ax = tail, tail_ax
            self._true_peak = max(self._true_peak, self._sample_peak)
        z = np.array(self._blocks, dtype=np.float64)
        seconds = self._pos / self.rate
        if not self._supported:
            return Loudness(None, self._sample_peak, self._sample_peak, seconds, histogram(z),
                            f"not measurable: {self.rate} Hz is below the {MIN_RATE} Hz BS.1770 needs")
        hist = histogram(z)
        if len(z) == 0:
            return Loudness(None, self._sample_peak, self._true_peak, seconds, hist,
                            f"not measurable: {seconds:.3f} s is shorter than one 400 ms block")
        value = integrated(z)
        reason = None if value is not None else "not measurable: every block is below -70 LUFS (silence)"
        return Loudness(value, self._sample_peak, self._true_peak, seconds, hist, reason)


def integrated(z: np.ndarray) -> float | None:
    """Gated loudness of block energies ``z`` (BS.1770-4 eqs. 4-7); None when nothing passes."""
    z = np.asarray(z, dtype=np.float64)
    with np.errstate(divide="ignore"):
        level = -0.691 + 10.0 * np.log10(z)
    passed = z[level > ABSOLUTE_GATE]
    if not len(passed):
        return None
    gate = lufs(float(np.mean(passed))) + RELATIVE_GATE
    kept = z[(level > ABSOLUTE_GATE) & (level > gate)]
    return lufs(float(np.mean(kept))) if len(kept) else None


def histogram(z: np.ndarray) -> dict:
    """The album data of block energies ``z``: see the module docstring for the format."""
    z = np.asarray(z, dtype=np.float64)
    z = z[np.isfinite(z)]
    with np.errstate(divide="ignore"):
        level = -0.691 + 10.0 * np.log10(z)
    keep = level > ABSOLUTE_GATE
    idx = np.floor((level[keep] - ABSOLUTE_GATE) / HIST_STEP).astype(int)
    bins = []
    if len(idx):
        counts = np.bincount(idx)
        sums = np.bincount(idx, weights=z[keep])
        bins = [[int(i), int(counts[i]), float(f"{sums[i]:.9g}")] for i in np.nonzero(counts)[0]]
    return {"format": HIST_FORMAT, "floor": ABSOLUTE_GATE, "step": HIST_STEP, "bins": bins}


def album(tracks: list[Loudness] | list[dict], peaks: list[float] | None = None) -> AlbumLoudness:
    """Album loudness (and gain via ``.gain_db``) gating every track's blocks together.

    ``tracks`` are ``Loudness`` results or their stored ``histogram`` dicts; ``peaks`` are the
    tracks' linear peaks when dicts are given (default: the ``Loudness`` true peaks).
    """
    hists = [t.histogram if isinstance(t, Loudness) else t for t in tracks]
    if peaks is None:
        peaks = [t.true_peak for t in tracks if isinstance(t, Loudness)]
    peak = max(peaks, default=0.0)
    count, energy = {}, {}
    for h in hists:
        if h.get("format") != HIST_FORMAT:
            raise ValueError(f"unknown album data format {h.get('format')!r}")
        for i, c, s in h["bins"]:
            count[i] = count.get(i, 0) + c
            energy[i] = energy.get(i, 0.0) + s
    total = sum(count.values())
    if not total:
        return AlbumLoudness(None, peak, "not measurable: no track has a block above -70 LUFS")
    gate = lufs(sum(energy.values()) / total) + RELATIVE_GATE
    kept = [i for i in count if lufs(energy[i] / count[i]) > gate]
    n = sum(count[i] for i in kept)
    if not n:
        return AlbumLoudness(None, peak, "not measurable: nothing passes the relative gate")
    return AlbumLoudness(lufs(sum(energy[i] for i in kept) / n), peak)


def measure(samples: np.ndarray, rate: int, chunk_frames: int = 1 << 16) -> Loudness:
    """``LoudnessMeter`` over a whole array (frames, channels) or a mono vector, chunk by chunk."""
    x = np.asarray(samples)
    if x.ndim == 1:
        x = x[:, None]
    meter = LoudnessMeter(rate, x.shape[1])
    for i in range(0, len(x), chunk_frames):
        meter.add(x[i:i + chunk_frames])
    return meter.result()


def replaygain_tags(track: Loudness, album_result: AlbumLoudness | None = None) -> dict[str, str]:
    """The REPLAYGAIN_* tag values (ReplayGain 2.0 reference -18 LUFS; peaks are true peaks)."""
    tags = {}
    if track.track_gain_db is not None:
        tags["REPLAYGAIN_TRACK_GAIN"] = f"{track.track_gain_db:+.2f} dB"
        tags["REPLAYGAIN_TRACK_PEAK"] = f"{track.true_peak:.6f}"
    if album_result is not None and album_result.gain_db is not None:
        tags["REPLAYGAIN_ALBUM_GAIN"] = f"{album_result.gain_db:+.2f} dB"
        tags["REPLAYGAIN_ALBUM_PEAK"] = f"{album_result.peak:.6f}"
    if tags:
        tags["REPLAYGAIN_REFERENCE_LOUDNESS"] = f"{REFERENCE_LUFS:.2f} LUFS"
    return tags
