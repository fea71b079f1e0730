"""Scans under the races of real deployments (issue 13), each forced in its racy order.

Several scanner workers share a scan's folder jobs, a worker can die after its
job's transaction committed but before the job was marked done (the rescuer
then runs the job again), a tagger re-reads a file while a scan runs, and a
second scan can be requested while one runs. The tests call the public job
functions in the order that used to go wrong: ``claim_all`` plays the workers
that hold jobs, ``run`` one worker finishing its job, ``die_after_commit`` one
that dies before ``queue.complete``.
"""
from pathlib import Path

import pytest

from tests.audio_factory import make_file, make_random_bytes
from tests.conftest import drain_scans as drain
from workers.jobs import queue
from workers.library import folders, scan, scan_worker
from workers.models import Job, Library, Track

pytestmark = pytest.mark.django_db

_workers = iter(range(1, 10_000))


@pytest.fixture
def library(tmp_path):
    root = tmp_path / "music"
    root.mkdir()
    return Library.objects.create(name="music", root=str(root))


@pytest.fixture
def one_job_per_folder(monkeypatch):
    """Every folder its own job, so that a test can hold some folders of a scan and run others."""
    monkeypatch.setattr(scan, "INLINE_SECONDS", 0)
    monkeypatch.setattr(scan, "FOLDERS_PER_JOB", 1)


def add(lib, folder: str, name: str, seed: int = 0) -> Path:
    return make_file(Path(lib.root) / folder if folder else Path(lib.root), "mp3", seconds=1, name=name, seed=seed)


def states(lib) -> dict:
    return {Path(p).name: s for p, s in Track.objects.filter(library=lib).values_list("path", "state")}


def claim_all() -> list[tuple[str, queue.ClaimedJob]]:
    """Every queued scan job, each claimed by a worker of its own (they now hold them, running)."""
    held = []
    while True:
        worker = f"worker:testhost:scan:{next(_workers)}"
        jobs = queue.claim("scan", worker, "boot", 1)
        if not jobs:
            return held
        held.append((worker, jobs[0]))


def claim_one() -> tuple[str, queue.ClaimedJob]:
    """The next scan job, claimed by a worker of its own."""
    worker = f"worker:testhost:scan:{next(_workers)}"
    [job] = queue.claim("scan", worker, "boot", 1)
    return worker, job


def run(worker: str, job: queue.ClaimedJob) -> dict:
    """A worker runs its job to the end, as ``ScanWorker`` does."""
    result = scan_worker.process_job(job.payload, job.library_id)
    queue.complete([job.id], worker, {job.id: result})
    return result


def die_after_commit(job: queue.ClaimedJob) -> None:
    """The job's transaction commits, then its worker is killed before ``queue.complete``; the rescuer requeues it."""
    scan_worker.process_job(job.payload, job.library_id)
    assert queue.rescue().requeued == 1


def active_finalize(lib) -> bool:
    return Job.objects.filter(queue="scan", key__startswith=f"finalize:{lib.id}:", state__in=Job.ACTIVE_STATES).exists()


def scan_library(lib, full=False) -> list:
    scan.request_scan(lib, full=full)
    return drain()


# --- case 2: a folder job re-run after it committed ------------------------------------------


def test_a_folder_job_run_again_after_its_commit_counts_nothing_twice(library, one_job_per_folder):
    for folder in ("A", "B"):
        add(library, folder, f"{folder.lower()}.mp3")
    assert scan_library(library) == []
    scan.request_scan(library)
    drain(limit=2)  # the library job, then the root folder: A and B are queued as jobs of their own
    before = scan.progress(library)
    assert before["folders_done"] == 1 and before["folders_total"] == 3
    _, job = claim_one()  # a worker takes A's job
    die_after_commit(job)
    worker, again = claim_one()
    assert again.id == job.id, "the rescued job is the next one to run"
    run(worker, again)  # the rescued job runs a second time
    progress = scan.progress(library)
    assert progress["folders_done"] == 2, "a folder job that ran twice is counted once"
    assert progress["files_seen"] == 1 and progress["state"] == "running"
    assert not active_finalize(library), "the scan is not finalized while B is unscanned"
    drain(limit=1)  # whatever runs next
    assert "missing" not in states(library).values()
    assert drain() == []
    progress = scan.progress(library)
    assert progress["state"] == "done" and progress["folders_done"] == progress["folders_total"] == 3
    assert progress["files_seen"] == 2 and progress["missing"] == 0
    assert states(library) == {"a.mp3": "scanned", "b.mp3": "scanned"}
    assert set(Track.objects.values_list("scan_gen", flat=True)) == {progress["gen"]}


