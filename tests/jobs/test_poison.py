"""Poison files: a file that kills its worker every time is quarantined, and the queue goes on.

The death is real: with ``EARMARK_TEST_ABORT_MARKER`` set (test-only; see
``workers.audio.decode``), opening a file whose path holds the marker calls
``os.abort()`` inside the tagger process, as a crash inside FFmpeg would.
No exception, no cleanup, no chance to record anything: the process is gone
(SIGABRT), supervisord restarts it, and only the queue's rescue (the
restarted worker's ``rescue_predecessor``, or another worker's maintenance
seeing the dead pid) can notice. After ``max_attempts`` deaths the job is
failed with the reason kept, and every other file is tagged in the meantime.

Three poison files and two taggers make nine deaths, at least five for one
process: more than supervisord's ``startretries`` (3) would forgive if a
death counted as a failed start; the program must never end up FATAL.
"""
import re
from pathlib import Path

import pytest
from django.utils import timezone

from workers.library import scan
from workers.library.libraries import add_library
from workers.models import Job, Meta, Track
from workers.tagfiles.tempfiles import TEMP_PREFIX

from tests.audio_factory import make_file
from tests.conftest import drain_scans, wait_for
from tests.supervisor_harness import Supervisor

pytestmark = pytest.mark.slow

MARKER = "POISON"


def test_a_file_that_kills_its_worker_is_quarantined_and_never_blocks_the_queue(worker_env, tmp_path,
                                                                                  installed_models_dir):
    root = tmp_path / "music"
    poison = [make_file(root / "Bad Album", fmt, seconds=2.0, seed=50 + i, name=f"{MARKER} {i}.{fmt}")
              for i, fmt in enumerate(["mp3", "flac", "ogg"])]
    good = [make_file(root / "Good Album", fmt, seconds=2.0, seed=i, name=f"{i:02d} good.{fmt}")
            for i, fmt in enumerate(["mp3", "flac", "ogg", "wav", "m4a", "opus"])]
    poison_bytes = {p: p.read_bytes() for p in poison}
    library = add_library("music", str(root))
    scan.request_scan(library)
    assert drain_scans() == []
    assert Track.objects.filter(state="scanned").count() == len(poison) + len(good)
    # The worst place for them: the head of the queue, where every claim looks first.
    poison_jobs = Job.objects.filter(queue="tag", track__path__contains=MARKER)
    good_jobs = Job.objects.filter(queue="tag").exclude(track__path__contains=MARKER)
    assert poison_jobs.update(priority=1) == len(poison)

    env = dict(worker_env, EARMARK_MODELS_DIR=str(installed_models_dir), EARMARK_TEST_ABORT_MARKER=MARKER)
    sup = Supervisor(env, tmp_path / "sup", EARMARK_SCANNERS=1, EARMARK_TAGGERS=2,
                     EARMARK_TAGGER_AUTOSTART="true").start()
    try:
        # Not blocked: the good files are all tagged while the poison jobs are still being retried
        # (a job whose worker died twice waits a backoff, so the rest of the queue goes first).
        wait_for(lambda: not good_jobs.exclude(state="done").exists(), timeout=120, interval=0.5,
                 message="every good file to be tagged")
        assert poison_jobs.filter(state__in=Job.ACTIVE_STATES).exists(), "the poison jobs were still pending"
        assert all(j.attempts >= 1 for j in poison_jobs.all()), "each poison file had killed a tagger already"
        # Let the backoff pass, rather than wait for it.
        def pull_forward():
            poison_jobs.filter(state="queued").update(run_after=timezone.now())
            return not poison_jobs.filter(state__in=Job.ACTIVE_STATES).exists()

        wait_for(pull_forward, timeout=120, interval=0.5, message="every poison job to be quarantined")
        taggers = lambda: {n: s for n, s in sup.status().items() if n.startswith("tagger:")}
        wait_for(lambda: set(taggers().values()) == {"RUNNING"}, timeout=30,
                 message="both taggers running after the deaths (not FATAL)")
        events = sup.log("supervisord")
    finally:
        sup.stop()

    for job in poison_jobs.all():  # .all(): a fresh query, not the rows read above
        assert job.state == "failed", (job.key, job.state, job.last_error)
        assert job.attempts == job.max_attempts == 3
        assert re.fullmatch(r"worker died 3 times on this job \(last: worker:testhost:tag:\d\)", job.last_error), \
            job.last_error
        track = job.track
        assert track.state == "failed" and track.error.startswith("quarantined: the tagger process died 3 times")
    # Nine real deaths (three files x three attempts), each restarted; no start ever failed.
    deaths = re.findall(r"exited: tagger_0\d \(terminated by SIGABRT", events)
    assert len(deaths) == 9, events
    assert "gave up" not in events and "FATAL" not in events, events
    # The good files were all tagged; the poison files were never touched.
    assert {t.state for t in Track.objects.exclude(path__contains=MARKER)} == {"tagged"}
    for path, data in poison_bytes.items():
        assert path.read_bytes() == data
    assert not list(Path(root).rglob(f"{TEMP_PREFIX}*"))
    assert not Meta.objects.filter(key__startswith="worker:").exists(), "stopped workers removed their rows"
    # A rescan does not feed the poison files to the taggers again (their tracks failed with the reason).
    scan.request_scan(library)
    assert drain_scans() == []
    assert not Job.objects.filter(queue="tag", state="queued").exists()
