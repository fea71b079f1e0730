"""The library watcher (``workers.library.watch``) on real files, real inotify and real stat walks.

Most tests drive one library's ``LibraryWatch`` in this process with a clock
they move by hand (``now``), so that settling is tested without sleeping and
without any assertion on times; the folder jobs then run through the scan
worker's own job function (``drain_scans``). The last test runs the real thing
under supervisord: a watcher, a scanner and a tagger with the real networks.
"""
import os
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from workers.jobs import queue
from workers.library import inotify, paths, polling, scan
from workers.library.watch import LibraryWatch, Watcher, status_key, statuses
from workers.models import Job, Library, Meta, Track
from workers.tagging import apply
from workers.tagging.categories import LABELS

from tests.audio_factory import make_file
from tests.conftest import drain_scans, wait_for
from tests.supervisor_harness import Supervisor

SETTLE = 2.0


@pytest.fixture
def library(tmp_path, settings):
    settings.EARMARK_WATCH_SETTLE_SECONDS = SETTLE
    root = tmp_path / "music"
    make_file(root / "Artist" / "Old", "mp3", seconds=1, name="01.mp3", seed=1)
    make_file(root / "Artist" / "Old", "mp3", seconds=1, name="02.mp3", seed=2)
    lib = Library.objects.create(name="music", root=str(root))
    scan.request_scan(lib)
    assert drain_scans() == []
    return lib


@pytest.fixture
def clip(tmp_path) -> bytes:
    return make_file(tmp_path / "src", "mp3", seconds=1, name="clip.mp3", seed=7).read_bytes()


def target_jobs(**filters):
    return list(Job.objects.filter(queue="scan", key__startswith="target:", **filters).order_by("id"))


def text(path) -> str:
    return paths.to_text(os.fsencode(path))


def live(path) -> Track | None:
    return Track.objects.filter(path=text(path)).exclude(state="missing").first()


def started(lib) -> LibraryWatch:
    w = LibraryWatch(lib)
    w.start(0.0)
    assert w.mode == "inotify" and not w.error, (w.mode, w.reason, w.error)
    Job.objects.filter(queue="scan").delete()  # the scan a start asks for (tested on its own)
    return w


def settle(w: LibraryWatch, now: float) -> float:
    """Take the events, then move the clock past the settle time and flush."""
    w.read(now)
    w.flush(now)
    now += SETTLE
    w.flush(now)
    return now