# --- case 5: a stale save lowers the scan generation ----------------------------------------


@pytest.mark.parametrize("change", ["rewritten", "broken"])
def test_rescanning_a_stale_track_mid_scan_never_lowers_its_generation(library, change):
    path = add(library, "A", "a.mp3")
    add(library, "A", "b.mp3")
    assert scan_library(library) == []
    stale = Track.objects.select_related("library").get(path=str(path))  # a tagger reads the track ...
    scan.request_scan(library)
    drain(limit=2)  # ... a scan passes its folder (A inline in the root's job) ...
    assert active_finalize(library)
    gen = scan.progress(library)["gen"]
    assert Track.objects.get(id=stale.id).scan_gen == gen
    if change == "rewritten":
        add(library, "A", "a.mp3", seed=5)  # ... the file changes under the tagger ...
    else:
        make_random_bytes(Path(library.root) / "A", "a.mp3")  # ... or becomes a bad file ...
    folders.rescan_track(stale)  # ... which re-reads it with the object it read before the scan
    assert Track.objects.get(id=stale.id).scan_gen == gen, "the generation did not go down"
    assert drain() == []  # the scan's finalize
    expected = "scanned" if change == "rewritten" else "failed"
    assert states(library) == {"a.mp3": expected, "b.mp3": "scanned"}, "a present file is never missing"
    assert scan_library(library) == []
    assert states(library) == {"a.mp3": expected, "b.mp3": "scanned"}


# --- case 8: overlapping scans lose folders ------------------------------------------------


def test_a_scan_requested_while_one_runs_composes_with_it(library, one_job_per_folder):
    for folder in ("A", "B", "C", "D"):
        add(library, folder, f"{folder.lower()}.mp3")
    assert scan_library(library) == []
    scan.request_scan(library)  # scan 1
    drain(limit=3)  # its library job, the root (A-D queued), one of A-D
    held = claim_all()  # three workers hold the other three
    unread = sorted(Path(j.payload["folder"]).name for _, j in held)
    [read] = {"A", "B", "C", "D"} - set(unread)
    add(library, unread[0], "new-unread.mp3")  # in a folder scan 1 has not read yet
    add(library, read, "new-read.mp3")  # in a folder scan 1 has read
    scan.request_scan(library)  # scan 2: `manage.py scan` again, while scan 1 runs
    run(*claim_one())  # a fourth worker takes the request
    drain(limit=1)  # whatever that queued runs next, while B, C and D are still held
    for worker, job in held:  # the first scan's workers finish
        run(worker, job)
    assert drain() == []
    progress = scan.progress(library)
    assert progress["state"] == "done", "both scans finished"
    assert states(library) == {name: "scanned" for name in ("a.mp3", "b.mp3", "c.mp3", "d.mp3",
                                                         "new-read.mp3", "new-unread.mp3")}
    assert set(Track.objects.values_list("scan_gen", flat=True)) == {progress["gen"]}, "the last scan saw every file"
    assert progress["folders_done"] == progress["folders_total"] == 5 and progress["files_seen"] == 6


def test_requests_during_a_scan_become_one_follow_up_scan(library, one_job_per_folder):
    add(library, "A", "a.mp3")
    add(library, "B", "b.mp3")
    assert scan_library(library) == []
    gen = scan.progress(library)["gen"]
    scan.request_scan(library)
    drain(limit=2)  # library job, root: A and B queued
    held = claim_all()  # two workers hold A and B
    for full in (False, True, False):  # three requests while they run, one of them --full
        scan.request_scan(library, full=full)
        run(*claim_one())  # another worker takes the request
    for worker, job in held:
        run(worker, job)
    assert drain() == []
    progress = scan.progress(library)
    assert progress["gen"] == gen + 2, "the running scan, then one follow-up for all the requests"
    assert progress["state"] == "done" and progress["full"] is True
    assert set(states(library).values()) == {"scanned"}
