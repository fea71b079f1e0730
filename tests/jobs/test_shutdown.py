"""Graceful stop: ``supervisorctl stop tagger:*`` while both taggers are tagging.

Two real taggers under the project's supervisord. One holds a long file (a
5-minute recording: about 7 s of network time here) that cannot finish
within the stop grace (``EARMARK_STOP_GRACE_SECONDS``, 3 s in this test),
the other short files that can. After SIGTERM the first must release its
job (back in the queue, the claim not counted as an attempt) and the second
must finish its job; both must exit 0 well inside ``stopwaitsecs`` (30 s),
leaving no partial file, no temporary file and no meta row.
"""
import hashlib
import re
import time
from pathlib import Path

import pytest

from workers.library import scan
from workers.library.libraries import add_library
from workers.models import Job, Library, Meta, Track
from workers.tagfiles.tempfiles import TEMP_PREFIX
from workers.tagfiles.namespace import read_earmark_tags

from tests.audio_factory import make_file, tone
from tests.conftest import category_tags, drain_scans, wait_for
from tests.supervisor_harness import Supervisor

pytestmark = pytest.mark.slow

GRACE = 3
STOPWAITSECS = 30  # deploy/supervisord.conf, [program:tagger]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def busy_job(key: str):
    row = Meta.objects.filter(key=key, value__state="busy").first()
    return row.value.get("job") if row else None


def test_stop_taggers_mid_tagging_finishes_or_releases_and_leaves_nothing(worker_env, tmp_path,
                                                                           installed_models_dir):
    root = tmp_path / "music"
    long_file = make_file(root / "Live", "wav", samples=tone(300, 16000)[None], sample_rate=16000,
                          name="long concert.wav")
    short = [make_file(root / "Singles", fmt, seconds=12, seed=i, name=f"{i:02d} single.{fmt}")
             for i, fmt in enumerate(["mp3", "flac", "ogg", "m4a", "wav", "opus", "mp3", "flac"])]
    before = {p: digest(p) for p in [long_file, *short]}
    library = add_library("music", str(root))
    # Full analysis: a fast one settles on a steady tone within the grace, and this test needs a job that outlasts it.
    Library.objects.filter(id=library.id).update(analysis=Library.Analysis.FULL)
    scan.request_scan(library)
    assert drain_scans() == []
    long_job = Job.objects.get(queue="tag", track__path=str(long_file))
    Job.objects.filter(id=long_job.id).update(priority=1)  # the first claim takes it

    env = dict(worker_env, EARMARK_MODELS_DIR=str(installed_models_dir), EARMARK_STOP_GRACE_SECONDS=str(GRACE))
    sup = Supervisor(env, tmp_path / "sup", EARMARK_SCANNERS=1, EARMARK_TAGGERS=2,
                     EARMARK_TAGGER_AUTOSTART="true").start()
    try:
        keys = ["worker:testhost:tag:0", "worker:testhost:tag:1"]
        # Both busy: one on the long file, the other on a short one that has run a moment.
        wait_for(lambda: long_job.id in [busy_job(k) for k in keys], timeout=60, message="the long file in hand")
        long_key = next(k for k in keys if busy_job(k) == long_job.id)
        short_key = next(k for k in keys if k != long_key)
        wait_for(lambda: Job.objects.filter(queue="tag", state="done").exists() and busy_job(short_key),
                 timeout=60, message="the other tagger busy on a short file, one already done")
        in_hand = busy_job(short_key)
        started = time.monotonic()
        sup.ctl("stop", "tagger:*")
        took = time.monotonic() - started
        events = sup.log("supervisord")
        taggers = {n: s for n, s in sup.status().items() if n.startswith("tagger:")}
    finally:
        sup.stop()

    assert took < GRACE + 8 < STOPWAITSECS, f"stop took {took:.1f}s"
    assert taggers == {"tagger:tagger_00": "STOPPED", "tagger:tagger_01": "STOPPED"}
    for n in (0, 1):
        assert f"stopped: tagger_{n:02d} (exit status 0)" in events, events
    assert "SIGKILL" not in events, "supervisord never had to kill a tagger"
    for n in (0, 1):
        log = sup.log(f"tagger_{n:02d}")
        assert "Traceback" not in log, log
    assert re.search(r"tag:\d: stopping now \(grace period over\)", sup.log(f"tagger_{long_key[-1].zfill(2)}")), \
        "the long job was given up when the grace ran out"

    # The long job: released, not failed, not counted; its file untouched.
    job = Job.objects.get(id=long_job.id)
    assert (job.state, job.attempts, job.claimed_by) == ("queued", 0, "")
    assert digest(long_file) == before[long_file]
    assert read_earmark_tags(long_file) == {}
    # The short job in hand at SIGTERM: finished.
    assert Job.objects.get(id=in_hand).state == "done"
    # Nothing running, nothing half done, nothing left behind.
    assert not Job.objects.filter(state="running").exists()
    for job in Job.objects.filter(queue="tag"):
        track, path = job.track, Path(job.track.path)
        if job.state == "done":
            assert track.state == "tagged"
            tags = read_earmark_tags(path)
            assert category_tags(track.earmark_tags) == category_tags(tags)
        else:
            assert (job.state, job.attempts) == ("queued", 0), (job.key, job.state, job.attempts)
            assert track.state == "scanned" and digest(path) == before[path]
    assert not list(root.rglob(f"{TEMP_PREFIX}*")), "no temporary file"
    assert not Meta.objects.filter(key__startswith="worker:testhost:tag:").exists(), "no meta row left"
    assert Track.objects.filter(state="tagged").count() >= 1
