"""Tempo, key and loudness from the tagger's own decode, on the track and in the files where players look.

Real files in every tag family, scanned and tagged by the tag worker's job
code in-process with the real networks, then the album's rewrite jobs run by
the real recalibrator. The loudness reference is pyloudnorm on the file's own
samples at its own rate (decoded here independently, with PyAV).
"""
import wave
from pathlib import Path

import av
import mutagen
import numpy as np
import pyloudnorm as pyln
import pytest
from mutagen.id3 import TXXX

from workers.calibration.recalibrate_worker import RecalibrateWorker
from workers.features import FEATURES_VERSION, synth
from workers.jobs import queue
from workers.jobs.runtime import Context
from workers.library import untag
from workers.models import Job, Library, Track
from workers.tagfiles import standard
from workers.tagfiles.namespace import open_tags, read_earmark_tags

from tests.audio_factory import make_file
from tests.tagging.test_tagger import library, models, run_tag_jobs, scan_and_tag, tagger  # noqa: F401 (fixtures)

pytestmark = pytest.mark.django_db

RATE = 44100
FORMATS = ["mp3", "flac", "opus", "m4a", "ogg"]  # ID3, Vorbis comments (with and without R128), MP4


def beat(bpm=120.0, seconds=16.0, seed=1, gain=0.5) -> np.ndarray:
    """A stereo drum pattern over an A minor chord bed: a steady beat and a tonal centre."""
    x = gain * synth.drums(bpm, "kit", 0.5, seconds, RATE, seed=seed)
    x = x + 0.3 * gain * synth.tonal(9, "minor", "chords", "saw", seconds, RATE, seed=seed)
    return np.stack([x, 0.6 * x]).astype(np.float32)


def native(path) -> tuple[np.ndarray, int]:
    """The file's samples at its own rate and channels, decoded here without Earmark's decoder."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate
        planar = av.AudioResampler(format="fltp", layout=stream.codec_context.layout.name, rate=rate)
        frames = [out.to_ndarray() for f in container.decode(stream) for out in planar.resample(f)]
        frames += [out.to_ndarray() for out in planar.resample(None)]
    x = np.concatenate(frames, axis=1)
    return x.T.astype(np.float64), rate


def field(path, name):
    return (open_tags(str(path)).standard_raw(name) or {}).get("text")


def run_rewrites() -> list:
    """The recalibrator's queue, in-process: the album-gain rewrites."""
    worker, results = RecalibrateWorker(), []
    while jobs := queue.claim("calibrate", "worker:t:calibrate:1", "boot", 8):
        for job in jobs:
            results.append(worker.process(job, Context()))
            queue.complete([job.id], "worker:t:calibrate:1", {job.id: results[-1]})
    worker.teardown()
    return results


def test_an_album_gets_bpm_key_and_replaygain_in_every_tag_family(library, tagger, models):
    album = Path(library.root) / "Album"
    files = [make_file(album, fmt, samples=beat(seed=i, gain=0.25 + 0.1 * i),
                       tags={"album": "Test Album", "artist": "A", "title": fmt}) for i, fmt in enumerate(FORMATS)]
    assert scan_and_tag(library, tagger) == []
    rewrites = Job.objects.filter(queue="calibrate", key__startswith="album:")
    assert rewrites.count() == len(FORMATS) - 1, "the last track measured saw the album whole; the others rewrite"
    assert all(r.get("written") for r in run_rewrites())
    tracks = {Path(t.path).name: t for t in Track.objects.all()}
    album_gains = {t.album_gain_db for t in tracks.values()}
    assert len(album_gains) == 1 and None not in album_gains
    meter_inputs = []
    for path in files:
        t = tracks[path.name]
        assert t.state == "tagged" and t.features_version == FEATURES_VERSION
        samples, rate = native(path)
        assert rate == t.features["rate"] and samples.shape[1] == t.features["channels"] == 2
        reference = pyln.Meter(rate).integrated_loudness(samples)
        assert abs(t.loudness_lufs - reference) <= 0.1, (path.name, t.loudness_lufs, reference)
        assert abs(t.track_gain_db - (-18 - reference)) <= 0.11
        assert abs(t.bpm - 120) <= 2.4 and t.musical_key == "A minor", (path.name, t.bpm, t.musical_key)
        meter_inputs.append(samples)
        fmt = path.suffix.lstrip(".")
        assert field(path, "bpm") == ["120"]
        assert field(path, "key") == ["Am"]
        if fmt == "opus":  # RFC 7845: R128 gains in Q7.8 against -23 LUFS, no REPLAYGAIN_* comments
            assert field(path, "r128_track_gain") == [str(round((t.track_gain_db - 5) * 256))]
            assert field(path, "r128_album_gain") == [str(round((t.album_gain_db - 5) * 256))]
            assert not any(k.upper().startswith("REPLAYGAIN") for k in mutagen.File(path).tags.keys())
        else:
            assert field(path, "replaygain_track_gain") == [f"{t.track_gain_db:+.2f} dB"]
            assert field(path, "replaygain_track_peak") == [f"{t.track_peak:.6f}"]
            assert field(path, "replaygain_album_gain") == [f"{t.album_gain_db:+.2f} dB"]
        ours = read_earmark_tags(path)
        assert ours["bpm"] == [f"{t.bpm:.1f}"] and ours["key"] == ["A minor"]
        if fmt == "m4a":
            assert mutagen.File(path).tags["tmpo"] == [120]
    # The album gain is the gating over all tracks' blocks, not a mean of track gains: louder tracks weigh more.
    assert min(t.track_gain_db for t in tracks.values()) < album_gains.pop() < max(t.track_gain_db for t in tracks.values())


