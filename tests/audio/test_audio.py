"""Formats, encoding, decoding and synthesis: workers.audio.*

Every format is written for real and decoded back, so these tests catch a
PyAV or FFmpeg upgrade that changes what the taggers hear.
"""
from __future__ import annotations

import os
import tracemalloc

import numpy as np
import pytest

from tests import audio_factory as af
from workers.audio.decode import DecodeError, decode, iter_decode, probe
from workers.audio.encode import write_audio
from workers.audio.formats import FORMATS, format_for_path, get_format, tag_family
from workers.audio.synth import STYLES, plan_for, synth_clip

ALL = list(FORMATS)
LOSSLESS = [k for k, f in FORMATS.items() if f.lossless]
# Encoders that cannot keep the input's channels (see encode._fit_channels).
STEREO_ONLY = {"ogg": 2}
MP3_MAX = {"mp3": 2}
CODECS = {"mp3": "mp3", "flac": "flac", "ogg": "vorbis", "opus": "opus", "m4a": "aac",
            "alac": "alac", "wav": "pcm_s16le", "aiff": "pcm_s16be"}

TAGS = {"title": "Ünïcode Title", "artist": "Søren Quinn", "album": "Salt & Ember",
        "albumartist": "Søren Quinn", "tracknumber": "3/11", "date": "1998", "genre": "Jazz"}


def decoded_rate(fmt: str, rate: int) -> int:
    """The rate a file of ``fmt`` holds when written at ``rate``."""
    return 48000 if fmt == "opus" else rate


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


# ------------------------------------------------------------------ formats

@pytest.mark.parametrize("name, expected", [
    ("a.mp3", "mp3"), ("A.MP3", "mp3"), ("x.flac", "flac"), ("x.ogg", "ogg"), ("x.oga", "ogg"),
    ("x.opus", "opus"), ("x.m4a", "m4a"), ("x.mp4", "m4a"), ("x.wav", "wav"), ("x.aif", "aiff"),
    ("x.aiff", "aiff"), ("x.aifc", "aiff"), ("x.aac", None), ("cover.jpg", None), ("notes.txt", None),
    ("._x.mp3", None), ("mp3", None), ("x.mp3.partial", None),
    (b"/music/Bj\xc3\xb6rk/01.flac", "flac"), (b"/music/latin1-\xe9.MP3", "mp3"),
])
def test_format_for_path(name, expected):
    assert format_for_path(name) == expected


def test_format_table_is_consistent():
    for key, spec in FORMATS.items():
        assert spec.key == key
        assert spec.extension.startswith(".")
        assert spec.tag_family in ("id3", "mp4", "vorbis")
    assert tag_family("opus") == "vorbis" and tag_family("alac") == "mp4" and tag_family("aiff") == "id3"
    with pytest.raises(ValueError, match="unknown audio format"):
        get_format("wma")


# --------------------------------------------------------- round trips

@pytest.mark.parametrize("fmt", ALL)
def test_round_trip_stereo(tmp_path, fmt):
    path = af.make_file(tmp_path, fmt, seconds=1.5, channels=2, sample_rate=44100, seed=1)
    out = decode(path)
    assert out.samples.dtype == np.float32 and out.samples.ndim == 1
    assert out.sample_rate == 16000
    assert out.duration == pytest.approx(1.5, abs=0.05)
    assert out.channels == 2
    assert out.source_sample_rate == decoded_rate(fmt, 44100)
    assert out.codec == CODECS[fmt]
    assert out.complete and out.bad_packets == 0
    assert 0.01 < rms(out.samples) < 1.0


@pytest.mark.parametrize("fmt", ALL)
def test_probe_agrees_with_decode(tmp_path, fmt):
    path = af.make_file(tmp_path, fmt, seconds=1.5, sample_rate=44100)
    info = probe(path)
    assert info.duration == pytest.approx(1.5, abs=0.05)
    assert info.sample_rate == decoded_rate(fmt, 44100)
    assert info.channels == 2
    assert info.codec == decode(path).codec


