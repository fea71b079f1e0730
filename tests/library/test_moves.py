"""Moves keep their analysis (issue 17): a moved or renamed file keeps its track, scores and tags.

Albums are tagged through the tagger's own record path (stored scores, then
``apply.write_track_tags``: a real safe write, so each file gets new bytes
and a new inode, as a tagged file in a library has), then moved with the
filesystem's own calls and rescanned by the scanner's job functions
(``drain``). The model version is made current, so a track that lost its
analysis, or its state, would be queued for tagging again: every test that
expects no tag job could fail.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from django.db import transaction

from tests.audio_factory import make_file
from tests.conftest import category_tags, drain_scans as drain
from workers.audio.fingerprint import audio_fingerprint
from workers.calibration.compute import LABEL_ORDER
from workers.library import fileinfo, folders, paths, scan, scan_worker
from workers.models import Job, Library, Score, Track, TrackTag
from workers.tagfiles import namespace as tagfile
from workers.tagging import scores
from workers.features import FEATURES_VERSION
from workers.tagging.apply import write_track_tags

pytestmark = pytest.mark.django_db

MODELS = "MTT_musicnn@abcd1234+MSD_musicnn@ef567890"
ALBUM = ["mp3", "flac", "ogg", "m4a", "wav"]


@pytest.fixture(autouse=True)
def current_models(monkeypatch):
    """Installed models of version MODELS: a tagged track is due again only if its row says otherwise."""
    monkeypatch.setattr(folders, "current_model_version", lambda: MODELS)
    monkeypatch.setattr(scan_worker, "current_model_version", lambda: MODELS)


@pytest.fixture
def library(tmp_path):
    return make_library(tmp_path, "music")


@pytest.fixture
def one_job_per_folder(monkeypatch):
    monkeypatch.setattr(scan, "INLINE_SECONDS", 0)
    monkeypatch.setattr(scan, "FOLDERS_PER_JOB", 1)


def make_library(tmp_path, name: str) -> Library:
    root = tmp_path / name
    root.mkdir()
    return Library.objects.create(name=name, root=str(root))


def add_album(folder: Path, formats=ALBUM, seed: int = 0) -> list[Path]:
    return [make_file(folder, fmt, seconds=1.0, seed=seed + i, tags={"title": f"Song {i}", "artist": "Someone"},
                      name=f"{i:02d}.{fmt}") for i, fmt in enumerate(formats)]


def scan_library(lib: Library) -> None:
    scan.request_scan(lib)
    assert drain() == []
    assert scan.progress(lib)["state"] == "done"


def tag_all(lib: Library, seed: int = 0) -> None:
    """What a tagger does for each scanned track: store its scores, write its tags (a real safe write), record."""
    rng = np.random.default_rng(seed)
    for track in Track.objects.filter(library=lib, state=Track.State.SCANNED).select_related("library"):
        means = rng.beta(0.6, 3.0, len(LABEL_ORDER)).astype(np.float32)
        scores.save(track, MODELS, LABEL_ORDER, means, means * 0.3, patches=4)
        write_track_tags(track, *scores.as_mappings(Score.objects.get(track=track), LABEL_ORDER), MODELS, None)
    # Measured too (tempo, key, loudness), else a scan would queue them for it.
    Track.objects.filter(library=lib, state=Track.State.TAGGED).update(features_version=FEATURES_VERSION)
    Job.objects.filter(queue="tag").update(state=Job.State.DONE)  # their tagger finished them


def analysis(lib: Library | None = None) -> dict:
    """Per analysed track's id: what must survive a move (state, scores, tag rows, Earmark's tags, model version)."""
    rows = Track.objects.filter(score__isnull=False)
    rows = rows if lib is None else rows.filter(library=lib)
    return {t.id: (t.state, t.model_version, t.earmark_tags, t.audio_fingerprint,
                   bytes(t.score.means), bytes(t.score.spreads),
                   sorted(TrackTag.objects.filter(track=t).values_list("category", "value", "rank", "strength")))
            for t in rows.select_related("score")}


def queued_tag_jobs() -> int:
    return Job.objects.filter(queue="tag", state__in=Job.ACTIVE_STATES).count()


def assert_rows_match_files(tracks) -> None:
    """Each row's path is a file whose identity and audio fingerprint are the row's, its tags Earmark's."""
    for t in tracks:
        path = paths.to_bytes(t.path)
        st = os.stat(path)
        assert (t.device, t.inode) == (fileinfo.db_int(st.st_dev), fileinfo.db_int(st.st_ino))
        assert (t.size, t.mtime_ns) == (st.st_size, st.st_mtime_ns)
        assert t.audio_fingerprint == audio_fingerprint(path)
        assert t.folder == paths.to_text(os.path.dirname(path))
        assert category_tags(tagfile.open_tags(os.fsdecode(path), t.format).earmark()) == t.earmark_tags


