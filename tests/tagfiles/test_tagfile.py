"""Writing Earmark's tags into real files of every format, safely.

Each case starts from a genuinely encoded file carrying the kind of user
tags real libraries have (multi-valued artists, MusicBrainz ids, comments,
cover art, an ID3v1 tail) and checks that a safe write leaves the audio and
the user's tags exactly as they were.
"""
from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from mutagen import File as MutagenFile
from mutagen import MutagenError
from mutagen.flac import FLAC, Picture
from mutagen.id3 import APIC, COMM, TXXX
from mutagen.mp4 import MP4, MP4Cover, MP4FreeForm

from tests.audio_factory import id3_header, make_file, png_bytes
from workers.tagfiles import namespace as tagfile, safewrite, tempfiles, verify
from workers.audio.decode import decode
from workers.tagfiles.safewrite import FileChangedError, TagWriteError, safe_write_tags
from workers.tagging.categories import LABELS
from workers.tagging.tagset import build_tags

USER_TAGS = dict(title="Blue in Green", artist=["Miles Davis", "Bill Evans"], album="Kind of Blue",
                 albumartist="Miles Davis", tracknumber="3/5", discnumber="1/1", date="1959", genre="Jazz")

FIELDS = {
    "genre": ["jazz", "blues"],
    "mood": ["mellow"],
    "instrument": ["piano", "strings"],
    "vocals": ["instrumental"],
    "era": ["1960s"],
    "version": ["earmark/1 models=MTT_musicnn@abcd1234+MSD_musicnn@ef567890 calibration=uncalibrated"],
    "score_mtt_female_vocal": ["0.012"],
    "score_msd_hip_hop": ["0.003"],
}
MINIMAL = {k: v for k, v in FIELDS.items() if not k.startswith("score_")}

# case -> (format, ID3 version the file starts with or None)
CASES = {
    "mp3-v23": ("mp3", (2, 3)),
    "mp3-v24": ("mp3", (2, 4)),
    "flac": ("flac", None),
    "ogg": ("ogg", None),
    "opus": ("opus", None),
    "m4a": ("m4a", None),
    "alac": ("alac", None),
    "wav": ("wav", (2, 4)),
    "aiff": ("aiff", (2, 4)),
}


def make_user_file(tmp_path: Path, case: str) -> Path:
    """A 2 s file of ``case`` with rich user tags, mode 0640."""
    fmt, id3_version = CASES[case]
    path = make_file(tmp_path, fmt, seconds=2.0, tags=USER_TAGS, name=f"{case}{_ext(fmt)}")
    family = tagfile.tag_family(fmt)
    if family == "id3":
        _add_id3_extras(path, fmt, id3_version)
    elif family == "mp4":
        audio = MP4(path)
        audio.tags["----:com.apple.iTunes:MusicBrainz Album Id"] = [MP4FreeForm(b"b1a9c0e9-d987")]
        audio.tags["covr"] = [MP4Cover(png_bytes(), imageformat=MP4Cover.FORMAT_PNG)]
        audio.save()
    else:
        audio = MutagenFile(path)
        audio.tags["MUSICBRAINZ_ALBUMID"] = ["b1a9c0e9-d987"]
        audio.tags["COMMENT"] = ["first", "second"]
        if fmt == "flac":
            picture = Picture()
            picture.type, picture.mime, picture.data = 3, "image/png", png_bytes()
            audio.add_picture(picture)
        audio.save()
    os.chmod(path, 0o640)
    return path


def _ext(fmt: str) -> str:
    return {"mp3": ".mp3", "flac": ".flac", "ogg": ".ogg", "opus": ".opus", "m4a": ".m4a",
            "alac": ".m4a", "wav": ".wav", "aiff": ".aiff"}[fmt]


def _add_id3_extras(path: Path, fmt: str, version: tuple[int, int]) -> None:
    """User TXXX, comment and cover; MP3 v2.3 files also get an ID3v1 tail."""
    container = MutagenFile(path)
    tags = container.tags
    tags.add(TXXX(encoding=3, desc="MusicBrainz Album Id", text=["b1a9c0e9-d987"]))
    tags.add(COMM(encoding=3, lang="eng", desc="", text=["a user comment"]))
    tags.add(APIC(encoding=3, mime="image/png", type=3, desc="cover", data=png_bytes()))
    if version == (2, 3):
        tags.update_to_v23()
        tags.save(path, v2_version=3, v1=2)
    else:
        container.save()


def decoded(path: Path) -> np.ndarray:
    return decode(path).samples


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def temp_files(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.startswith(tempfiles.TEMP_PREFIX)]


