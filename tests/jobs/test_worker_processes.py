"""The worker runtime with real OS processes on one SQLite file."""
import collections
import os
import signal
import time

import pytest

from workers.jobs import queue
from workers.models import Job, Meta

from tests.conftest import manage, spawn, wait_for

pytestmark = pytest.mark.slow


def test_four_processes_complete_2000_jobs_exactly_once(worker_env, tmp_path):
    queue.enqueue_many("scan", [queue.NewJob(key=f"job-{i}") for i in range(2000)])
    log = tmp_path / "ran.log"
    procs = [spawn("run_noop_worker", "scan", "--exit-when-idle", "--batch", "10", "--log", log, env=worker_env)
             for _ in range(4)]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], outputs
    assert not any("database is locked" in o for o in outputs), outputs
    ran = collections.Counter(log.read_text().split())
    assert len(ran) == 2000 and set(ran.values()) == {1}, "every job ran exactly once"
    assert Job.objects.filter(state="done").count() == 2000
    assert not Meta.objects.filter(key__startswith="worker:").exists(), "workers removed their rows"


def test_sigterm_finishes_current_job_and_cleans_up(worker_env, tmp_path):
    queue.enqueue_many("scan", [queue.NewJob(key=f"j{i}") for i in range(5)])
    log = tmp_path / "ran.log"
    p = spawn("run_noop_worker", "scan", "--sleep", "1.5", "--log", log, "--number", "7", env=worker_env)
    wait_for(lambda: Job.objects.filter(state="running").exists(), message="a running job")
    time.sleep(0.3)
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=20)[0]
    assert p.returncode == 0, out
    assert Job.objects.filter(state="done").count() == 1, "the job in hand was finished"
    assert Job.objects.filter(state="queued").count() == 4
    assert not Job.objects.filter(state="running").exists()
    assert not Meta.objects.filter(key="worker:testhost:scan:7").exists()


def test_second_signal_releases_at_once(worker_env):
    queue.enqueue("scan", "long")
    p = spawn("run_noop_worker", "scan", "--sleep", "60", env=worker_env)
    wait_for(lambda: Job.objects.filter(state="running").exists(), message="a running job")
    p.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    started = time.monotonic()
    p.send_signal(signal.SIGINT)
    p.communicate(timeout=20)
    assert p.returncode == 0 and time.monotonic() - started < 10
    job = Job.objects.get(key="long")
    assert job.state == "queued" and job.attempts == 0, "released, not counted as a failure"
    assert not Meta.objects.filter(key__startswith="worker:").exists()


def test_heartbeat_row_is_live_while_busy(worker_env):
    queue.enqueue("scan", "slow")
    p = spawn("run_noop_worker", "scan", "--sleep", "4", "--number", "3", env=worker_env)
    try:
        row = wait_for(lambda: Meta.objects.filter(key="worker:testhost:scan:3", value__state="busy").first(),
                       message="a busy worker row")
        first = row.updated_at
        assert row.value["pid"] == p.pid and row.value["job"] == Job.objects.get(key="slow").id
        wait_for(lambda: Meta.objects.get(key=row.key).updated_at > first, timeout=5, message="a second heartbeat")
        out = manage("workers", "status", "--json", env=worker_env).stdout
        assert '"worker:testhost:scan:3"' in out and '"busy"' in out
    finally:
        p.terminate()
        p.communicate(timeout=20)


def test_killed_worker_jobs_return_within_the_heartbeat_timeout(worker_env, settings):
    queue.enqueue("scan", "victim")
    victim = spawn("run_noop_worker", "scan", "--sleep", "60", "--number", "1", env=worker_env)
    wait_for(lambda: Job.objects.filter(state="running").exists(), message="a running job")
    env = dict(worker_env, EARMARK_HOSTNAME="otherhost")  # a rescuer on another host: no pid check
    rescuer = spawn("run_noop_worker", "scan", "--number", "2", env=env)
    try:
        os.kill(victim.pid, signal.SIGKILL)
        victim.communicate()
        killed = time.monotonic()
        wait_for(lambda: Job.objects.filter(key="victim", state="done").exists(),
                 timeout=settings.EARMARK_HEARTBEAT_TIMEOUT + 5, message="the job rescued and done")
        assert time.monotonic() - killed <= settings.EARMARK_HEARTBEAT_TIMEOUT + 1
        job = Job.objects.get(key="victim")
        assert job.attempts == 2
    finally:
        rescuer.terminate()
        rescuer.communicate(timeout=20)


def test_dead_pid_on_same_host_is_rescued_at_once(worker_env):
    queue.enqueue("scan", "victim")
    victim = spawn("run_noop_worker", "scan", "--sleep", "60", "--number", "1", env=worker_env)
    wait_for(lambda: Job.objects.filter(state="running").exists(), message="a running job")
    os.kill(victim.pid, signal.SIGKILL)
    victim.communicate()
    killed = time.monotonic()
    rescuer = spawn("run_noop_worker", "scan", "--number", "2", env=worker_env)
    try:
        wait_for(lambda: Job.objects.filter(key="victim", state="done").exists(), timeout=10,
                 message="the job rescued and done")
        assert time.monotonic() - killed < 5, "a dead local pid does not wait for the heartbeat timeout"
    finally:
        rescuer.terminate()
        rescuer.communicate(timeout=20)


def test_exit_when_idle_exits_zero_on_empty_queue(worker_env):
    proc = manage("run_noop_worker", "tag", "--exit-when-idle", env=worker_env, timeout=30)
    assert proc.returncode == 0


def test_a_failing_command_says_why(worker_env, tmp_path):
    env = dict(worker_env, DATABASE_URL=f"sqlite:///{tmp_path}/no/such/dir/db.sqlite3")
    proc = manage("queue", "status", "--json", env=env, check=False)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("manage.py queue status failed: OperationalError: unable to open database file"), last
    assert "DATABASE_URL" in last
