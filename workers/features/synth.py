"""Synthetic clips with a known answer, for the feature tests and ``bench.features``.

* ``drums(bpm, timbre, swing)``: a drum pattern at a known tempo. Timbres: ``"kit"``
  (kick on 1 and 3, snare on 2 and 4, hats on eighths), ``"rock"`` (syncopated kick),
  ``"clicks"`` (a metronome, accented downbeat), ``"kick"`` (bass drum only, every beat).
  ``swing`` is where the off-beat eighth falls inside the beat (0.5 straight, 0.67 triplet).
* ``tonal(tonic, mode, kind, timbre)``: a chord progression (``kind="chords"``) or a melody
  over a root bass line (``kind="melody"``) in a known key; timbres ``"sine"`` (a few soft
  partials) and ``"saw"`` (1/k partials, sawtooth-ish).
* ``pad`` (slow-attack sustained chords), ``pink_noise`` and ``rubato`` (notes at
  irregular, drifting intervals): clips with no steady beat.

Every clip comes from ``numpy.random.default_rng(seed)``: the same arguments give the same
samples. Mono float32 in [-1, 1]. Imports only numpy.
"""
from __future__ import annotations

import numpy as np

MAJOR_PROGRESSIONS = ((0, 5, 7, 0), (0, 9, 5, 7, 0), (0, 7, 9, 5, 0))   # I-IV-V-I, I-vi-IV-V-I, I-V-vi-IV-I
MINOR_PROGRESSIONS = ((0, 5, 7, 0), (0, 8, 5, 7, 0), (0, 3, 10, 7, 0))  # i-iv-V-i, i-VI-iv-V-i, i-III-VII-V-i
MAJOR_SCALE = (0, 2, 4, 5, 7, 9, 11)
MINOR_SCALE = (0, 2, 3, 5, 7, 8, 11)  # harmonic minor: the raised leading tone marks the key
DRUM_TIMBRES = ("kit", "rock", "clicks", "kick")
TONAL_TIMBRES = ("sine", "saw")


def _env(n: int, rate: int, attack: float, decay: float) -> np.ndarray:
    t = np.arange(n) / rate
    return np.minimum(1.0, t / max(attack, 1e-4)) * np.exp(-t / decay)


def _kick(rate, rng):
    n = int(0.35 * rate)
    t = np.arange(n) / rate
    freq = 50 + 110 * np.exp(-t / 0.03)
    return np.sin(2 * np.pi * np.cumsum(freq) / rate) * _env(n, rate, 0.002, 0.12)


def _snare(rate, rng):
    n = int(0.25 * rate)
    t = np.arange(n) / rate
    noise = rng.standard_normal(n)
    noise = noise - np.concatenate([[0.0], noise[:-1]]) * 0.7
    return (0.6 * noise * _env(n, rate, 0.001, 0.06) + 0.5 * np.sin(2 * np.pi * 190 * t) * _env(n, rate, 0.001, 0.05))


def _hat(rate, rng):
    n = int(0.08 * rate)
    noise = rng.standard_normal(n)
    hp = np.diff(noise, prepend=0.0)
    hp = np.diff(hp, prepend=0.0)
    return 0.25 * hp * _env(n, rate, 0.0005, 0.015)


def _click(rate, rng, accent=False):
    n = int(0.02 * rate)
    t = np.arange(n) / rate
    return (1.0 if accent else 0.6) * np.sin(2 * np.pi * (1500 if accent else 1000) * t) * _env(n, rate, 0.0002, 0.004)


def _place(out: np.ndarray, sound: np.ndarray, at: float, rate: int, gain: float = 1.0) -> None:
    i = int(round(at * rate))
    if i < 0 or i >= len(out):
        return
    j = min(len(out), i + len(sound))
    out[i:j] += gain * sound[: j - i]


def _normalize(x: np.ndarray, level: float = 0.5) -> np.ndarray:
    peak = float(np.max(np.abs(x))) if len(x) else 0.0
    return (x * (level / peak) if peak > 0 else x).astype(np.float32)


