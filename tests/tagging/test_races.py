"""Races with the user: a file changed, moved or deleted between scan and write is never overwritten.

Real files, a real tagger process (``run_tagger``), and changes made the way
a person or their tagger makes them (mutagen saving an edited title, a
file replaced by a new rip, ``rename``, ``unlink``), once before the tagger
reaches the file and once while the tagger is analysing it (a long file, so
the change lands between the tagger's checks and its write). Whatever the
moment: the user's version is never replaced by one made from stale
content; a changed file is re-scanned (and tagged from what it now holds),
a moved or deleted one is marked missing and nothing is created at its old
path.
"""
import hashlib
import os
from pathlib import Path

import mutagen
import numpy as np
import pytest
from django.utils import timezone

from workers.library import scan
from workers.audio.decode import decode
from workers.library.libraries import add_library
from workers.models import Job, Track
from workers.tagfiles.tempfiles import TEMP_PREFIX
from workers.tagfiles.namespace import read_earmark_tags

from tests.audio_factory import make_file, read_user_tags, tone
from tests.conftest import category_tags, drain_scans, manage, spawn, wait_for

pytestmark = pytest.mark.slow


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def edit_title(path: Path, title: str) -> None:
    """What a person's tagger does: open with mutagen, change the title, save in place."""
    audio = mutagen.File(path, easy=True)
    audio["title"] = title
    audio.save()


def scan_library(library) -> None:
    scan.request_scan(library)
    assert drain_scans() == []


def assert_tags_match_database(track: Track) -> None:
    tags = read_earmark_tags(track.path)
    assert category_tags(tags) == category_tags(track.earmark_tags)
    st = os.stat(track.path)
    assert (st.st_size, st.st_mtime_ns) == (track.size, track.mtime_ns)


@pytest.fixture
def env(worker_env, installed_models_dir):
    return dict(worker_env, EARMARK_MODELS_DIR=str(installed_models_dir))


def test_files_changed_moved_or_deleted_after_the_scan_are_rescanned_or_missing(env, tmp_path):
    root = tmp_path / "music"
    album = root / "Album"
    edited, replaced, moved, deleted, control = (
        make_file(album, fmt, seconds=2.5, seed=i, name=f"{name}.{fmt}", tags={"title": name, "artist": "A"})
        for i, (name, fmt) in enumerate([("edited", "mp3"), ("replaced", "flac"), ("moved", "ogg"),
                                         ("deleted", "m4a"), ("control", "mp3")]))
    library = add_library("music", str(root))
    scan_library(library)
    assert Track.objects.filter(state="scanned").count() == 5

    # Between the scan and the tagger: the person edits, re-rips, moves and deletes.
    edit_title(edited, "Edited by the user")
    make_file(album, "flac", seconds=3.0, seed=99, name="replaced.flac", tags={"title": "new rip"})
    new_audio = decode(replaced).samples
    new_home = root / "Elsewhere" / "moved.ogg"
    new_home.parent.mkdir()
    os.rename(moved, new_home)
    moved_bytes = digest(new_home)
    deleted.unlink()

    out = manage("run_tagger", "--exit-when-idle", env=env, timeout=180)
    assert "Traceback" not in out.stdout + out.stderr, out.stderr

    track = Track.objects.get(path=str(edited))
    assert track.state == "tagged" and track.title == "Edited by the user", "re-scanned before tagging"
    assert read_user_tags(edited)["title"] == "Edited by the user", "the user's edit survived"
    assert_tags_match_database(track)

    track = Track.objects.get(path=str(replaced))
    assert track.state == "tagged" and track.title == "new rip" and track.duration == pytest.approx(3.0, abs=0.1)
    assert np.array_equal(decode(replaced).samples, new_audio), "the new rip's audio, not the old one's"
    assert_tags_match_database(track)

    for gone in (moved, deleted):
        assert Track.objects.get(path=str(gone)).state == "missing"
        assert not gone.exists(), "nothing is written where the file used to be"
    assert digest(new_home) == moved_bytes and read_earmark_tags(new_home) == {}, "the moved file is not touched"
    assert Track.objects.get(path=str(control)).state == "tagged"
    assert set(Job.objects.filter(queue="tag").values_list("state", flat=True)) == {"done"}

    # The next scan finds the moved file at its new place, as a new track to tag.
    scan_library(library)
    assert Track.objects.get(path=str(new_home)).state == "scanned"
    assert Job.objects.filter(queue="tag", state="queued", track__path=str(new_home)).exists()
    assert not list(root.rglob(f"{TEMP_PREFIX}*"))


