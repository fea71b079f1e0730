"""PostgreSQL: the second pass of the shared tests, and what only PostgreSQL has.

The main run (SQLite) starts one throwaway PostgreSQL server per session
(``tests/pg.py``) and runs each module of ``POSTGRES_MODULES`` again in a
child ``pytest`` on it (``test_module_passes_on_postgres``); Django's
database is fixed once its settings are loaded, so a second process is the
one reliable way to run the same tests on a second database. That child run
also takes the tests below marked ``postgres``: SKIP LOCKED claims under
concurrency, LISTEN/NOTIFY wake-ups of workers and of the state broker, and
two hosts (two supervisord instances) sharing one database.

To run only the PostgreSQL side: ``EARMARK_TEST_DB=postgres pytest tests/jobs/test_postgres.py``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection, transaction

from workers.jobs import dialect, queue, registry
from workers.library import scan
from workers.live.broker import Broker
from workers.library.libraries import add_library
from workers.models import Job, Meta, Track

from tests.conftest import POSTGRES_MODULES, ROOT, database_url, manage, spawn, wait_for

SLOW_MODULES = {"jobs/test_worker_processes", "live/test_broker", "jobs/test_postgres"}
W = "worker:testhost:scan:1"


# --- the PostgreSQL pass, driven from the main run ------------------------------------------------


def _pass_params():
    return [pytest.param(m, marks=[pytest.mark.slow] if m in SLOW_MODULES else [], id=m) for m in POSTGRES_MODULES]


@pytest.mark.postgres_driver
@pytest.mark.parametrize("module", _pass_params())
def test_module_passes_on_postgres(module, postgres_url, request, tmp_path):
    """The module's tests, run again by a child ``pytest`` on the session's PostgreSQL server."""
    args = [sys.executable, "-m", "pytest", f"tests/{module}.py", "-q", "-rfEs", "-p", "no:cacheprovider",
            "--timeout=300"]
    if request.config.option.markexpr:
        args += ["-m", request.config.option.markexpr]
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "EARMARK_DATA_DIR")}
    env.update(EARMARK_TEST_DB="postgres", EARMARK_TEST_POSTGRES_URL=postgres_url,
               EARMARK_DATA_DIR=str(tmp_path / "data"))
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=580)
    out = proc.stdout + proc.stderr
    summary = out.strip().splitlines()[-1] if out.strip() else ""
    print(f"{module} on PostgreSQL: {summary}")
    if proc.returncode == 5:  # every test deselected by the -m expression
        pytest.skip(f"{module}: no test selected on PostgreSQL ({summary})")
    assert proc.returncode == 0, f"{module} failed on PostgreSQL ({summary}):\n{out[-8000:]}"


# --- SKIP LOCKED ---------------------------------------------------------------------------------------


def _claim_in_open_transaction(holding: threading.Event, release: threading.Event, out: list) -> None:
    """Another connection claims 3 jobs and keeps its transaction (and its row locks) open until ``release``."""
    try:
        with transaction.atomic():
            out.extend(queue.claim("scan", "worker:other:scan:1", "boot", limit=3))
            holding.set()
            release.wait(10)
    finally:
        connection.close()


@pytest.mark.postgres
def test_a_claim_skips_rows_that_another_claim_holds_locked(transactional_db):
    queue.enqueue_many("scan", [queue.NewJob(key=f"k{i}") for i in range(6)])
    holding, release, theirs = threading.Event(), threading.Event(), []
    other = threading.Thread(target=_claim_in_open_transaction, args=(holding, release, theirs))
    other.start()
    try:
        assert holding.wait(10), "the other claim did not happen"
        started = time.monotonic()
        mine = queue.claim("scan", W, "boot", limit=6)
        waited = time.monotonic() - started
    finally:
        release.set()
        other.join(10)
    assert waited < 1.0, f"the claim waited {waited:.2f}s on rows another transaction holds"
    assert [j.key for j in theirs] == ["k0", "k1", "k2"]
    assert [j.key for j in mine] == ["k3", "k4", "k5"], "locked rows are skipped, not claimed twice"


def _claim_until_empty(worker: str, seen: list, errors: list) -> None:
    try:
        while jobs := queue.claim("scan", worker, "boot", limit=7):
            seen.extend(j.id for j in jobs)
            queue.complete([j.id for j in jobs], worker)
    except Exception as exc:  # reported by the test, not lost in the thread
        errors.append(exc)
    finally:
        connection.close()


@pytest.mark.postgres
def test_concurrent_claimers_take_every_job_exactly_once(transactional_db):
    queue.enqueue_many("scan", [queue.NewJob(key=f"job-{i}") for i in range(1400)])
    seen: list[int] = []
    errors: list[Exception] = []
    threads = [threading.Thread(target=_claim_until_empty, args=(f"worker:testhost:scan:{n}", seen, errors))
               for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(seen) == 1400 and len(set(seen)) == 1400, "every job claimed exactly once"
    assert Job.objects.filter(state="done").count() == 1400


# --- LISTEN/NOTIFY ----------------------------------------------------------------------------------


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


@pytest.mark.postgres
@pytest.mark.slow
def test_an_idle_worker_starts_a_new_job_at_once_on_notify(worker_env):
    """With a 10 s idle poll only the notification can explain a start within a fraction of a second."""
    env = dict(worker_env, EARMARK_IDLE_POLL_SECONDS="10")
    worker = spawn("run_noop_worker", "scan", "--number", "5", env=env)
    latencies = []
    try:
        wait_for(lambda: Meta.objects.filter(key="worker:testhost:scan:5", value__state="idle").exists(),
                 message="an idle worker")
        time.sleep(0.3)  # well into its wait
        for i in range(15):
            enqueued = time.time()
            queue.enqueue("scan", f"wake-{i}")
            job = wait_for(lambda: Job.objects.filter(key=f"wake-{i}", started_at__isnull=False).first(),
                           timeout=15, interval=0.005, message=f"job {i} to start")
            latencies.append(job.started_at.timestamp() - enqueued)
            time.sleep(0.05)
    finally:
        worker.terminate()
        worker.communicate(timeout=20)
    assert max(latencies) < 2.0, f"a wake-up was lost (the 10 s poll found the job): {latencies}"
    assert _p95(latencies) < 0.25, f"p95 {_p95(latencies) * 1000:.0f} ms: {latencies}"


@pytest.mark.postgres
def test_listen_url_sends_the_listener_elsewhere_or_turns_it_off(transactional_db, settings):
    """Behind PgBouncer the listener needs a direct connection (``EARMARK_LISTEN_URL``), or none at all."""
    settings.EARMARK_LISTEN_URL = "off"
    assert dialect.open_listener(connection, ["earmark_test"]) is None
    settings.EARMARK_LISTEN_URL = database_url()  # here the same server, as a direct URL names it
    listener = dialect.open_listener(connection, ["earmark_test"])
    try:
        assert listener.params["application_name"] == "earmark-listener"
        assert listener.wait(1) is True, "a fresh listener may have missed something"
        assert listener.wait(0.05) is False
        dialect.notify(connection, "earmark_test")
        assert listener.wait(2) is True
        assert listener.wait(0.05) is False, "one notification wakes once"
    finally:
        listener.close()


def _terminate_listeners() -> int:
    with connection.cursor() as cur:
        cur.execute("SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name = 'earmark-listener' AND datname = current_database()")
        return cur.fetchone()[0]


@pytest.mark.postgres
def test_a_lost_listener_means_maybe_until_it_listens_again(transactional_db, monkeypatch):
    """A dropped LISTEN connection costs latency (the caller polls), never a missed change."""
    monkeypatch.setattr(dialect, "LISTEN_RETRY_S", 0.2)
    feed = dialect.ChangeFeed(connection, [dialect.queue_channel("scan")], fallback=60)
    try:
        assert feed.changed() and not feed.changed()
        assert _terminate_listeners() == 1
        wait_for(feed.changed, timeout=2, interval=0.05, message="the lost connection noticed")
        time.sleep(0.3)  # past the retry delay
        wait_for(feed.changed, timeout=2, interval=0.05, message="listening again")
        assert not feed.changed()
        queue.enqueue("scan", "after-the-reconnect")
        wait_for(feed.changed, timeout=2, interval=0.01, message="the notification")
    finally:
        feed.close()


@pytest.mark.postgres
def test_broker_wakes_on_notifications_and_falls_back_to_polling(transactional_db):
    """A notifying write is read at once; a silent one (raw SQL) waits for the fallback, and is not lost."""
    broker = Broker(poll=0.02, min_interval=0.1, fallback=3.0, send=lambda *event: None,
                    has_listeners=lambda: True)
    broker.start()
    try:
        wait_for(lambda: broker.reads >= 1, message="the first read")
        time.sleep(0.3)
        reads = broker.reads
        time.sleep(0.8)
        assert broker.reads == reads, "nothing notified, nothing read (the fallback is 3 s)"
        started = time.monotonic()
        registry.write(registry.new_identity("scan", 8), {"state": "idle"})
        wait_for(lambda: "worker:testhost:scan:8" in broker.channels["workers"].state, timeout=5,
                 interval=0.01, message="the notified worker row")
        assert time.monotonic() - started < 1.0, "read on the notification, not on the fallback"
        with connection.cursor() as cur:  # bypasses every notify
            cur.execute("DELETE FROM workers_meta WHERE key = %s", ["worker:testhost:scan:8"])
        wait_for(lambda: "worker:testhost:scan:8" not in broker.channels["workers"].state, timeout=6,
                 message="the silent delete, by the fallback read")
    finally:
        broker.stop()


# --- two hosts, one database ----------------------------------------------------------------------------


def _library_of_small_files(root: Path, folders: int, per_folder: int) -> int:
    """``folders`` album folders of ``per_folder`` copies of one short MP3: many quick scan jobs."""
    from tests.audio_factory import make_file

    sample = make_file(root.parent, "mp3", seconds=0.5, tags={"title": "t", "artist": "a"}, name="sample.mp3")
    for f in range(folders):
        album = root / f"artist-{f % 6}" / f"album-{f}"
        album.mkdir(parents=True)
        for n in range(per_folder):
            shutil.copyfile(sample, album / f"{n:03d}.mp3")
    return folders * per_folder


def _process_tree(pid: int) -> list[int]:
    """``pid`` and every descendant (Linux ``/proc``)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def _kill_host(pid: int) -> None:
    """A host dies: freeze supervisord and its workers, then SIGKILL each of their process groups.

    supervisord starts every program in a process group of its own, so the
    whole host is the process groups of the whole tree.
    """
    tree = _process_tree(pid)
    for p in tree:
        os.kill(p, signal.SIGSTOP)  # nothing restarts, nothing finishes, while we collect
    groups = {os.getpgid(p) for p in tree}
    for group in groups:
        os.killpg(group, signal.SIGKILL)


