"""SIGKILL chaos under supervisord: the short version of ``python -m bench.chaos`` (about 75 s here).

A real supervisord (the project's config) runs 4 scanners, 2 taggers and 2
recalibrators on the test's SQLite file and a library of 16 short files in
every format. Once half the files are tagged and a calibration is in
force, for 36 seconds the driver SIGKILLs a running worker every 0.6-2 s
(mostly one with a job in hand) while it keeps work coming: rescans,
re-tags and new calibrations, which make the recalibrators rewrite every
file. Then the queues drain, a last scan runs, and ``bench.chaos.check``
holds every invariant of the issue: jobs done or failed with a reason,
none running, no decoded audio changed, no temporary file anywhere, tags
in every file equal to the database's. The long run:
``python -m bench.chaos --minutes N``.
"""
import re

import pytest
from django.conf import settings

from bench.chaos import WORKERS, Chaos, check, decoded_audio, final_scan, make_library, settle, temp_files
from workers.library import scan
from workers.library.libraries import add_library
from workers.models import Calibration, Job, Meta

from tests.conftest import wait_for
from tests.supervisor_harness import Supervisor

pytestmark = pytest.mark.slow

TRACKS = 16
CHAOS_SECONDS = 36
WORKERS_GROUPS = ("scanner", "tagger", "recalibrator")


def test_sigkill_chaos_under_supervisord_loses_and_corrupts_nothing(worker_env, tmp_path, installed_models_dir):
    root = tmp_path / "library"
    files = make_library(root, TRACKS, seconds=(2.0, 3.5))
    before = decoded_audio(files)
    library = add_library("chaos", str(root))
    scan.request_scan(library)
    env = dict(worker_env, EARMARK_MODELS_DIR=str(installed_models_dir), EARMARK_CALIBRATION_MIN_TRACKS="8",
               EARMARK_CALIBRATION_CHECK_SECONDS="1")
    sup = Supervisor(env, tmp_path / "sup", EARMARK_TAGGER_AUTOSTART="true", EARMARK_RECALIBRATOR_AUTOSTART="true",
                     **WORKERS).start()
    log = []
    try:
        chaos = Chaos(sup, library, host=settings.EARMARK_HOSTNAME, seed=7, log=log.append)
        chaos.warm_up(TRACKS // 2, timeout=90)
        stats = chaos.run(CHAOS_SECONDS, until=lambda st: st.interrupted >= 2 and set(st.kills) == set(WORKERS_GROUPS),
                          at_most=CHAOS_SECONDS * 3)
        settle(150)
        final_scan(library, 120)
        report = check(library, before)
        # supervisord kept every worker up: each one killed is RUNNING again once past its startsecs.
        wait_for(lambda: all_running(sup.status()), timeout=30, interval=0.5,
                 message="every worker RUNNING again, none given up")
        sup.ctl("stop", "all")
        rows_left = list(Meta.objects.filter(key__startswith="worker:").values_list("key", flat=True))
        events = sup.log("supervisord")
        cleaned = sum(sup.log(f"scanner_{n:02d}").count("left by dead tag writers") for n in range(4))
    finally:
        sup.stop()

    detail = "\n".join(log)
    print(f"kills: {dict(stats.kills)}, interrupted jobs: {stats.interrupted}, spared: {stats.spared}, "
          f"churn: {dict(stats.churn)}, jobs: {dict(report.jobs)}, retried: {report.jobs_retried}, "
          f"folders where a scanner removed a dead writer's temporary file: {cleaned}")
    assert not report.problems, "\n".join(report.problems) + "\n" + detail
    # The chaos was real: every kind of worker died, and died with work in hand.
    assert stats.total_kills >= 12, detail
    assert set(stats.kills) == set(WORKERS_GROUPS), (stats.kills, detail)
    assert stats.interrupted >= 2, detail
    assert len(re.findall(r"terminated by SIGKILL", events)) == stats.total_kills, events
    # ... and every kind of work got done through it.
    assert report.files_checked == TRACKS and report.tracks_tagged == TRACKS
    assert Calibration.objects.count() >= 2, "the recalibrators had calibrations to write"
    assert Job.objects.filter(queue="calibrate", state="done", result__written=True).exists()
    assert Job.objects.filter(queue="scan", state="done").count() > 10
    assert report.jobs_retried >= 1, "some job was rescued from a dead worker and run again"
    assert "gave up" not in events and "FATAL" not in events, events
    # A clean stop leaves nothing behind.
    assert rows_left == [], rows_left
    assert temp_files(root) == []


def all_running(states: dict) -> bool:
    workers = [state for name, state in states.items() if name.split(":")[0] in WORKERS_GROUPS]
    return bool(workers) and set(workers) == {"RUNNING"}
