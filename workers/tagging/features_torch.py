"""Tempo, key and loudness of a batch of files in torch, on the networks' device (issue #16's GPU path).

On a GPU tagger the decode workers are the bottleneck, and the features (``workers.features``,
numpy and scipy) were most of their work beyond decoding. Here the decode worker only keeps the
native-rate stream (``NativeCapture``: 2 bytes a sample, ``NATIVE_CAP`` values at most, beyond
which it measures on its CPU as before), and the tagger process measures a whole batch in torch next to
the networks (``measure_batch``). Only the per-sample work moves; every decision stays in
``workers.features``, so nothing is written twice:

* **Loudness**: the K-weighting biquads as their impulse response (``IR_SECONDS`` long, where
  the 38 Hz high-pass has decayed below 1e-9: a causal FIR equal to the IIR to float32
  rounding) applied by FFT overlap-save, the channel-weighted energy, and the 400 ms blocks from
  its float64 running sum at the meter's own hop boundaries; true peak by the meter's polyphase
  interpolator, only where it could beat the sample peak (as the meter does). Gating, the
  histogram and the reasons are the meter's (``LoudnessMeter.result``).
* **Tempo**: the decimator's FIR as a strided ``conv1d``, the STFT and the tilted / plain onset
  flux; the tempogram and the choice of tempo are the tracker's (``TempoTracker.result``).
* **Key**: the STFT, the spectral peaks and their folding into the 120-bin pitch-class histogram;
  tuning, chroma and the profile match are the detector's (``KeyDetector.result``).

Files are grouped by (rate, channels) and zero-padded to the longest of their sub-batch; each
file's results are cut at its own length (every filter here is causal, so padding after a file
changes none of its values). The parameters (filters, windows, weights, bands) are read from a
``FeatureAnalyzer`` built for each file, and its meters are handed the torch results
(``_hand_over``), so ``Features`` come out exactly as ``StreamMeasure`` makes them. Device-
agnostic: the tests run it on CPU torch, where it gives the numpy path's answers.
"""
from __future__ import annotations

import math
import time
from array import array
from dataclasses import dataclass
from itertools import groupby

import numpy as np
import torch
import torch.nn.functional as F
from scipy import signal

from workers.features import extract
from workers.features import key as key_mod

NATIVE_CAP = 1 << 26     # values (frames x channels) a decode worker ships: 12.7 min of 44.1 kHz stereo, 128 MB
FULL_SCALE = 32767       # int16 steps per frame peak
BATCH_VALUES = 1 << 26   # values measured in one go on the device (each file fits: NATIVE_CAP)
IR_SECONDS = 0.1         # K-weighting impulse response kept; its tail there is ~1e-10 of the first tap
PEAK_SLAB = 1 << 20      # true-peak outputs gathered in one go (12 taps each: 48 MB)


@dataclass
class Native:
    """One file's decoded native-rate stream as a decode worker ships it (picklable).

    A decode worker ships block floating point: int16 ``planes`` and, per decoder frame (``runs``
    samples each), the ``scales`` that bring them back. Two bytes a sample, as float16, but the
    error is ~96 dB below each frame's peak where float16's is ~66 dB below each sample (on 50
    synthetic clips float16 moved two keys across the "no tonal centre" threshold, this none),
    and overs above full scale keep their value. Tests hand float ``planes`` with no scales."""

    planes: np.ndarray                  # (channels, frames): int16 with ``scales``, else float
    rate: int
    scales: np.ndarray | None = None    # float32, one per run
    runs: np.ndarray | None = None      # int64 lengths of the runs, summing to ``frames``

    @property
    def frames(self) -> int:
        return self.planes.shape[1]

    def tensor(self, device: str) -> torch.Tensor:
        """The samples as float32 (channels, frames) on ``device``."""
        x = torch.from_numpy(self.planes).to(device).float()
        if self.scales is not None:
            scales, runs = (torch.from_numpy(a).to(device) for a in (self.scales, self.runs))
            x *= torch.repeat_interleave(scales, runs)
        return x


def _quantize(planes: list[np.ndarray]) -> tuple[np.ndarray, float]:
    """One decoder frame as int16 planes and their scale; NaN and infinities cleaned as the meters clean them."""
    x = np.array(planes, dtype=np.float32)
    if not np.all(np.isfinite(x)):
        x = np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0)
    scale = float(np.max(np.abs(x), initial=0.0)) / FULL_SCALE or 1.0
    return np.rint(x / scale).astype(np.int16), scale


