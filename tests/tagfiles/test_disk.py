"""Full disk and read-only media: a tag write that cannot happen leaves the file intact and is retried later.

Filesystems used: two real **tmpfs** mounts made by the test (``mount -t
tmpfs -o size=3m``), one filled to the last byte with a filler file (writes
fail with ENOSPC) and one remounted read-only (``mount -o remount,ro``:
EROFS). The test skips, saying why, only where mounting is not permitted
(not root, or no mount namespace rights); the CI machine runs it as root.

Real worker processes (``run_tagger`` and ``run_recalibrator`` with
``--exit-when-idle``) meet the failures. Each job must end back in the queue
with a backoff and the reason ("no space left on device", "read-only
filesystem"), the track keeps its state and shows the reason, every
original file is byte-for-byte what it was, and no temporary file is left.
Then space is freed and the filesystem made writable again, the backoff
is brought forward ("later"), and the same jobs succeed.
"""
import errno
import hashlib
import os
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from workers.calibration import compute
from workers.library import scan
from workers.library.libraries import add_library
from workers.models import Job, Library, Track
from workers.tagfiles.tempfiles import TEMP_PREFIX
from workers.tagfiles.namespace import read_earmark_tags

from tests.audio_factory import make_file
from tests.conftest import drain_scans, manage

pytestmark = pytest.mark.slow


