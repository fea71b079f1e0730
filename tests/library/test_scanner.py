"""The scanner on real files: incremental rescans, missing roots, bad files, symlinks, odd names.

Scans here run in-process through the same job functions the worker calls
(``drain``), so each test reads like the scenario it checks; the multi-process
path is covered by the supervisord integration test.
"""
import os
import shutil
from pathlib import Path

import pytest

from workers.library import folders, paths, scan
from workers.jobs import queue
from workers.models import Job, Library, Track

from tests.conftest import drain_scans as drain
from tests.audio_factory import make_corrupt_id3_mp3, make_file, make_id3_only, make_image_as_audio, make_random_bytes

pytestmark = pytest.mark.django_db

def scan_library(lib, full=False):
    scan.request_scan(lib, full=full)
    return drain()


@pytest.fixture
def library(tmp_path):
    root = tmp_path / "music"
    root.mkdir()
    return Library.objects.create(name="music", root=str(root))


def root_of(lib) -> Path:
    return Path(lib.root)


def states(lib) -> dict:
    return {Path(paths.to_bytes(p).decode(errors="replace")).name: s
            for p, s in Track.objects.filter(library=lib).values_list("path", "state")}


def test_first_scan_reads_formats_and_tags_and_queues_tag_jobs(library):
    root = root_of(library)
    for i, fmt in enumerate(["mp3", "flac", "ogg", "opus", "m4a", "wav"]):
        make_file(root / "Artist" / "Album", fmt, seconds=1.5, tags={"title": f"Song {i}", "artist": "Artist"},
                  name=f"{i:02d}.{fmt}")
    (root / "Artist" / "cover.jpg").write_bytes(b"not audio, not an audio extension")
    assert scan_library(library) == []
    tracks = Track.objects.filter(library=library)
    assert tracks.count() == 6 and {t.state for t in tracks} == {"scanned"}
    t = tracks.get(format="flac")
    assert t.title == "Song 1" and t.artist == "Artist" and t.channels == 2 and t.sample_rate == 44100
    assert 1.3 < t.duration < 1.7 and t.size == os.path.getsize(paths.to_bytes(t.path))
    assert Job.objects.filter(queue="tag", state="queued").count() == 6
    progress = scan.progress(library)
    assert progress["state"] == "done" and progress["files_seen"] == 6 and progress["new"] == 6
    assert progress["folders_done"] == progress["folders_total"] == 3


def test_rescan_is_incremental(library, monkeypatch):
    root = root_of(library)
    a = make_file(root, "mp3", seconds=1, name="a.mp3")
    make_file(root, "flac", seconds=1, name="b.flac")
    scan_library(library)
    Job.objects.filter(queue="tag").update(state="done")
    Track.objects.update(state="tagged", model_version=folders.current_model_version() or "")  # as tagged
    read = []
    real_read = folders.fileinfo.read
    monkeypatch.setattr(folders.fileinfo, "read", lambda p: read.append(p) or real_read(p))
    scan_library(library)
    assert read == [], "unchanged files are not re-read"
    assert not Job.objects.filter(queue="tag", state="queued").exists()
    make_file(root, "mp3", seconds=2, name="a.mp3", seed=3)  # changed content, size and mtime
    scan_library(library)
    assert read == [os.fsencode(a)]
    assert Job.objects.filter(queue="tag", state="queued", track__path=str(a)).count() == 1
    scan_library(library, full=True)
    assert len(read) == 3, "--full re-reads everything"
    b = Track.objects.get(path__endswith="b.flac")
    assert b.state == "tagged", "an unchanged tagged file keeps its tags: --full does not re-run the networks"
    assert not Job.objects.filter(queue="tag", state="queued", track=b).exists()


def test_tag_jobs_are_deduplicated(library):
    make_file(root_of(library), "mp3", seconds=1, name="a.mp3")
    scan_library(library)
    scan_library(library, full=True)
    assert Job.objects.filter(queue="tag").count() == 1


