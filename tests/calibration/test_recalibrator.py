"""The recalibrator on real files: real model scores, the auto trigger as a maintenance service, rewrites only
where tags change, the odd cases of a job, and the promise that neither it nor the scanner
ever imports torch.
"""
from __future__ import annotations

import configparser
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from django.core.management import call_command

from workers.calibration import auto, compute
from workers.tagging import calibrated
from workers.library import paths, scan, scan_worker
from workers.jobs import maintenance, queue
from workers.tagfiles import namespace as tagfile
from workers.models import Job, Library, Score, Track
from workers.jobs.queue import ClaimedJob
from workers.calibration.recalibrate_worker import RecalibrateWorker
from workers.jobs.runtime import Context, PermanentError
from workers.tagging import scores as stored
from workers.tagging.apply import write_track_tags
from workers.tagging import measures
from workers.tagging.tagset import build_tags

from tests.audio_factory import make_file
from tests.conftest import ROOT

MODELS = "MTT_musicnn@abcd1234+MSD_musicnn@ef567890"
INLINE = "worker:testhost:inline:0"


def drain(queue_name: str, handle) -> list:
    """Run a queue's jobs in this process as a worker would; returns the results."""
    results = []
    while jobs := queue.claim(queue_name, INLINE, "boot", 1):
        result = handle(jobs[0])
        queue.complete([jobs[0].id], INLINE, {jobs[0].id: result})
        results.append(result)
    return results


def scan_library(library: Library) -> None:
    scan.request_scan(library)
    drain("scan", lambda job: scan_worker.process_job(job.payload, job.library_id))


def file_state(path) -> tuple[bytes, int]:
    with open(path, "rb") as f:
        return f.read(), os.stat(path).st_mtime_ns


def tracks_by_name(library) -> dict[str, Track]:
    return {Path(t.path).name: t for t in Track.objects.filter(library=library).select_related("library", "score")}


def make_library(tmp_path, formats, write_mode=Library.WriteMode.MINIMAL, seconds=1.0) -> Library:
    root = tmp_path / "music"
    for i, fmt in enumerate(formats):
        make_file(root, fmt, seconds=seconds, seed=i, tags={"title": f"Song {i}", "artist": "Someone"},
                  name=f"{i:02d}.{fmt}")
    return Library.objects.create(name="music", root=str(root), write_mode=write_mode)


def give_synthetic_scores(library, seed=0) -> None:
    """Tag every scanned track from random scores, as a tagger would have (uncalibrated)."""
    rng = np.random.default_rng(seed)
    for track in Track.objects.filter(library=library).select_related("library"):
        means = rng.beta(0.6, 6.0, len(compute.LABEL_ORDER)).astype(np.float32)
        spreads = (means * 0.3).astype(np.float32)
        stored.save(track, MODELS, compute.LABEL_ORDER, means, spreads, patches=4)
        m, s = stored.as_mappings(Score.objects.get(track=track), compute.LABEL_ORDER)
        write_track_tags(track, m, s, MODELS, None)


# ------------------------------------------------------------ real scores, end to end

