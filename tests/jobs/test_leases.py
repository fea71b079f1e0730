"""Leases under adversity, with real worker processes (issue 13, cases 1 and 4).

1. A worker whose job holds the GIL past the heartbeat timeout stays alive
   to the queue (its heartbeat is a process of its own), and a worker whose
   job was taken from it learns so before it writes or completes anything.
4. A batching worker that dies charges an attempt only to the job it was
   working on, never to the rest of the batch it held.

The interleavings are forced with the public queue functions
(``maintenance.run_once``, ``queue.rescue``) and real signals; the work is
``run_noop_worker``, whose "write" is a line in a log file made after
``Context.ensure_held``, as every real worker's write is.
"""
import os
import signal
import time
from datetime import timedelta

import pytest
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from workers.jobs import maintenance, queue
from workers.models import Job, Meta

from tests.conftest import spawn, wait_for

pytestmark = pytest.mark.slow

HOLDER = "worker:testhost:scan:1"


def _lines(log) -> list[str]:
    return log.read_text().split() if log.exists() else []


def test_a_worker_holding_the_gil_past_the_heartbeat_timeout_keeps_its_job(worker_env, tmp_path):
    queue.enqueue("scan", "gil")
    log = tmp_path / "ran.log"
    hold = settings.EARMARK_HEARTBEAT_TIMEOUT + 4
    holder = spawn("run_noop_worker", "scan", "--hold-gil", hold, "--log", log, "--number", "1", "--max-jobs", "1",
                   env=worker_env)
    wait_for(lambda: Job.objects.filter(key="gil", state="running", claimed_by=HOLDER).exists(),
             message="the job in the holder's hands")
    other = spawn("run_noop_worker", "scan", "--log", log, "--number", "2", env=worker_env)
    try:
        # Maintenance, as often as it likes, for longer than the heartbeat timeout.
        while holder.poll() is None:
            maintenance.run_once()
            job = Job.objects.get(key="gil")
            assert job.state in ("running", "done") and job.claimed_by in (HOLDER, ""), \
                "a live worker's job was handed to another worker"
            time.sleep(0.5)
        out = holder.communicate(timeout=30)[0]
        assert holder.returncode == 0, out
    finally:
        other.terminate()
        other.communicate(timeout=30)
    job = Job.objects.get(key="gil")
    assert job.state == "done" and job.attempts == 1
    assert _lines(log) == [str(job.id)], "the job ran exactly once"


def test_a_worker_whose_job_was_taken_writes_nothing_and_completes_nothing(worker_env, tmp_path):
    queue.enqueue("scan", "taken")
    log = tmp_path / "ran.log"
    holder = spawn("run_noop_worker", "scan", "--hold-gil", "5", "--log", log, "--number", "1", "--max-jobs", "1",
                   env=worker_env)
    wait_for(lambda: Job.objects.filter(key="taken", state="running", claimed_by=HOLDER).exists(),
             message="the job in the holder's hands")
    # The holder's heartbeat looks stale to the rescuer (a clock jump, a database that
    # could not take its writes): the job goes back to the queue and another worker takes it.
    # (One transaction: the holder's heartbeat, which beats on, cannot slip in between.)
    with transaction.atomic():
        Meta.objects.filter(key=HOLDER).update(updated_at=timezone.now() - timedelta(hours=1))
        assert queue.rescue().requeued == 1
    other = spawn("run_noop_worker", "scan", "--log", log, "--number", "2", "--max-jobs", "1", env=worker_env)
    try:
        out = holder.communicate(timeout=60)[0]
        assert holder.returncode == 0, out
        assert "was taken from this worker" in out, out
        assert other.wait(timeout=60) == 0
    finally:
        other.kill()
        other.communicate()
    job = Job.objects.get(key="taken")
    assert job.state == "done" and job.claimed_by == "worker:testhost:scan:2"
    assert _lines(log) == [str(job.id)], "only the job's new holder wrote"


def test_a_batching_worker_that_dies_charges_only_the_job_in_hand(worker_env):
    queue.enqueue_many("scan", [queue.NewJob(key=f"b{n}") for n in range(8)])
    first = Job.objects.get(key="b0")
    for death in range(1, first.max_attempts + 1):
        victim = spawn("run_noop_worker", "scan", "--batch", "8", "--sleep", "60", "--number", "1", env=worker_env)
        wait_for(lambda: Job.objects.filter(key="b0", state="running", attempts=death).exists(),
                 message=f"the first job begun for the {death}. time")
        assert Job.objects.filter(state="running").count() == 8, "the worker holds the whole batch"
        os.kill(victim.pid, signal.SIGKILL)
        victim.communicate()
        maintenance.run_once()  # the dead pid is reaped and its jobs are rescued
        Job.objects.filter(state="queued").update(run_after=timezone.now())  # skip the retry backoff
    first.refresh_from_db()
    assert first.state == "failed" and "worker died 3 times" in first.last_error
    rest = Job.objects.exclude(key="b0")
    assert [j.attempts for j in rest] == [0] * 7, "the jobs only held were never charged"
    assert set(rest.values_list("state", flat=True)) == {"queued"}


def _heartbeat_children(pid: int) -> list[int]:
    children = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and b"workers.jobs.heartbeat" in cmdline:
            children.append(int(entry))
    return children


def test_a_heartbeat_process_that_dies_is_replaced_and_dies_with_its_worker(worker_env):
    worker = spawn("run_noop_worker", "scan", "--number", "1", env=worker_env)
    try:
        first = wait_for(lambda: _heartbeat_children(worker.pid), message="the heartbeat process")
        os.kill(first[0], signal.SIGKILL)
        second = wait_for(lambda: [p for p in _heartbeat_children(worker.pid) if p not in first],
                          message="a new heartbeat process")
        beat = Meta.objects.get(key=HOLDER).updated_at
        wait_for(lambda: Meta.objects.get(key=HOLDER).updated_at > beat, message="beats from the new one")
    finally:
        worker.kill()
        worker.communicate()
    wait_for(lambda: not os.path.exists(f"/proc/{second[0]}") or _zombie(second[0]), timeout=5,
             message="the heartbeat gone with its worker")


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