def copy_slowly(clip: bytes, dest: Path, w: LibraryWatch, now: float, chunks=3, step=0.5) -> float:
    """Write ``dest`` in chunks, ``step`` seconds of the clock apart, the watcher reading and flushing between."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    size = -(-len(clip) // chunks)
    with open(dest, "wb") as out:
        for i in range(chunks):
            out.write(clip[i * size : (i + 1) * size])
            out.flush()
            now += step
            w.read(now)
            assert w.flush(now) == 0, "nothing is queued while the copy goes on"
    return now


@pytest.mark.django_db
def test_an_album_copied_in_slowly_is_one_job_once_the_copy_settles(library, clip):
    w = started(library)
    album = Path(library.root) / "Artist" / "New Album"
    now = 0.0
    for i in range(20):
        now = copy_slowly(clip, album / f"{i:02d}.mp3", w, now)
    assert target_jobs() == []
    assert w.flush(now + SETTLE - 0.1) == 0
    assert w.flush(now + SETTLE) == 1
    (job,) = target_jobs()
    assert job.payload["folder"] == text(album) and job.payload["recursive"], job.payload
    assert job.priority < scan.FOLDER_PRIORITY
    assert drain_scans() == []
    assert Track.objects.filter(folder=text(album), state="scanned").count() == 20
    assert Job.objects.filter(queue="tag", state="queued", track__folder=text(album)).count() == 20
    assert not w.pending


@pytest.mark.django_db
def test_files_added_to_a_known_folder_queue_that_folder_alone(library, clip):
    w = started(library)
    old = Path(library.root) / "Artist" / "Old"
    now = 0.0
    for i in range(5):
        now = copy_slowly(clip, old / f"new-{i}.mp3", w, now)
    (old / "cover.jpg").write_bytes(b"\xff\xd8 not music")
    settle(w, now)
    (job,) = target_jobs()
    assert job.payload["folder"] == text(old) and not job.payload["recursive"]
    assert drain_scans() == []
    assert Track.objects.filter(folder=text(old)).exclude(state="missing").count() == 7


@pytest.mark.django_db
def test_renames_moves_deletes_and_a_folder_rename_end_in_the_right_rows(library, clip):
    root = Path(library.root)
    old = root / "Artist" / "Old"
    other = root / "Artist" / "Other"
    make_file(other, "mp3", seconds=1, name="o.mp3", seed=3)
    scan.request_scan(library)
    assert drain_scans() == []
    ids = {p.name: live(p).id for p in (old / "01.mp3", old / "02.mp3")}
    w = started(library)

    os.rename(old / "01.mp3", old / "01 renamed.mp3")  # a rename inside a folder
    now = settle(w, 0.0)
    assert [j.payload["folder"] for j in target_jobs()] == [text(old)]
    assert drain_scans() == []
    assert live(old / "01 renamed.mp3").id == ids["01.mp3"] and live(old / "01.mp3") is None

    os.rename(old / "02.mp3", other / "02.mp3")  # a move between folders
    now = settle(w, now)
    assert sorted(j.payload["folder"] for j in target_jobs(state="queued")) == sorted([text(old), text(other)])
    assert drain_scans() == []
    assert live(other / "02.mp3").id == ids["02.mp3"] and live(old / "02.mp3") is None

    (other / "o.mp3").unlink()  # a delete
    now = settle(w, now)
    assert [j.payload["folder"] for j in target_jobs(state="queued")] == [text(other)]
    assert drain_scans() == []
    assert live(other / "o.mp3") is None and Track.objects.get(path=text(other / "o.mp3")).state == "missing"

    renamed = root / "Artist" / "Renamed"
    os.rename(old, renamed)  # a folder rename: its old name is swept, its new name read with all below it
    settle(w, now)
    queued = {j.payload["folder"]: j.payload for j in target_jobs(state="queued")}
    assert set(queued) == {text(root / "Artist"), text(renamed)}, queued
    assert queued[text(root / "Artist")]["sweep"] and queued[text(renamed)]["recursive"]
    assert drain_scans() == []
    assert live(renamed / "01 renamed.mp3").id == ids["01.mp3"]
    assert not Track.objects.filter(folder=text(old)).exclude(state="missing").exists()


@pytest.mark.django_db
def test_earmarks_own_tag_writes_queue_nothing_and_a_users_edit_does(library):
    """The tagger's write path (``apply.write_file_tags``: the verified clone renamed over the file, then ``apply.record``)."""
    w = started(library)
    path = Path(library.root) / "Artist" / "Old" / "01.mp3"
    track = live(path)
    Job.objects.filter(queue="tag").exclude(track=track).delete()  # the scan's: this track's is the one a tagger runs
    (job,) = queue.claim("tag", "worker:testhost:tag:0", "boot", 1)
    assert job.track_id == track.id
    means = {label: 0.001 for label in LABELS}
    means[next(iter(LABELS))] = 0.99
    written = apply.write_file_tags(Track.objects.get(id=track.id), means, {}, "m@1")
    assert written.changed and (written.size, written.mtime_ns) != (track.size, track.mtime_ns)
    w.read(0.0)
    assert w.pending, "the rename over the track is an event"
    # Between the rename and the record: the track's job is running, so the folder waits.
    assert w.flush(SETTLE) == 0 and w.pending
    apply.record(Track.objects.get(id=track.id), written)
    queue.complete([job.id], "worker:testhost:tag:0")
    assert w.flush(2 * SETTLE) == 0 and not w.pending
    assert target_jobs() == []

    with open(path, "ab") as f:  # a person (or a program) edits the file
        f.write(b"\0" * 16)
    settle(w, 3 * SETTLE)
    assert [j.payload["folder"] for j in target_jobs()] == [text(path.parent)]