def drums(bpm: float, timbre: str = "kit", swing: float = 0.5, seconds: float = 20.0, rate: int = 22050,
          seed: int = 0, jitter_ms: float = 4.0) -> np.ndarray:
    """A drum pattern at ``bpm`` (quarter-note beats), with a little human timing jitter."""
    if timbre not in DRUM_TIMBRES:
        raise ValueError(f"unknown drum timbre {timbre!r}; one of {DRUM_TIMBRES}")
    rng = np.random.default_rng(seed)
    out = np.zeros(int(seconds * rate))
    beat = 60.0 / bpm
    kick, snare, hat = _kick(rate, rng), _snare(rate, rng), _hat(rate, rng)
    accent, click = _click(rate, rng, True), _click(rate, rng)
    start = rng.uniform(0.0, beat)
    n_beats = int((seconds - start) / beat) + 1
    for b in range(n_beats):
        t0 = start + b * beat
        jit = lambda: rng.normal(0.0, jitter_ms / 1000.0)  # noqa: E731 (one draw per hit)
        vel = lambda: rng.uniform(0.8, 1.0)  # noqa: E731
        pos = b % 4
        if timbre == "clicks":
            _place(out, accent if pos == 0 else click, t0 + jit(), rate, vel())
            continue
        if timbre == "kick":
            _place(out, kick, t0 + jit(), rate, vel())
            continue
        if timbre == "kit":
            if pos in (0, 2):
                _place(out, kick, t0 + jit(), rate, vel())
        else:  # rock: kick on 1, the and of 2, 3
            if pos in (0, 2):
                _place(out, kick, t0 + jit(), rate, vel())
            if pos == 1:
                _place(out, kick, t0 + swing * beat + jit(), rate, 0.8 * vel())
        if pos in (1, 3):
            _place(out, snare, t0 + jit(), rate, vel())
        _place(out, hat, t0 + jit(), rate, vel())
        _place(out, hat, t0 + swing * beat + jit(), rate, 0.7 * vel())
    return _normalize(out)


def _tone(freq: float, n: int, rate: int, timbre: str, phase_rng) -> np.ndarray:
    t = np.arange(n) / rate
    if timbre == "sine":
        partials = [(1, 1.0), (2, 0.35), (3, 0.12)]
    elif timbre == "saw":
        partials = [(k, 1.0 / k) for k in range(1, 11)]
    else:
        raise ValueError(f"unknown tonal timbre {timbre!r}; one of {TONAL_TIMBRES}")
    out = np.zeros(n)
    for k, a in partials:
        if k * freq < rate / 2 - 200:
            out += a * np.sin(2 * np.pi * k * freq * t + phase_rng.uniform(0, 2 * np.pi))
    return out


def _midi_hz(m: float) -> float:
    return 440.0 * 2.0 ** ((m - 69) / 12.0)


def _note(out, midi, at, dur, rate, timbre, rng, gain=1.0, attack=0.01, release=0.08):
    n = int(dur * rate)
    if n <= 0:
        return
    env = np.minimum(1.0, np.arange(n) / (attack * rate + 1)) * np.exp(-np.arange(n) / (rate * max(dur, 0.3)))
    tail = min(n, int(release * rate))
    env[n - tail:] *= np.linspace(1.0, 0.0, tail)
    _place(out, _tone(_midi_hz(midi), n, rate, timbre, rng) * env, at, rate, gain)


def _triad(root_pc: int, mode: str, tonic: int, degree: int) -> list[int]:
    """The diatonic triad on ``degree`` semitones above the tonic (the V of minor is major)."""
    scale = MAJOR_SCALE if mode == "major" else MINOR_SCALE
    if degree not in scale or (mode == "minor" and degree == 3):  # III, VII of minor: natural-minor majors
        return [root_pc, root_pc + 4, root_pc + 7]
    idx = scale.index(degree)
    third = (scale[(idx + 2) % 7] - scale[idx]) % 12
    fifth = (scale[(idx + 4) % 7] - scale[idx]) % 12
    return [root_pc, root_pc + third, root_pc + fifth]


