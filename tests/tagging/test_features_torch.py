"""The batched torch features (``workers.tagging.features_torch``) give the numpy path's answers.

On a GPU tagger the tempo, key and loudness of a batch are measured in torch next to the
networks; the code is device-agnostic, and a GPU cannot run here, so these tests run it on CPU
torch in float32: the device changes the arithmetic's speed, not its formulation. Parity is
checked against ``workers.features`` itself on synthetic signals of several rates, channel
counts and lengths in one batch (so grouping and padding are exercised), including the ones that
are not measurable. The end-to-end test forces the torch path through ``Analyzer``.
"""
from __future__ import annotations

import math
import pickle
import numpy as np
import pytest

from workers.features import extract, synth
from workers.tagging import features_torch as ft

from tests.audio_factory import make_file

LU, DB, BPM_REL = 0.05, 0.05, 0.005  # the parity bounds: loudness, true peak, tempo


def _channels(mono: np.ndarray, channels: int) -> np.ndarray:
    """A mono signal on ``channels`` channels, each a little quieter (so the channel weights matter)."""
    mono = np.asarray(mono).reshape(len(mono), -1)[:, 0]
    return (mono[:, None] * np.linspace(1.0, 0.7, channels)).astype(np.float32)


def _music(bpm: float, tonic: int, mode: str, rate: int, seconds: float, seed: int) -> np.ndarray:
    beat = synth.drums(bpm, "kit", seconds=seconds, rate=rate, seed=seed)
    harmony = synth.tonal(tonic, mode, "chords", "saw", seconds=seconds, rate=rate, seed=seed + 1)
    return 0.5 * beat + 0.5 * harmony


def _intersample_sine(rate: int, seconds: float) -> np.ndarray:
    """A sine at a quarter of the rate sampled 45 degrees off its crests: true peak 3 dB above the samples."""
    n = np.arange(int(rate * seconds))
    return (0.9 * np.sin(np.pi / 2 * n + np.pi / 4)).astype(np.float32)


CLIPS = {  # name: (samples (frames, channels), rate)
    "drums 128, 44.1 kHz stereo": (_channels(synth.drums(128, seconds=16, rate=44100, seed=3), 2), 44100),
    "music 97 A minor, 44.1 kHz stereo, shorter": (_channels(_music(97, 9, "minor", 44100, 12, 5), 2), 44100),
    "music 140 D major, 48 kHz mono": (_channels(_music(140, 2, "major", 48000, 13, 7), 1), 48000),
    "melody Bb major, 22.05 kHz 5.1": (_channels(synth.tonal(10, "major", "melody", "saw", seconds=10, rate=22050,
                                                              seed=9), 6), 22050),
    "intersample sine, 44.1 kHz": (_channels(_intersample_sine(44100, 3.0), 2), 44100),
    "noise, 96 kHz stereo": (synth.noise(7, 96000, channels=2, seed=1).astype(np.float32), 96000),
    "music, 192 kHz stereo": (_channels(_music(110, 4, "minor", 192000, 7, 11), 2), 192000),
    "two seconds": (_channels(synth.sine(440, 2.0, 44100), 2), 44100),
    "silence": (np.zeros((44100 * 7, 2), np.float32), 44100),
    "a quarter second": (_channels(synth.sine(1000, 0.25, 44100), 1), 44100),
    "6 kHz (below BS.1770's range)": (_channels(_music(120, 0, "major", 6000, 8, 13), 1), 6000),
}


def _native(samples: np.ndarray, rate: int) -> ft.Native:
    """A clip as float32 planes, so both paths see the very same input."""
    return ft.Native(np.ascontiguousarray(samples.T), rate)


@pytest.fixture(scope="module")
def measured():
    """Per clip: (numpy path, torch path) ``Features.to_json()``, the torch path as one batch of all."""
    names = list(CLIPS)
    reference = [extract.analyze(*CLIPS[n]).to_json() for n in names]
    batched = ft.measure_batch([_native(*CLIPS[n]) for n in names], device="cpu")
    return dict(zip(names, zip(reference, batched)))