def write(path: Path, fields=FIELDS, **kwargs):
    st = path.stat()
    return safe_write_tags(path, fields, st.st_size, st.st_mtime_ns, **kwargs)


# ------------------------------------------------------------- round trips

@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_keeps_audio_and_user_tags(tmp_path, case):
    fmt, id3_version = CASES[case]
    path = make_user_file(tmp_path, case)
    samples_before = decoded(path)
    user_before = tagfile.read_user_tags(path)
    assert user_before, "the fixture must carry user tags"

    result = write(path)

    assert result.changed
    st = path.stat()
    assert (result.size, result.mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert tagfile.read_earmark_tags(path) == FIELDS
    assert tagfile.read_user_tags(path) == user_before
    assert tagfile.read_id3_version(path) == id3_version
    np.testing.assert_array_equal(decoded(path), samples_before)
    assert temp_files(tmp_path) == []


@pytest.mark.parametrize("case", list(CASES))
def test_earmark_tags_are_plain_tags_to_other_software(tmp_path, case):
    fmt, _ = CASES[case]
    path = make_user_file(tmp_path, case)
    write(path)
    family = tagfile.tag_family(fmt)
    if family == "id3":
        tags = MutagenFile(path).tags
        assert tags["TXXX:earmark:genre"].text == ["jazz", "blues"]
        assert tags["TXXX:earmark:score_mtt_female_vocal"].text == ["0.012"]
        assert tags["TXXX:MusicBrainz Album Id"].text == ["b1a9c0e9-d987"]
    elif family == "mp4":
        tags = MP4(path).tags
        assert [bytes(v) for v in tags["----:com.apple.iTunes:earmark:genre"]] == [b"jazz", b"blues"]
        assert tags["\xa9nam"] == ["Blue in Green"]
    else:
        tags = MutagenFile(path).tags
        assert tags["EARMARK_GENRE"] == ["jazz", "blues"]
        assert tags["EARMARK_SCORE_MSD_HIP_HOP"] == ["0.003"]
        assert tags["ARTIST"] == ["Miles Davis", "Bill Evans"]


@pytest.mark.parametrize("case", list(CASES))
def test_writing_twice_is_idempotent(tmp_path, case):
    path = make_user_file(tmp_path, case)
    first = write(path)
    digest, mtime = sha(path), path.stat().st_mtime_ns
    second = write(path)
    assert not second.changed
    assert (second.size, second.mtime_ns) == (first.size, first.mtime_ns)
    assert sha(path) == digest and path.stat().st_mtime_ns == mtime


@pytest.mark.parametrize("case", list(CASES))
def test_rewriting_the_same_tags_gives_the_same_bytes(tmp_path, case):
    path = make_user_file(tmp_path, case)
    tagfile.write_earmark_tags(path, FIELDS)
    digest = sha(path)
    tags = tagfile.open_tags(path)
    tags.replace_earmark(tagfile.normalize_fields(FIELDS))   # force a save of identical content
    tags.save()
    assert sha(path) == digest


@pytest.mark.parametrize("case", ["mp3-v23", "flac", "m4a", "opus"])
def test_stale_keys_are_removed(tmp_path, case):
    path = make_user_file(tmp_path, case)
    user_before = tagfile.read_user_tags(path)
    write(path, FIELDS)
    result = write(path, MINIMAL)
    assert result.changed
    assert tagfile.read_earmark_tags(path) == MINIMAL
    write(path, {"version": "earmark/1 x"})
    assert tagfile.read_earmark_tags(path) == {"version": ["earmark/1 x"]}
    assert tagfile.read_user_tags(path) == user_before


def test_id3v1_tail_is_kept_byte_for_byte(tmp_path):
    path = make_user_file(tmp_path, "mp3-v23")
    tail = path.read_bytes()[-128:]
    assert tail.startswith(b"TAG")
    write(path)
    assert path.read_bytes()[-128:] == tail
    assert tagfile.read_id3_version(path) == (2, 3)


@pytest.mark.parametrize("fmt", ["mp3", "wav", "aiff"])
def test_files_without_id3_get_v24(tmp_path, fmt):
    path = make_file(tmp_path, fmt, seconds=1.0)
    data = path.read_bytes()
    if data.startswith(b"ID3"):  # FFmpeg's MP3 muxer writes an empty tag: strip it
        path.write_bytes(data[verify._id3v2_size(data[:10]):])
    assert tagfile.read_id3_version(path) is None
    samples = decoded(path)
    write(path, MINIMAL)
    assert tagfile.read_id3_version(path) == (2, 4)
    assert tagfile.read_earmark_tags(path) == MINIMAL
    np.testing.assert_array_equal(decoded(path), samples)


def test_case_variants_of_our_keys_are_ours(tmp_path):
    path = make_file(tmp_path, "flac", seconds=1.0, tags={"title": "t"})
    audio = FLAC(path)
    audio.tags["earmark_Genre"] = ["old"]
    audio.save()
    assert tagfile.read_earmark_tags(path) == {"genre": ["old"]}
    write(path, MINIMAL)
    assert tagfile.read_earmark_tags(path) == MINIMAL
    assert tagfile.read_user_tags(path) == {"TITLE": ["t"]}


def test_a_tagset_round_trips(tmp_path):
    path = make_user_file(tmp_path, "ogg")
    scores = {label: (0.5 if label in ("mtt:piano", "msd:jazz") else 0.001) for label in LABELS}
    tagset = build_tags(scores, models="MTT_musicnn@abcd1234+MSD_musicnn@ef567890", mode="full")
    write(path, tagset)
    assert tagfile.read_earmark_tags(path) == tagset.fields()
    assert not write(path, tagset).changed


def test_non_utf8_file_names_work(tmp_path):
    path = make_user_file(tmp_path, "flac")
    odd = os.path.join(os.fsencode(tmp_path), b"caf\xe9.flac")
    os.rename(path, odd)
    st = os.stat(odd)
    result = safe_write_tags(odd, MINIMAL, st.st_size, st.st_mtime_ns)
    assert result.changed
    assert tagfile.read_earmark_tags(os.fsdecode(odd)) == MINIMAL


# ------------------------------------------------------------- refusals

def test_size_or_mtime_change_raises_file_changed(tmp_path):
    path = make_user_file(tmp_path, "mp3-v24")
    st = path.stat()
    digest = sha(path)
    with pytest.raises(FileChangedError, match="size"):
        safe_write_tags(path, FIELDS, st.st_size + 1, st.st_mtime_ns)
    with pytest.raises(FileChangedError, match="modified"):
        safe_write_tags(path, FIELDS, st.st_size, st.st_mtime_ns - 1)
    assert sha(path) == digest and temp_files(tmp_path) == []


def test_vanished_file_or_swapped_symlink_raises_file_changed(tmp_path):
    with pytest.raises(FileChangedError, match="no longer exists"):
        safe_write_tags(tmp_path / "gone.mp3", FIELDS)
    target = make_user_file(tmp_path, "flac")
    link = tmp_path / "link.flac"
    link.symlink_to(target)
    with pytest.raises(FileChangedError, match="regular file"):
        safe_write_tags(link, FIELDS)


def test_a_concurrent_edit_is_not_overwritten(tmp_path, monkeypatch):
    path = make_user_file(tmp_path, "flac")
    real_verify = safewrite.verify_same_audio

    def user_saves_meanwhile(original, copy, fmt=None):
        method = real_verify(original, copy, fmt)
        audio = FLAC(original)
        audio.tags["TITLE"] = ["Edited by the user"]
        audio.save()
        return method

    monkeypatch.setattr(safewrite, "verify_same_audio", user_saves_meanwhile)
    with pytest.raises(FileChangedError, match="changed while"):
        write(path)
    assert FLAC(path).tags["TITLE"] == ["Edited by the user"]
    assert tagfile.read_earmark_tags(path) == {}
    assert temp_files(tmp_path) == []


@pytest.mark.parametrize("case", ["mp3-v24", "flac", "m4a"])
def test_disk_full_during_the_write_leaves_the_original_intact(tmp_path, monkeypatch, case):
    path = make_user_file(tmp_path, case)
    digest, st = sha(path), path.stat()

    def disk_full(self):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as exc:
            raise MutagenError(exc)  # as mutagen wraps it

    for family in (tagfile._Id3Tags, tagfile._Mp4Tags, tagfile._VorbisTags):
        monkeypatch.setattr(family, "_save", disk_full)
    with pytest.raises(TagWriteError) as caught:
        safe_write_tags(path, FIELDS, st.st_size, st.st_mtime_ns)
    assert caught.value.reason == "no space left on device while writing tags"
    assert caught.value.errno == errno.ENOSPC and caught.value.stage == "write"
    assert sha(path) == digest and path.stat().st_mtime_ns == st.st_mtime_ns
    assert temp_files(tmp_path) == []


def test_read_only_filesystem_is_named(tmp_path, monkeypatch):
    path = make_user_file(tmp_path, "opus")
    digest = sha(path)

    def read_only(src, dst):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(safewrite.os, "replace", read_only)
    with pytest.raises(TagWriteError) as caught:
        write(path)
    assert caught.value.reason == "read-only filesystem" and caught.value.stage == "replace"
    assert sha(path) == digest and temp_files(tmp_path) == []


def test_damaged_audio_in_the_copy_is_caught(tmp_path, monkeypatch):
    path = make_user_file(tmp_path, "flac")
    digest = sha(path)
    real_write = tagfile.write_tags

    def write_and_flip_a_byte(target, fields, planned, fmt=None):
        changed = real_write(target, fields, planned, fmt)
        with open(target, "r+b") as f:
            f.seek(-100, os.SEEK_END)
            byte = f.read(1)
            f.seek(-100, os.SEEK_END)
            f.write(bytes([byte[0] ^ 0xFF]))
        return changed

    monkeypatch.setattr(tagfile, "write_tags", write_and_flip_a_byte)
    with pytest.raises(TagWriteError, match="verification failed") as caught:
        write(path)
    assert caught.value.stage == "verify"
    assert sha(path) == digest and temp_files(tmp_path) == []


@pytest.mark.parametrize("case", ["m4a", "ogg"])
def test_packet_and_page_checks_catch_changed_audio(tmp_path, case):
    original = make_user_file(tmp_path, case)
    other = make_file(tmp_path, CASES[case][0], seconds=2.0, seed=5, name=f"other{original.suffix}")
    with pytest.raises(TagWriteError, match="verification failed"):
        safewrite.verify_same_audio(str(original), str(other))
    assert safewrite.verify_same_audio(str(original), str(original)) in ("packets", "ogg pages")


def test_unparseable_id3_frames_are_not_dropped(tmp_path):
    path = make_file(tmp_path, "mp3", seconds=1.0)

    def frame(frame_id: bytes, payload: bytes) -> bytes:
        n = len(payload)
        return frame_id + bytes((n >> s) & 0x7F for s in (21, 14, 7, 0)) + b"\0\0" + payload

    body = frame(b"TIT2", b"\x03Title") + frame(b"TPE1", b"\x09bad encoding") + b"\0" * 32
    path.write_bytes(id3_header(len(body)) + body + path.read_bytes())
    digest = sha(path)
    with pytest.raises(TagWriteError, match="TPE1"):
        write(path)
    assert sha(path) == digest


def test_unsupported_format_is_refused(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not audio")
    with pytest.raises(TagWriteError, match="unsupported format"):
        safe_write_tags(path, FIELDS)


def test_bad_fields_are_refused_before_touching_anything(tmp_path):
    path = make_user_file(tmp_path, "flac")
    for bad in ({"Genre": ["rock"]}, {"genre": [""]}, {"genre": ["a\x00b"]}, {"score:mtt:rock": "1"}):
        with pytest.raises(ValueError):
            safe_write_tags(path, bad)


def test_stale_temp_files_are_cleaned(tmp_path):
    old = tmp_path / f"{tempfiles.TEMP_PREFIX}abc.flac"
    new = tmp_path / f"{tempfiles.TEMP_PREFIX}def.flac"
    mine = tmp_path / "song.flac"
    for p in (old, new, mine):
        p.write_bytes(b"x")
    os.utime(old, (1, 1))
    os.utime(mine, (1, 1))
    assert tempfiles.remove_stale_temp_files(tmp_path, older_than=3600) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([new.name, mine.name])


# ------------------------------------------------------- copying and owner

def test_copy_falls_back_from_reflink_to_copy_file_range_to_plain_copy(tmp_path, monkeypatch):
    path = make_user_file(tmp_path, "flac")

    def no_reflink(fd, request, arg):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(safewrite.fcntl, "ioctl", no_reflink)
    assert write(path, MINIMAL).copy_method == "copy_file_range"

    def no_copy_range(*args):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(safewrite.os, "copy_file_range", no_copy_range)
    samples = decoded(path)
    result = write(path, FIELDS)
    assert result.copy_method == "copy"
    assert tagfile.read_earmark_tags(path) == FIELDS
    np.testing.assert_array_equal(decoded(path), samples)


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_owner_and_group_are_kept(tmp_path):
    path = make_user_file(tmp_path, "mp3-v24")
    os.chown(path, 1234, 2345)
    os.chmod(path, 0o664)
    result = write(path)
    st = path.stat()
    assert result.owner_preserved
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 2345, 0o664)