def test_fill_empty_keeps_the_users_replaygain_and_replace_keeps_it_to_restore(library, tagger, models):
    root = Path(library.root)
    mp3 = make_file(root, "mp3", samples=beat(), name="user.mp3")
    flac = make_file(root, "flac", samples=beat(), name="user.flac")
    tags = mutagen.File(mp3)
    tags.tags.add(TXXX(encoding=3, desc="replaygain_track_gain", text=["-3.00 dB"]))  # foobar2000's lower case
    tags.save()
    tags = mutagen.File(flac)
    tags["REPLAYGAIN_TRACK_PEAK"] = "0.500000"  # half a pair is still the user's ReplayGain
    tags["BPM"] = "60"
    tags.save()
    assert scan_and_tag(library, tagger) == []
    assert field(mp3, "replaygain_track_gain") == ["-3.00 dB"] and field(mp3, "replaygain_track_peak") is None
    assert field(flac, "replaygain_track_peak") == ["0.500000"] and field(flac, "replaygain_track_gain") is None
    assert field(flac, "bpm") == ["60"] and field(mp3, "bpm") == ["120"], "fill-empty: only empty fields"
    assert field(flac, "key") == ["Am"]

    library.standard_tags = Library.StandardTags.REPLACE
    library.save()
    Track.objects.update(model_version="")  # due again
    for t in Track.objects.all():
        queue.enqueue("tag", f"tag:{t.id}", track_id=t.id, library_id=t.library_id)
    assert run_tag_jobs(tagger) == []
    gain = Track.objects.get(path__endswith="user.mp3").track_gain_db
    assert field(mp3, "replaygain_track_gain") == [f"{gain:+.2f} dB"] and field(flac, "bpm") == ["120"]

    untag.untag([str(mp3), str(flac)])
    assert field(mp3, "replaygain_track_gain") == ["-3.00 dB"] and field(mp3, "bpm") is None
    assert field(flac, "bpm") == ["60"] and field(flac, "replaygain_track_peak") == ["0.500000"]
    assert field(flac, "key") is None and not read_earmark_tags(flac)


@pytest.mark.parametrize("kind", ["silence", "2s", "clipping", "mono", "8ch", "192k", "no-beat"])
def test_hard_signals_get_a_value_or_a_reason_never_a_failed_job(kind, library, tagger, models):
    root = Path(library.root)
    if kind == "silence":
        make_file(root, "flac", samples=np.zeros((2, RATE * 8), np.float32), name="f.flac")
    elif kind == "2s":
        make_file(root, "flac", samples=beat(seconds=2.0), name="f.flac")
    elif kind == "clipping":
        make_file(root, "flac", samples=np.clip(beat(gain=4.0), -1, 1), name="f.flac")
    elif kind == "mono":
        make_file(root, "mp3", samples=beat()[:1], name="f.mp3")
    elif kind == "8ch":  # 7.1 as plain PCM (Earmark's test encoder makes up to 5.1)
        pcm = (np.repeat(beat()[:1], 8, axis=0).T * 0.3 * 32767).astype("<i2")
        with wave.open(str(root / "f.wav"), "wb") as out:
            out.setnchannels(8), out.setsampwidth(2), out.setframerate(RATE), out.writeframes(pcm.tobytes())
    elif kind == "192k":
        x = 0.4 * synth.drums(120.0, "kit", 0.5, 12.0, 192000, seed=3)
        make_file(root, "flac", samples=np.stack([x, x]).astype(np.float32), sample_rate=192000, name="f.flac")
    else:
        make_file(root, "flac", samples=np.stack([synth.pad(seconds=16.0, rate=RATE, seed=2)] * 2) * 0.5,
                  name="f.flac")
    assert scan_and_tag(library, tagger) == []
    track = Track.objects.get()
    assert track.state == "tagged", track.error
    f, reasons = track.features, track.features.get("reasons", {})
    for name, value in (("loudness", f.get("loudness_lufs")), ("tempo", f.get("bpm")), ("key", f.get("key"))):
        assert (value is None) == (name in reasons), (kind, name, value, reasons)
    path = track.path
    assert (field(path, "bpm") is None) == (track.bpm is None)
    assert (field(path, "replaygain_track_gain") is None) == (track.track_gain_db is None)
    if kind == "silence":
        assert track.loudness_lufs is None and track.bpm is None and read_earmark_tags(path)["loudness_unmeasured"]
    if kind in ("2s", "no-beat"):
        assert track.bpm is None, "no BPM rather than a wrong one"
    if kind == "clipping":
        assert f["clipped"] and track.track_peak >= 0.999
    if kind in ("mono", "8ch", "192k"):
        assert f["channels"] == {"mono": 1, "8ch": 8, "192k": 2}[kind] and track.loudness_lufs is not None
        assert f["rate"] == (192000 if kind == "192k" else RATE)
        assert kind == "8ch" or abs(track.bpm - 120) <= 2.4


def test_a_recalibration_keeps_the_measured_fields(library, tagger, models):
    path = make_file(Path(library.root), "flac", samples=beat(), name="f.flac")
    assert scan_and_tag(library, tagger) == []
    track = Track.objects.get()
    queue.enqueue("calibrate", f"calibrate:{track.id}:x", {"force": True}, track_id=track.id,
                  library_id=track.library_id)
    assert run_rewrites()
    assert field(path, "bpm") == ["120"] and field(path, "replaygain_track_gain") == [f"{track.track_gain_db:+.2f} dB"]
    assert read_earmark_tags(path)["bpm"] == [f"{track.bpm:.1f}"]
    assert standard.read_record(open_tags(str(path)))["bpm"]["ours"] == ["120"]