def test_removed_files_and_folders_become_missing(library):
    root = root_of(library)
    make_file(root / "keep", "mp3", seconds=1, name="k.mp3")
    make_file(root / "keep", "mp3", seconds=1, name="gone.mp3")
    make_file(root / "gone-folder" / "deep", "flac", seconds=1, name="d.flac")
    scan_library(library)
    (root / "keep" / "gone.mp3").unlink()
    shutil.rmtree(root / "gone-folder")
    scan_library(library)
    assert states(library) == {"k.mp3": "scanned", "gone.mp3": "missing", "d.flac": "missing"}
    make_file(root / "keep", "mp3", seconds=1, name="gone.mp3")
    scan_library(library)
    assert states(library)["gone.mp3"] == "scanned", "a file that comes back is scanned again"


@pytest.mark.parametrize("how", ["removed", "emptied"])
def test_missing_or_empty_root_fails_and_marks_nothing(library, how):
    root = root_of(library)
    make_file(root / "a", "mp3", seconds=1, name="x.mp3")
    scan_library(library)
    shutil.rmtree(root)
    if how == "emptied":
        root.mkdir()
    [failed] = scan_library(library)
    assert "is the drive mounted" in failed.last_error and "Nothing was marked missing" in failed.last_error
    assert states(library) == {"x.mp3": "scanned"}
    library.refresh_from_db()
    assert library.last_scan_error


def test_root_vanishing_mid_scan_marks_nothing(library):
    root = root_of(library)
    make_file(root / "a", "mp3", seconds=1, name="x.mp3")
    make_file(root / "b", "mp3", seconds=1, name="y.mp3")
    scan_library(library)
    scan.request_scan(library)
    drain(limit=1)  # only the library job: it fans out to the root folder
    shutil.rmtree(root)  # the NAS unmounts after the scan started
    failed = drain()
    assert failed and "Nothing was marked missing" in failed[-1].last_error
    assert set(states(library).values()) == {"scanned"}


def test_bad_files_fail_with_reasons_and_good_files_still_scan(library):
    root = root_of(library)
    make_file(root, "mp3", seconds=1, name="good.mp3")
    (root / "empty.mp3").write_bytes(b"")
    make_random_bytes(root, "noise.flac")
    make_image_as_audio(root, "cover.mp3")
    make_id3_only(root, "tag-only.mp3")
    make_corrupt_id3_mp3(root, name="corrupt-id3.mp3")
    (root / "notes.ogg").write_text("these are my notes, not audio")
    assert scan_library(library) == []
    tracks = {Path(t.path).name: t for t in Track.objects.filter(library=library)}
    assert tracks["good.mp3"].state == "scanned"
    assert tracks["empty.mp3"].error == "empty file (0 bytes)"
    for name in ("noise.flac", "cover.mp3", "tag-only.mp3", "notes.ogg"):
        assert tracks[name].state == "failed", name
        assert tracks[name].error, name
    # A damaged ID3 header in front of good audio is the tagger's problem, not a scan failure.
    assert tracks["corrupt-id3.mp3"].state in ("scanned", "failed")


def test_a_directory_named_like_a_file_is_a_folder(library):
    root = root_of(library)
    make_file(root / "x.mp3", "flac", seconds=1, name="inside.flac")
    scan_library(library)
    assert states(library) == {"inside.flac": "scanned"}


def test_symlinks_outside_root_are_not_followed_and_loops_do_not_hang(library, tmp_path):
    root = root_of(library)
    outside = tmp_path / "outside"
    make_file(outside, "mp3", seconds=1, name="secret.mp3")
    make_file(root / "real", "mp3", seconds=1, name="in.mp3")
    os.symlink(outside / "secret.mp3", root / "escape.mp3")
    os.symlink(outside, root / "escape-dir")
    os.symlink(root, root / "real" / "loop")
    os.symlink(root / "nowhere.mp3", root / "broken.mp3")
    os.symlink(root / "real" / "in.mp3", root / "alias.mp3")
    assert scan_library(library) == []
    s = states(library)
    assert s["in.mp3"] == "scanned" and s["alias.mp3"] == "scanned"
    assert s["escape.mp3"] == "failed" and s["broken.mp3"] == "failed"
    assert "secret.mp3" not in s, "nothing under a directory link leaving the root is scanned"
    escape = Track.objects.get(path=str(root / "escape.mp3"))
    assert "outside the library root" in escape.error and escape.size is None, "never read"


