"""The worker's pulse, in a process of its own: the meta row and the leases stay fresh whatever the work does.

A heartbeat thread shares the worker's GIL: a decode or a C call that holds
it for longer than the heartbeat timeout (a long SQLite lock wait inside one
statement, a codec that never releases it) silenced the thread, maintenance
took the worker for dead, and its job ran twice at once. So the beat runs in
a child process (started with ``spawn``: nothing of the worker's state, no
inherited database connection) that does nothing but write the worker's row
and extend its leases every interval, and the status the worker publishes
over a pipe.

The pipe is also how the child knows its worker lives: when the worker
exits or is killed, the kernel closes the pipe and the child stops at once,
so a dead worker's heartbeat goes stale exactly as before. A worker that
lives but never comes back from a job (a hung decoder) would keep its lease
forever; the child is its watchdog too, and SIGKILLs it once one job has run
``EARMARK_JOB_TIMEOUT_SECONDS``: supervisord restarts it, and the queue
charges that job an attempt and quarantines it after ``max_attempts``.
"""
from __future__ import annotations

import ctypes
import dataclasses
import logging
import multiprocessing
import os
import signal
import threading
import time

from django.conf import settings
from django.db import connections

log = logging.getLogger("earmark.worker")

MIN_SPACING = 0.2  # status changes coalesce for this long before a write
PR_SET_PDEATHSIG = 1


class Heartbeat:
    """The parent's handle: starts the child and passes it every change of the worker's status.

    The status goes through a thread that waits for ``ctx.changed``, so
    that changing it costs the worker (and its signal handlers) only an
    event; while the work holds the GIL, the child beats on with the last
    status it was sent.
    """

    def __init__(self, identity, ctx):
        self.identity, self.ctx = identity, ctx
        self.pipe = self.process = self.sender = None
        self.stopping = threading.Event()

    def start(self) -> "Heartbeat":
        spawn = multiprocessing.get_context("spawn")
        self.pipe, child_end = spawn.Pipe()
        database = dict(connections["default"].settings_dict)  # the test runner may have renamed it
        self.process = spawn.Process(
            target=beat_until_orphaned, name=f"heartbeat {self.identity.key}", daemon=True,
            args=(dataclasses.asdict(self.identity), database, child_end, self.ctx.status,
                  settings.EARMARK_HEARTBEAT_INTERVAL, settings.EARMARK_JOB_TIMEOUT_SECONDS,
                  os.environ.get("DJANGO_SETTINGS_MODULE", "")))
        self.process.start()
        child_end.close()
        self.sender = threading.Thread(target=self._send_changes, name="heartbeat-status", daemon=True)
        self.sender.start()
        return self

    def _send_changes(self) -> None:
        while True:
            self.ctx.changed.wait()
            self.ctx.changed.clear()
            stopping = self.stopping.is_set()
            try:
                self.pipe.send(None if stopping else self.ctx.status)
            except (OSError, ValueError):  # the child is gone: only the status is lost
                return
            if stopping:
                return

    def stop(self) -> None:
        """Stop the child and wait for it, so that no beat lands after the worker removed its row."""
        self.stopping.set()
        self.ctx.changed.set()
        self.sender.join(timeout=5)
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5)
        self.pipe.close()


def beat_until_orphaned(identity: dict, database: dict, pipe, status: dict, interval: float, job_timeout: float,
                        settings_module: str) -> None:
    """The child's whole life: beat every ``interval``, and sooner after a status change, until the pipe closes."""
    # Ctrl-C and supervisord's stop signal are for the worker, which finishes its job and then stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with(identity["pid"])
    if settings_module:
        os.environ["DJANGO_SETTINGS_MODULE"] = settings_module
    import django

    django.setup()
    connections["default"].settings_dict.update(database)
    from workers.jobs.registry import Identity  # models import only after setup

    identity = Identity(**identity)
    try:
        while status is not None:
            _beat(identity, status)
            if _overran(identity, status, job_timeout):
                return
            status = _next_status(pipe, status, interval)
    finally:
        connections.close_all()


def _die_with(parent: int) -> None:
    """Have the kernel kill us the moment the worker dies (Linux), so no beat of ours outlives it.

    The closed pipe would stop us too, but only after a beat in progress
    had refreshed a dead worker's row.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
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


def _next_status(pipe, status: dict, interval: float) -> dict | None:
    """Wait up to ``interval`` for a new status; None once the worker is gone or says stop."""
    try:
        if pipe.poll(interval):
            status = pipe.recv()
            time.sleep(MIN_SPACING)
            while status is not None and pipe.poll(0):
                status = pipe.recv()
    except (EOFError, OSError):  # the worker's end closed: it exited or was killed
        return None
    return status


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