class NativeCapture:
    """A decoder's native sink that keeps the stream for the device, or measures it on the CPU as before.

    It falls back to ``StreamMeasure`` (replaying what it kept) when the stream would pass
    ``cap`` values or changes rate or channels mid-way, so a decode worker never holds more than
    ``cap`` values however long the file; ``result`` then is that measurement, and ``native()``
    None. Same interface as ``StreamMeasure`` (``__call__``, ``seconds``, ``result``).
    """

    def __init__(self, cap: int = NATIVE_CAP):
        self.cap, self.parts, self.scales, self.values = cap, [], [], 0
        self.format: tuple[int, int] | None = None
        self.fallback: extract.StreamMeasure | None = None
        self._seconds = 0.0

    @property
    def seconds(self) -> float:
        """Time spent here, the fallback's measuring included (the tagger's "features" timing)."""
        return self._seconds + (self.fallback.seconds if self.fallback is not None else 0.0)

    def __call__(self, planes: list[np.ndarray], rate: int) -> None:
        """One decoded frame: a float32 array per channel (``workers.audio.frames.native_planes``)."""
        if self.fallback is None:
            started = time.perf_counter()
            try:
                kept = self._keep(planes, rate)
            except Exception:  # noqa: BLE001 - never break the decode: the CPU measurement gives the reason
                kept = False
            if not kept:
                self._fall_back()
            self._seconds += time.perf_counter() - started
            if kept:
                return
        self.fallback(planes, rate)

    def _keep(self, planes: list[np.ndarray], rate: int) -> bool:
        """Keep one frame; False when it does not fit (the cap, or another rate or channel count)."""
        here, size = (int(rate), len(planes)), len(planes) * len(planes[0])
        self.format = self.format or here
        if here != self.format or self.values + size > self.cap:
            return False
        part, scale = _quantize(planes)
        self.parts.append(part)
        self.scales.append(scale)
        self.values += size
        return True

    def _fall_back(self) -> None:
        """Measure on the CPU from here on, starting with what was kept (then dropped)."""
        self.fallback = extract.StreamMeasure()
        for part, scale in zip(self.parts, self.scales):
            self.fallback(list(part * np.float32(scale)), self.format[0])
        self.parts, self.scales, self.values = [], [], 0

    def result(self, complete: bool = True) -> dict:
        """The CPU measurement's JSON when there is one to give (or a reason); ``{}`` when the device measures."""
        if self.fallback is not None or not complete or not self.values:
            return (self.fallback or extract.StreamMeasure()).result(complete)
        return {}

    def native(self) -> Native | None:
        """The kept stream for ``measure_batch``; None when the CPU measured it (or nothing was decoded)."""
        if self.fallback is not None or not self.values:
            return None
        runs = np.array([p.shape[1] for p in self.parts], dtype=np.int64)
        return Native(np.concatenate(self.parts, axis=1), self.format[0], np.array(self.scales, np.float32), runs)


def measure_batch(natives: list[Native], device: str = "cpu") -> list[dict]:
    """``Features.to_json()`` of each file, measured in torch on ``device`` in as few passes as fit."""
    out: list[dict | None] = [None] * len(natives)
    order = sorted(range(len(natives)), key=lambda i: (natives[i].rate, *natives[i].planes.shape))
    for _, group in groupby(order, key=lambda i: (natives[i].rate, len(natives[i].planes))):
        for part in _sub_batches(list(group), natives):
            for i, features in zip(part, _measure_group([natives[i] for i in part], device)):
                out[i] = features
    return out


def _sub_batches(indices: list[int], natives: list[Native]) -> list[list[int]]:
    """Consecutive runs (shortest first) whose padded size stays within ``BATCH_VALUES``: bounded device memory."""
    runs, run = [], []
    for i in indices:
        if run and (len(run) + 1) * natives[i].planes.size > BATCH_VALUES:
            runs.append(run)
            run = []
        run.append(i)
    return runs + [run] if run else runs


def _measure_group(natives: list[Native], device: str) -> list[dict]:
    """Files of one rate and channel count: the torch passes, then each file's meters finish as on the CPU."""
    rate, channels = natives[0].rate, len(natives[0].planes)
    analyzers = [extract.FeatureAnalyzer(rate, channels, tonal_seconds=extract.TONAL_SECONDS) for _ in natives]
    lengths = [n.frames for n in natives]
    with torch.inference_mode():
        x = _stack(natives, device)
        loudness = _loudness(x, lengths, analyzers[0]._loudness)
        tonal = [min(n, analyzers[0]._tonal_left) for n in lengths]
        low, low_lengths = _decimate(x[:, :, :max(tonal)].mean(dim=1), tonal, analyzers[0]._decimator)
        del x
        flux = _onset_flux(low, low_lengths, analyzers[0]._tempo)
        pitch = _pitch_histograms(low, low_lengths, analyzers[0]._key)
    return [_hand_over(a, lo, fl, pi, n).result().to_json()
            for a, lo, fl, pi, n in zip(analyzers, loudness, flux, pitch, low_lengths)]