@pytest.mark.slow
def test_tagger_triggers_calibration_and_recalibration_rewrites_only_what_changes(
        worker_env, settings, installed_models_dir, tmp_path):
    from workers.tagging.tag_worker import TagWorker

    settings.EARMARK_MODELS_DIR = installed_models_dir
    settings.EARMARK_CALIBRATION_MIN_TRACKS = 3
    settings.EARMARK_CALIBRATION_CHECK_SECONDS = 0
    library = make_library(tmp_path, ["mp3", "flac", "ogg"], Library.WriteMode.FULL, seconds=4.0)
    scan_library(library)

    tagger, ctx = TagWorker("cpu"), Context()
    tagger.setup(ctx)
    tagged = drain("tag", lambda job: tagger.process(job, ctx))
    assert len(tagged) == 3
    assert calibrated.current_pointer() is None
    # Any worker's maintenance pass runs the auto trigger (registered by workers.calibration.auto).
    assert maintenance.run_once().services["recalibrated"] == 1
    version = calibrated.current_pointer()["version"]
    assert Job.objects.filter(queue="calibrate", state="queued").count() == 3
    for track in Track.objects.filter(library=library):
        assert "calibration=uncalibrated" in tagfile.read_earmark_tags(paths.to_bytes(track.path))["version"][0]

    proc = subprocess.run([sys.executable, str(ROOT / "manage.py"), "run_recalibrator", "--exit-when-idle"],
                          env=worker_env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [j.result["written"] for j in Job.objects.filter(queue="calibrate")] == [True] * 3
    calibration = calibrated.current(max_age=0)
    before = {}
    for name, track in tracks_by_name(library).items():
        means, spreads = stored.as_mappings(track.score, compute.LABEL_ORDER)
        expected = replace(build_tags(means, spreads, calibration, "full", models=track.score.model_version),
                           measured=measures.namespace_fields(track))  # tempo, key, loudness: kept as measured
        in_file = tagfile.read_earmark_tags(paths.to_bytes(track.path))
        in_file.pop("standard", None)  # what went into the standard fields: tests/tagfiles/test_standard.py
        assert in_file == expected.fields(), "exactly what a fresh tagging would write"
        assert in_file["version"][0].endswith(f"calibration={version}")
        assert track.calibration_version == version and track.earmark_tags == expected.categories
        before[name] = file_state(paths.to_bytes(track.path))

    call_command("calibrate", "--min-tracks", "3")                 # the same scores: the same calibration
    assert not Job.objects.filter(queue="calibrate", state="queued").exists()
    queue.enqueue_many("calibrate", [queue.NewJob(key=f"calibrate:{t.id}", payload={"force": True}, track_id=t.id)
                                     for t in Track.objects.filter(library=library)])
    manage_run = subprocess.run([sys.executable, str(ROOT / "manage.py"), "run_recalibrator", "--exit-when-idle"],
                                env=worker_env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert manage_run.returncode == 0, manage_run.stdout + manage_run.stderr
    forced = Job.objects.filter(queue="calibrate", key__regex=r"^calibrate:\d+$")
    assert [j.result["written"] for j in forced] == [False] * 3
    after = {name: file_state(paths.to_bytes(t.path)) for name, t in tracks_by_name(library).items()}
    assert after == before, "a second recalibration with the same calibration writes nothing"


# ------------------------------------------------------------ torch stays out

def imported_torch(importtime_log: str) -> bool:
    """Whether ``python -X importtime`` listed torch (or any torch submodule)."""
    return re.search(r"\|\s+torch(\.|\s*$)", importtime_log, re.MULTILINE) is not None


def run_with_importtime(command: str, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "manage.py"), command, "--exit-when-idle"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-5000:]
    assert "import time:" in proc.stderr, "importtime output expected"
    return proc


@pytest.mark.slow
def test_scanner_and_recalibrator_never_import_torch(worker_env, tmp_path):
    library = make_library(tmp_path, ["mp3", "flac"])
    scan.request_scan(library)
    scan_run = run_with_importtime("run_scanner", worker_env)
    assert Track.objects.filter(library=library, state="scanned").count() == 2
    assert not imported_torch(scan_run.stderr)

    give_synthetic_scores(library)
    row, _ = compute.compute(min_count=2)
    assert compute.activate(row) == 2
    recal_run = run_with_importtime("run_recalibrator", worker_env)
    assert Job.objects.filter(queue="calibrate", state="done").count() == 2
    assert set(Track.objects.values_list("calibration_version", flat=True)) == {row.version}
    assert not imported_torch(recal_run.stderr)
    assert imported_torch("import time:      1234 |      5678 |   torch.nn\n"), "the detector itself works"


# ------------------------------------------------------------ one job, odd cases

def job_for(track: Track, **payload) -> ClaimedJob:
    return ClaimedJob(id=0, queue="calibrate", key=f"calibrate:{track.id}", payload=payload, track_id=track.id,
                      library_id=track.library_id, attempts=1, max_attempts=3)


@pytest.fixture
def calibrated_library(db, tmp_path):
    """Three real files tagged from synthetic scores, and a current calibration none was written with."""
    library = make_library(tmp_path, ["mp3", "flac", "ogg"])
    scan_library(library)
    give_synthetic_scores(library)
    Job.objects.filter(queue="tag").delete()  # the scan's; these tracks were "tagged" from synthetic scores
    row, _ = compute.compute(min_count=3)
    compute.activate(row)
    return library, row


def test_a_job_rewrites_the_file_then_skips_it(calibrated_library):
    library, row = calibrated_library
    worker, track = RecalibrateWorker(), tracks_by_name(calibrated_library[0])["00.mp3"]
    assert worker.process(job_for(track, calibration=row.version), Context()) == {"written": True,
                                                                                   "calibration": row.version}
    state = file_state(paths.to_bytes(track.path))
    track.refresh_from_db()
    assert worker.process(job_for(track), Context()) == {"skipped": "already written with this calibration"}
    assert worker.process(job_for(track, force=True), Context())["written"] is False
    assert file_state(paths.to_bytes(track.path)) == state


def test_a_disabled_library_is_left_alone(calibrated_library):
    library, row = calibrated_library
    track = tracks_by_name(library)["00.mp3"]
    state = file_state(paths.to_bytes(track.path))
    Library.objects.filter(id=library.id).update(enabled=False)
    result = RecalibrateWorker().process(job_for(track, calibration=row.version), Context())
    assert result == {"skipped": "the library music is disabled"}
    assert file_state(paths.to_bytes(track.path)) == state


def test_a_batch_reads_its_tracks_in_one_query(calibrated_library, django_assert_num_queries):
    held = queue.claim("calibrate", "worker:testhost:calibrate:1", "boot", 10)
    other = queue.enqueue("calibrate", "someone-elses", track_id=held[0].track_id)
    queue.claim("calibrate", "worker:testhost:calibrate:2", "boot", 10)
    assert len(held) == 3 and other
    worker = RecalibrateWorker()
    with django_assert_num_queries(1):
        tracks = [worker._track(job) for job in held]
    assert [t.id for t in tracks] == [j.track_id for j in held] and not worker.tracks
    assert all(t.score.means and t.library.root for t in tracks), "library and scores came along"


def test_rows_are_recorded_once_per_batch_before_its_jobs_complete(calibrated_library):
    library, row = calibrated_library
    held = queue.claim("calibrate", INLINE, "boot", 10)
    worker, versions = RecalibrateWorker(), lambda: set(Track.objects.values_list("calibration_version", flat=True))
    assert [worker.process(job, Context())["written"] for job in held[:2]] == [True, True]
    assert versions() == {"uncalibrated"}, "the first two wait for the batch's end"
    assert worker.process(held[2], Context())["written"] is True
    assert versions() == {row.version}, "recorded after the batch's last job"
    for track in Track.objects.all():
        st = os.stat(paths.to_bytes(track.path))
        assert (track.size, track.mtime_ns) == (st.st_size, st.st_mtime_ns)


def test_stopping_mid_batch_records_what_was_written(calibrated_library):
    library, row = calibrated_library
    held = queue.claim("calibrate", INLINE, "boot", 10)
    worker = RecalibrateWorker()
    worker.process(held[0], Context())
    worker.teardown()
    assert Track.objects.get(id=held[0].track_id).calibration_version == row.version


def test_a_row_made_stale_by_another_recalibrator_is_read_again(calibrated_library):
    library, row = calibrated_library
    worker, track = RecalibrateWorker(), tracks_by_name(library)["00.mp3"]
    job = job_for(track, calibration=row.version)
    worker.tracks = {job.id: track}                        # read ahead, before the other worker's write
    other = calibrated.LibraryCalibration("cal-elsewhere", row.stats)
    means, spreads = stored.as_mappings(track.score, compute.LABEL_ORDER)
    write_track_tags(Track.objects.select_related("library").get(id=track.id), means, spreads, MODELS, other)
    assert worker.process(job, Context()) == {"written": True, "calibration": row.version}
    track.refresh_from_db()
    assert track.state == Track.State.TAGGED and track.calibration_version == row.version
    assert not Job.objects.filter(queue="tag").exists(), "not mistaken for a user's edit"


def test_a_changed_file_goes_back_to_the_tagger(calibrated_library):
    track = tracks_by_name(calibrated_library[0])["01.flac"]
    path = paths.to_bytes(track.path)
    os.utime(path, ns=(track.mtime_ns + 10**9, track.mtime_ns + 10**9))
    result = RecalibrateWorker().process(job_for(track), Context())
    assert result == {"rescanned": "the file changed since its scan; queued for tagging"}
    assert Job.objects.filter(queue="tag", key=f"tag:{track.id}", state="queued").exists()


def test_a_vanished_file_is_marked_missing(calibrated_library):
    track = tracks_by_name(calibrated_library[0])["02.ogg"]
    os.unlink(paths.to_bytes(track.path))
    result = RecalibrateWorker().process(job_for(track), Context())
    assert result == {"rescanned": "the file changed since its scan; the track is now missing"}
    track.refresh_from_db()
    assert track.state == Track.State.MISSING
    assert RecalibrateWorker().process(job_for(track), Context()) == {"skipped": "the track is missing, not tagged"}


def test_jobs_that_cannot_succeed_fail_for_good(calibrated_library, tmp_path):
    library, _ = calibrated_library
    worker, tracks = RecalibrateWorker(), tracks_by_name(library)
    Score.objects.filter(track=tracks["00.mp3"]).delete()
    with pytest.raises(PermanentError, match="no stored scores"):
        worker.process(job_for(tracks["00.mp3"]), Context())
    outside = make_file(tmp_path / "elsewhere", "mp3", seconds=1.0)
    Track.objects.filter(id=tracks["01.flac"].id).update(path=str(outside))
    with pytest.raises(PermanentError, match="outside the library root"):
        worker.process(job_for(tracks["01.flac"]), Context())
    Score.objects.filter(track=tracks["02.ogg"]).update(labels_version="another")
    with pytest.raises(PermanentError, match="another label list"):
        worker.process(job_for(tracks["02.ogg"]), Context())
    gone = job_for(tracks["02.ogg"])
    gone.track_id = 10**9
    with pytest.raises(PermanentError, match="no longer exists"):
        worker.process(gone, Context())


# ------------------------------------------------------------ deployment

def test_supervisord_runs_recalibrators_from_the_environment():
    conf = configparser.RawConfigParser()
    conf.read(ROOT / "deploy" / "supervisord.conf")
    program = conf["program:recalibrator"]
    assert "manage.py run_recalibrator" in program["command"]
    assert program["numprocs"] == "%(ENV_EARMARK_RECALIBRATORS)s"
    assert program["autostart"] == "%(ENV_EARMARK_RECALIBRATOR_AUTOSTART)s"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EARMARK_")}
    defaults = subprocess.run(["bash", "-c", "source deploy/env.sh && echo $EARMARK_RECALIBRATORS "
                               "$EARMARK_RECALIBRATOR_AUTOSTART"], cwd=ROOT, env=env, capture_output=True,
                              text=True, check=True).stdout.split()
    assert defaults == ["2", "true"]