class Tmpfs:
    """A small tmpfs mounted by the test (root only), unmounted afterwards whatever happens."""

    def __init__(self, path: Path, size: str = "3m"):
        self.path = path
        path.mkdir(parents=True)
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "earmark-test", str(path)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}); "
                        "the full-disk and read-only tests need root or CAP_SYS_ADMIN")

    def remount(self, mode: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{mode}", str(self.path)], check=True, capture_output=True)

    def fill(self) -> Path:
        """Write a filler file until the filesystem is full (ENOSPC)."""
        filler = self.path / ".filler"
        block = b"\0" * 65536
        with open(filler, "wb", buffering=0) as f:
            while True:
                try:
                    f.write(block)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    block = block[: len(block) // 2]
                    if not block:
                        break
        return filler

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


@pytest.fixture
def media(tmp_path):
    mounts = []

    def make(name):
        mounts.append(Tmpfs(tmp_path / name))
        return mounts[-1]

    yield make
    for m in mounts:
        m.unmount()


def digests(root: Path) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()
            and not p.name.startswith(".filler")}


def later(queue_name: str) -> None:
    """Time passes: bring the retries' backoff forward."""
    Job.objects.filter(queue=queue_name, state="queued").update(run_after=timezone.now())


def assert_retried_with(queue_name: str, libraries, reason: str, attempts: int = 1) -> None:
    jobs = Job.objects.filter(queue=queue_name, track__library__in=libraries)
    assert jobs.exists()
    for job in jobs:
        assert job.state == "queued", (job.key, job.state, job.last_error)
        assert job.attempts == attempts and reason in job.last_error, (job.key, job.last_error)
        assert job.run_after > timezone.now() + timedelta(seconds=5), "retried later, after a backoff"
        assert reason in job.track.error, job.track.error


def test_full_disk_and_read_only_media_leave_files_intact_and_retry_later(worker_env, tmp_path, media,
                                                                          installed_models_dir):
    full, readonly = media("full"), media("readonly")
    for fs, seed in ((full, 0), (readonly, 10)):
        for i, fmt in enumerate(["mp3", "flac", "m4a", "ogg"]):
            make_file(fs.path / "Album", fmt, seconds=2.5, seed=seed + i, name=f"{i:02d} song.{fmt}",
                      tags={"title": f"Song {i}", "artist": "Someone"})
    full_lib, ro_lib = add_library("full", str(full.path)), add_library("readonly", str(readonly.path))
    for library in (full_lib, ro_lib):
        scan.request_scan(library)
    readonly.remount("ro")  # scanning a read-only library is fine: nothing is written
    assert drain_scans() == []
    assert Track.objects.filter(state="scanned").count() == 8
    filler = full.fill()
    before = {**digests(full.path), **digests(readonly.path)}
    env = dict(worker_env, EARMARK_MODELS_DIR=str(installed_models_dir))

    # The tagger: scores stored, writes refused by the filesystem, jobs back in the queue with the reason.
    out = manage("run_tagger", "--exit-when-idle", env=env, timeout=180)
    assert "database is locked" not in out.stdout + out.stderr
    assert_retried_with("tag", [full_lib], "no space left on device")
    assert_retried_with("tag", [ro_lib], "read-only filesystem")
    assert set(Track.objects.values_list("state", flat=True)) == {"scanned"}
    assert {**digests(full.path), **digests(readonly.path)} == before, "every original is intact"
    assert not list(tmp_path.rglob(f"{TEMP_PREFIX}*")), "no temporary copy left"

    # Later, with room and write access again: the same jobs succeed.
    filler.unlink()
    readonly.remount("rw")
    later("tag")
    manage("run_tagger", "--exit-when-idle", env=env, timeout=180)
    assert set(Job.objects.filter(queue="tag").values_list("state", "attempts")) == {("done", 2)}
    for track in Track.objects.all():
        assert track.state == "tagged" and track.error == ""
        assert read_earmark_tags(track.path)["version"], track.path

    # The recalibrator meets the same filesystems: a new calibration must rewrite every file.
    filler = full.fill()
    readonly.remount("ro")
    before = {**digests(full.path), **digests(readonly.path)}
    result = compute.recalibrate(min_count=1)
    assert result.jobs == 8
    manage("run_recalibrator", "--exit-when-idle", env=env, timeout=120)
    assert_retried_with("calibrate", [full_lib], "no space left on device")
    assert_retried_with("calibrate", [ro_lib], "read-only filesystem")
    assert {**digests(full.path), **digests(readonly.path)} == before, "every original is intact"
    assert not list(tmp_path.rglob(f"{TEMP_PREFIX}*"))

    filler.unlink()
    readonly.remount("rw")
    later("calibrate")
    manage("run_recalibrator", "--exit-when-idle", env=env, timeout=120)
    assert set(Job.objects.filter(queue="calibrate").values_list("state", flat=True)) == {"done"}
    version = result.calibration.version
    for track in Track.objects.all():
        assert track.calibration_version == version and track.error == ""
        assert f"calibration={version}" in read_earmark_tags(track.path)["version"][0]
    assert Library.objects.count() == 2 and os.path.ismount(full.path) and os.path.ismount(readonly.path)


# --- an unmounted library --------------------------------------------------------------------------


def bind_mount(source: Path, target: Path) -> None:
    target.mkdir(exist_ok=True)
    proc = subprocess.run(["mount", "--bind", str(source), str(target)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot bind-mount here ({proc.stderr.strip() or proc.returncode}); needs root")


def unmount(target: Path) -> None:
    subprocess.run(["umount", str(target)], check=True, capture_output=True)


def test_an_unmounted_library_never_marks_tracks_missing_or_deletes_anything(worker_env, tmp_path):
    """The library root is a real bind mount (``mount --bind``) of the directory holding the files,
    unmounted and even removed between scans and in the middle of one, as a NAS or USB drive goes away."""
    disk, root = tmp_path / "disk", tmp_path / "mnt" / "music"
    root.parent.mkdir()
    for album in range(3):
        for i, fmt in enumerate(["mp3", "ogg"]):
            make_file(disk / f"Album {album}", fmt, seconds=1.0, seed=album * 10 + i, name=f"{i} song.{fmt}")
    make_file(disk, "flac", seconds=1.0, seed=99, name="loose file in the root.flac")
    files = digests(disk)
    bind_mount(disk, root)
    try:
        library = add_library("nas", str(root))
        scan.request_scan(library)
        manage("run_scanner", "--exit-when-idle", env=worker_env, timeout=60)
        assert Track.objects.filter(library=library, state="scanned").count() == 7
        Track.objects.filter(library=library, path__endswith=".mp3").update(state="tagged")  # some tagged too
        known = dict(Track.objects.filter(library=library).values_list("path", "state"))
        tag_jobs = set(Job.objects.filter(queue="tag").values_list("id", flat=True))

        def assert_nothing_lost(reason: str) -> None:
            assert dict(Track.objects.filter(library=library).values_list("path", "state")) == known, reason
            assert digests(disk) == files, reason
            assert set(Job.objects.filter(queue="tag").values_list("id", flat=True)) == tag_jobs, reason

        # Between scans: unmounted (an empty mount point), then gone altogether.
        unmount(root)
        scan.request_scan(library)
        manage("run_scanner", "--exit-when-idle", env=worker_env, timeout=60)
        job = Job.objects.filter(queue="scan", state="failed").latest("id")
        assert "is empty but nas has tracks there; is the drive mounted? Nothing was marked missing." in job.last_error
        assert_nothing_lost("unmounted between scans")
        root.rmdir()
        scan.request_scan(library, full=True)
        manage("run_scanner", "--exit-when-idle", env=worker_env, timeout=60)
        assert "cannot be read" in Job.objects.filter(queue="scan", state="failed").latest("id").last_error
        assert_nothing_lost("mount point removed between scans")
        library.refresh_from_db()
        assert "is the drive mounted?" in library.last_scan_error

        # Mid-scan: the scan starts on the mounted library, then the drive goes away.
        bind_mount(disk, root)
        scan.request_scan(library, full=True)
        drain_scans(limit=1)  # the library job: the root was there, the scan has begun
        assert Job.objects.filter(queue="scan", key=f"library:{library.id}").latest("id").state == "done"
        assert Job.objects.filter(queue="scan", state="queued", payload__kind="folder").exists()
        unmount(root)
        manage("run_scanner", "--exit-when-idle", env=worker_env, timeout=60)
        assert_nothing_lost("unmounted in the middle of a scan")
        assert scan.progress(library)["state"] == "failed"

        # Back again: an ordinary scan finds everything as it was.
        bind_mount(disk, root)
        scan.request_scan(library)
        manage("run_scanner", "--exit-when-idle", env=worker_env, timeout=60)
        assert scan.progress(library)["state"] == "done"
        assert_nothing_lost("mounted again")
    finally:
        subprocess.run(["umount", str(root)], capture_output=True)