def tonal(tonic: int, mode: str = "major", kind: str = "chords", timbre: str = "sine", seconds: float = 16.0,
          rate: int = 22050, seed: int = 0) -> np.ndarray:
    """A clip in the key ``tonic`` (pitch class, 0 = C) ``mode`` (``"major"``/``"minor"``)."""
    rng = np.random.default_rng(seed)
    out = np.zeros(int(seconds * rate))
    progs = MAJOR_PROGRESSIONS if mode == "major" else MINOR_PROGRESSIONS
    prog = progs[int(rng.integers(len(progs)))]
    base = 48 + tonic  # C3..B3: the chord register
    chord_len = seconds / (len(prog) + 1)  # the final tonic rings twice as long
    scale = MAJOR_SCALE if mode == "major" else MINOR_SCALE
    t = 0.0
    for i, degree in enumerate(prog):
        dur = chord_len * (2 if i == len(prog) - 1 else 1)
        root = base + degree if degree < 8 else base + degree - 12
        notes = _triad(root, mode, tonic, degree)
        if kind == "chords":
            for m in notes:
                _note(out, m, t, dur, rate, timbre, rng, 0.5)
            _note(out, root - 12, t, dur, rate, timbre, rng, 0.6)
        elif kind == "melody":
            _note(out, root - 12, t, dur, rate, timbre, rng, 0.5)  # the bass line: chord roots
            step = 60.0 / rng.uniform(90, 140) / 2
            k, m_t = 0, t
            while m_t < t + dur - 0.05:
                if k == 0:  # each bar starts on a chord tone
                    pitch = 60 + tonic + (notes[int(rng.integers(3))] - base)
                else:
                    deg = scale[int(rng.integers(7))]
                    pitch = 60 + tonic + deg
                _note(out, pitch, m_t, step * 0.95, rate, timbre, rng, 0.7)
                m_t += step * (2 if rng.random() < 0.3 else 1)
                k += 1
        else:
            raise ValueError("kind is 'chords' or 'melody'")
        t += dur
    return _normalize(out)


def pad(seconds: float = 20.0, rate: int = 22050, seed: int = 0) -> np.ndarray:
    """Sustained chords with multi-second attacks and overlaps: harmony, no beat."""
    rng = np.random.default_rng(seed)
    out = np.zeros(int(seconds * rate))
    t = 0.0
    while t < seconds:
        dur = rng.uniform(4.0, 7.0)
        root = 48 + int(rng.integers(12))
        n = int((dur + 3.0) * rate)
        env = np.sin(np.pi * np.arange(n) / n) ** 2
        for m in (root, root + 4 if rng.random() < 0.5 else root + 3, root + 7, root + 12):
            _place(out, _tone(_midi_hz(m) * rng.uniform(0.998, 1.002), n, rate, "sine", rng) * env, t, rate, 0.3)
        t += dur * rng.uniform(0.6, 1.0)
    return _normalize(out)


def pink_noise(seconds: float = 20.0, rate: int = 22050, seed: int = 0) -> np.ndarray:
    """Stationary 1/f noise (spectral shaping of white noise)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(len(spec), dtype=float)
    f[0] = 1.0
    return _normalize(np.fft.irfft(spec / np.sqrt(f), n))


def rubato(seconds: float = 20.0, rate: int = 22050, seed: int = 0) -> np.ndarray:
    """Plucked notes whose spacing wanders freely (0.15-1.4 s): onsets with no pulse."""
    rng = np.random.default_rng(seed)
    out = np.zeros(int(seconds * rate))
    t = 0.1
    while t < seconds:
        _note(out, 55 + int(rng.integers(20)), t, rng.uniform(0.3, 1.2), rate, "saw", rng, rng.uniform(0.4, 1.0),
              attack=0.003)
        t += float(np.exp(rng.uniform(np.log(0.15), np.log(1.4))))
    return _normalize(out)


def sine(freq: float, seconds: float, rate: int, level_dbfs: float = -20.0, channels: int = 1) -> np.ndarray:
    """A sine at ``level_dbfs`` peak in every channel, shape (frames, channels), float64."""
    t = np.arange(int(seconds * rate)) / rate
    x = 10 ** (level_dbfs / 20) * np.sin(2 * np.pi * freq * t)
    return np.repeat(x[:, None], channels, axis=1)


def noise(seconds: float, rate: int, level_dbfs: float = -20.0, channels: int = 1, seed: int = 0) -> np.ndarray:
    """White noise at ``level_dbfs`` RMS, independent per channel, shape (frames, channels), float64."""
    rng = np.random.default_rng(seed)
    return 10 ** (level_dbfs / 20) * rng.standard_normal((int(seconds * rate), channels))
