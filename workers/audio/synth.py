"""Deterministic music-like clips for tests, the demo library and benchmarks.

A tagger fed pure sine waves gives every file the same tags, which hides
bugs in calibration and tag writing. These clips differ the way a library
does: each seed picks a style (band, electronic, ambient, acoustic, hip-hop,
jazz, vocal pop, noise), a tempo, a key and mode, a chord progression,
instrument timbres, drum patterns, stereo spread and reverb.

Everything comes from one ``numpy.random.Generator`` seeded with ``seed``, so
the same seed always gives the same samples. Notes are rendered with
vectorised additive synthesis (one numpy expression per note, harmonics
stacked in a matrix) and reverb is one FFT convolution, so a 30 s stereo
clip takes a few tens of milliseconds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SCALES = {
    "major": (0, 2, 4, 5, 7, 9, 11),
    "minor": (0, 2, 3, 5, 7, 8, 10),
    "dorian": (0, 2, 3, 5, 7, 9, 10),
    "mixolydian": (0, 2, 4, 5, 7, 9, 10),
    "phrygian": (0, 1, 3, 5, 7, 8, 10),
    "harmonic_minor": (0, 2, 3, 5, 7, 8, 11),
}

PROGRESSIONS = (
    (0, 5, 3, 4), (0, 4, 5, 3), (5, 3, 0, 4), (0, 3, 0, 4),
    (1, 4, 0, 0), (0, 6, 5, 4), (0, 3, 4, 3), (0, 0, 3, 4),
)

# 16-step drum patterns (1 = hit); styles pick one and mutate it per seed.
KICKS = ("1000000010100000", "1000100010001000", "1000001000100000", "1001000000100100")
SNARES = ("0000100000001000", "0000100000001001", "0000000010000000", "0000100100001000")
HATS = ("1010101010101010", "0010001000100010", "1111111111111111", "1011101010111010")

# Style archetypes: which voices play and the parameter ranges they draw from.
STYLES = {
    "band": dict(tempo=(96, 150), drums=1.0, bass=1.0, chords=1.0, melody=0.9, voice=0.3,
                 noise=0.0, chord_timbre=("organ", "saw"), lead=("saw", "square"), reverb=(0.2, 0.8)),
    "electronic": dict(tempo=(118, 136), drums=1.0, bass=1.0, chords=0.8, melody=0.7, voice=0.2,
                       noise=0.2, chord_timbre=("saw", "square"), lead=("square", "saw"), reverb=(0.3, 1.2),
                       four_on_floor=True),
    "ambient": dict(tempo=(56, 84), drums=0.0, bass=0.5, chords=1.0, melody=0.5, voice=0.2,
                    noise=0.8, chord_timbre=("pad",), lead=("sine",), reverb=(1.5, 3.0)),
    "acoustic": dict(tempo=(68, 112), drums=0.1, bass=0.6, chords=1.0, melody=0.9, voice=0.4,
                     noise=0.0, chord_timbre=("piano", "pluck"), lead=("flute", "sine"), reverb=(0.4, 1.5)),
    "hiphop": dict(tempo=(80, 96), drums=1.0, bass=1.0, chords=0.6, melody=0.5, voice=0.7,
                   noise=0.3, chord_timbre=("piano", "pad"), lead=("sine", "square"), reverb=(0.2, 0.6),
                   swing=0.25),
    "jazz": dict(tempo=(100, 180), drums=0.9, bass=1.0, chords=1.0, melody=0.8, voice=0.2,
                 noise=0.0, chord_timbre=("piano",), lead=("flute", "saw"), reverb=(0.3, 1.0),
                 swing=0.33, sevenths=True),
    "vocal_pop": dict(tempo=(90, 128), drums=0.9, bass=1.0, chords=1.0, melody=0.3, voice=1.0,
                      noise=0.0, chord_timbre=("piano", "pad"), lead=("sine",), reverb=(0.5, 1.5)),
    "noise": dict(tempo=(60, 140), drums=0.3, bass=0.0, chords=0.1, melody=0.0, voice=0.0,
                  noise=1.0, chord_timbre=("pad",), lead=("sine",), reverb=(0.5, 2.5)),
}


@dataclass(frozen=True)
class Plan:
    """Everything a seed decided about a clip; handy for tests and debugging."""

    style: str
    tempo: float
    root: int
    scale: str
    progression: tuple[int, ...]
    voices: frozenset[str]
    chord_timbre: str
    lead_timbre: str
    reverb_seconds: float
    swing: float
    gain: float


def plan_for(rng: np.random.Generator, style: str | None = None) -> Plan:
    """Draw a style (unless given) and its parameters from ``rng``."""
    if style is None:
        style = str(rng.choice(list(STYLES)))
    elif style not in STYLES:
        raise ValueError(f"unknown style {style!r}; known: {', '.join(STYLES)}")
    spec = STYLES[style]
    voices = {name for name in ("drums", "bass", "chords", "melody", "voice", "noise")
              if rng.random() < spec[name]}
    if not voices:
        voices = {"noise"}
    lo, hi = spec["tempo"]
    rlo, rhi = spec["reverb"]
    return Plan(
        style=style,
        tempo=float(rng.uniform(lo, hi)),
        root=int(rng.integers(40, 52)),  # E2..D#3 as the bass root
        scale=str(rng.choice(list(SCALES))),
        progression=PROGRESSIONS[int(rng.integers(len(PROGRESSIONS)))],
        voices=frozenset(voices),
        chord_timbre=str(rng.choice(spec["chord_timbre"])),
        lead_timbre=str(rng.choice(spec["lead"])),
        reverb_seconds=float(rng.uniform(rlo, rhi)),
        swing=float(spec.get("swing", 0.0)),
        gain=float(rng.uniform(0.35, 0.95)),
    )


def synth_clip(seed: int, seconds: float, sample_rate: int = 44100,
               channels: int = 2, style: str | None = None) -> np.ndarray:
    """A music-like clip, float32 shaped (channels, n), peak at most 0.95.

    ``channels`` may be 1, 2 or 6 (5.1: front pair, centre, LFE from the
    bass, surrounds from the reverb), so tests can make every layout.
    ``style`` (a key of ``STYLES``) fixes the archetype, so a demo album
    can sound like one band; by default the seed picks it.
    """
    if channels not in (1, 2, 6):
        raise ValueError(f"channels must be 1, 2 or 6, not {channels}")
    rng = np.random.default_rng(seed)
    plan = plan_for(rng, style)
    n = max(1, int(round(seconds * sample_rate)))
    mix = _Mix(n, sample_rate)
    _render_voices(mix, plan, rng)
    dry, bass = mix.stereo, mix.bass
    wet = _reverb(dry + bass, plan.reverb_seconds, sample_rate, rng)
    front = dry + bass + 0.35 * wet
    peak = float(np.max(np.abs(front))) or 1.0
    scale = plan.gain / peak
    front *= scale
    if channels == 1:
        out = front.mean(axis=0, keepdims=True)
    elif channels == 2:
        out = front
    else:
        centre = 0.5 * dry.mean(axis=0) * scale
        lfe = bass.mean(axis=0) * scale
        surround = 0.5 * wet * scale
        out = np.stack([front[0], front[1], centre, lfe, surround[0], surround[1]])
    return np.clip(out, -0.95, 0.95).astype(np.float32)


# -------------------------------------------------------------- arrangement

class _Mix:
    """Stereo buffers a voice adds into: ``stereo`` for most, ``bass`` apart
    so the 5.1 output can route it to the LFE channel."""

    def __init__(self, n: int, sample_rate: int):
        self.n = n
        self.sr = sample_rate
        self.stereo = np.zeros((2, n), dtype=np.float64)
        self.bass = np.zeros((2, n), dtype=np.float64)

    def add(self, start: int, signal: np.ndarray, pan: float, level: float, bus: str = "stereo") -> None:
        """Add a mono signal at sample ``start``, constant-power panned."""
        if start >= self.n or len(signal) == 0:
            return
        end = min(self.n, start + len(signal))
        piece = signal[: end - start] * level
        angle = (pan + 1.0) * math.pi / 4.0
        buffer = self.bass if bus == "bass" else self.stereo
        buffer[0, start:end] += math.cos(angle) * piece
        buffer[1, start:end] += math.sin(angle) * piece


def _render_voices(mix: _Mix, plan: Plan, rng: np.random.Generator) -> None:
    """Lay out bars and hand each present voice its part of the timeline."""
    beat = 60.0 / plan.tempo
    step = beat / 4.0  # sixteenth notes
    steps = int(math.ceil(mix.n / mix.sr / step)) + 1
    scale = SCALES[plan.scale]
    sevenths = STYLES[plan.style].get("sevenths", False)
    if "chords" in plan.voices:
        _chords(mix, plan, rng, scale, beat, sevenths)
    if "bass" in plan.voices:
        _bassline(mix, plan, rng, scale, step, steps)
    if "melody" in plan.voices:
        _melody(mix, plan, rng, scale, step, steps, plan.lead_timbre, octave=2, pan=rng.uniform(-0.4, 0.4))
    if "voice" in plan.voices:
        _melody(mix, plan, rng, scale, step * 2, steps // 2, "voice", octave=2, pan=0.0)
    if "drums" in plan.voices:
        _drums(mix, plan, rng, step, steps)
    if "noise" in plan.voices:
        _noise_texture(mix, rng, plan.tempo)


def _step_time(index: int, step: float, swing: float) -> float:
    """Start of a step in seconds; swing delays every second step."""
    return index * step + (step * swing if index % 2 else 0.0)


def _pitch(root: int, scale: tuple[int, ...], degree: int) -> int:
    """MIDI note of a scale degree (degrees past 6 climb octaves)."""
    octave, index = divmod(degree, len(scale))
    return root + 12 * octave + scale[index]


def _chords(mix, plan, rng, scale, beat, sevenths) -> None:
    """Triads (or sevenths) of the progression, one per bar, held or arpeggiated."""
    bar = 4 * beat
    bars = int(math.ceil(mix.n / mix.sr / bar))
    arpeggio = plan.chord_timbre in ("piano", "pluck") and rng.random() < 0.5
    for b in range(bars):
        degree = plan.progression[b % len(plan.progression)]
        tones = [degree, degree + 2, degree + 4] + ([degree + 6] if sevenths else [])
        for i, d in enumerate(tones):
            midi = _pitch(plan.root + 12, scale, d)
            if arpeggio:
                onset, length = b * bar + i * beat, bar - i * beat
            else:
                onset, length = b * bar, bar
            note = _note(midi, length, mix.sr, plan.chord_timbre, rng)
            mix.add(int(onset * mix.sr), note, pan=(i - 1) * 0.3, level=0.18)


def _bassline(mix, plan, rng, scale, step, steps) -> None:
    """Chord roots on a per-song eighth-note rhythm, to the bass (LFE) bus."""
    pattern = rng.random(8) < 0.6
    pattern[0] = True
    for s in range(0, steps, 2):
        if not pattern[(s // 2) % 8]:
            continue
        bar = s // 16
        degree = plan.progression[bar % len(plan.progression)]
        midi = _pitch(plan.root, scale, degree) + (12 if rng.random() < 0.15 else 0)
        note = _note(midi, step * 2 * 0.9, mix.sr, "bass", rng)
        mix.add(int(_step_time(s, step, plan.swing) * mix.sr), note, pan=0.0, level=0.45, bus="bass")


def _melody(mix, plan, rng, scale, step, steps, timbre, octave, pan) -> None:
    """A random walk over the scale with rests, in two-step notes."""
    degree = int(rng.integers(0, 7))
    density = rng.uniform(0.4, 0.85)
    s = 0
    while s < steps:
        length = int(rng.choice([2, 2, 4, 4, 6, 8]))
        if rng.random() < density:
            degree = int(np.clip(degree + rng.choice([-2, -1, -1, 0, 1, 1, 2, 3]), -3, 10))
            midi = _pitch(plan.root + 12 * octave, scale, degree)
            note = _note(midi, step * length * 0.95, mix.sr, timbre, rng)
            mix.add(int(_step_time(s, step, plan.swing) * mix.sr), note, pan=float(pan), level=0.22)
        s += length


def _drums(mix, plan, rng, step, steps) -> None:
    """Place pre-rendered kick, snare and hat samples on mutated patterns."""
    sr = mix.sr
    four = STYLES[plan.style].get("four_on_floor", False)
    patterns = {
        "kick": _mutate(KICKS[1] if four else KICKS[int(rng.integers(len(KICKS)))], rng),
        "snare": _mutate(SNARES[int(rng.integers(len(SNARES)))], rng),
        "hat": _mutate(HATS[int(rng.integers(len(HATS)))], rng),
    }
    sounds = {"kick": _kick(sr, rng), "snare": _snare(sr, rng), "hat": _hat(sr, rng)}
    levels = {"kick": 0.9, "snare": 0.55, "hat": 0.18}
    pans = {"kick": 0.0, "snare": 0.05, "hat": float(rng.uniform(-0.5, 0.5))}
    for s in range(steps):
        start = int(_step_time(s, step, plan.swing) * sr)
        for name, pattern in patterns.items():
            if pattern[s % 16]:
                accent = 1.0 if s % 4 == 0 else 0.8
                mix.add(start, sounds[name], pans[name], levels[name] * accent)


def _mutate(pattern: str, rng) -> np.ndarray:
    """The pattern with one or two steps flipped, so seeds differ in groove."""
    hits = np.array([c == "1" for c in pattern])
    for _ in range(int(rng.integers(0, 3))):
        i = int(rng.integers(1, 16))
        hits[i] = not hits[i]
    return hits


# ------------------------------------------------------------------ sounds

_TIMBRES = {
    # harmonics, spectral tilt (amplitude ~ 1/k**tilt), odd-only, attack, decay, sustain
    "sine": (2, 3.0, False, 0.01, 0.3, 0.8),
    "flute": (4, 2.5, False, 0.05, 0.2, 0.7),
    "saw": (12, 1.0, False, 0.01, 0.2, 0.7),
    "square": (12, 1.0, True, 0.01, 0.2, 0.7),
    "organ": (8, 1.5, True, 0.02, 0.1, 0.9),
    "pad": (6, 1.8, False, 0.6, 1.0, 0.8),
    "piano": (10, 1.6, False, 0.005, 0.6, 0.0),
    "pluck": (8, 1.3, False, 0.003, 0.25, 0.0),
    "bass": (6, 1.7, False, 0.01, 0.3, 0.6),
    "voice": (24, 1.0, False, 0.08, 0.3, 0.8),
}

# Vowel formants (Hz) for the voice timbre: a, e, o, u.
_VOWELS = ((800, 1150, 2900), (400, 2000, 2550), (450, 800, 2830), (325, 700, 2530))


def _note(midi: int, seconds: float, sr: int, timbre: str, rng) -> np.ndarray:
    """One note: additive harmonics times an envelope, all in one expression."""
    harmonics, tilt, odd, attack, decay, sustain = _TIMBRES[timbre]
    freq = 440.0 * 2.0 ** ((midi - 69) / 12.0)
    n = max(1, int(seconds * sr))
    t = np.arange(n) / sr
    ks = np.arange(1, harmonics + 1, 2 if odd else 1, dtype=np.float64)
    ks = ks[ks * freq < sr / 2 - 500]  # no aliasing
    if len(ks) == 0:
        return np.zeros(n)
    amps = ks ** -tilt
    if timbre == "voice":
        amps = amps * _formant_weights(ks * freq, _VOWELS[int(rng.integers(len(_VOWELS)))])
        vibrato = 1.0 + 0.006 * np.sin(2 * np.pi * 5.5 * t) * np.minimum(1.0, t / 0.3)
        cycles = freq * np.cumsum(vibrato) / sr
    else:
        detune = 1.0 + rng.normal(0.0, 0.0015)
        cycles = freq * detune * t
    table = _wavetable(ks, amps)
    index = (cycles * _TABLE_SIZE).astype(np.int64) & (_TABLE_SIZE - 1)
    return table[index] * _envelope(n, sr, attack, decay, sustain)


_TABLE_SIZE = 4096  # power of two: the phase wraps with a bit mask


def _wavetable(ks: np.ndarray, amps: np.ndarray) -> np.ndarray:
    """One period of the note's waveform, normalised to peak-ish 1.

    Looking samples up in a table costs one index per sample instead of one
    sine per harmonic per sample: what makes 5,000 demo files affordable.
    """
    angle = 2 * np.pi * np.arange(_TABLE_SIZE) / _TABLE_SIZE
    return (amps @ np.sin(np.outer(ks, angle))) / amps.sum()


def _formant_weights(freqs: np.ndarray, formants) -> np.ndarray:
    """Resonance gain of each harmonic: a vowel-like spectral envelope."""
    weights = np.full_like(freqs, 0.05)
    for centre in formants:
        weights += np.exp(-0.5 * ((freqs - centre) / (0.12 * centre)) ** 2)
    return weights


def _envelope(n: int, sr: int, attack: float, decay: float, sustain: float) -> np.ndarray:
    """Attack-decay-sustain-release, with a short release so notes never click."""
    t = np.arange(n) / sr
    rise = np.minimum(1.0, t / max(attack, 1e-4))
    body = sustain + (1.0 - sustain) * np.exp(-np.maximum(t - attack, 0.0) / max(decay, 1e-3))
    release = np.minimum(1.0, (n - np.arange(n)) / (0.01 * sr))
    return rise * body * release


def _kick(sr: int, rng) -> np.ndarray:
    """A sine whose pitch falls from ~150 Hz to ~50 Hz, decaying fast."""
    t = np.arange(int(0.35 * sr)) / sr
    top, bottom = rng.uniform(110, 180), rng.uniform(40, 60)
    freq = bottom + (top - bottom) * np.exp(-t / 0.04)
    phase = 2 * np.pi * np.cumsum(freq) / sr
    return np.sin(phase) * np.exp(-t / rng.uniform(0.08, 0.18))


def _snare(sr: int, rng) -> np.ndarray:
    """A noise burst over a short tone: the snare wires and the drum head."""
    t = np.arange(int(0.25 * sr)) / sr
    noise = _highpass(rng.standard_normal(len(t))) * np.exp(-t / rng.uniform(0.04, 0.09))
    body = np.sin(2 * np.pi * rng.uniform(160, 220) * t) * np.exp(-t / 0.05)
    return 0.6 * noise / 2.0 + 0.5 * body


def _hat(sr: int, rng) -> np.ndarray:
    """Very short high-passed noise: a closed hi-hat."""
    t = np.arange(int(0.08 * sr)) / sr
    noise = _highpass(_highpass(rng.standard_normal(len(t))))
    return noise / 4.0 * np.exp(-t / rng.uniform(0.01, 0.03))


def _highpass(x: np.ndarray) -> np.ndarray:
    """First difference: a cheap high-pass that keeps the length."""
    return np.diff(x, prepend=0.0)


def _noise_texture(mix: _Mix, rng, tempo: float) -> None:
    """Coloured noise (white to brown) with a slow swell, in stereo."""
    n, sr = mix.n, mix.sr
    size = _fast_fft_size(n)  # an FFT of a length with large prime factors is 10-100x slower
    slope = rng.uniform(0.0, 2.0)  # 0 white, 1 pink, 2 brown (power ~ 1/f**slope)
    freqs = np.fft.rfftfreq(size, 1.0 / sr)
    shape = 1.0 / np.maximum(freqs, 20.0) ** (slope / 2.0)
    t = np.arange(n) / sr
    swell = 0.6 + 0.4 * np.sin(2 * np.pi * (tempo / 60.0 / 16.0) * t + rng.uniform(0, 2 * np.pi))
    for channel in range(2):
        spectrum = np.fft.rfft(rng.standard_normal(size)) * shape
        noise = np.fft.irfft(spectrum, size)[:n]
        noise /= np.max(np.abs(noise)) or 1.0
        mix.stereo[channel] += 0.25 * noise * swell


def _reverb(dry: np.ndarray, seconds: float, sr: int, rng) -> np.ndarray:
    """Stereo reverb: FFT convolution with decaying noise, a different tail
    per channel so the room sounds wide. Output has the input's length.

    The tail is computed at about 11 kHz and interpolated back up: a room's
    tail is dull anyway, and the convolution costs a quarter of full rate.
    """
    factor = max(1, sr // 11025)
    low_sr = sr / factor
    n = dry.shape[1]
    m = n // factor
    if m < 2:
        return np.zeros_like(dry)
    low = dry[:, : m * factor].reshape(2, m, factor).mean(axis=2)
    ir_len = max(1, int(seconds * low_sr))
    t = np.arange(ir_len) / low_sr
    size = _fast_fft_size(m + ir_len)
    wet = np.empty_like(dry)
    fine = np.arange(n) / factor
    for channel in range(2):
        ir = rng.standard_normal(ir_len) * np.exp(-6.9 * t / seconds)
        ir /= math.sqrt(np.sum(ir ** 2)) or 1.0
        full = np.fft.irfft(np.fft.rfft(low[channel], size) * np.fft.rfft(ir, size), size)
        wet[channel] = np.interp(fine, np.arange(m), full[:m])
    return wet


def _fast_fft_size(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n: FFT sizes that pocketfft does fastest."""
    best = 1 << int(math.ceil(math.log2(n)))
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            size = p35 << max(0, int(math.ceil(math.log2(n / p35))))
            best = min(best, size)
            p35 *= 3
        p5 *= 5
    return best
