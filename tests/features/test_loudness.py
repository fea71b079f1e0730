"""BS.1770-4 loudness, true peak and ReplayGain 2.0 against pyloudnorm and the standard's own test signals."""
from __future__ import annotations

import json

import numpy as np
import pyloudnorm as pyln  # the test extra: a missing reference must fail, not skip
import pytest

from workers.features import loudness as L
from workers.features import synth

RATES = (44100, 48000, 96000, 192000)
LAYOUTS = {"mono": 1, "stereo": 2, "5.1": 6}


def _signal(kind: str, level: float, rate: int, channels: int) -> np.ndarray:
    if kind == "sine":
        x = synth.sine(997.0, 3.0, rate, level, channels)
    else:
        x = synth.noise(3.0, rate, level, channels, seed=channels)
    if channels == 6:
        x[:, 3] *= 0.8   # the LFE (weight 0)
        x[:, 4:] *= 0.5  # quieter surrounds (weight 1.41)
    return x


def _reference(x: np.ndarray, rate: int) -> float:
    # pyloudnorm knows up to 5 channels in the order L R C Ls Rs and has no LFE: drop it.
    ref = x[:, [0, 1, 2, 4, 5]] if x.shape[1] == 6 else x
    return pyln.Meter(rate).integrated_loudness(ref)


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind,level", [("sine", -20.0), ("sine", -40.0), ("noise", -14.0), ("noise", -33.0)])
def test_integrated_loudness_is_within_0_1_lu_of_pyloudnorm(rate, layout, kind, level):
    x = _signal(kind, level, rate, LAYOUTS[layout])
    ours = L.measure(x, rate)
    assert ours.reason is None
    assert ours.integrated_lufs == pytest.approx(_reference(x, rate), abs=0.1)


def test_the_ebu_3341_reference_tone_reads_its_level():
    """EBU Tech 3341 case 1: a 1 kHz stereo sine at -23 dBFS is -23.0 LUFS (+-0.1)."""
    for rate in (44100, 48000):
        assert L.measure(synth.sine(997.0, 5.0, rate, -23.0, 2), rate).integrated_lufs == pytest.approx(-23.0, abs=0.1)


def test_gating_drops_the_quiet_part_as_pyloudnorm_does():
    rate = 48000
    loud = synth.noise(4.0, rate, -18.0, 2, seed=1)
    quiet = synth.noise(4.0, rate, -50.0, 2, seed=2)
    x = np.concatenate([loud, quiet, np.zeros((rate, 2)), loud])
    ours = L.measure(x, rate).integrated_lufs
    assert ours == pytest.approx(_reference(x, rate), abs=0.1)
    assert ours == pytest.approx(L.measure(loud, rate).integrated_lufs, abs=0.3)  # the quiet part is gated out


def test_chunked_input_gives_the_same_numbers_as_one_array():
    rate = 44100
    x = synth.noise(5.0, rate, -20.0, 2, seed=3)
    whole = L.measure(x, rate, chunk_frames=len(x))
    rng = np.random.default_rng(0)
    meter = L.LoudnessMeter(rate, 2)
    i = 0
    while i < len(x):
        n = int(rng.integers(1, 9000))
        meter.add(x[i:i + n])
        i += n
    parts = meter.result()
    assert parts.integrated_lufs == pytest.approx(whole.integrated_lufs, abs=1e-9)
    assert parts.true_peak == pytest.approx(whole.true_peak, abs=1e-9)
    assert parts.histogram == whole.histogram


def test_silence_and_too_short_are_not_measurable_with_a_reason():
    silent = L.measure(np.zeros((48000 * 3, 2)), 48000)
    assert silent.integrated_lufs is None and silent.track_gain_db is None
    assert "silence" in silent.reason
    short = L.measure(synth.noise(0.3, 48000, -20.0, 2), 48000)
    assert short.integrated_lufs is None and "shorter than one 400 ms block" in short.reason
    empty = L.measure(np.zeros((0, 1)), 44100)
    assert empty.integrated_lufs is None and empty.sample_peak == 0.0


def test_true_peak_finds_the_peak_between_samples():
    rate = 48000
    n = np.arange(rate)
    x = 0.5 * np.sin(2 * np.pi * n / 4 + np.pi / 4)[:, None]  # fs/4 at 45 degrees: samples at +-0.354
    r = L.measure(x, rate)
    assert r.sample_peak == pytest.approx(0.5 / np.sqrt(2), rel=1e-6)
    assert 20 * np.log10(r.true_peak / 0.5) == pytest.approx(0.0, abs=0.2)
    assert r.true_peak_dbtp == pytest.approx(-6.02, abs=0.2)