@pytest.mark.parametrize("fmt", ALL)
def test_user_tags_written_the_natural_way(tmp_path, fmt):
    path = af.make_file(tmp_path, fmt, seconds=0.5, tags=TAGS)
    assert af.read_user_tags(path) == TAGS


def test_tag_families_use_native_containers(tmp_path):
    import mutagen
    from mutagen.id3 import ID3

    kinds = {}
    for fmt in ALL:
        audio = mutagen.File(af.make_file(tmp_path, fmt, seconds=0.3, tags={"title": "x"}))
        kinds[fmt] = "id3" if isinstance(audio.tags, ID3) else type(audio).__name__
    assert kinds == {"mp3": "id3", "wav": "id3", "aiff": "id3", "flac": "FLAC", "ogg": "OggVorbis",
                     "opus": "OggOpus", "m4a": "MP4", "alac": "MP4"}


@pytest.mark.parametrize("fmt", ALL)
def test_mono_is_plain_channel_average(tmp_path, fmt):
    """L = a tone, R = silence decodes to half the tone's level, not 1/sqrt(2)."""
    left = af.tone(1.0, 44100, freq=440.0, amplitude=0.5)
    stereo = np.stack([left, np.zeros_like(left)])
    path = af.make_file(tmp_path, fmt, sample_rate=44100, samples=stereo, name=f"lr{get_format(fmt).extension}")
    level = rms(decode(path).samples[1600:-1600])  # skip codec edges
    assert level == pytest.approx(rms(left) / 2, rel=0.05)


@pytest.mark.parametrize("fmt", ALL)
def test_mono_file_keeps_level(tmp_path, fmt):
    signal = af.tone(1.0, 44100, freq=330.0, amplitude=0.5)
    path = af.make_file(tmp_path, fmt, sample_rate=44100, samples=signal)
    out = decode(path)
    assert out.channels == STEREO_ONLY.get(fmt, 1)
    assert rms(out.samples[1600:-1600]) == pytest.approx(rms(signal), rel=0.05)


@pytest.mark.parametrize("fmt", ALL)
def test_8khz_input(tmp_path, fmt):
    path = af.make_file(tmp_path, fmt, seconds=1.0, sample_rate=8000, channels=1)
    out = decode(path)
    assert out.source_sample_rate == decoded_rate(fmt, 8000)
    assert out.duration == pytest.approx(1.0, abs=0.08)  # AAC at 8 kHz pads a 1024-sample frame
    assert len(out.samples) == pytest.approx(16000, abs=0.08 * 16000)


@pytest.mark.parametrize("fmt", ALL)
def test_six_channel_input(tmp_path, fmt):
    path = af.make_file(tmp_path, fmt, seconds=1.0, sample_rate=48000, channels=6)
    out = decode(path)
    assert out.channels == {**STEREO_ONLY, **MP3_MAX}.get(fmt, 6)
    assert out.duration == pytest.approx(1.0, abs=0.05)
    assert rms(out.samples) > 0.005


def test_six_channel_average_includes_every_channel(tmp_path):
    """One tone in the centre channel only: the mean over 6 channels is 1/6 of it."""
    centre = af.tone(1.0, 48000, amplitude=0.6)
    samples = np.zeros((6, len(centre)), dtype=np.float32)
    samples[2] = centre
    path = af.make_file(tmp_path, "flac", sample_rate=48000, samples=samples)
    assert rms(decode(path).samples[800:-800]) == pytest.approx(rms(centre) / 6, rel=0.03)


@pytest.mark.parametrize("rate", [16000, 22050, 48000])
def test_other_rates_resample_to_16k(tmp_path, rate):
    path = af.make_file(tmp_path, "flac", seconds=2.0, sample_rate=rate)
    out = decode(path)
    assert out.source_sample_rate == rate
    assert len(out.samples) == pytest.approx(32000, abs=20)


