"""Tempo on synthetic drum patterns 60-200 BPM (MIREX exact and octave-tolerant rates) and beat-free clips.

The clips here are not the bench's (``bench.features``: 15 tempos at 44.1 kHz): 18 other tempos
at 22.05 kHz, where the synthetic hi-hat keeps more of its energy in the analysed band, so the
hats on the eighths are louder than at 44.1 kHz (the harder case for the octave), plus drums
under chords at other tempos and seeds.
"""
from __future__ import annotations

import numpy as np
import pytest

from workers.features import synth, tempo

TEMPOS = (60, 66, 73, 81, 88, 95, 103, 110, 118, 125, 133, 141, 150, 158, 167, 176, 188, 200)
OCTAVES = (1.0, 2.0, 0.5, 3.0, 1.0 / 3.0)
RATE = 22050


def _within(est: float | None, true: float, factors=(1.0,)) -> bool:
    return est is not None and any(abs(est - true * f) <= 0.02 * true * f for f in factors)


def _clips():
    for i, bpm in enumerate(TEMPOS):
        for timbre in synth.DRUM_TIMBRES:
            for swing in ((0.5, 0.62) if timbre in ("kit", "rock") else (0.5,)):
                yield bpm, timbre, swing, i


@pytest.fixture(scope="module")
def drum_results():
    out = []
    for bpm, timbre, swing, seed in _clips():
        x = synth.drums(bpm, timbre, swing, seconds=12.0, rate=RATE, seed=seed)
        out.append((bpm, timbre, swing, tempo.estimate(x, RATE)))
    return out


def test_drum_patterns_meet_the_mirex_rates(drum_results):
    exact = np.mean([_within(r.bpm, bpm) for bpm, _, _, r in drum_results])
    octave = np.mean([_within(r.bpm, bpm, OCTAVES) for bpm, _, _, r in drum_results])
    misses = [(bpm, t, s, r.bpm) for bpm, t, s, r in drum_results if not _within(r.bpm, bpm, OCTAVES)]
    wrong = [(bpm, t, s, r.bpm) for bpm, t, s, r in drum_results if not _within(r.bpm, bpm)]
    print(f"\n{len(drum_results)} clips: exact {exact:.1%}, octave-tolerant {octave:.1%}")
    assert octave >= 0.99, misses
    assert exact >= 0.95, wrong  # measured 0.972 (0.815 before the tilted flux and the subdivision check)


def test_every_timbre_and_the_swung_patterns_pass_on_their_own(drum_results):
    for timbre in synth.DRUM_TIMBRES:
        for swing in (0.5, 0.62):
            rows = [(bpm, r) for bpm, t, s, r in drum_results if t == timbre and s == swing]
            if rows:
                rate = np.mean([_within(r.bpm, bpm, OCTAVES) for bpm, r in rows])
                assert rate >= 0.9, (timbre, swing, [(b, r.bpm) for b, r in rows])
                exact = np.mean([_within(r.bpm, bpm) for bpm, r in rows])
                assert exact >= 0.8, (timbre, swing, [(b, r.bpm) for b, r in rows])  # straight rock: 0.83


def test_slow_kits_are_not_read_at_their_eighths():
    """60-75 BPM with hats on the eighths: the hats made 120-150 win before the tilt and the subdivision check."""
    for i, bpm in enumerate((61.0, 64.5, 68.0, 71.5, 75.0)):
        for timbre in ("kit", "rock"):
            x = synth.drums(bpm, timbre, 0.5, seconds=12.0, rate=44100, seed=300 + i)
            r = tempo.estimate(x, 44100)
            assert _within(r.bpm, bpm), (bpm, timbre, r)


def test_fast_clicks_keep_their_tempo():
    """155-165 BPM clicks were read at half: the comb looked for the 4th multiple of a whole-frame period."""
    for i, bpm in enumerate((155.0, 158.0, 160.0, 163.0, 165.0)):
        r = tempo.estimate(synth.drums(bpm, "clicks", seconds=12.0, rate=44100, seed=400 + i), 44100)
        assert _within(r.bpm, bpm), (bpm, r)