def _workers_by_host() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for row in registry.live_workers():
        out.setdefault(row["host"], set()).add(row["id"])
    return out


class LiveState:
    """The dashboard's view of one channel, kept as the browser keeps it: a snapshot, then deltas."""

    def __init__(self, client, channel: str):
        self.client, self.channel = client, channel
        self.state = client.snapshots()[channel]["state"]

    def until(self, predicate, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while not predicate(self.state):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"the dashboard's {self.channel} never matched: {sorted(self.state)}")
            event = self.client.next(left, types=("delta",)).json()
            if event["channel"] == self.channel:
                self.state.update(event["set"])
                for key in event["del"]:
                    self.state.pop(key, None)
        return self.state


@pytest.mark.postgres
@pytest.mark.slow
def test_two_hosts_share_one_database_and_a_dead_hosts_jobs_come_back(worker_env, tmp_path, django_user_model):
    from bench.live import SSEClient, WebServer, session_cookie

    from tests.supervisor_harness import Supervisor

    files = _library_of_small_files(tmp_path / "music", folders=40, per_folder=60)
    library = add_library("shared", str(tmp_path / "music"))
    hosts = {name: Supervisor(dict(worker_env, EARMARK_HOSTNAME=name), tmp_path / name, EARMARK_SCANNERS=2)
             for name in ("host-a", "host-b")}
    web = WebServer(worker_env, tmp_path / "web.log")
    from workers.live.views import VIEW_PERMISSION, permission

    staff = django_user_model.objects.create_user("staff", password="pw", is_staff=True)
    staff.user_permissions.add(permission(VIEW_PERMISSION))
    cookie = session_cookie(staff)
    client = None
    try:
        for sup in hosts.values():
            sup.start()
        web.start()
        both = {"host-a": {"worker:host-a:scan:0", "worker:host-a:scan:1"},
                "host-b": {"worker:host-b:scan:0", "worker:host-b:scan:1"}}
        wait_for(lambda: _workers_by_host() == both, timeout=60, message="two scanners on each host")
        status = json.loads(manage("workers", "status", "--json", env=worker_env).stdout)
        assert {(w["host"], w["id"]) for w in status} == {(h, k) for h, keys in both.items() for k in keys}
        client = SSEClient(web.port, cookie)
        dashboard = LiveState(client, "workers")
        dashboard.until(lambda s: set(s) == both["host-a"] | both["host-b"], timeout=10)

        scan.request_scan(library)
        on_a = Job.objects.filter(queue="scan", state="running", claimed_by__startswith="worker:host-a:")
        wait_for(on_a.exists, timeout=60, interval=0.005, message="host-a holding a scan job")
        _kill_host(hosts["host-a"].proc.pid)
        killed = time.monotonic()
        held = set(on_a.values_list("id", flat=True))
        assert held, "host-a held jobs when it died"

        back = Job.objects.filter(id__in=held, state="done", claimed_by__startswith="worker:host-b:")
        wait_for(lambda: back.count() == len(held), timeout=settings.EARMARK_HEARTBEAT_TIMEOUT + 5, interval=0.05,
                 message="host-a's jobs done by host-b")
        assert time.monotonic() - killed <= settings.EARMARK_HEARTBEAT_TIMEOUT + 1
        dashboard.until(lambda s: set(s) == both["host-b"], timeout=10)
        wait_for(lambda: scan.progress(library).get("state") == "done", timeout=120, message="the scan")
        assert Track.objects.filter(library=library, state="scanned").count() == files
        assert {w["host"] for w in registry.live_workers()} == {"host-b"}
    finally:
        if client is not None:
            client.close()
        web.stop()
        for sup in hosts.values():
            sup.stop()