@pytest.mark.django_db
@pytest.mark.parametrize("how", ["library", "setting"])
def test_a_polled_library_finds_changes_by_a_stat_walk_and_settles_them_too(library, clip, settings, how):
    Library.objects.filter(id=library.id).update(poll_seconds=60, **({"watch": "poll"} if how == "library" else {}))
    library.refresh_from_db()
    if how == "library":
        reason = "the library's watch setting is poll"
    else:
        settings.EARMARK_WATCH_FORCE_POLL = True
        reason = "EARMARK_WATCH_FORCE_POLL is set"
    w = LibraryWatch(library)
    w.start(0.0)
    assert (w.mode, w.reason, w.tree) == ("poll", reason, None)
    assert w.folders == 3 and w.next_poll == 60.0
    old = Path(library.root) / "Artist" / "Old"
    (old / "03.mp3").write_bytes(clip[:1000])  # a copy under way when the poll comes
    album = Path(library.root) / "Artist" / "Polled"
    album.mkdir()
    (album / "a.mp3").write_bytes(clip)
    Job.objects.filter(queue="scan").delete()
    w.tick(60.0)  # the poll: both folders wait; the next walk comes a settle time later
    assert target_jobs() == [] and w.next_poll == 60.0 + SETTLE
    (old / "03.mp3").write_bytes(clip)  # the copy finished
    w.tick(60.0 + SETTLE)  # the walk sees it change again: still waiting
    assert target_jobs() == []
    w.tick(60.0 + 2 * SETTLE)  # no change since: queued
    assert sorted(j.payload["folder"] for j in target_jobs()) == sorted([text(old), text(album)])
    assert w.next_poll == 60.0 + 2 * SETTLE + 60
    assert drain_scans() == []
    assert live(old / "03.mp3") and live(album / "a.mp3")
    w.tick(w.next_poll)  # the scan's own writes changed nothing on disk: nothing more
    w.tick(w.next_poll)
    assert len(target_jobs()) == 2
    status = w.status()
    assert (status["mode"], status["reason"], status["poll_seconds"]) == ("poll", reason, 60) and status["last_poll"]


MOUNTINFO = """\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
60 27 0:50 / /mnt/nas rw,relatime - nfs4 server:/export rw,vers=4.2
61 27 0:51 / /mnt/smb\\040share rw - cifs //host/share rw
62 27 0:52 / /mnt/cloud rw - fuse.rclone remote: rw
63 27 8:17 / /mnt/usb rw - fuseblk /dev/sdb1 rw
64 60 0:53 / /mnt/nas/local rw - ext4 /dev/sdc1 rw
"""


@pytest.mark.parametrize("path, polled, words", [
    ("/srv/music", False, "ext4 at /"),
    ("/mnt/nas/music", True, "NFS mount (nfs4 at /mnt/nas)"),
    ("/mnt/smb share/x", True, "SMB/CIFS mount (cifs at /mnt/smb share)"),
    ("/mnt/cloud", True, "FUSE (rclone) mount"),
    ("/mnt/usb/music", False, "fuseblk at /mnt/usb"),
    ("/mnt/nas/local/music", False, "ext4 at /mnt/nas/local"),
    ("/mnt/nasty", False, "ext4 at /"),
])
def test_the_mode_follows_the_mount_holding_the_root(path, polled, words):
    lib = Library(name="x", root=path)
    mode, reason = polling.choose_mode(lib, path.encode(), MOUNTINFO)
    assert mode == ("poll" if polled else "inotify") and words in reason, (mode, reason)
    lib.watch = "inotify"
    assert polling.choose_mode(lib, path.encode(), MOUNTINFO)[0] == "inotify", "the library's own setting wins"
    lib.watch = "off"
    assert polling.choose_mode(lib, path.encode(), MOUNTINFO)[0] == "off"


@pytest.mark.django_db
def test_a_root_that_vanishes_is_reported_and_watched_again_when_back(library, clip):
    w = started(library)
    root = Path(library.root)
    away = root.with_name("away")
    os.rename(root, away)
    w.read(0.0)
    assert w.broken and "was deleted, moved or unmounted" in w.error and w.tree is None
    assert w.status()["state"] == "error"
    w.flush(10.0)  # nothing to do, nothing raised
    w.start(10.0)  # the next reload tries again: still gone
    assert w.broken and "cannot be read" in w.error
    root.mkdir()  # an empty mount point while tracks are known: nothing may be queued
    w.start(20.0)
    assert w.broken and "is empty" in w.error
    root.rmdir()
    os.rename(away, root)
    w.start(30.0)
    assert not w.broken and not w.error and w.tree is not None
    assert Job.objects.filter(queue="scan", key=f"library:{library.id}").exists(), "a scan finds what was missed"
    (root / "Artist" / "Old" / "03.mp3").write_bytes(clip)
    settle(w, 30.0)
    assert len(target_jobs()) == 1