@pytest.fixture
def tagged_album(library):
    files = add_album(Path(library.root) / "Artist" / "Album")
    scan_library(library)
    tag_all(library)
    tracks = Track.objects.filter(library=library)
    assert tracks.count() == len(ALBUM) and {t.state for t in tracks} == {Track.State.TAGGED}
    assert TrackTag.objects.filter(track__in=tracks).count() >= len(ALBUM), "the album has tags to keep"
    assert all(t.audio_fingerprint.startswith("p1:") for t in tracks), "the tag write recorded the fingerprint"
    assert_rows_match_files(tracks)  # the write's new inode is on the row
    assert queued_tag_jobs() == 0
    return files


# --- moves within a library --------------------------------------------------------------------------


def _move_album(root: Path) -> None:
    (root / "Elsewhere").mkdir()
    os.rename(root / "Artist" / "Album", root / "Elsewhere" / "Album")


def _rename_folder(root: Path) -> None:
    os.rename(root / "Artist" / "Album", root / "Artist" / "Album (2020 remaster)")


def _rename_files(root: Path) -> None:
    for f in (root / "Artist" / "Album").iterdir():
        os.rename(f, f.with_name(f"renamed {f.name}"))


@pytest.mark.parametrize("move", [_move_album, _rename_folder, _rename_files], ids=["album", "folder", "files"])
def test_a_moved_tagged_album_keeps_its_tracks_and_is_not_analysed_again(library, tagged_album, move):
    before = analysis(library)
    old_paths = set(Track.objects.values_list("path", flat=True))
    move(Path(library.root))
    scan_library(library)
    tracks = Track.objects.filter(library=library)
    assert analysis(library) == before, "same ids, states, scores, tag rows and fingerprints"
    assert queued_tag_jobs() == 0, "nothing is analysed again"
    assert not old_paths & set(Track.objects.values_list("path", flat=True)), "the old paths are gone"
    assert Track.objects.count() == len(ALBUM)
    assert_rows_match_files(tracks)
    progress = scan.progress(library)
    assert (progress["moved"], progress["new"], progress["missing"]) == (len(ALBUM), 0, 0)
    scan_library(library)  # and the next scan sees them as unchanged
    assert analysis(library) == before and queued_tag_jobs() == 0
    assert scan.progress(library)["files_read"] == 0


def test_a_track_missing_since_an_earlier_scan_comes_back_with_its_analysis(library, tagged_album, tmp_path):
    before = analysis(library)
    (Path(library.root) / "notes.txt").write_text("the root is not empty: no unmounted drive")
    shutil.move(Path(library.root) / "Artist", tmp_path / "away")  # out of the library: the tracks go missing
    scan_library(library)
    assert set(Track.objects.values_list("state", flat=True)) == {Track.State.MISSING}
    os.rename(tmp_path / "away", Path(library.root) / "Back")  # same filesystem: a rename, the inodes kept
    scan_library(library)
    assert analysis(library) == before, "missing tracks come back tagged, with their scores and tags"
    assert queued_tag_jobs() == 0


@pytest.mark.parametrize("old_first", [True, False], ids=["old-folder-first", "new-folder-first"])
def test_a_file_moved_between_two_folders_of_one_scan_in_either_order(library, one_job_per_folder, old_first):
    root = Path(library.root)
    add_album(root / "One", ["mp3", "flac"])
    add_album(root / "Two", ["ogg"], seed=7)
    scan_library(library)
    tag_all(library)
    before = analysis(library)
    moved = Track.objects.get(path__endswith="One/00.mp3")
    os.rename(root / "One" / "00.mp3", root / "Two" / "moved.mp3")
    scan.request_scan(library)
    drain(limit=2)  # the library job and the root: One and Two are queued as jobs of their own
    jobs = {Path(j.payload["folder"]).name: j for j in Job.objects.filter(queue="scan", state="queued")}
    assert set(jobs) == {"One", "Two"}
    first, second = (jobs["One"], jobs["Two"]) if old_first else (jobs["Two"], jobs["One"])
    Job.objects.filter(id=second.id).update(run_after=second.run_after.replace(year=2999))  # held back
    drain(limit=1)
    if old_first:
        assert Track.objects.get(id=moved.id).state == Track.State.MISSING, "its old folder saw it gone"
    Job.objects.filter(id=second.id).update(run_after=first.run_after)
    assert drain() == []
    assert analysis(library) == before and queued_tag_jobs() == 0
    track = Track.objects.get(id=moved.id)
    assert track.path.endswith("Two/moved.mp3") and track.state == Track.State.TAGGED
    assert scan.progress(library)["moved"] == 1 and not Track.objects.filter(state=Track.State.MISSING).exists()


