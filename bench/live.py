"""``python -m bench.live``: how fast a worker's database write reaches the dashboard, and silence when idle.

The real thing end to end: the ASGI app under uvicorn in its own process (its
state broker inside), a staff session, and an SSE client reading
``/events/``. This driver process plays the worker: it writes a worker's meta
row through ``workers.jobs.registry.write`` (the very call a worker's heartbeat
thread makes), each time with a new ``detail``, and times how long until the
delta carrying that value arrives. Between changes it waits a random 0-300 ms,
so the writes land at every phase of the broker's 50 ms glance and its 250 ms
read spacing.

Then idle: two real ``run_scanner`` processes sit idle (heartbeating, so the
database keeps changing) while the client counts the events it receives,
keep-alives apart. Targets on SQLite: p95 <= 300 ms and 0 events while idle.

The SSE client and the server wrapper here are also what ``tests/live/test_broker.py``
and ``tests/live/test_browser.py`` use.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import queue
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EVENTS_PATH = "/events/?channel=workers&channel=queues&channel=jobs"
TARGET_P95_MS = 300


# --- a server and a client, shared with the tests ------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WebServer:
    """``uvicorn project.asgi:application`` in a child process, as supervisord's ``web`` program runs it."""

    def __init__(self, env: dict, log_path: Path, port: int | None = None):
        self.port = port or free_port()
        self.log_path = Path(log_path)
        self.env = env
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30) -> "WebServer":
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "project.asgi:application", "--host", "127.0.0.1",
                 "--port", str(self.port), "--no-access-log", "--timeout-graceful-shutdown", "2"],
                env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"uvicorn exited {self.proc.returncode}:\n{self.log()}")
            try:
                self.get("/events/")  # any answer means it serves (this one is a redirect to login)
                return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"uvicorn did not answer within {timeout}s:\n{self.log()}")

    def get(self, path: str, cookie: str | None = None) -> http.client.HTTPResponse:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.request("GET", path, headers={"Cookie": f"sessionid={cookie}"} if cookie else {})
        response = conn.getresponse()
        response.read()
        conn.close()
        return response

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM, as supervisord stops it; returns the exit status.

        uvicorn shuts down gracefully and then re-raises the signal, so a clean
        stop reads as -15 (supervisord: "terminated by SIGTERM", expected on stop).
        """
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


@dataclass
class Event:
    type: str
    data: str
    at: float  # time.perf_counter() when the event's last line arrived

    def json(self):
        return json.loads(self.data) if self.data else None


class SSEClient:
    """A minimal EventSource: one GET, a reader thread that parses ``text/event-stream`` into a queue."""

    def __init__(self, port: int, cookie: str | None, path: str = EVENTS_PATH):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=None)
        self.conn.connect()
        self.sock = self.conn.sock
        self.conn.request("GET", path, headers={"Accept": "text/event-stream",
                                                **({"Cookie": f"sessionid={cookie}"} if cookie else {})})
        self.response = self.conn.getresponse()
        self.status = self.response.status
        self.content_type = self.response.getheader("Content-Type", "")
        self.events: queue.Queue[Event | None] = queue.Queue()
        self.thread = threading.Thread(target=self._read, daemon=True)
        if self.status == 200 and self.content_type.startswith("text/event-stream"):
            self.thread.start()

    def _read(self) -> None:
        kind, data = "message", []
        try:
            for raw in iter(self.response.readline, b""):
                line = raw.decode("utf-8").rstrip("\r\n")
                if not line:
                    if data or kind != "message":
                        self.events.put(Event(kind, "\n".join(data), time.perf_counter()))
                    kind, data = "message", []
                elif line.startswith(":"):
                    continue
                else:
                    field, _, value = line.partition(":")
                    value = value[1:] if value.startswith(" ") else value
                    if field == "event":
                        kind = value
                    elif field == "data":
                        data.append(value)
        except (OSError, ValueError, http.client.HTTPException):
            pass
        finally:
            self.events.put(None)

    def next(self, timeout: float = 10.0, types: tuple[str, ...] = ("snapshot", "delta")) -> Event:
        """The next event of one of ``types`` (others are skipped); ``TimeoutError`` if none comes."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                event = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"no {'/'.join(types)} event within {timeout}s") from None
            if event is None:
                raise ConnectionError("the event stream ended")
            if event.type in types:
                return event

    def drain(self, seconds: float, types: tuple[str, ...] = ("snapshot", "delta")) -> list[Event]:
        """Every event of ``types`` that arrives within ``seconds``."""
        out, deadline = [], time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                out.append(self.next(left, types))
            except TimeoutError:
                break
        return out

    def snapshots(self, channels=("jobs", "queues", "workers"), timeout: float = 10.0) -> dict[str, dict]:
        """Read the snapshots that open the stream: ``{channel: {"seq": n, "state": {...}}}``."""
        self.next(timeout, types=("stream-open",))
        out = {}
        while len(out) < len(channels):
            event = self.next(timeout)
            assert event.type == "snapshot", f"expected snapshots first, got {event.type}"
            snap = event.json()
            out[snap["channel"]] = snap
        return out

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the reader, which then sees the end of the stream
        except OSError:
            pass
        if self.thread.is_alive():
            self.thread.join(timeout=5)
        self.conn.close()


def session_cookie(user) -> str:
    """A logged-in session for ``user`` in the shared database (as the login form would make)."""
    from django.test import Client

    client = Client()
    client.force_login(user)
    return client.cookies["sessionid"].value


# --- the benchmark ---------------------------------------------------------------------