@pytest.mark.django_db
def test_a_library_that_runs_out_of_inotify_watches_is_polled_and_says_why(library, monkeypatch):
    def no_more(*args, **kwargs):
        raise inotify._limit_error("watch")

    monkeypatch.setattr(inotify, "Tree", no_more)
    w = LibraryWatch(library)
    w.start(0.0)
    assert w.mode == "poll" and w.snapshot is not None and not w.error
    assert "the inotify watch limit is reached" in w.reason and "polled instead" in w.reason
    assert Job.objects.filter(queue="scan", key=f"library:{library.id}").exists()


@pytest.mark.django_db
def test_an_overflowing_event_queue_asks_for_a_library_scan(library):
    w = started(library)
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    flood = Path(library.root) / "Artist" / "Old"
    for i in range(limit // 2 + 100):  # a create and a close-after-write each
        (flood / f"f{i}").touch()
    w.read(0.0)
    assert Job.objects.filter(queue="scan", key=f"library:{library.id}", state="queued").exists()
    assert "overflowed" in w.status()["missed"]


@pytest.mark.django_db
def test_a_burst_of_ten_thousand_events_queues_one_job_per_folder(library):
    w = started(library)
    root = Path(library.root) / "Artist" / "Old"
    folders = [root.parent / f"F{n:03d}" for n in range(100)]
    for folder in folders:
        folder.mkdir()
    now = settle(w, 0.0)  # the new (still empty) folders
    drain_scans()
    Job.objects.filter(queue="scan").delete()
    for i in range(5000):  # an rsync: two events a file (create, close after write), 10,000 in all
        (folders[i % 100] / f"{i:05d}.mp3").touch()
        if i % 1000 == 999:
            now += 0.25
            w.read(now)
    settle(w, now)
    jobs = target_jobs()
    assert len(jobs) == 100 and {j.payload["folder"] for j in jobs} == {text(f) for f in folders}
    assert w.info["events"] >= 10_000


@pytest.mark.django_db
def test_a_flush_naming_too_many_folders_asks_for_a_library_scan_instead(library, settings):
    settings.EARMARK_WATCH_MAX_FOLDERS = 10
    w = started(library)
    for n in range(20):
        (Path(library.root) / "Artist" / "Old" / f"x{n}.mp3").touch()
        (Path(library.root) / f"New{n}").mkdir()
    settle(w, 0.0)
    assert target_jobs() == []
    assert Job.objects.filter(queue="scan", key=f"library:{library.id}").exists()


@pytest.mark.django_db
def test_a_watcher_process_restart_asks_for_an_incremental_scan_and_writes_its_status(library, settings):
    Library.objects.create(name="off", root=str(Path(library.root).parent), watch="off")  # holds "music"
    w = Watcher()
    w.reload(0.0)
    assert Job.objects.filter(queue="scan", key=f"library:{library.id}").exists()
    assert w.watches[library.id].mode == "inotify"
    w.write_statuses(0.0)
    (status,) = statuses(library)
    assert (status["mode"], status["folders"], status["state"], status["host"]) == ("inotify", 3, "watching", "testhost")
    off = Library.objects.get(name="off")
    assert Meta.objects.get(key=status_key(off.id)).value["mode"] == "off"
    assert w.watches[off.id].tree is None
    off.delete()
    w.reload(1.0)
    assert not Meta.objects.filter(key=status_key(off.id)).exists()
    w.shutdown()
    assert Meta.objects.get(key=status_key(library.id)).value["state"] == "stopped"


# --- the real processes ----------------------------------------------------------------------


def _status(lib) -> dict:
    row = Meta.objects.filter(key=status_key(lib.id)).first()
    return dict(row.value, updated_at=row.updated_at) if row else {}


def _settled_since(lib, moment) -> bool:
    """The watcher saw events up to ``moment`` (the last write's record comes right after its rename) and settled them."""
    status = _status(lib)
    if not status.get("last_event") or status["pending_folders"]:
        return False
    last = datetime.fromisoformat(status["last_event"])
    return last >= moment - timedelta(seconds=1) and status["updated_at"] >= last + timedelta(seconds=SETTLE - 0.2)


@pytest.mark.slow
def test_the_watcher_under_supervisord_tags_new_music_by_itself_and_not_its_own_writes(
        worker_env, installed_models_dir, tmp_path):
    music, polled = tmp_path / "music", tmp_path / "polled"
    for i in range(2):
        make_file(music / "Old", "mp3", seconds=2, name=f"{i}.mp3", seed=i)
    make_file(polled / "A", "flac", seconds=2, name="a.flac", seed=5)
    clips = [make_file(tmp_path / "src", "mp3", seconds=2, name=f"{i}.mp3", seed=10 + i).read_bytes()
             for i in range(6)]
    lib = Library.objects.create(name="music", root=str(music))
    poll_lib = Library.objects.create(name="polled", root=str(polled), watch="poll", poll_seconds=1)
    sup = Supervisor(worker_env, tmp_path / "sup", EARMARK_SCANNERS=1, EARMARK_TAGGERS=1, EARMARK_GPUS=0,
                     EARMARK_TAGGER_DEVICE="cpu", EARMARK_TAGGER_AUTOSTART="true", EARMARK_WATCHER_AUTOSTART="true",
                     EARMARK_MODELS_DIR=installed_models_dir, EARMARK_WATCH_SETTLE_SECONDS=SETTLE,
                     EARMARK_WATCH_RELOAD_SECONDS=1).start()
    try:
        # Started: the watcher's own scans find what is there; the tagger's writes queue nothing.
        wait_for(lambda: _status(lib).get("mode") == "inotify" and _status(poll_lib).get("mode") == "poll",
                 timeout=30, message="both libraries watched")
        assert _status(poll_lib)["reason"] == "the library's watch setting is poll"
        wait_for(lambda: Track.objects.filter(state="tagged").count() == 3, timeout=90, message="3 tagged tracks")
        last_write = max(Track.objects.filter(library=lib).values_list("tagged_at", flat=True))
        wait_for(lambda: _settled_since(lib, last_write), timeout=30, message="the watcher to settle the tag writes")
        assert target_jobs() == [], "Earmark's own tag writes queued nothing"

        # An album copied in slowly, in chunks: one folder job, and every file tagged.
        album = music / "New"
        album.mkdir()
        for i, clip in enumerate(clips):
            with open(album / f"{i}.mp3", "wb") as out:
                for start in range(0, len(clip), len(clip) // 3 + 1):
                    out.write(clip[start : start + len(clip) // 3 + 1])
                    out.flush()
                    time.sleep(0.1)
        wait_for(lambda: Track.objects.filter(folder=text(album), state="tagged").count() == 6, timeout=60,
                 message="the album tagged")
        (job,) = target_jobs()
        assert job.payload["folder"] == text(album) and job.payload["reason"] == "watcher"

        # Renamed, moved, deleted, and a folder renamed.
        os.rename(album / "0.mp3", album / "zero.mp3")
        os.rename(album / "1.mp3", music / "Old" / "1b.mp3")
        (album / "2.mp3").unlink()
        os.rename(music / "Old", music / "Older")
        wait_for(lambda: live(album / "zero.mp3") and live(music / "Older" / "1b.mp3")
                 and live(music / "Older" / "0.mp3") and not live(album / "2.mp3")
                 and not Track.objects.filter(folder=text(music / "Old")).exclude(state="missing").exists(),
                 timeout=30, message="the rows to follow the files")

        # The polled library: a new file is found by the stat walk.
        make_file(polled / "A", "flac", seconds=2, name="b.flac", seed=6)
        wait_for(lambda: live(polled / "A" / "b.flac") and live(polled / "A" / "b.flac").state == "tagged",
                 timeout=30, message="the polled file tagged")
        assert [j.payload["folder"] for j in target_jobs(library=poll_lib)] == [text(polled / "A")]

        sup.ctl("stop", "watcher")
        assert "stopped: watcher (exit status 0)" in sup.log("supervisord")
        assert _status(lib)["state"] == "stopped" and "Traceback" not in sup.log("watcher")
    except BaseException:
        print("STATUS", _status(lib), _status(poll_lib))
        print("WATCHER LOG", sup.log("watcher")[-3000:])
        print("JOBS", list(Job.objects.values_list("queue", "key", "state", "payload")))
        raise
    finally:
        sup.stop()


@pytest.mark.django_db
def test_the_library_admin_page_shows_how_the_watcher_watches_it(library, admin_client):
    page = lambda: admin_client.get(f"/admin/workers/library/{library.id}/change/").content.decode()
    assert "no watcher has reported on this library" in page()
    Library.objects.filter(id=library.id).update(watch="poll", poll_seconds=30)
    w = Watcher()
    w.reload(0.0)
    w.write_statuses(0.0)
    html = page()
    assert "poll (watching)" in html and "the library&#x27;s watch setting is poll" in html and "testhost" in html
    assert 'name="poll_seconds"' in html and 'value="30"' in html