def test_a_stale_write_of_the_old_folder_after_the_move_marks_nothing_missing(library, one_job_per_folder):
    """Two scanners: one read the old folder before the move was written, and writes after it."""
    root = Path(library.root)
    add_album(root / "One", ["mp3", "flac"])
    (root / "Two").mkdir()
    scan_library(library)
    tag_all(library)
    before = analysis(library)
    moved = Track.objects.get(path__endswith="One/00.mp3")
    os.rename(root / "One" / "00.mp3", root / "Two" / "00.mp3")
    scan.request_scan(library)
    drain(limit=2)
    gen = scan.progress(library)["gen"]
    result, stale = folders.read_folder(library, os.fsencode(root / "One"), gen, False)
    assert moved.path in stale.known, "the old folder's scanner knows the track under its old path"
    assert drain() == []  # the other scanner: both folder jobs and the finalize
    with transaction.atomic():
        folders.write_folder(library, stale, gen, result)
    assert result.missing == 0
    assert analysis(library) == before and queued_tag_jobs() == 0


# --- between libraries ---------------------------------------------------------------------------------


@pytest.mark.parametrize("source_first", [True, False], ids=["source-scanned-first", "target-scanned-first"])
def test_a_file_moved_to_another_library_keeps_its_track(tmp_path, source_first):
    source, target = make_library(tmp_path, "source"), make_library(tmp_path, "target")
    add_album(Path(source.root) / "Album", ["mp3", "flac"])
    for _ in range(3):  # the source library's generation runs ahead of the target's
        scan_library(source)
    scan_library(target)
    tag_all(source)
    before = analysis()
    moved = Track.objects.get(path__endswith="Album/01.flac")
    os.rename(Path(source.root) / "Album" / "01.flac", Path(target.root) / "01.flac")
    for lib in (source, target) if source_first else (target, source):
        scan_library(lib)
    track = Track.objects.get(id=moved.id)
    assert track.library_id == target.id and track.path == str(Path(target.root) / "01.flac")
    assert analysis() == before and queued_tag_jobs() == 0
    assert Track.objects.filter(library=source).count() == 1
    scan_library(source)  # a later scan of the old library leaves it alone
    assert Track.objects.get(id=moved.id).state == Track.State.TAGGED


def test_a_stale_write_in_the_old_library_leaves_a_track_moved_out_alone(tmp_path):
    """The old library's scan read the folder before the move; its generation is ahead of the new library's."""
    source, target = make_library(tmp_path, "source"), make_library(tmp_path, "target")
    add_album(Path(source.root) / "Album", ["mp3"])
    for _ in range(3):
        scan_library(source)
    scan_library(target)
    tag_all(source)
    before = analysis()
    os.rename(Path(source.root) / "Album" / "00.mp3", Path(target.root) / "00.mp3")
    scan.request_scan(source)
    drain(limit=1)  # the library job: the root folder is queued
    gen = scan.progress(source)["gen"]
    result, stale = folders.read_folder(source, os.fsencode(Path(source.root) / "Album"), gen, False)
    scan_library(target)
    with transaction.atomic():
        folders.write_folder(source, stale, gen, result)
    assert result.missing == 0, "the track is the target library's now, with that library's generation"
    assert analysis() == before
    assert drain() == []


# --- what is not a move --------------------------------------------------------------------------------


@pytest.mark.parametrize("same_size", [False, True], ids=["other-size", "same-size-other-audio"])
def test_a_reused_inode_holding_another_file_is_a_new_track(library, same_size):
    root = Path(library.root)
    [old] = add_album(root / "Album", ["wav"])
    scan_library(library)
    tag_all(library)
    old_track = Track.objects.get()
    old.unlink()
    new = make_file(root / "Other", "wav", seconds=1.0 if same_size else 2.0, seed=99, name="new.wav")
    st = new.stat()
    # The filesystem handed the freed inode to the new file (forced here: no filesystem promises when).
    fake = {"device": fileinfo.db_int(st.st_dev), "inode": fileinfo.db_int(st.st_ino)}
    if same_size:  # everything alike but the audio: only the fingerprint tells them apart
        fake.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
    Track.objects.filter(id=old_track.id).update(**fake)
    scan_library(library)
    assert Track.objects.get(id=old_track.id).state == Track.State.MISSING
    fresh = Track.objects.exclude(id=old_track.id).get()
    assert fresh.path == str(new) and fresh.state == Track.State.SCANNED and not fresh.audio_fingerprint
    assert Job.objects.filter(queue="tag", track=fresh, state="queued").count() == 1
    assert scan.progress(library)["moved"] == 0