def setup_django(db: Path, data_dir: Path) -> None:
    os.environ.update(DJANGO_SETTINGS_MODULE="project.settings", DATABASE_URL=f"sqlite:///{db}",
                      SECRET_KEY="earmark-benchmark-only", EARMARK_DATA_DIR=str(data_dir),
                      EARMARK_HOSTNAME="benchhost", EARMARK_LOG_LEVEL="WARNING")
    import django

    django.setup()


def measure_latency(client: SSEClient, changes: int, max_gap: float) -> list[tuple[float, float]]:
    """Write ``changes`` worker-row updates; per change, (pause before it, seconds to its delta's arrival)."""
    from workers.jobs import registry

    identity = registry.new_identity("scan", number="bench")
    registry.write(identity, {"state": "busy", "detail": "start"})
    wait_for_detail(client, identity.key, "start")
    out = []
    for i in range(changes):
        gap = random.uniform(0, max_gap)
        time.sleep(gap)
        detail = f"change-{i}"
        started = time.perf_counter()
        registry.write(identity, {"state": "busy", "detail": detail, "progress": i / changes})
        out.append((gap, wait_for_detail(client, identity.key, detail) - started))
    registry.remove(identity)
    return out


def wait_for_detail(client: SSEClient, key: str, detail: str, timeout: float = 10.0) -> float:
    deadline = time.monotonic() + timeout
    while True:
        event = client.next(max(0.01, deadline - time.monotonic()), types=("delta",))
        payload = event.json()
        if payload["channel"] == "workers" and payload["set"].get(key, {}).get("detail") == detail:
            return event.at


def count_idle_events(client: SSEClient, env: dict, log_dir: Path, db: Path, seconds: float,
                      workers: int) -> tuple[int, int]:
    """Events received while ``workers`` idle scanners heartbeat; and how many commits they made meanwhile."""
    from bench.common import Procs, wait_until
    from workers.models import Meta

    with Procs([["run_scanner"]] * workers, env, log_dir, "idle-scanner") as procs:
        wait_until(lambda: Meta.objects.filter(key__startswith="worker:", value__state="idle").count() == workers,
                   timeout=60, message="idle scanners", procs=procs)
        client.drain(1.0)  # their arrival is news; what follows must not be
        with CommitCounter(db) as commits:
            events = client.drain(seconds)
        procs.terminate()
    return len(events), commits.count


class CommitCounter(threading.Thread):
    """Counts the polls (every 20 ms) at which SQLite's ``data_version`` moved: a floor on commits made."""

    def __init__(self, db: Path):
        super().__init__(daemon=True)
        self.db, self.count, self.stop = db, 0, threading.Event()

    def run(self) -> None:
        import sqlite3

        conn = sqlite3.connect(self.db, isolation_level=None)
        last = conn.execute("PRAGMA data_version").fetchone()[0]
        while not self.stop.wait(0.02):
            version = conn.execute("PRAGMA data_version").fetchone()[0]
            self.count += version != last
            last = version
        conn.close()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.join()


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument("--max-gap", type=float, default=0.3, help="largest random pause between changes (s)")
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--idle-workers", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)

    from bench.common import Workspace, machine_note, print_table

    with Workspace(prefix="earmark-live-", keep=args.keep) as ws:
        db = ws.fresh_db()
        env = ws.env(db, EARMARK_IDLE_POLL_SECONDS="0.5")
        setup_django(db, ws.data_dir)
        from django.contrib.auth import get_user_model

        user = get_user_model().objects.create_user("bench", password="bench", is_staff=True)
        from workers.live.views import ensure_groups

        user.groups.add(ensure_groups()["viewer"])  # /events/ needs workers.view_dashboard
        server = WebServer(env, ws.log_dir / "web.log").start()
        client = SSEClient(server.port, session_cookie(user))
        try:
            client.snapshots()
            measured = measure_latency(client, args.changes, args.max_gap)
            idle_events, commits = count_idle_events(client, env, ws.log_dir, db, args.idle_seconds,
                                                      args.idle_workers)
        finally:
            client.close()
            server.stop()
    latencies = [seconds * 1000 for _, seconds in measured]
    # A change that comes soon after the previous read waits out the broker's read spacing (250 ms).
    soon = [seconds * 1000 for gap, seconds in measured if gap < 0.25]
    later = [seconds * 1000 for gap, seconds in measured if gap >= 0.25]
    p50, p95 = statistics.median(latencies), percentile(latencies, 95)
    per_minute = idle_events * 60 / args.idle_seconds
    print(f"bench.live: SSE latency from a worker's write (registry.write) to the event at the client; {machine_note()}")
    print_table(["measure", "value", "target"], [
        ["changes", len(latencies), ""],
        ["latency p50 (ms)", f"{p50:.0f}", ""],
        ["latency p95 (ms)", f"{p95:.0f}", f"<= {TARGET_P95_MS}"],
        ["latency max (ms)", f"{max(latencies):.0f}", ""],
        [f"  p50 of {len(soon)} changes < 250 ms after the previous", f"{statistics.median(soon):.0f}" if soon else "-", ""],
        [f"  p50 of {len(later)} changes >= 250 ms after the previous", f"{statistics.median(later):.0f}" if later else "-", ""],
        [f"idle: events in {args.idle_seconds:.0f} s ({args.idle_workers} workers heartbeating)", idle_events, ""],
        ["idle: events per minute", f"{per_minute:.1f}", "0"],
        ["idle: database commits meanwhile (at least)", commits, ""],
    ])
    ok = p95 <= TARGET_P95_MS and idle_events == 0
    print("targets met" if ok else "TARGETS MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