def test_true_peak_is_at_least_the_sample_peak_at_every_rate():
    for rate in RATES:
        x = synth.noise(1.0, rate, -10.0, 2, seed=rate)
        r = L.measure(x, rate)
        assert r.true_peak >= r.sample_peak > 0


def test_replaygain_2_track_gain_is_minus_18_minus_loudness():
    r = L.measure(synth.noise(3.0, 44100, -20.0, 2), 44100)
    assert r.track_gain_db == pytest.approx(-18.0 - r.integrated_lufs)
    tags = L.replaygain_tags(r)
    assert tags["REPLAYGAIN_TRACK_GAIN"] == f"{r.track_gain_db:+.2f} dB"
    assert float(tags["REPLAYGAIN_TRACK_PEAK"]) == pytest.approx(r.true_peak, abs=1e-6)


def test_album_gates_every_tracks_blocks_together():
    rate = 44100
    a = synth.noise(20.0, rate, -14.0, 2, seed=1)
    b = synth.noise(4.0, rate, -30.0, 2, seed=2)
    ra, rb = L.measure(a, rate), L.measure(b, rate)
    whole = L.measure(np.concatenate([a, b]), rate).integrated_lufs
    alb = L.album([ra, rb])
    assert alb.integrated_lufs == pytest.approx(whole, abs=0.1)
    # Not the mean of the track loudnesses: the long loud track dominates, the quiet one is gated out.
    assert abs(alb.integrated_lufs - (ra.integrated_lufs + rb.integrated_lufs) / 2) > 3
    assert alb.gain_db == pytest.approx(-18.0 - alb.integrated_lufs)
    assert alb.peak == max(ra.true_peak, rb.true_peak)
    assert L.album([ra]).integrated_lufs == pytest.approx(ra.integrated_lufs, abs=0.02)


def test_album_data_is_small_json_and_round_trips():
    rate = 44100
    r = L.measure(synth.noise(60.0, 8000, -20.0, 1) * np.linspace(0.05, 1, 480000)[:, None], 8000)
    text = json.dumps(r.histogram)
    assert len(text) < 30_000
    back = json.loads(text)
    assert L.album([back], peaks=[r.true_peak]).integrated_lufs == pytest.approx(r.integrated_lufs, abs=0.02)
    silent = L.measure(np.zeros((rate, 2)), rate)
    assert L.album([silent]).integrated_lufs is None and L.album([silent]).reason
    assert L.album([silent, r]).integrated_lufs == pytest.approx(r.integrated_lufs, abs=0.02)


def test_channel_weights_follow_bs1770():
    assert list(L.channel_weights(6)) == [1.0, 1.0, 1.0, 0.0, 1.41, 1.41]
    assert list(L.channel_weights(8)) == [1.0, 1.0, 1.0, 0.0, 1.41, 1.41, 1.41, 1.41]
    rate = 48000
    x = np.zeros((rate * 3, 6))
    x[:, 3] = synth.noise(3.0, rate, -10.0, 1)[:, 0]  # only the LFE plays
    assert L.measure(x, rate).integrated_lufs is None


def test_integer_samples_are_scaled_to_full_scale():
    rate = 44100
    x = synth.sine(997.0, 3.0, rate, -20.0, 2)
    as_int = np.round(x * 32767).astype(np.int16)
    assert L.measure(as_int, rate).integrated_lufs == pytest.approx(L.measure(x, rate).integrated_lufs, abs=0.01)


@pytest.mark.parametrize("layout", ["float32 C", "float32 planar", "float64 C"])
def test_the_compiled_k_weighting_is_scipys_filter_chunk_after_chunk(layout):
    """kernels.kweighted_energy against scipy's sosfilt, its state carried over three uneven chunks."""
    from scipy import signal

    from workers.features.kernels import kweighted_energy

    rng = np.random.default_rng(7)
    x = rng.standard_normal((30_001, 2)) * 0.3
    x = x.astype(np.float32) if layout.startswith("float32") else x
    sos, weights = L.k_weighting_sos(44100), np.array([1.0, 1.41])
    y, _ = signal.sosfilt(sos, x.astype(np.float64), axis=0, zi=np.zeros((2, 2, 2)))
    state, energy, peak = np.zeros((2, 2, 2)), [], []
    for part in np.split(x, [7, 20_000]):
        part = np.asfortranarray(part) if layout.endswith("planar") else part  # the decoder's transposed planes
        e, p = np.empty(len(part)), np.empty(len(part))
        kweighted_energy(part, sos, state, weights, e, p)
        energy.append(e)
        peak.append(p)
    np.testing.assert_allclose(np.concatenate(energy), np.square(y) @ weights, rtol=1e-9, atol=1e-15)
    np.testing.assert_array_equal(np.concatenate(peak), np.abs(x).max(axis=1))