def _db(linear: float) -> float:
    return 20 * math.log10(linear) if linear > 0 else -math.inf


def assert_parity(ref: dict, got: dict) -> None:
    """Same measurability and reasons; loudness, peaks, tempo within the bounds; the same key."""
    assert got["reasons"] == ref["reasons"]
    assert (got["loudness_lufs"] is None) == (ref["loudness_lufs"] is None)
    if ref["loudness_lufs"] is not None:
        assert got["loudness_lufs"] == pytest.approx(ref["loudness_lufs"], abs=LU)
    assert _db(got["true_peak"]) == pytest.approx(_db(ref["true_peak"]), abs=DB)
    assert _db(got["sample_peak"]) == pytest.approx(_db(ref["sample_peak"]), abs=DB)
    assert (got["bpm"] is None) == (ref["bpm"] is None)
    if ref["bpm"] is not None:
        assert got["bpm"] == pytest.approx(ref["bpm"], rel=BPM_REL)
    assert got["key"] == ref["key"]
    assert got["seconds"] == ref["seconds"] and (got["rate"], got["channels"]) == (ref["rate"], ref["channels"])
    hist_ref = {i: c for i, c, _ in ref["album_data"]["bins"]}
    hist_got = {i: c for i, c, _ in got["album_data"]["bins"]}
    assert sum(hist_got.values()) == sum(hist_ref.values())  # the album data holds the same blocks


@pytest.mark.parametrize("name", list(CLIPS))
def test_the_torch_path_gives_the_numpy_answers(measured, name):
    ref, got = measured[name]
    assert_parity(ref, got)


def test_the_clips_are_the_cases_they_are_meant_to_be(measured):
    """The parity above means something only if the clips measure what they were made for."""
    ref = {name: pair[0] for name, pair in measured.items()}
    assert ref["drums 128, 44.1 kHz stereo"]["bpm"] == pytest.approx(128, rel=0.02)
    assert ref["music 97 A minor, 44.1 kHz stereo, shorter"]["key"] == "A minor"
    assert ref["music 140 D major, 48 kHz mono"]["key"] == "D major"
    sine = ref["intersample sine, 44.1 kHz"]
    assert _db(sine["true_peak"]) - _db(sine["sample_peak"]) == pytest.approx(3.0, abs=0.2)
    assert "400 ms" in ref["a quarter second"]["reasons"]["loudness"]
    assert "below -70" in ref["silence"]["reasons"]["loudness"]
    assert "6000 Hz" in ref["6 kHz (below BS.1770's range)"]["reasons"]["loudness"]
    assert "too short" in ref["two seconds"]["reasons"]["tempo"]


def _feed(sink, samples: np.ndarray, rate: int, frame: int = 1152) -> None:
    """Hand ``samples`` to a native sink in decoder-sized frames, a float32 plane per channel as the decoder does."""
    for i in range(0, len(samples), frame):
        sink(list(samples[i:i + frame].T), rate)


def _shipped(samples: np.ndarray, rate: int) -> ft.Native:
    """What a decode worker ships of a clip."""
    capture = ft.NativeCapture()
    _feed(capture, samples, rate)
    return capture.native()


def test_sub_batches_and_what_decode_workers_ship_give_the_same_answers(monkeypatch):
    """A small device budget splits a group into several passes; the int16 blocks shipped lose nothing measurable."""
    names = ["drums 128, 44.1 kHz stereo", "music 97 A minor, 44.1 kHz stereo, shorter", "two seconds"]
    whole = ft.measure_batch([_native(*CLIPS[n]) for n in names])
    monkeypatch.setattr(ft, "BATCH_VALUES", 2 * CLIPS[names[1]][0].size)  # padded: 2 s + 12 s fit, not 16 s too
    assert ft._sub_batches([2, 1, 0], [_native(*CLIPS[n]) for n in names]) == [[2, 1], [0]]
    shipped = ft.measure_batch([_shipped(*CLIPS[n]) for n in names])
    for ref, got in zip(whole, shipped):
        assert_parity(ref, got)