def _on_cpu(native: Native) -> dict:
    """The decode worker's own measurement, here: the fallback when the device pass fails."""
    measure = extract.StreamMeasure()
    measure(list(native.tensor("cpu").numpy()), native.rate)
    return measure.result()


def _stack(natives: list[Native], device: str) -> torch.Tensor:
    """The files' samples as one zero-padded float32 (files, channels, frames) tensor."""
    width = max(n.frames for n in natives)
    x = torch.zeros((len(natives), len(natives[0].planes), width), dtype=torch.float32, device=device)
    for i, n in enumerate(natives):
        x[i, :, :n.frames] = n.tensor(device)
    return x.nan_to_num_(nan=0.0, posinf=1.0, neginf=-1.0)  # as the meters clean their input


# -- loudness ---------------------------------------------------------------------------------

@dataclass
class _Loud:
    frames: int
    blocks: np.ndarray   # mean-square weighted energy of each 400 ms block
    sample_peak: float
    true_peak: float


def _loudness(x: torch.Tensor, lengths: list[int], meter) -> list[_Loud]:
    """Block energies and peaks of each file (the meter gives rate, weights, filters and hop boundaries)."""
    sample = x.abs().amax(dim=(1, 2)).double().cpu().numpy()
    if not meter._supported:
        return [_Loud(n, np.zeros(0), float(s), float(s)) for n, s in zip(lengths, sample)]
    true = sample if meter._fir is None else _true_peaks(x, meter._phases, meter._gain, sample)
    y = _causal_fir(x, torch.from_numpy(_impulse_response(meter._sos, meter.rate)).to(x))
    energy = torch.einsum("fct,c->ft", y * y, torch.from_numpy(meter.weights).to(x))
    running = F.pad(torch.cumsum(energy.double(), dim=1), (1, 0))
    out = []
    for i, n in enumerate(lengths):
        bounds = meter._boundary(np.arange(10 * n // meter.rate + 2))
        bounds = torch.from_numpy(bounds[bounds <= n]).to(x.device)
        sums = running[i, bounds]
        blocks = (sums[4:] - sums[:-4]) / (bounds[4:] - bounds[:-4])
        out.append(_Loud(n, blocks.cpu().numpy(), float(sample[i]), float(true[i])))
    return out


def _impulse_response(sos: np.ndarray, rate: int) -> np.ndarray:
    """The K-weighting biquads' impulse response, long enough that the rest is below float32's reach."""
    impulse = np.zeros(max(16, int(IR_SECONDS * rate)))
    impulse[0] = 1.0
    return signal.sosfilt(sos, impulse).astype(np.float32)


def _causal_fir(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``y[n] = sum_k h[k] x[n-k]`` along the last axis by FFT overlap-save: an IIR's work as a few big FFTs."""
    taps, frames = len(h), x.shape[-1]
    size = 1 << max(15, math.ceil(math.log2(4 * taps)))
    hop = size - taps + 1
    blocks = max(1, math.ceil(frames / hop))
    padded = F.pad(x, (taps - 1, blocks * hop - frames))
    pieces = padded.unfold(-1, size, hop)                           # (..., blocks, size), a view
    spectrum = torch.fft.rfft(pieces, n=size) * torch.fft.rfft(h, n=size)
    y = torch.fft.irfft(spectrum, n=size)[..., taps - 1:]           # the valid part of each block
    return y.reshape(*x.shape[:-1], -1)[..., :frames]


def _true_peaks(x: torch.Tensor, phases: np.ndarray, gain: float, floor: np.ndarray) -> np.ndarray:
    """Per file, the largest |output| of the meter's polyphase interpolator, or ``floor`` (its sample peak).

    As in the meter, only outputs that could beat ``floor`` are computed: an output is a 12-tap
    sum, at most ``gain`` times its largest input, so only those within reach of an input above
    ``floor / gain`` are gathered (on music a small fraction; a full ``conv1d`` measured 5x the
    numpy path's time on the CPU). ``phases[k, p]`` is tap k of phase p; the zeros padded after a
    file play the meter's flush of its delay line."""
    taps = phases.shape[0]
    files, channels, frames = x.shape
    rows = F.pad(x.reshape(files * channels, frames), (taps - 1, taps - 1))
    floor_rows = torch.from_numpy(np.repeat(floor, channels)).to(x)
    hits = (rows.abs() > floor_rows[:, None] / gain).to(x.dtype)
    reach = F.max_pool1d(F.pad(hits, (taps - 1, 0))[:, None], taps, stride=1)[:, 0] > 0  # a hit in n-11..n
    reach[:, :taps - 1] = False  # outputs whose window starts before the padding
    row, n = torch.nonzero(reach, as_tuple=True)
    weight = torch.from_numpy(phases).to(x)
    back = torch.arange(taps, device=x.device)
    best = floor_rows.clone()
    for start in range(0, len(n), PEAK_SLAB):
        r, at = row[start:start + PEAK_SLAB], n[start:start + PEAK_SLAB]
        y = (rows[r[:, None], at[:, None] - back] @ weight).abs().amax(dim=1)  # window[m, k] = ext[n - k]
        best.scatter_reduce_(0, r, y, reduce="amax")
    return best.reshape(files, channels).amax(dim=1).double().cpu().numpy()


# -- the tonal front end: decimation, tempo's onset flux, key's pitch histogram ------------------

def _decimate(mono: torch.Tensor, lengths: list[int], decimator) -> tuple[torch.Tensor, list[int]]:
    """The decimator's output: ``out[j] = sum_k fir[k] mono[j*factor - k]``, ``len // factor`` of them a file."""
    factor = decimator.factor
    if factor == 1:
        return mono, lengths
    fir = torch.from_numpy(decimator._fir[::-1].copy()).to(mono)
    low = F.conv1d(F.pad(mono[:, None, :], (len(fir) - 1, 0)), fir[None, None, :], stride=factor)[:, 0]
    return low, [n // factor for n in lengths]


def _frames(x: torch.Tensor, size: int, hop: int) -> torch.Tensor:
    """The framer's frames (``size`` every ``hop``), of the longest file; shorter files mask theirs."""
    if x.shape[-1] < size:
        return x.new_zeros((x.shape[0], 0, size))
    return x.unfold(-1, size, hop)


def _frame_counts(lengths: list[int], size: int, hop: int) -> list[int]:
    return [(n - size) // hop + 1 if n >= size else 0 for n in lengths]


def _onset_flux(low: torch.Tensor, lengths: list[int], tracker) -> list[np.ndarray]:
    """Per file, the tracker's (frames, 2) flux: tilted and plain mean of each bin's dB rise over two frames."""
    frames = _frames(low, tracker.n_fft, tracker.hop)
    window = torch.from_numpy(tracker._window).to(low)
    power = torch.fft.rfft(frames * window).abs().square() * tracker._scale
    db = 10.0 * torch.log10(torch.clamp(power[..., tracker._lo:], min=1e-10))
    lag = tracker._lag
    flux = torch.relu(db[:, lag:] - db[:, :-lag]) @ torch.from_numpy(tracker._weights).to(low)
    counts = _frame_counts(lengths, tracker.n_fft, tracker.hop)
    return [flux[i, :max(0, c - lag)].double().cpu().numpy() for i, c in enumerate(counts)]


@dataclass
class _Pitch:
    hist: np.ndarray     # the detector's 120-bin pitch-class histogram
    dev: complex         # magnitude-weighted sum of exp(2 pi i pitch), for the tuning
    frames: int
    tonal_frames: int


def _pitch_histograms(low: torch.Tensor, lengths: list[int], detector) -> list[_Pitch]:
    """Per file, what the detector accumulates: peaks in its band, parabolically refined, folded into pitch classes."""
    counts = _frame_counts(lengths, detector.n_fft, detector.n_fft // 2)
    files, bins = len(lengths), 12 * key_mod.FINE
    band = detector._band
    if len(band) < 3 or band[0] < 1 or not max(counts):
        return [_Pitch(np.zeros(bins), 0j, c, 0) for c in counts]
    frames = _frames(low, detector.n_fft, detector.n_fft // 2)
    mag = torch.fft.rfft(frames * torch.from_numpy(detector._window).to(low)).abs() * detector._scale
    lo, hi = int(band[0]), int(band[-1])
    m = mag[..., lo - 1:hi + 2]
    c = m[..., 1:-1]
    valid = torch.arange(frames.shape[1], device=low.device)[None, :] < torch.tensor(counts, device=low.device)[:, None]
    peak = ((c > m[..., :-2]) & (c >= m[..., 2:]) & (c > 1e-3 * c.amax(dim=-1, keepdim=True)) & (c > 1e-5)
            & valid[..., None])
    f_idx, t_idx, b_idx = torch.nonzero(peak, as_tuple=True)
    la, lb, lc = (torch.log(m[f_idx, t_idx, b_idx + k].double() + 1e-12) for k in range(3))
    den = la - 2 * lb + lc
    shift = torch.where(den < 0, 0.5 * (la - lc) / torch.where(den < 0, den, -torch.ones_like(den)),
                        torch.zeros_like(den))
    freq = (lo + b_idx + shift) * detector.rate / detector.n_fft
    ok = (freq >= key_mod.FMIN) & (freq <= key_mod.FMAX)
    f_idx, t_idx, freq = f_idx[ok], t_idx[ok], freq[ok]
    amp = c[f_idx, t_idx, b_idx[ok]].double()
    pitch = 12.0 * torch.log2(freq / 440.0) + 69.0
    phase = 2 * math.pi * pitch
    dev_re = _per_file(f_idx, amp * torch.cos(phase), files)
    dev_im = _per_file(f_idx, amp * torch.sin(phase), files)
    frame_id = f_idx * frames.shape[1] + t_idx
    total = _per_file(frame_id, amp, files * frames.shape[1])
    tonal = (total.reshape(files, -1) > 0).sum(dim=1)
    fine = torch.remainder(torch.floor(torch.remainder(pitch, 12.0) * key_mod.FINE + 0.5).long(), bins)
    hist = _per_file(f_idx * bins + fine, amp / total[frame_id], files * bins).reshape(files, bins)
    hist, dev_re, dev_im, tonal = (t.cpu().numpy() for t in (hist, dev_re, dev_im, tonal))
    return [_Pitch(hist[i], complex(dev_re[i], dev_im[i]), counts[i], int(tonal[i])) for i in range(files)]


def _per_file(index: torch.Tensor, values: torch.Tensor, size: int) -> torch.Tensor:
    """Sums of ``values`` by ``index`` (a bincount with weights) in float64."""
    return torch.zeros(size, dtype=torch.float64, device=values.device).index_add_(0, index, values.double())


# -- handing the torch results to the numpy meters ------------------------------------------------

def _hand_over(analyzer: extract.FeatureAnalyzer, loud: _Loud, flux: np.ndarray, pitch: _Pitch,
               decimated: int) -> extract.FeatureAnalyzer:
    """Put the torch results where ``FeatureAnalyzer``'s meters keep their streaming state.

    Their ``result()`` then does what it does after ``add``: gating, histogram and reasons;
    tempogram and tempo choice; tuning, chroma and key match. These are the meters' private
    fields (``LoudnessMeter._blocks`` ..., ``TempoTracker._flux``, ``KeyDetector._hist`` ...);
    the parity tests (tests/tagging/test_features_torch.py) fail if they change meaning.
    """
    meter, tracker, detector = analyzer._loudness, analyzer._tempo, analyzer._key
    meter._pos, meter._blocks = loud.frames, array("d", loud.blocks.tolist())
    meter._sample_peak, meter._true_peak = loud.sample_peak, loud.true_peak
    tracker._flux, tracker._samples = [flux], decimated
    detector._hist, detector._dev = pitch.hist.astype(np.float64), pitch.dev
    detector._frames, detector._tonal_frames, detector._samples = pitch.frames, pitch.tonal_frames, decimated
    return analyzer


def measure_prepared(prepared: list, device: str) -> None:
    """Measure, in one batch, the files whose decode worker shipped native samples (``Prepared.native``).

    Should the device pass fail, they are measured on this CPU as a decode worker would. Each
    gets its ``features`` and its share of the time (by samples) in ``timings["features"]``; the
    samples are dropped once measured."""
    files = [p for p in prepared if getattr(p, "native", None) is not None]
    if not files:
        return
    started = time.perf_counter()
    try:
        results = measure_batch([p.native for p in files], device)
    except Exception:  # noqa: BLE001 - the device failing (memory, a driver) must not lose the features
        results = [_on_cpu(p.native) for p in files]
    per_value = (time.perf_counter() - started) / max(1, sum(p.native.planes.size for p in files))
    for p, features in zip(files, results):
        p.timings["features"] = p.timings.get("features", 0.0) + per_value * p.native.planes.size
        p.features, p.native = features, None
