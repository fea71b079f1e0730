"""The shared front end of tempo and key: a streaming integer decimator and a streaming framer.

Tempo and key need neither the full band nor the native rate, so a mono signal is low-passed
and decimated by an integer ``factor`` (``analysis_rate(rate)``: the rate nearest 11025 Hz that
divides evenly, e.g. 44.1 kHz -> 11025, 48 kHz -> 12000, 192 kHz -> 12000, 16 kHz kept), with
a polyphase FIR that keeps its history between chunks, so chunked and whole-array input give
the same samples. Imports numpy and scipy only.
"""
from __future__ import annotations

import numpy as np
from scipy import signal

TARGET_RATE = 11025


def decimation(rate: int) -> int:
    return max(1, int(round(rate / TARGET_RATE)))


def analysis_rate(rate: int) -> float:
    return rate / decimation(rate)


def to_mono(chunk: np.ndarray) -> np.ndarray:
    a = np.asarray(chunk)
    if a.dtype.kind in "iu":
        a = a.astype(np.float64) / float(np.iinfo(a.dtype).max)
    if a.ndim == 2:
        a = a.mean(axis=1)
    a = a.astype(np.float32, copy=False)
    if not np.all(np.isfinite(a)):
        a = np.nan_to_num(a, nan=0.0, posinf=1.0, neginf=-1.0)
    return a


class Decimator:
    """``process(mono_chunk) -> decimated samples`` for as many chunks as wanted."""

    def __init__(self, rate: int):
        self.factor = decimation(rate)
        self.rate = rate / self.factor
        if self.factor > 1:
            self._fir = signal.firwin(16 * self.factor + 1, 0.8 / self.factor).astype(np.float32)
            self._hist = int(np.ceil((len(self._fir) - 1) / self.factor)) * self.factor
            self._buf = np.zeros(self._hist, dtype=np.float32)

    def process(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if self.factor == 1:
            return x
        buf = np.concatenate([self._buf, x])
        usable = (len(buf) - self._hist) // self.factor * self.factor
        if usable <= 0:
            self._buf = buf
            return np.zeros(0, dtype=np.float32)
        seg = buf[: self._hist + usable]
        y = signal.upfirdn(self._fir, seg, down=self.factor)
        first = self._hist // self.factor
        out = y[first: first + usable // self.factor]
        self._buf = buf[usable:]
        return out.astype(np.float32, copy=False)


class Framer:
    """Cuts a stream into overlapping frames (``size`` samples every ``hop``), chunk by chunk."""

    def __init__(self, size: int, hop: int):
        self.size, self.hop = size, hop
        self._buf = np.zeros(0, dtype=np.float32)

    def frames(self, x: np.ndarray) -> np.ndarray:
        buf = np.concatenate([self._buf, np.asarray(x, dtype=np.float32)])
        if len(buf) < self.size:
            self._buf = buf
            return np.zeros((0, self.size), dtype=np.float32)
        n = (len(buf) - self.size) // self.hop + 1
        out = np.lib.stride_tricks.sliding_window_view(buf, self.size)[:: self.hop][:n].copy()
        self._buf = buf[n * self.hop:]
        return out
