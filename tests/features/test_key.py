"""Key and mode on synthetic progressions and melodies in all 24 keys (accuracy and MIREX score), notations."""
from __future__ import annotations

import numpy as np
import pytest

from workers.features import key as K
from workers.features import synth

RATE = 22050


@pytest.fixture(scope="module")
def key_results():
    out = []
    for tonic in range(12):
        for mode in ("major", "minor"):
            for kind in ("chords", "melody"):
                for timbre in synth.TONAL_TIMBRES:
                    seed = tonic * 7 + 3 * (mode == "minor") + (kind == "melody") + 2 * (timbre == "saw")
                    x = synth.tonal(tonic, mode, kind, timbre, seconds=12.0, rate=RATE, seed=seed)
                    out.append(((tonic, mode), kind, timbre, K.estimate(x, RATE)))
    return out


def _est(k: K.Key):
    return None if k.tonic is None else (k.tonic, k.mode)


def test_all_24_keys_are_found(key_results):
    correct = np.mean([_est(k) == ref for ref, _, _, k in key_results])
    mirex = np.mean([K.mirex_score(_est(k), ref) for ref, _, _, k in key_results])
    misses = [(K.PITCH_CLASSES[r[0]] + " " + r[1], kind, timbre, k.name) for r, kind, timbre, k in key_results
              if _est(k) != r]
    print(f"\n{len(key_results)} clips: correct {correct:.1%}, MIREX weighted {mirex:.3f}")
    assert correct >= 0.90, misses
    assert mirex >= 0.92


@pytest.mark.parametrize("kind", ("chords", "melody"))
@pytest.mark.parametrize("timbre", synth.TONAL_TIMBRES)
def test_each_kind_and_timbre_passes_on_its_own(key_results, kind, timbre):
    rows = [(ref, k) for ref, kd, tb, k in key_results if kd == kind and tb == timbre]
    assert np.mean([_est(k) == ref for ref, k in rows]) >= 0.85


def test_the_default_profile_is_the_one_measured_best(key_results):
    assert K.PROFILE_ACCURACY[K.DEFAULT_PROFILE] == max(K.PROFILE_ACCURACY.values())
    clear = [k.confidence for ref, _, _, k in key_results if _est(k) == ref]
    assert np.median(clear) > 0.3


@pytest.mark.parametrize("rate", (16000, 44100, 48000, 96000))
def test_any_sample_rate(rate):
    for tonic, mode in ((2, "major"), (9, "minor"), (6, "minor")):
        k = K.estimate(synth.tonal(tonic, mode, "chords", "saw", seconds=10.0, rate=rate, seed=tonic), rate)
        assert (k.tonic, k.mode) == (tonic, mode), (rate, k)


def test_a_detuned_recording_is_still_in_its_key():
    x = synth.tonal(4, "major", "chords", "saw", seconds=10.0, rate=RATE, seed=1)
    cents = 35.0
    k = K.estimate(x, int(round(RATE * 2 ** (cents / 1200))))  # played back fast: every pitch 35 cents sharp
    assert (k.tonic, k.mode) == (4, "major")
    assert k.tuning_cents == pytest.approx(cents, abs=8)


def test_no_key_for_noise_silence_and_short_clips():
    for seed in (1, 2):
        k = K.estimate(synth.pink_noise(seconds=10.0, rate=RATE, seed=seed), RATE)
        assert k.tonic is None and "no tonal centre" in k.reason
    assert "silence" in K.estimate(np.zeros(RATE * 5, dtype=np.float32), RATE).reason
    assert "too short" in K.estimate(synth.tonal(0, seconds=2.0, rate=RATE), RATE).reason


def test_notations():
    assert K.camelot(0, "major") == "8B" and K.camelot(9, "minor") == "8A"
    assert K.camelot(7, "major") == "9B" and K.camelot(11, "major") == "1B" and K.camelot(5, "minor") == "4A"
    assert K.open_key(0, "major") == "1d" and K.open_key(9, "minor") == "1m" and K.open_key(7, "major") == "2d"
    k = K.Key(9, "minor", 0.5)
    assert (k.name, k.short, k.camelot, k.open_key) == ("A minor", "Am", "8A", "1m")
    assert K.Key(6, "major", 0.5).short == "F#"
    for tonic in range(12):
        for mode in ("major", "minor"):
            kk = K.Key(tonic, mode, 1.0)
            assert K.parse(kk.short) == (tonic, mode) == K.parse(kk.name)
    codes = {K.camelot(t, m) for t in range(12) for m in ("major", "minor")}
    assert len(codes) == 24
    assert K.parse("Bbm") == (10, "minor") and K.parse("G#") == (8, "major")
    with pytest.raises(ValueError):
        K.parse("H minor")


def test_mirex_score_weights():
    assert K.mirex_score((0, "major"), (0, "major")) == 1.0
    assert K.mirex_score((7, "major"), (0, "major")) == 0.5      # a fifth above
    assert K.mirex_score((9, "minor"), (0, "major")) == 0.3      # relative minor
    assert K.mirex_score((0, "major"), (9, "minor")) == 0.3      # relative major
    assert K.mirex_score((0, "minor"), (0, "major")) == 0.2      # parallel
    assert K.mirex_score((1, "major"), (0, "major")) == 0.0
    assert K.mirex_score(None, (0, "major")) == 0.0