def test_a_decode_worker_keeps_int16_blocks_until_the_cap_then_measures_itself():
    x, rate = CLIPS["music 97 A minor, 44.1 kHz stereo, shorter"]
    kept = ft.NativeCapture()
    _feed(kept, x, rate)
    assert kept.result() == {}
    native = kept.native()
    assert native.rate == rate and native.planes.dtype == np.int16 and native.planes.shape == x.T.shape
    assert np.abs(native.tensor("cpu").numpy() - x.T).max() <= np.abs(x).max() / ft.FULL_SCALE  # half a step
    loud = np.array([[0.5, 2.0, -1.5]], np.float32)  # an over above full scale keeps its value
    assert np.allclose(_shipped(loud.T, rate).tensor("cpu").numpy(), loud, rtol=1e-4)

    capped = ft.NativeCapture(cap=x.size // 3)
    _feed(capped, x, rate)
    assert capped.native() is None and capped.seconds > 0
    assert_parity(extract.analyze(x, rate).to_json(), capped.result())


def test_a_decode_worker_gives_the_cpu_reasons_when_there_is_nothing_to_ship():
    x, rate = CLIPS["two seconds"]
    changing = ft.NativeCapture()
    _feed(changing, x[:4410], rate)
    _feed(changing, x[:4410, :1], rate)
    assert "changes from 44100 Hz, 2 channels" in changing.result()["reasons"]["all"] and changing.native() is None
    assert "no audio" in ft.NativeCapture().result()["reasons"]["all"]
    partial = ft.NativeCapture()
    _feed(partial, x, rate)
    assert "only part" in partial.result(complete=False)["reasons"]["all"]


class _Ready:
    """What ``measure_prepared`` needs of a ``pipeline.Prepared``."""

    def __init__(self, native):
        self.native, self.features, self.timings = native, {}, {"features": 0.0}


def test_a_failing_device_pass_measures_on_the_cpu_instead(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(ft, "measure_batch", broken)
    x, rate = CLIPS["music 140 D major, 48 kHz mono"]
    files = [_Ready(_shipped(x, rate)), _Ready(None)]
    ft.measure_prepared(files, "cuda")
    assert files[0].native is None and files[0].timings["features"] > 0
    assert_parity(extract.analyze(x, rate).to_json(), files[0].features)
    assert files[1].features == {}  # measured by its decode worker: left alone


def test_the_gpu_wiring_end_to_end_on_the_cpu(installed_models_dir, tmp_path, monkeypatch):
    """Forced on, decode workers ship samples, ``score_prepared`` measures them in torch: the CPU path's answers."""
    from workers.tagging import pipeline

    files = [make_file(tmp_path, "flac", samples=_channels(_music(124, 9, "minor", 44100, 12, 21), 2).T,
                       name="a.flac"),
             make_file(tmp_path, "wav", samples=_channels(_music(100, 7, "major", 48000, 9, 23), 1).T,
                       sample_rate=48000, name="b.wav")]
    analyzer = pipeline.Analyzer("cpu", models_dir=installed_models_dir)
    try:
        cpu = [a.features for a in analyzer.analyze_many(files)]
        analyzer.batched_features = True
        # through pickle, as from a decode worker
        prepared = [pickle.loads(pickle.dumps(pipeline.prepare_file(f, native=True))) for f in files]
        assert all(p.native is not None and p.features == {} for p in prepared)
        monkeypatch.setattr(ft, "_on_cpu", lambda native: pytest.fail("the torch path fell back to the CPU"))
        on_device = analyzer.score_prepared(prepared)
        assert all(p.native is None for p in prepared)  # dropped once measured
        via_submit = analyzer.analyze_many(files)
    finally:
        analyzer.close()
    for ref, a, b in zip(cpu, on_device, via_submit):
        assert ref["bpm"] is not None and ref["key"] is not None and ref["loudness_lufs"] is not None
        assert_parity(ref, a.features)
        assert_parity(ref, b.features)
        assert a.timings["features"] > 0