# --- the benchmark, at a tiny size ------------------------------------------------------------------------


@pytest.mark.postgres_driver
@pytest.mark.slow
def test_postgres_queue_benchmark_prints_every_row(postgres_url):
    """``bench.queue_postgres`` end to end on the session's server (no timing is asserted)."""
    env = {k: v for k, v in os.environ.items() if k not in ("DJANGO_SETTINGS_MODULE", "DATABASE_URL")}
    args = ["--jobs", "200", "--repeats", "1", "--procs", "1,2", "--latency-samples", "10",
            "--database-url", postgres_url.rsplit("/", 1)[0] + "/postgres"]
    proc = subprocess.run([sys.executable, "-m", "bench.queue_postgres", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-4000:]}"
    rate = r"\s+\d[\d,]*\s*$"
    assert len(re.findall(r"^earmark run_noop_worker\s+[12]\s+100\s.*" + rate, out, re.M)) == 2, out
    assert len(re.findall(r"^bare psycopg SKIP LOCKED claim\+complete\s+2\s+(1|10)\s.*" + rate, out, re.M)) == 2, out
    assert re.search(r"^procrastinate worker, concurrency 8\s+2\s+-\s.*" + rate, out, re.M), out
    assert re.search(r"^earmark, LISTEN/NOTIFY \(idle poll 10 s\)\s+2\s+10\s+[\d.]+\s+[\d.]+", out, re.M), out
    for ratio in ("earmark 2 proc vs target 5,000 jobs/s", "earmark 2 proc vs procrastinate 2 proc",
                  "earmark 2 proc vs bare SKIP LOCKED batch 1", "idle start p95 vs target 50 ms"):
        assert re.search(re.escape(ratio) + r".*\s\d+\.\d\dx", out), (ratio, out)