def test_decode_to_other_target_rate(tmp_path):
    path = af.make_file(tmp_path, "wav", seconds=1.0, sample_rate=44100)
    out = decode(path, target_sr=22050)
    assert out.sample_rate == 22050 and len(out.samples) == pytest.approx(22050, abs=10)


def test_decode_resamples_frequency_correctly(tmp_path):
    """A 1 kHz tone at 44.1 kHz is still 1 kHz after resampling to 16 kHz."""
    path = af.make_file(tmp_path, "flac", sample_rate=44100, samples=af.tone(1.0, 44100, freq=1000.0))
    samples = decode(path).samples
    spectrum = np.abs(np.fft.rfft(samples))
    peak_hz = np.argmax(spectrum) * 16000 / len(samples)
    assert peak_hz == pytest.approx(1000.0, abs=2.0)


# ------------------------------------------------------------ encoding

@pytest.mark.parametrize("fmt", ALL)
def test_encoding_is_deterministic(tmp_path, fmt):
    samples = synth_clip(9, 0.8)
    a, b = tmp_path / f"a{get_format(fmt).extension}", tmp_path / f"b{get_format(fmt).extension}"
    write_audio(a, samples, 44100, fmt, tags={"title": "same"})
    write_audio(b, samples, 44100, fmt, tags={"title": "same"})
    assert a.read_bytes() == b.read_bytes()


def test_write_audio_refuses_bad_input(tmp_path):
    with pytest.raises(ValueError, match="channels"):
        write_audio(tmp_path / "x.flac", np.zeros((3, 100), np.float32), 44100, "flac")
    with pytest.raises(ValueError, match="empty"):
        write_audio(tmp_path / "x.flac", np.zeros((2, 0), np.float32), 44100, "flac")
    with pytest.raises(ValueError, match="unknown audio format"):
        write_audio(tmp_path / "x.wma", np.zeros((2, 100), np.float32), 44100, "wma")
    with pytest.raises(ValueError, match="unknown tag keys"):
        write_audio(tmp_path / "x.flac", np.zeros((2, 100), np.float32), 44100, "flac", tags={"titel": "x"})


def test_write_audio_accepts_1d_and_clips(tmp_path):
    loud = np.full(8000, 3.0, dtype=np.float32)
    path = tmp_path / "loud.wav"
    write_audio(path, loud, 8000, "wav")
    out = decode(path, target_sr=8000)
    assert out.channels == 1 and float(out.samples.max()) <= 1.0


def test_bitrate_changes_lossy_size(tmp_path):
    samples = synth_clip(2, 2.0)
    low, high = tmp_path / "low.mp3", tmp_path / "high.mp3"
    write_audio(low, samples, 44100, "mp3", bitrate=64_000)
    write_audio(high, samples, 44100, "mp3", bitrate=256_000)
    assert high.stat().st_size > 2.5 * low.stat().st_size


# ------------------------------------------------------------ streaming

def test_iter_decode_chunks_match_whole_decode(tmp_path):
    path = af.make_file(tmp_path, "flac", seconds=3.3)
    chunks = list(iter_decode(path, chunk_seconds=1.0))
    assert [len(c) for c in chunks[:-1]] == [16000] * (len(chunks) - 1)
    assert 0 < len(chunks[-1]) <= 16000
    np.testing.assert_allclose(np.concatenate(chunks), decode(path).samples, atol=1e-6)


def test_iter_decode_memory_is_bounded(tmp_path):
    """Two minutes stream in 1 s chunks without ever holding the whole result."""
    path = af.make_file(tmp_path, "flac", sample_rate=8000, samples=af.tone(120.0, 8000, amplitude=0.3))
    whole = 120 * 16000 * 4  # bytes of the full 16 kHz float32 result
    tracemalloc.start()
    try:
        total = 0
        for chunk in iter_decode(path, chunk_seconds=1.0):
            assert len(chunk) <= 16000
            total += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == pytest.approx(120 * 16000, abs=100)
    assert peak < whole / 5