def test_files_changed_moved_or_deleted_while_being_tagged_are_never_overwritten(env, tmp_path):
    """Each change lands while the tagger is analysing that very file (about 3 s of networks each here)."""
    root = tmp_path / "music"
    files = {name: make_file(root / "Live", fmt, samples=tone(90, 16000, freq=220 + 110 * i)[None],
                             sample_rate=16000, name=f"{name}.{fmt}", tags={"title": name})
             for i, (name, fmt) in enumerate([("edited", "flac"), ("moved", "mp3"), ("deleted", "wav")])}
    library = add_library("music", str(root))
    scan_library(library)
    for priority, name in enumerate(["edited", "moved", "deleted"], start=1):  # in this order
        Job.objects.filter(queue="tag", track__path=str(files[name])).update(priority=priority)
    jobs = {name: Job.objects.get(queue="tag", track__path=str(path)).id for name, path in files.items()}

    # --max-jobs 3: the three attempts only, so the edited file's retry (after its backoff) waits for later.
    tagger = spawn("run_tagger", "--exit-when-idle", "--max-jobs", "3", "--number", "1", env=env)
    try:
        def in_hand(name):
            return Track.objects.filter(jobs__id=jobs[name], jobs__state="running").exists() and \
                _busy_on(jobs[name])

        wait_for(lambda: in_hand("edited"), timeout=60, interval=0.05, message="the tagger on 'edited'")
        edit_title(files["edited"], "Edited mid-tagging")
        edited_bytes = digest(files["edited"])
        wait_for(lambda: in_hand("moved"), timeout=60, interval=0.05, message="the tagger on 'moved'")
        new_home = root / "Moved" / "moved.mp3"
        new_home.parent.mkdir()
        os.rename(files["moved"], new_home)
        moved_bytes = digest(new_home)
        wait_for(lambda: in_hand("deleted"), timeout=60, interval=0.05, message="the tagger on 'deleted'")
        files["deleted"].unlink()
        out = tagger.communicate(timeout=120)[0]
    finally:
        if tagger.poll() is None:
            tagger.kill()
    assert tagger.returncode == 0 and "Traceback" not in out and "Errno" not in out, out

    # The edited file: the stale write was refused; the file is exactly the user's; re-scanned, retried later.
    assert digest(files["edited"]) == edited_bytes and read_earmark_tags(files["edited"]) == {}
    track = Track.objects.get(path=str(files["edited"]))
    assert track.title == "Edited mid-tagging" and track.state == "scanned"
    st = os.stat(files["edited"])
    assert (track.size, track.mtime_ns) == (st.st_size, st.st_mtime_ns)
    job = Job.objects.get(id=jobs["edited"])
    assert job.state == "queued" and "changed while it was being tagged" in job.last_error, job.last_error
    # Moved and deleted: missing, nothing created at the old path, the moved file untouched.
    for name in ("moved", "deleted"):
        assert Track.objects.get(path=str(files[name])).state == "missing"
        assert not files[name].exists()
    assert digest(new_home) == moved_bytes
    assert not list(root.rglob(f"{TEMP_PREFIX}*"))

    # Later: the retry tags the user's version, keeping the user's edit.
    Job.objects.filter(state="queued").update(run_after=timezone.now())
    manage("run_tagger", "--exit-when-idle", env=env, timeout=180)
    track = Track.objects.get(path=str(files["edited"]))
    assert track.state == "tagged" and read_user_tags(files["edited"])["title"] == "Edited mid-tagging"
    assert_tags_match_database(track)
    assert not Job.objects.filter(state__in=Job.ACTIVE_STATES).exists()


def _busy_on(job_id: int) -> bool:
    from workers.models import Meta

    return Meta.objects.filter(key="worker:testhost:tag:1", value__state="busy", value__job=job_id).exists()
