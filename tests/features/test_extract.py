"""The one entry point: every feature from one native-rate stream, and bad input never crashes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from workers.features import FEATURES_VERSION, FeatureAnalyzer, Features, album, analyze, synth

ROOT = Path(__file__).resolve().parents[2]


def _music(rate: int, channels: int, seconds: float = 12.0) -> np.ndarray:
    beat = synth.drums(124, "kit", seconds=seconds, rate=rate, seed=1)
    harmony = synth.tonal(9, "minor", "chords", "saw", seconds=seconds, rate=rate, seed=2)
    mono = 0.5 * beat + 0.5 * harmony
    return np.repeat(mono[:, None], channels, axis=1) * np.linspace(1.0, 0.8, channels)


def test_analyze_gives_every_feature():
    f = analyze(_music(44100, 2), 44100)
    assert f.version == FEATURES_VERSION
    assert f.reasons == {}
    assert -40 < f.loudness_lufs < 0 and f.track_gain_db == pytest.approx(-18.0 - f.loudness_lufs, abs=0.011)
    assert f.true_peak >= f.sample_peak > 0 and not f.clipped
    assert f.bpm == pytest.approx(124, rel=0.02) or f.bpm == pytest.approx(62, rel=0.02)
    assert (f.key, f.key_short, f.key_camelot, f.key_open) == ("A minor", "Am", "8A", "1m")
    tags = f.tags()
    assert tags["INITIALKEY"] == "Am" and tags["BPM"] in ("124", "62") and tags["REPLAYGAIN_TRACK_GAIN"].endswith(" dB")


def test_streaming_equals_one_array_and_json_round_trips():
    x = _music(48000, 2, seconds=10.0)
    whole = analyze(x, 48000)
    a = FeatureAnalyzer(48000, 2)
    for i in range(0, len(x), 4801):
        a.add(x[i:i + 4801])
    parts = a.result()
    assert parts.loudness_lufs == whole.loudness_lufs and parts.key == whole.key
    assert parts.bpm == pytest.approx(whole.bpm, abs=0.05)
    data = json.loads(json.dumps(parts.to_json()))
    assert Features.from_json(data).album_data == parts.album_data
    assert album([parts, whole]).integrated_lufs == pytest.approx(parts.loudness_lufs, abs=0.05)


def test_a_decoders_planes_frame_by_frame_measure_as_one_array():
    """StreamMeasure, fed one float32 array per channel as the decoder hands them (1,152-frame MP3 frames)."""
    from workers.features.extract import StreamMeasure

    x = _music(44100, 2, seconds=10.0).astype(np.float32)
    whole = analyze(x, 44100).to_json()
    measure = StreamMeasure()
    for i in range(0, len(x), 1152):
        measure([x[i:i + 1152, c].copy() for c in range(2)], 44100)
    parts = measure.result()
    assert parts["loudness_lufs"] == whole["loudness_lufs"] and parts["true_peak"] == whole["true_peak"]
    assert parts["key"] == whole["key"] and parts["bpm"] == pytest.approx(whole["bpm"], abs=0.05)


def test_the_package_does_not_import_numba_until_it_measures():
    """numba (~50 MB) is for measuring processes only: the web process imports the package for its version."""
    code = ("import sys, workers.features; assert 'numba' not in sys.modules; "
            "workers.features.loudness.LoudnessMeter(44100, 2); assert 'numba' in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


@pytest.mark.parametrize("case", ["silence", "two seconds", "clipping", "mono", "8 channels", "192 kHz",
                                  "int16", "nan", "empty", "1 kHz"])
def test_bad_input_gives_a_value_or_a_reason(case):
    rate, x = 44100, None
    if case == "silence":
        x = np.zeros((rate * 10, 2), dtype=np.float32)
    elif case == "two seconds":
        x = _music(rate, 2, seconds=2.0)
    elif case == "clipping":
        x = np.clip(_music(rate, 2) * 5, -1, 1)  # driven ~8 dB into the ceiling
    elif case == "mono":
        x = _music(rate, 1)[:, 0]
    elif case == "8 channels":
        rate, x = 48000, _music(48000, 8)
    elif case == "192 kHz":
        rate, x = 192000, _music(192000, 2, seconds=8.0)
    elif case == "int16":
        x = np.round(_music(rate, 2) * 20000).astype(np.int16)
    elif case == "nan":
        x = _music(rate, 2)
        x[1000:5000] = np.nan
    elif case == "empty":
        x = np.zeros((0, 2))
    elif case == "1 kHz":  # below what BS.1770 and the tempo front end are defined for
        rate, x = 1000, _music(8000, 1)[::8]
    f = analyze(x, rate)
    json.dumps(f.to_json())
    for name, value in (("loudness", f.loudness_lufs), ("tempo", f.bpm), ("key", f.key)):
        assert (value is None) == (name in f.reasons), (case, name, value, f.reasons)
    if case == "silence":
        assert set(f.reasons) == {"loudness", "tempo", "key"} and "silence" in f.reasons["loudness"]
    if case == "two seconds":
        assert f.loudness_lufs is not None and "too short" in f.reasons["tempo"] and "too short" in f.reasons["key"]
    if case == "clipping":
        assert f.clipped and f.true_peak > 1.0 and f.bpm is not None
    if case == "1 kHz":
        assert "8000 Hz" in f.reasons["loudness"] and "too low" in f.reasons["tempo"]
    if case in ("mono", "8 channels", "192 kHz", "int16", "nan"):
        assert f.loudness_lufs is not None and f.key == "A minor", f


def test_wrong_shapes_are_a_clear_error():
    with pytest.raises(ValueError):
        FeatureAnalyzer(0, 2)
    a = FeatureAnalyzer(44100, 2)
    with pytest.raises(ValueError, match="channels"):
        a.add(np.zeros((100, 3)))


def test_the_package_imports_neither_torch_nor_django():
    code = ("import sys, workers.features, workers.features.synth; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'django')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