def test_hard_links_are_two_tracks_and_a_link_left_alone_is_a_move(library, tagged_album):
    root = Path(library.root)
    before = analysis(library)
    original = tagged_album[0]
    link = root / "Links" / "link.mp3"
    link.parent.mkdir()
    os.link(original, link)
    scan_library(library)
    assert analysis(library) == before, "the original keeps its track"
    linked = Track.objects.get(path=str(link))
    assert linked.id not in before and linked.state == Track.State.SCANNED
    assert Job.objects.filter(queue="tag", track=linked, state="queued").count() == 1
    first_scan = make_library(root.parent, "linked")  # both names new in one scan: two tracks as well
    os.link(original, Path(first_scan.root) / "a.mp3")
    os.link(original, Path(first_scan.root) / "b.mp3")
    scan_library(first_scan)
    assert Track.objects.filter(library=first_scan).count() == 2
    # The original name removed, the link left: the file moved (``mv`` is a link and an unlink).
    Track.objects.filter(id=linked.id).delete()
    Job.objects.filter(queue="tag").update(state=Job.State.DONE)
    kept = Track.objects.get(path=str(original)).id
    original.unlink()
    for other in Path(first_scan.root).iterdir():
        other.unlink()
    scan_library(library)
    assert Track.objects.get(id=kept).path == str(link)
    assert analysis(library) == before and queued_tag_jobs() == 0


def test_a_file_moved_and_edited_keeps_its_track_but_is_tagged_again(library, tagged_album):
    track = Track.objects.get(path=str(tagged_album[0]))
    moved = Path(library.root) / "Elsewhere.mp3"
    os.rename(tagged_album[0], moved)
    os.utime(moved, ns=(track.mtime_ns, track.mtime_ns + 5_000_000_000))  # a tag editor saved it, same size
    scan_library(library)
    again = Track.objects.get(id=track.id)
    assert again.path == str(moved) and again.state == Track.State.SCANNED and again.model_version == ""
    assert again.audio_fingerprint == track.audio_fingerprint, "the same audio"
    assert Job.objects.filter(queue="tag", track=again, state="queued").count() == 1
    assert Score.objects.filter(track_id=track.id).exists()


def test_a_track_without_a_fingerprint_is_confirmed_by_its_mtime(library, tagged_album):
    """Tracks tagged before Earmark kept fingerprints: a rename keeps the mtime to the nanosecond."""
    Track.objects.update(audio_fingerprint="")
    before = analysis(library)
    _move_album(Path(library.root))
    scan_library(library)
    assert analysis(library) == before and queued_tag_jobs() == 0


def test_two_new_names_of_one_moved_file_read_at_once_give_one_move_and_one_new_track(library, tagged_album):
    """Two scanners each meet one name of a file whose old name is gone; the second write finds it taken."""
    root = Path(library.root)
    before = analysis(library)
    kept = Track.objects.get(path=str(tagged_album[0])).id
    b, c = root / "B" / "b.mp3", root / "C" / "c.mp3"
    b.parent.mkdir()
    c.parent.mkdir()
    os.link(tagged_album[0], b)
    os.rename(tagged_album[0], c)
    scan.request_scan(library)
    drain(limit=1)  # the library job: the scan runs, its root folder queued
    gen = scan.progress(library)["gen"]
    reads = [folders.read_folder(library, os.fsencode(p.parent), gen, False) for p in (b, c)]
    assert [len(writes.moved) for _, writes in reads] == [1, 1], "each saw a move"
    for result, writes in reads:
        with transaction.atomic():
            folders.finish_writes(library, *folders.write_folder(library, writes, gen, result), gen)
    assert Track.objects.get(id=kept).path == str(b), "the first write moved the track"
    other = Track.objects.get(path=str(c))
    assert (reads[1][0].moved, reads[1][0].new) == (0, 1) and other.state == Track.State.SCANNED
    assert Job.objects.filter(queue="tag", track=other, state="queued").count() == 1
    assert drain() == []
    assert analysis(library) == before
