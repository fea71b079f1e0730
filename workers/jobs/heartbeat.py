"""The worker's pulse, in a process of its own: the meta row and the leases stay fresh whatever the work does.

A heartbeat thread shares the worker's GIL: a decode or a C call that holds
it for longer than the heartbeat timeout (a long SQLite lock wait inside one
statement, a codec that never releases it) silenced the thread, maintenance
took the worker for dead, and its job ran twice at once. So the beat runs in
a child process, ``python -m workers.jobs.heartbeat`` (a fresh interpreter:
none of the worker's state, no inherited database connection), that does
nothing but write the worker's row and extend its leases every interval,
with the status the worker sends it as JSON lines on its stdin.

The pipe is also how the child knows its worker lives: when the worker
exits or is killed, the pipe closes, and the kernel's parent-death signal
stops the child at once, so a dead worker's heartbeat goes stale exactly as
before. A worker that lives but never comes back from a job (a hung decoder)
would keep its lease forever; the child is its watchdog too, and SIGKILLs it
once one job has run ``EARMARK_JOB_TIMEOUT_SECONDS``: supervisord restarts
it, and the queue charges that job an attempt and quarantines it after
``max_attempts``.
"""
from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time

log = logging.getLogger("earmark.worker")

MIN_SPACING = 0.2  # status changes coalesce for this long before a write
PR_SET_PDEATHSIG = 1
#: Set in the child's environment: the app loads only what a heartbeat needs (``WorkersConfig.ready``).
CHILD_ENV = "EARMARK_HEARTBEAT_PROCESS"


class Heartbeat:
    """The worker's handle: starts the child and passes it every change of the worker's status.

    The status goes through a thread that waits for ``ctx.changed``, so
    that changing it costs the worker (and its signal handlers) only an
    event; while the work holds the GIL, the child beats on with the last
    status it was sent.
    """

    def __init__(self, identity, ctx):
        self.identity, self.ctx = identity, ctx
        self.process = self.sender = None
        self.stopping = threading.Event()

    def start(self) -> "Heartbeat":
        from django.conf import settings
        from django.db import connections

        config = {"identity": dataclasses.asdict(self.identity), "status": self.ctx.status,
                  "database": connections["default"].settings_dict,  # the test runner may have renamed it
                  "interval": settings.EARMARK_HEARTBEAT_INTERVAL, "job_timeout": settings.EARMARK_JOB_TIMEOUT_SECONDS}
        env = dict(os.environ, **{CHILD_ENV: "1"})
        env.setdefault("DJANGO_SETTINGS_MODULE", settings.SETTINGS_MODULE)
        self.process = subprocess.Popen([sys.executable, "-m", "workers.jobs.heartbeat"], stdin=subprocess.PIPE,
                                        env=env, text=True)
        self._send(config)
        self.sender = threading.Thread(target=self._send_changes, name="heartbeat-status", daemon=True)
        self.sender.start()
        return self

    def _send(self, message) -> bool:
        try:
            self.process.stdin.write(json.dumps(message, default=str) + "\n")
            self.process.stdin.flush()
            return True
        except (OSError, ValueError):  # the child is gone: only the status is lost
            return False

    def _send_changes(self) -> None:
        while True:
            self.ctx.changed.wait()
            self.ctx.changed.clear()
            stopping = self.stopping.is_set()
            if not self._send(None if stopping else self.ctx.status) or stopping:
                return

    def revive(self) -> None:
        """Start another child if this one died (a crash, an OOM kill): a worker must never go on unseen."""
        if self.process.poll() is not None and not self.stopping.is_set():
            log.error("%s: the heartbeat process exited (%s); starting another", self.identity.key,
                      self.process.returncode)
            self.start()

    def stop(self) -> None:
        """Stop the child and wait for it, so that no beat lands after the worker removed its row."""
        self.stopping.set()
        self.ctx.changed.set()
        self.sender.join(timeout=5)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        finally:
            try:
                self.process.stdin.close()
            except OSError:  # the child died first: nothing was left to say to it
                pass


# ------------------------------------------------------------------ the child


def beat_until_orphaned() -> None:
    """The child's whole life: beat every interval, and sooner after a status change, until stdin closes."""
    # Ctrl-C and supervisord's stop signal are for the worker, which finishes its job and then stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with(os.getppid())
    lines = _Lines(sys.stdin.fileno())
    try:
        config = lines.next(timeout=30)
    except TimeoutError:
        config = _Lines.EOF
    if config is _Lines.EOF:
        return
    import django
    from django.conf import settings

    settings.INSTALLED_APPS = ["workers"]  # the models only: no admin, no numpy (40 MB, not 65)
    django.setup()
    from django.db import connections

    from workers.jobs.registry import Identity

    connections["default"].settings_dict.update(config["database"])
    identity, status = Identity(**config["identity"]), config["status"]
    try:
        while status is not None:
            _beat(identity, status)
            if _overran(identity, status, config["job_timeout"]):
                return
            status = _next_status(lines, status, config["interval"])
    finally:
        connections.close_all()


class _Lines:
    """JSON messages, one per line, from a pipe, each waited for with a timeout."""

    EOF = object()

    def __init__(self, fd: int):
        self.fd, self.buffer = fd, b""

    def next(self, timeout: float):
        """The next message; ``_Lines.EOF`` once the pipe closed; ``TimeoutError`` if none came in time."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.fd], [], [], remaining)[0]:
                raise TimeoutError
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return self.EOF
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def ready(self) -> bool:
        return b"\n" in self.buffer or bool(select.select([self.fd], [], [], 0)[0])


def _next_status(lines: _Lines, status: dict, interval: float) -> dict | None:
    """Wait up to ``interval`` for a new status; None once the worker is gone or says stop."""
    try:
        message = lines.next(interval)
    except TimeoutError:
        return status
    time.sleep(MIN_SPACING)
    try:
        while message not in (None, _Lines.EOF) and lines.ready():
            message = lines.next(MIN_SPACING)
    except TimeoutError:  # half a line: the rest comes with the next wait
        pass
    return None if message in (None, _Lines.EOF) else message


def _die_with(parent: int) -> None:
    """Have the kernel kill us the moment the worker dies (Linux), so no beat of ours outlives it.

    The closed pipe would stop us too, but only after a beat in progress
    had refreshed a dead worker's row.
    """
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the pipe alone stops us
        return
    if os.getppid() != parent:  # the worker died before the request took effect
        os._exit(0)


def _beat(identity, status: dict) -> None:
    from workers.jobs import leases, registry

    try:
        registry.write(identity, status)
        leases.extend_leases(identity.key, identity.boot_id)
    except Exception:  # a busy database must not stop the beat; the next one retries
        log.exception("heartbeat of %s failed", identity.key)


def _overran(identity, status: dict, job_timeout: float) -> bool:
    """Kill a worker stuck on one job for longer than the job timeout (see the module docstring)."""
    started = status.get("job_started") if status.get("state") == "busy" else None
    if not job_timeout or not started or time.time() - started < job_timeout:
        return False
    log.error("%s: job %s has run for %.0f s (EARMARK_JOB_TIMEOUT_SECONDS=%.0f); killing the worker",
              identity.key, status.get("job"), time.time() - started, job_timeout)
    try:
        os.kill(identity.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return True


if __name__ == "__main__":
    beat_until_orphaned()
