"""Tempo (BPM) with a confidence, from a mono signal at any sample rate, streaming.

``TempoTracker(rate)`` takes ``add(mono_chunk)`` and gives ``result()``, a ``Tempo``
(``bpm`` None with a ``reason`` when there is no steady beat); ``estimate(mono, rate)``
does it for one array.

Method (chosen by measurement on ``synth`` clips, see ``bench.features``):

1. Decimate to ~11 kHz (``frontend``); STFT with a 46 ms Hann window every ~5.8 ms
   (~172 frames a second), power in dB per bin (21.5 Hz bins from 30 Hz up).
2. Onset strength: spectral flux, the mean over bins of the positive dB rise over 11.6 ms,
   minus its 0.5 s moving average and half-wave rectified, so slow swells (pads, fades) leave
   nothing and only attacks remain. Per bin rather than per mel band (measured): a drum hit
   lifts the bins between a sustained chord's partials, where a mel band would be dominated
   by the chord and its partials' beating (drums under a loud saw-chord bed, measured before step 4's comb:
   82 % of clips octave-correct per bin against 73 % with 40 mel bands; pads' confidence halves).
3. Tempogram: autocorrelation of 8 s Hann-windowed stretches every 2 s, each normalised
   (lag 0 = 1) and divided by the window's own autocorrelation, averaged over the track.
4. Beat period: each candidate period (40-250 BPM, at an autocorrelation peak) is scored
   by the mean autocorrelation at its first ``COMB_K`` = 4 multiples (a beat repeats; a
   dotted or syncopated period does not), times a log-normal perceptual prior centred on
   120 BPM (one octave standard deviation, as in Ellis 2007 / librosa). Octave decision:
   the peak at half the winning period replaces it when it scores at least ``TIE_RATIO``
   = 0.9 as well (a pulse heard at both levels is felt at the quicker one). The period is
   then refined to a fraction of a frame from the peaks at 1x..4x (parabolic interpolation),
   so the BPM is within ~0.3 % even at 200 BPM. Measured (12 s clips at 22.05 kHz; exact /
   octave-tolerant): synthetic drum patterns 81 % / 100 %, ``workers.audio.synth`` music
   74 % / 97 %; the plain autocorrelation peak gave 78 % / 99 % and 32 % / 82 %, the comb
   without the octave rule 66 % / 100 % and 89 % / 97 %; 0.9 is the balance.
5. Confidence: the prominence of that peak over the tempogram's mean across the lag range
   (0 = no periodicity, near 1 = a metronome), times ``min(1, onset strength / ONSET_DB)``
   where the onset strength is the envelope's mean (dB a frame): a pad's slow chorus beating
   is periodic but weak (~0.03 dB a frame, drum patterns 0.2-1.3), so it does not count as a
   beat. Below ``MIN_CONFIDENCE`` the answer is None ("no steady beat"): on the synthetic
   clips pads and pink noise give 0.03-0.08, rubato up to 0.22, drum patterns 0.3-0.85.

Imports numpy and scipy only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .frontend import Decimator, Framer, to_mono

MIN_BPM, MAX_BPM = 40.0, 250.0
PRIOR_BPM, PRIOR_OCTAVES = 120.0, 1.0
MIN_CONFIDENCE = 0.25
COMB_K = 4
TIEBREAK = True
TIE_RATIO = 0.9
ONSET_DB = 0.15  # mean onset strength (dB a frame) below which the confidence is scaled down
MIN_SECONDS = 6.0
WINDOW_S, WINDOW_HOP_S = 8.0, 2.0


@dataclass(frozen=True)
class Tempo:
    bpm: float | None
    confidence: float
    reason: str | None = None


class TempoTracker:
    """Onset strength is computed as chunks arrive; only the envelope (~0.7 kB a second) is kept."""

    def __init__(self, rate: int):
        self._dec = Decimator(rate)
        self.rate = self._dec.rate
        self.n_fft = 1 << int(round(math.log2(0.046 * self.rate)))
        self.hop = max(1, int(round(self.rate / 172.27)))
        self.fps = self.rate / self.hop
        self._framer = Framer(self.n_fft, self.hop)
        self._window = np.hanning(self.n_fft).astype(np.float32)
        self._scale = 1.0 / (self._window.sum() / 2) ** 2
        self._lo = int(np.ceil(30.0 * self.n_fft / self.rate))  # every STFT bin from 30 Hz up
        self._lag = 2
        self._prev = np.zeros((0, self.n_fft // 2 + 1 - self._lo), dtype=np.float32)
        self._flux: list[np.ndarray] = []
        self._samples = 0

    def add(self, chunk: np.ndarray) -> None:
        self.add_decimated(self._dec.process(to_mono(chunk)))

    def add_decimated(self, x: np.ndarray) -> None:
        """Samples already mono at ``frontend.analysis_rate(rate)`` (one decimator can feed tempo and key)."""
        self._samples += len(x)
        frames = self._framer.frames(x)
        if not len(frames):
            return
        spec = np.abs(np.fft.rfft(frames * self._window, axis=1)) ** 2 * self._scale
        db = 10.0 * np.log10(np.maximum(spec[:, self._lo:], 1e-10))
        db = np.concatenate([self._prev, db.astype(np.float32)])
        if len(db) > self._lag:
            self._flux.append(np.maximum(0.0, db[self._lag:] - db[:-self._lag]).mean(axis=1))
        self._prev = db[-self._lag:]

    def envelope(self) -> np.ndarray:
        """The onset strength so far, detrended and rectified (one value per frame)."""
        flux = np.concatenate(self._flux) if self._flux else np.zeros(0)
        width = max(1, int(round(0.5 * self.fps)))
        if len(flux) <= width:
            return np.zeros(len(flux))
        trend = np.convolve(flux, np.ones(width) / width, mode="same")
        return np.maximum(0.0, flux - trend)

    def result(self) -> Tempo:
        seconds = self._samples / self.rate
        if self.rate < 4000:
            return Tempo(None, 0.0, f"sample rate {self.rate:.0f} Hz is too low for tempo")
        if seconds < MIN_SECONDS:
            return Tempo(None, 0.0, f"too short: {seconds:.1f} s, tempo needs {MIN_SECONDS:.0f} s")
        env = self.envelope()
        if not np.any(env > 0):
            return Tempo(None, 0.0, "no onsets (silence or a constant tone)")
        acf = tempogram(env, self.fps)
        return pick_tempo(acf, self.fps, strength=float(np.mean(env)))


def tempogram(env: np.ndarray, fps: float) -> np.ndarray:
    """The mean normalised autocorrelation of Hann-windowed stretches of ``env`` (lag 0..~2x max period)."""
    win = int(round(WINDOW_S * fps))
    hop = int(round(WINDOW_HOP_S * fps))
    max_lag = min(int(round(4 * 60.0 / MIN_BPM * fps)), win - 1)
    if len(env) < win:
        win = len(env)
        max_lag = min(max_lag, win - 1)
    w = np.hanning(win)
    nfft = 1 << int(math.ceil(math.log2(2 * win)))
    wacf = np.fft.irfft(np.abs(np.fft.rfft(w, nfft)) ** 2)[:max_lag]
    wacf = wacf / wacf[0]
    starts = range(0, len(env) - win + 1, hop)
    segs = np.stack([env[s:s + win] for s in starts])
    segs = (segs - segs.mean(axis=1, keepdims=True)) * w
    acf = np.fft.irfft(np.abs(np.fft.rfft(segs, nfft, axis=1)) ** 2, axis=1)[:, :max_lag]
    energy = acf[:, :1]
    good = energy[:, 0] > 1e-12
    if not np.any(good):
        return np.zeros(max_lag)
    acf = acf[good] / energy[good]
    return acf.mean(axis=0) / np.maximum(wacf, 0.05)


def _parabolic(a: np.ndarray, i: int) -> float:
    if 0 < i < len(a) - 1:
        den = a[i - 1] - 2 * a[i] + a[i + 1]
        if den < 0:
            return i + 0.5 * (a[i - 1] - a[i + 1]) / den
    return float(i)


def _local_peak(a: np.ndarray, center: float, radius: int) -> int:
    lo, hi = max(1, int(center) - radius), min(len(a) - 1, int(center) + radius + 2)
    return lo + int(np.argmax(a[lo:hi])) if hi > lo else int(center)


def _comb(acf: np.ndarray, lags: np.ndarray) -> np.ndarray:
    """For each period, the mean autocorrelation at its first ``COMB_K`` multiples (a beat repeats)."""
    total = np.zeros(len(lags))
    count = np.zeros(len(lags))
    for k in range(1, COMB_K + 1):
        idx = np.round(lags * k).astype(int)
        ok = idx < len(acf) - 1
        lo_i = np.clip(idx - (k > 1), 0, len(acf) - 1)
        hi_i = np.clip(idx + (k > 1), 0, len(acf) - 1)
        vals = np.maximum.reduce([acf[lo_i], acf[np.clip(idx, 0, len(acf) - 1)], acf[hi_i]])
        total += np.where(ok, np.maximum(vals, 0), 0.0)
        count += ok
    return total / np.maximum(count, 1)


def pick_tempo(acf: np.ndarray, fps: float, strength: float = ONSET_DB) -> Tempo:
    """The tempo of a tempogram; ``strength`` (the envelope's mean, dB a frame) scales the confidence."""
    lo = int(math.floor(60.0 * fps / MAX_BPM))
    hi = min(len(acf) - 2, int(math.ceil(60.0 * fps / MIN_BPM)))
    if hi <= lo + 2:
        return Tempo(None, 0.0, "too short for the tempo range")
    lags = np.arange(lo, hi + 1)
    a = acf[lo:hi + 1]
    bpm = 60.0 * fps / lags
    prior = np.exp(-0.5 * (np.log2(bpm / PRIOR_BPM) / PRIOR_OCTAVES) ** 2)
    is_peak = np.r_[False, (a[1:-1] > a[:-2]) & (a[1:-1] >= a[2:]), False]
    if not np.any(is_peak):
        return Tempo(None, 0.0, "no periodicity in the onsets")
    comb = _comb(acf, lags) if COMB_K > 1 else np.maximum(a, 0)
    score = np.where(is_peak, comb * prior, -np.inf)
    best = int(np.argmax(score))
    # Octave tie-break: a peak at half the period almost as strong as this one is the felt beat.
    half = _local_peak(acf, lags[best] / 2.0, 2)
    if TIEBREAK and half >= lo and acf[half] > acf[half - 1] and acf[half] >= acf[half + 1] \
            and comb[half - lo] >= TIE_RATIO * comb[best]:
        best = half - lo
    period = float(lags[best])
    confidence = float(np.clip(a[best] - np.mean(a), 0.0, 1.0)) * min(1.0, strength / ONSET_DB)
    if confidence < MIN_CONFIDENCE:
        return Tempo(None, round(confidence, 3), f"no steady beat (confidence {confidence:.2f} < {MIN_CONFIDENCE})")
    estimates, weights = [], []
    for k in range(1, 5):
        if k * period >= len(acf) - 2:
            break
        i = _local_peak(acf, k * period, max(2, int(0.03 * k * period)))
        if acf[i] <= 0:
            continue
        estimates.append(_parabolic(acf, i) / k)
        weights.append(acf[i] * k)
    period = float(np.average(estimates, weights=weights)) if estimates else period
    return Tempo(round(60.0 * fps / period, 2), round(confidence, 3))


def estimate(mono: np.ndarray, rate: int, chunk: int = 1 << 16) -> Tempo:
    """``TempoTracker`` over one array (mono, or (frames, channels), averaged to mono)."""
    tracker = TempoTracker(rate)
    for i in range(0, len(mono), chunk):
        tracker.add(mono[i:i + chunk])
    return tracker.result()
