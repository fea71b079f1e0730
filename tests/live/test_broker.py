"""The state broker end to end: the real ASGI app under uvicorn, a real SSE client, writes from other processes."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import time
from datetime import timedelta

import pytest

from bench.live import SSEClient, WebServer, session_cookie
from django.utils import timezone

from workers.jobs import queue
from workers.live import snapshots
from workers.live.broker import Broker, ChannelState, diff
from workers.models import Meta
from workers.live.views import KEEP_ALIVE, VIEW_PERMISSION, _with_snapshots, permission

from tests.conftest import spawn, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def server(worker_env, tmp_path):
    web = WebServer(worker_env, tmp_path / "web.log").start()
    yield web
    web.stop()


@pytest.fixture
def cookie(django_user_model):
    staff = django_user_model.objects.create_user("staff", password="pw", is_staff=True)
    staff.user_permissions.add(permission(VIEW_PERMISSION))
    return session_cookie(staff)


def write_from_another_process(db_path: str, sql: str, params: list) -> None:
    """One statement committed by a separate ``python`` process with a plain sqlite3 connection."""
    script = textwrap.dedent(f"""
        import json, sqlite3, sys
        conn = sqlite3.connect({db_path!r}, isolation_level=None, timeout=30)
        conn.execute({sql!r}, json.loads(sys.argv[1]))
    """)
    subprocess.run([sys.executable, "-c", script, json.dumps(params)], check=True, timeout=30)


def worker_row_sql(db_path: str, key: str, value: dict) -> None:
    write_from_another_process(
        db_path, "INSERT INTO workers_meta (key, value, updated_at) VALUES (?, ?, datetime('now')) "
                 "ON CONFLICT(key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
        [key, json.dumps(value)])


def test_diff_sends_only_what_changed():
    state = ChannelState()
    first = state.advance("workers", {"a": {"x": 1}, "b": 2})
    assert first == {"channel": "workers", "seq": 1, "base": 0, "set": {"a": {"x": 1}, "b": 2}, "del": []}
    assert state.advance("workers", {"a": {"x": 1}, "b": 2}) is None  # nothing new: nothing sent
    assert state.advance("workers", {"a": {"x": 2}}) == {"channel": "workers", "seq": 2, "base": 1,
                                                        "set": {"a": {"x": 2}}, "del": ["b"]}
    assert diff({"k": None}, {"k": None}) == ({}, [])  # a None value is not "missing"


class FakeBroker:
    def snapshots(self, channels):
        return [{"channel": c, "seq": 3, "state": {"k": c}} for c in channels]

    def seqs(self):
        return {"workers": 3, "jobs": 4}


def wrapped(chunks: list[bytes], channels=("jobs", "workers")) -> list[bytes]:
    async def inner():
        for chunk in chunks:
            yield chunk

    async def collect():
        return [c async for c in _with_snapshots(inner(), FakeBroker(), list(channels))]

    return asyncio.run(collect())


def test_stream_gets_snapshots_right_after_it_opens_and_seqs_on_keep_alives():
    opening, delta = b": pad\n\nevent: stream-open\ndata:\n\n", b"event: delta\ndata: {}\n\n"
    out = wrapped([opening, KEEP_ALIVE, delta])
    assert out[0] == opening and out[-1] == delta
    assert out[1].decode() == ('event: snapshot\ndata: {"channel": "jobs", "seq": 3, "state": {"k": "jobs"}}\n\n'
                               'event: snapshot\ndata: {"channel": "workers", "seq": 3, "state": {"k": "workers"}}\n\n')
    assert out[2] == b'event: keep-alive\ndata: {"seq": {"workers": 3, "jobs": 4}}\n\n'
    refused = b'event: stream-error\nid: error\ndata: {"condition": "forbidden"}\n\n'
    assert wrapped([refused]) == [refused]  # no state for a refused stream


def test_heartbeat_shows_fresh_then_late_age_in_steps(settings):
    settings.EARMARK_HEARTBEAT_INTERVAL = 5  # late after 11 s
    assert snapshots.heartbeat(3) == {"late": False, "within": 11}
    assert snapshots.heartbeat(13.9) == {"late": True, "age": 10}
    assert snapshots.heartbeat(125) == {"late": True, "age": 120}
    assert snapshots.heartbeat_changes_in(3) == pytest.approx(8.05)
    assert snapshots.heartbeat_changes_in(13.9) == pytest.approx(1.15)


@pytest.fixture
def broker(transactional_db):
    sent = []
    listening = [True]
    b = Broker(poll=0.02, min_interval=0.2, send=lambda *event: sent.append(event),
               has_listeners=lambda: listening[0])
    b.sent, b.listening = sent, listening
    b.start()
    yield b
    b.stop()


def test_broker_reads_only_after_commits_and_batches_bursts(broker):
    wait_for(lambda: broker.reads >= 1, message="the first read")
    time.sleep(0.3)
    reads = broker.reads
    time.sleep(0.6)
    assert broker.reads == reads, "no commit, no read"
    for i in range(10):  # a burst of commits within 0.1 s ...
        queue.enqueue("scan", f"burst-{i}")
        time.sleep(0.01)
    wait_for(lambda: broker.channels["queues"].state["queue:scan"]["queued"] == 10, message="the burst")
    time.sleep(0.3)
    assert broker.reads - reads <= 2  # ... becomes one or two reads, not ten
    deltas = [payload for channel, kind, payload in broker.sent if channel == "queues"]
    assert all(d["base"] == d["seq"] - 1 for d in deltas) and deltas[-1]["set"]["queue:scan"]["queued"] == 10


def test_broker_sleeps_without_listeners_but_snapshots_are_fresh(broker):
    wait_for(lambda: broker.reads >= 1, message="the first read")
    broker.listening[0] = False
    time.sleep(0.3)
    reads = broker.reads
    queue.enqueue("tag", "unseen")
    time.sleep(0.5)
    assert broker.reads == reads  # nobody listens: nothing read
    (snap,) = broker.snapshots(["queues"])
    assert snap["state"]["queue:tag"]["queued"] == 1 and broker.reads == reads + 1


def test_a_heartbeat_turning_late_is_sent_without_any_commit(broker, settings):
    settings.EARMARK_HEARTBEAT_INTERVAL = 1  # late after 3 s
    Meta.objects.create(key="worker:h:scan:1", value={"host": "h", "queue": "scan", "state": "idle"},
                        updated_at=timezone.now() - timedelta(seconds=2.6))
    wait_for(lambda: "worker:h:scan:1" in broker.channels["workers"].state, message="the worker")
    assert broker.channels["workers"].state["worker:h:scan:1"]["heartbeat"]["late"] is False
    wait_for(lambda: broker.channels["workers"].state["worker:h:scan:1"]["heartbeat"]["late"], timeout=3,
             message="the heartbeat to turn late")


def test_only_staff_can_open_the_stream(server, cookie, django_user_model):
    anonymous = SSEClient(server.port, None)
    assert anonymous.status == 302 and "/admin/login/" in anonymous.response.getheader("Location")
    plain = SSEClient(server.port, session_cookie(django_user_model.objects.create_user("plain", password="pw")))
    assert plain.status == 302
    staff = SSEClient(server.port, cookie)
    try:
        assert staff.status == 200 and staff.content_type.startswith("text/event-stream")
        assert set(staff.snapshots()) == {"workers", "queues", "jobs"}
    finally:
        staff.close()


def test_a_change_from_another_process_reaches_the_client_as_a_delta(server, cookie, worker_env):
    if not worker_env["DATABASE_URL"].startswith("sqlite:"):
        pytest.skip("writes through a plain sqlite3 connection")
    db = worker_env["DATABASE_URL"].removeprefix("sqlite:///")
    client = SSEClient(server.port, cookie)
    try:
        snaps = client.snapshots()
        assert snaps["workers"]["state"] == {}
        assert snaps["queues"]["state"]["queue:scan"]["queued"] == 0
        key = "worker:elsewhere:scan:7"
        worker_row_sql(db, key, {"host": "elsewhere", "queue": "scan", "pid": 4242, "state": "busy", "progress": 0.5})
        delta = client.next(types=("delta",)).json()
        assert delta["channel"] == "workers" and delta["base"] == snaps["workers"]["seq"]
        assert delta["set"][key]["progress"] == 0.5 and delta["set"][key]["heartbeat"]["late"] is False
        worker_row_sql(db, key, {"host": "elsewhere", "queue": "scan", "pid": 4242, "state": "busy", "progress": 0.75})
        update = client.next(types=("delta",)).json()
        assert update["seq"] == delta["seq"] + 1 and update["set"] == {key: {**delta["set"][key], "progress": 0.75}}
        write_from_another_process(db, "DELETE FROM workers_meta WHERE key = ?", [key])
        assert client.next(types=("delta",)).json()["del"] == [key]
        queue.enqueue("scan", "from-the-test-process")  # another process than the server's, too
        queued = client.next(types=("delta",)).json()
        assert queued["channel"] == "queues" and queued["set"]["queue:scan"]["queued"] == 1
    finally:
        client.close()


def test_no_events_while_idle_although_workers_heartbeat(server, cookie, worker_env):
    client = SSEClient(server.port, cookie)
    worker = spawn("run_scanner", env=worker_env)
    try:
        client.snapshots()
        wait_for(lambda: Meta.objects.filter(key__startswith="worker:", value__state="idle").exists(),
                 message="an idle scanner")
        client.drain(1.0)  # the worker's arrival
        before = Meta.objects.get(key__startswith="worker:").updated_at
        assert client.drain(3.0) == []
        assert Meta.objects.get(key__startswith="worker:").updated_at > before, "the database did change"
    finally:
        worker.terminate()
        worker.wait(30)
        client.close()


def test_reconnecting_client_starts_from_a_fresh_snapshot(server, cookie):
    first = SSEClient(server.port, cookie)
    seq = first.snapshots()["queues"]["seq"]
    first.close()
    queue.enqueue("tag", "while-away")
    queue.pause("calibrate")
    second = SSEClient(server.port, cookie)
    try:
        snap = second.snapshots()["queues"]
        assert snap["seq"] > seq
        assert snap["state"]["queue:tag"]["queued"] == 1 and snap["state"]["queue:calibrate"]["paused"] is True
    finally:
        second.close()


def test_web_process_stops_cleanly_with_its_broker(worker_env, tmp_path, cookie):
    web = WebServer(worker_env, tmp_path / "web.log").start()
    client = SSEClient(web.port, cookie)
    client.snapshots()
    client.close()
    assert web.stop() in (0, -15)  # uvicorn re-raises SIGTERM after its graceful shutdown
    log = web.log()
    assert "Finished server process" in log and "broker stopped" in log and "Traceback" not in log, log