def test_max_seconds_stops_early(tmp_path):
    path = af.make_file(tmp_path, "mp3", seconds=3.0)
    out = decode(path, max_seconds=1.25)
    assert len(out.samples) == 20000 and not out.complete
    assert sum(len(c) for c in iter_decode(path, chunk_seconds=0.5, max_seconds=1.25)) == 20000


def test_max_seconds_longer_than_file_is_complete(tmp_path):
    path = af.make_file(tmp_path, "wav", seconds=1.0)
    out = decode(path, max_seconds=10)
    assert out.complete and out.duration == pytest.approx(1.0, abs=0.01)


# ------------------------------------------------------------ bad files

def expect_error(path, kind: str, *words: str) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        decode(path)
    err = info.value
    assert err.kind == kind, err.reason
    assert str(err) == err.reason and err.reason.startswith(kind.replace("_", " "))
    for word in words:
        assert word in err.reason
    return err


def test_empty_file(tmp_path):
    expect_error(af.make_empty(tmp_path), "empty", "0 bytes")


@pytest.mark.parametrize("name", ["noise.mp3", "noise.flac", "noise.m4a", "noise.ogg", "noise.wav"])
def test_random_bytes_are_not_audio(tmp_path, name):
    expect_error(af.make_random_bytes(tmp_path, name), "not_audio")


def test_image_named_mp3(tmp_path):
    expect_error(af.make_image_as_audio(tmp_path), "not_audio", "PNG image")


def test_png_maker_writes_a_valid_png():
    import struct
    import zlib

    data = af.png_bytes(3, 2)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    length = struct.unpack(">I", data[33:37])[0]
    assert zlib.decompress(data[41:41 + length]) == (b"\x00" + bytes([200, 40, 40]) * 3) * 2


def test_id3_tag_without_audio(tmp_path):
    expect_error(af.make_id3_only(tmp_path), "not_audio", "ID3")


def test_corrupt_id3_header_still_decodes(tmp_path):
    """FFmpeg skips a broken ID3 header and finds the MPEG frames after it
    (mutagen, by contrast, refuses the tag: the scanner must cope with that)."""
    import mutagen
    from mutagen.id3 import ID3NoHeaderError

    path = af.make_corrupt_id3_mp3(tmp_path, seconds=2.0)
    assert decode(path).duration == pytest.approx(2.0, abs=0.1)
    with pytest.raises((mutagen.MutagenError, ID3NoHeaderError, ValueError)):
        mutagen.File(path)


@pytest.mark.parametrize("fmt", ALL)
def test_truncated_files(tmp_path, fmt):
    path = af.make_truncated(tmp_path, fmt, fraction=0.4, seconds=3.0)
    if get_format(fmt).container == "ipod":
        # MP4 keeps its index (moov) at the end: a cut file cannot be opened.
        expect_error(path, "corrupt", "MP4", "cut short")
    elif get_format(fmt).container == "ogg":
        expect_error(path, "truncated", "Ogg")
    else:
        err = expect_error(path, "truncated", "of 3.0 s")
        assert err.reason.startswith("truncated: decoded 1.")


def test_slightly_short_file_is_accepted(tmp_path):
    """Losing the last few frames (under 10%) is not worth failing a song."""
    path = af.make_file(tmp_path, "flac", seconds=12.0, sample_rate=16000, channels=1)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.97)])
    assert decode(path).duration > 11.0


def test_damaged_middle_is_reported_as_corrupt(tmp_path):
    path = af.make_file(tmp_path, "m4a", seconds=5.0)
    data = bytearray(path.read_bytes())
    start, length = int(len(data) * 0.4), int(len(data) * 0.3)
    data[start:start + length] = np.random.default_rng(1).bytes(length)
    path.write_bytes(bytes(data))
    expect_error(path, "corrupt", "failed to decode")