def test_drums_under_chords():
    """A loud chord bed over the drums (the bench's mix, other tempos and seeds).

    Measured exact / octave-tolerant 0.89 / 1.0 (0.56 / 0.89 before the tilt and the square root)."""
    results = []
    for i, bpm in enumerate((64.0, 79.0, 97.0, 112.0, 127.0, 143.0, 161.0, 178.0, 194.0)):
        for j, w in enumerate((0.6, 0.4)):
            beat = synth.drums(bpm, synth.DRUM_TIMBRES[(i + j) % 4], 0.5 + 0.1 * (i % 2), 12.0, RATE, seed=500 + i)
            chords = synth.tonal((i * 5) % 12, ("major", "minor")[j], "chords", ("saw", "sine")[i % 2], 12.0, RATE,
                                 seed=500 + i)
            results.append((bpm, tempo.estimate(w * beat + (1 - w) * chords, RATE)))
    exact = np.mean([_within(r.bpm, bpm) for bpm, r in results])
    octave = np.mean([_within(r.bpm, bpm, OCTAVES) for bpm, r in results])
    assert octave >= 0.95, [(b, r.bpm) for b, r in results]
    assert exact >= 0.75, [(b, r.bpm) for b, r in results]


def test_alternation_tells_a_beat_from_its_eighths():
    fps, period = 172.0, 86.0  # 120 BPM
    env = np.zeros(int(20 * fps))
    env[::int(period)] = 1.0                   # every beat
    assert tempo.alternation(env, period, fps) > 0.9
    env[int(period) // 2::int(period)] = 0.3   # weak off-beats
    assert tempo.alternation(env, period / 2, fps) == pytest.approx(0.3, abs=0.05)
    assert tempo.alternation(env, period / 4, fps) < 0.05  # nothing between the eighths


def test_the_bpm_is_precise_when_the_octave_is_right(drum_results):
    errors = [abs(r.bpm - bpm) / bpm for bpm, _, _, r in drum_results if _within(r.bpm, bpm)]
    assert np.median(errors) < 0.003
    assert max(errors) < 0.02


def test_drum_patterns_are_confident(drum_results):
    assert min(r.confidence for *_, r in drum_results) >= tempo.MIN_CONFIDENCE
    assert all(r.reason is None for *_, r in drum_results)


@pytest.mark.parametrize("rate", (8000, 16000, 44100, 48000, 96000))
def test_any_sample_rate(rate):
    for bpm, timbre in ((92, "kit"), (128, "kick"), (171, "rock")):
        r = tempo.estimate(synth.drums(bpm, timbre, seconds=10.0, rate=rate, seed=bpm), rate)
        assert _within(r.bpm, bpm, OCTAVES), (rate, bpm, timbre, r)


@pytest.mark.parametrize("name,make", [
    ("pad", synth.pad), ("pink noise", synth.pink_noise), ("rubato", synth.rubato)])
def test_music_without_a_steady_beat_gets_no_bpm(name, make):
    for seed in (1, 2, 3):
        r = tempo.estimate(make(seconds=15.0, rate=RATE, seed=seed), RATE)
        assert r.bpm is None, (name, seed, r)
        assert r.reason and "beat" in r.reason
        assert r.confidence < tempo.MIN_CONFIDENCE


def test_silence_short_and_steady_tone_give_a_reason_not_a_crash():
    assert "too short" in tempo.estimate(synth.drums(120, seconds=4.0, rate=RATE), RATE).reason
    assert tempo.estimate(np.zeros(RATE * 10, dtype=np.float32), RATE).bpm is None
    tone = synth.sine(440.0, 10.0, RATE, -10.0)[:, 0]
    assert tempo.estimate(tone, RATE).bpm is None
    assert tempo.estimate(np.zeros(0, dtype=np.float32), RATE).reason


def test_chunked_input_gives_the_same_tempo():
    x = synth.drums(137, "rock", 0.58, seconds=12.0, rate=44100, seed=5)
    whole = tempo.estimate(x, 44100, chunk=len(x))
    tracker = tempo.TempoTracker(44100)
    for i in range(0, len(x), 3001):
        tracker.add(x[i:i + 3001])
    assert tracker.result().bpm == pytest.approx(whole.bpm, abs=0.05)
    assert _within(whole.bpm, 137, OCTAVES)