def test_odd_names_are_scanned_like_any_other(library):
    root = os.fsencode(root_of(library))
    src = make_file(root_of(library) / "src", "mp3", seconds=1, name="src.mp3")
    names = ["Café del Mar – Ñandú.mp3".encode(), b"new\nline.mp3", b"latin1-\xe9t\xe9.mp3", b"back\\slash.mp3"]
    for name in names:
        shutil.copy(src, os.path.join(root, name))
    assert scan_library(library) == []
    for name in names:
        track = Track.objects.get(path=paths.to_text(os.path.join(root, name)))
        assert track.state == "scanned", name
        assert paths.to_bytes(track.path) == os.path.join(root, name)


def test_vanished_file_is_recorded_not_fatal(library, monkeypatch):
    root = root_of(library)
    make_file(root, "mp3", seconds=1, name="a.mp3")
    make_file(root, "mp3", seconds=1, name="b.mp3")
    real_read = folders.fileinfo.read

    def vanish(path):
        if path.endswith(b"a.mp3"):
            os.unlink(path)
        return real_read(path)

    monkeypatch.setattr(folders.fileinfo, "read", vanish)
    assert scan_library(library) == []
    tracks = {Path(t.path).name: t for t in Track.objects.filter(library=library)}
    assert tracks["a.mp3"].state == "failed" and "vanished" in tracks["a.mp3"].error
    assert tracks["b.mp3"].state == "scanned"


def test_unreadable_folder_keeps_its_tracks(library):
    root = root_of(library)
    make_file(root / "locked", "mp3", seconds=1, name="l.mp3")
    scan_library(library)
    real_scandir = os.scandir

    def deny(path):
        if os.fsencode(path).endswith(b"locked"):
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    folders.os.scandir = deny
    try:
        assert scan_library(library) == []
    finally:
        folders.os.scandir = real_scandir
    assert states(library) == {"l.mp3": "scanned"}
    assert "cannot list" in scan.progress(library)["errors"][0]


def test_a_scan_whose_folder_job_failed_for_good_is_failed_by_maintenance(library):
    from workers.jobs import maintenance

    root = root_of(library)
    make_file(root / "A", "mp3", seconds=1, name="a.mp3")
    make_file(root / "B", "flac", seconds=1, name="b.flac")
    assert scan_library(library) == []
    make_file(root / "A", "ogg", seconds=1, name="new.ogg")
    scan.request_scan(library)
    drain(limit=1)  # the library job: the scan is running, its root folder job queued
    assert maintenance.run_once().services["scans_failed"] == 0, "a scan with work left is left alone"
    assert scan.progress(library)["state"] == "running"
    # The folder job killed its scanner three times and was quarantined (as the rescuer does it).
    Job.objects.filter(queue="scan", state="queued").update(state="failed",
                                                             last_error="worker died 3 times on this job")
    assert maintenance.run_once().services["scans_failed"] == 1
    progress = scan.progress(library)
    assert progress["state"] == "failed" and "worker died 3 times on this job" in progress["error"]
    library.refresh_from_db()
    assert "nothing was marked missing" in library.last_scan_error
    assert set(states(library).values()) == {"scanned"} and "new.ogg" not in states(library)
    assert maintenance.run_once().services["scans_failed"] == 0, "failed once"
    scan_library(library)
    assert scan.progress(library)["state"] == "done", "the next scan runs as usual"
    assert "new.ogg" in states(library)