def test_vanished_file(tmp_path):
    err = expect_error(tmp_path / "gone.flac", "vanished")
    with pytest.raises(DecodeError, match="vanished"):
        probe(tmp_path / "gone.flac")
    assert "no longer exists" in err.reason


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files regardless of permissions")
def test_unreadable_file(tmp_path):
    path = af.make_file(tmp_path, "flac", seconds=0.3)
    path.chmod(0)
    try:
        expect_error(path, "unreadable", "permission")
    finally:
        path.chmod(0o644)


@pytest.mark.parametrize("error, kind, words", [
    (PermissionError(13, "Permission denied"), "unreadable", "permission denied"),
    (FileNotFoundError(2, "No such file or directory"), "vanished", "disappeared"),
    (OSError(5, "Input/output error"), "unreadable", "Input/output error"),
])
def test_open_failures_after_stat(tmp_path, monkeypatch, error, kind, words):
    """Races (deleted, chmod-ed between stat and open) and disk errors,
    simulated at the point FFmpeg opens the file (root ignores chmod)."""
    import workers.audio.decode as decode_module

    path = af.make_file(tmp_path, "flac", seconds=0.3)

    def refuse(*args, **kwargs):
        raise error

    monkeypatch.setattr(decode_module.av, "open", refuse)
    expect_error(path, kind, words)


def test_bytes_path_that_is_not_utf8(tmp_path):
    """Old libraries hold Latin-1 names; the scanner passes them as bytes."""
    good = af.make_file(tmp_path, "flac", seconds=0.5)
    latin1 = os.fsencode(tmp_path) + b"/caf\xe9.flac"
    os.rename(good, latin1)
    assert decode(latin1).duration == pytest.approx(0.5, abs=0.02)
    assert probe(latin1).channels == 2


def test_directory_is_not_audio(tmp_path):
    folder = tmp_path / "album.flac"
    folder.mkdir()
    expect_error(folder, "not_audio", "regular file")


def test_probe_refuses_bad_files(tmp_path):
    with pytest.raises(DecodeError, match="PNG"):
        probe(af.make_image_as_audio(tmp_path))
    with pytest.raises(DecodeError, match="empty"):
        probe(af.make_empty(tmp_path))


# ------------------------------------------------------------ synthesis

def test_synth_is_deterministic_and_shaped():
    a = synth_clip(42, 1.0, 22050, 2)
    assert a.shape == (2, 22050) and a.dtype == np.float32
    assert np.array_equal(a, synth_clip(42, 1.0, 22050, 2))
    assert not np.array_equal(a, synth_clip(43, 1.0, 22050, 2))
    assert 0.1 < float(np.abs(a).max()) <= 0.95


@pytest.mark.parametrize("channels", [1, 2, 6])
def test_synth_channels(channels):
    clip = synth_clip(5, 0.5, 16000, channels)
    assert clip.shape == (channels, 8000)
    assert np.all(np.isfinite(clip))


def test_synth_varies_across_seeds():
    plans = [plan_for(np.random.default_rng(s)) for s in range(60)]
    assert len({p.style for p in plans}) >= 6
    assert len({round(p.tempo) for p in plans}) >= 30
    assert len({p.scale for p in plans}) >= 4
    levels = [rms(synth_clip(s, 1.0, 16000, 1)) for s in range(8)]
    assert max(levels) > 1.5 * min(levels)


def test_synth_style_can_be_fixed():
    assert plan_for(np.random.default_rng(0), "jazz").style == "jazz"
    for style in STYLES:
        assert synth_clip(1, 0.3, 16000, 1, style=style).shape == (1, 4800)
    with pytest.raises(ValueError):
        synth_clip(1, 0.3, style="polka")
