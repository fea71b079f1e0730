"""Tempo on synthetic drum patterns 60-200 BPM (MIREX exact and octave-tolerant rates) and beat-free clips."""
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
    print(f"\n{len(drum_results)} clips: exact {exact:.1%}, octave-tolerant {octave:.1%}")
    assert octave >= 0.95, misses
    assert exact >= 0.75  # measured 0.815; the rest are the other octave (x2, x0.5) of the pattern


def test_every_timbre_and_the_swung_patterns_pass_on_their_own(drum_results):
    for timbre in synth.DRUM_TIMBRES:
        for swing in (0.5, 0.62):
            rows = [(bpm, r) for bpm, t, s, r in drum_results if t == timbre and s == swing]
            if rows:
                rate = np.mean([_within(r.bpm, bpm, OCTAVES) for bpm, r in rows])
                assert rate >= 0.9, (timbre, swing, [(b, r.bpm) for b, r in rows])


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
