"""The one worker loop behind ``run_scanner``, ``run_tagger`` and ``run_recalibrator``.

Claim a batch, process each job outside any transaction, complete or fail it.
The heartbeat runs in a process of its own (``workers.jobs.heartbeat``) with
its own database connection: it keeps the worker's meta row fresh and
extends its leases whatever the work does, even a C call that holds the GIL
for minutes. Maintenance runs on a thread with a connection of its own, so a
slow pass (a recalibration, a lock wait) never delays the work. Before a
write that must not happen twice, a worker checks that the job is still its
own (``Context.ensure_held``); a job that was taken from it is dropped, never
completed. SIGTERM/SIGINT finish the current job (or release it after a
grace period); a second signal releases at once.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

from django.conf import settings
from django.db import OperationalError, close_old_connections, connection, connections

from workers.jobs import dialect, leases, maintenance, queue, registry
from workers.jobs.heartbeat import Heartbeat
from workers.jobs.queue import ClaimedJob

log = logging.getLogger("earmark.worker")


_IMPORTED = time.monotonic()


def _process_age() -> float:
    """Seconds since this process started (from ``/proc``; else since this module was imported)."""
    try:
        with open("/proc/self/stat", "rb") as f:
            start_ticks = int(f.read().rsplit(b")", 1)[1].split()[19])
        with open("/proc/uptime", "rb") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _IMPORTED


class PermanentError(Exception):
    """A failure no retry can fix (not audio, outside the library): fail at once."""


class ImmediateStop(BaseException):
    """Raised in the main thread to abandon the current job (second signal, grace expired)."""


class LeaseLost(Exception):
    """The job was rescued from this worker and may run elsewhere: drop it, write nothing, complete nothing."""


class Worker:
    """What a queue's worker does with one job; the runner does everything else."""

    queue: str = ""
    batch_size: int = 1
    #: Claim and ``prepare`` the next batch before processing this one, so that
    #: work ``prepare`` starts in the background (a GPU tagger's decoding) runs
    #: while this batch's jobs finish.
    lookahead: bool = False

    def setup(self, ctx: "Context") -> None:
        """Load what the worker needs once per process (models, caches)."""

    def prepare(self, jobs: list[ClaimedJob], ctx: "Context") -> None:
        """Work on a whole claimed batch (of more than one job) before ``process`` sees each job."""

    def process(self, job: ClaimedJob, ctx: "Context") -> dict | None:
        """Do the job; raise to fail it (``PermanentError``: no retry). Returns an optional result."""
        raise NotImplementedError

    def teardown(self) -> None:
        """Release what ``setup`` took."""


def _hold_everything(job_ids: list[int]) -> set[int]:
    return set(job_ids)


@dataclass
class Context:
    """The worker's live status (published to its heartbeat), and the fence before writes."""

    status: dict = field(default_factory=lambda: {"state": "starting", "done": 0, "failed": 0})
    changed: threading.Event = field(default_factory=threading.Event)
    #: The jobs among those given that are still this worker's (``leases.held``); the runner sets it.
    still_held: Callable[[list[int]], set[int]] = _hold_everything
    #: Charge jobs whose work starts now (``leases.begin``), returning those still ours: for a
    #: worker that works on several jobs at once (a GPU batch's shared forward pass).
    begin: Callable[[list[int]], set[int]] = _hold_everything

    def update(self, **fields) -> None:
        """Change the status; the heartbeat writes it soon, but only when something really changed."""
        if all(self.status.get(k) == v for k, v in fields.items()):
            return
        self.status = {**self.status, **fields}
        self.changed.set()

    def progress(self, fraction: float, detail: str | None = None) -> None:
        """Report progress of the current job (0..1); shown live in the admin."""
        self.update(progress=round(float(fraction), 3), **({"detail": detail} if detail else {}))

    def ensure_held(self, job_id: int) -> None:
        """Raise ``LeaseLost`` unless the job is still ours: call it right before a write a second holder would repeat."""
        if job_id not in self.still_held([job_id]):
            raise LeaseLost(f"job {job_id} was taken from this worker")


class Upkeep(threading.Thread):
    """Takes this process's turn at maintenance every interval, on a connection of its own."""

    def __init__(self):
        super().__init__(name="maintenance", daemon=True)
        self.stop_event = threading.Event()

    def run(self) -> None:
        try:
            while True:
                try:
                    maintenance.maybe_run()
                except Exception:  # a busy database: the next interval retries
                    log.exception("maintenance failed")
                if self.stop_event.wait(maintenance.interval()):
                    return
        finally:
            connections.close_all()

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=10)


class Runner:
    """Runs one ``Worker`` until stopped (or idle, with ``exit_when_idle``)."""

    FLUSH_SECONDS = 0.5

    def __init__(self, worker: Worker, number=None, exit_when_idle=False, batch_size=None, max_jobs=None):
        self.worker = worker
        self.identity = registry.new_identity(worker.queue, number)
        self.exit_when_idle = exit_when_idle
        self.batch_override = batch_size
        self.max_jobs = max_jobs
        self.ctx = Context()
        self.stopping = False
        self.held: dict[int, ClaimedJob] = {}  # by id: every job claimed and not yet finished or handed back
        self.ahead: list[ClaimedJob] = []  # the next batch, claimed and prepared (``Worker.lookahead``)
        self.finished: list[int] = []
        self.results: dict[int, dict] = {}
        self.last_flush = time.monotonic()
        self.processed = 0

    # -- signals -------------------------------------------------------------

    def _on_signal(self, signum, frame) -> None:
        if self.stopping:
            raise ImmediateStop(f"second signal {signum}")
        self.stopping = True
        self.ctx.update(state="stopping")
        log.info("%s: signal %s, finishing the current job (grace %.0fs)", self.identity.key, signum, self._grace())
        signal.setitimer(signal.ITIMER_REAL, self._grace())

    def _on_alarm(self, signum, frame) -> None:
        raise ImmediateStop("grace period over")

    @staticmethod
    def _grace() -> float:
        return float(getattr(settings, "EARMARK_STOP_GRACE_SECONDS", 20.0))

    def _install_signals(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
            signal.signal(signal.SIGALRM, self._on_alarm)

    # -- main loop -----------------------------------------------------------

    def run(self) -> int:
        """Returns the process exit status: 0 for a clean stop."""
        self._install_signals()
        registry.write(self.identity, self.ctx.status)
        queue.rescue_predecessor(self.identity.key, self.identity.boot_id)
        self.ctx.still_held, self.ctx.begin = self._still_held, self._begin
        self.heartbeat = heartbeat = Heartbeat(self.identity, self.ctx)
        upkeep = Upkeep()
        heartbeat.start()
        upkeep.start()
        log.info("%s: started (pid %s, boot %s)", self.identity.key, self.identity.pid, self.identity.boot_id)
        try:
            self.worker.setup(self.ctx)
            self._hold_until_started()
            self.ctx.update(state="idle")
            self._loop()
        except ImmediateStop as stop:
            log.info("%s: stopping now (%s)", self.identity.key, stop)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            self._shutdown(heartbeat, upkeep)
        return 0

    def _hold_until_started(self) -> None:
        """Claim nothing until the process is ``EARMARK_START_SECONDS`` old (supervisord sets it).

        supervisord counts a process that exits within ``startsecs`` as a
        failed start, and after ``startretries`` of those it gives the program
        up (FATAL) until a person restarts it. A job that kills its worker (a
        poison file) must never look like that, or a few bad files would stop
        all tagging: so a worker takes its first job only once it is past
        ``startsecs``; then a death on a job is an ordinary exit that
        supervisord restarts, and the queue quarantines the job after its
        ``max_attempts`` deaths. A worker that cannot start at all (missing
        models, no database) still fails within ``startsecs``, as it should.
        """
        hold = float(os.environ.get("EARMARK_START_SECONDS") or 0)
        while not self.stopping and _process_age() < hold:
            time.sleep(0.05)

    def _loop(self) -> None:
        while not self.stopping:
            self.heartbeat.revive()
            if self.max_jobs is not None and self.processed >= self.max_jobs:
                return
            jobs, self.ahead = self.ahead or self._claim(True), []
            if jobs:
                self._run_batch(jobs)
                continue
            self._flush()
            if self.exit_when_idle and not self._pending():
                log.info("%s: queue idle, exiting", self.identity.key)
                return
            if self.ctx.status.get("state") != "idle":
                # Only on the way into idle: every update wakes the heartbeat, and every
                # heartbeat write would wake every other idle worker into a claim.
                self.ctx.update(state="idle", job=None, file=None, progress=None, detail=None)
            dialect.wait_for_change(connection, settings.EARMARK_IDLE_POLL_SECONDS, lambda: self.stopping,
                                    channels=[dialect.queue_channel(self.worker.queue)])

    def _claim(self, prepare: bool = False) -> list[ClaimedJob]:
        """Claim a batch; charged at once only when its one job starts right away (see ``queue.claim``)."""
        batch = self.batch_override or self.worker.batch_size  # the worker may size it in setup()
        charge = batch == 1 and not self.worker.lookahead
        try:
            jobs = queue.claim(self.worker.queue, self.identity.key, self.identity.boot_id, batch, charge=charge)
        except OperationalError as exc:  # e.g. the busy timeout ran out under heavy load: try again
            log.warning("%s: claim failed (%s); retrying", self.identity.key, exc)
            time.sleep(0.5)
            return []
        # A job of ours that maintenance rescued (a stale heartbeat) and that this claim took
        # again is already in hand: the new claim renews its lease for the copy being
        # processed, and holding it twice would run it twice.
        jobs = [j for j in jobs if j.id not in self.held]
        self.held.update((j.id, j) for j in jobs)
        if prepare and len(jobs) > 1:
            self.worker.prepare(jobs, self.ctx)
        return jobs

    def _pending(self) -> bool:
        return queue.has_pending(self.worker.queue)

    def _run_batch(self, jobs: list[ClaimedJob]) -> None:
        if self.worker.lookahead and not self.stopping:
            self.ahead = self._claim(True)
        for job in jobs:
            if self.stopping:
                break
            self._run_one(job)
        self._flush(force=True)
        self._release([j.id for j in jobs if j.id in self.held])

    def _release(self, job_ids: list[int]) -> None:
        """Hand back jobs we hold but will not finish, refunding the attempts of those begun."""
        if job_ids:
            queue.release(job_ids, self.identity.key, self.identity.boot_id,
                          uncharged=[i for i in job_ids if not self.held[i].charged])
            for job_id in job_ids:
                del self.held[job_id]

    def _begin(self, job_ids: list[int]) -> set[int]:
        """Charge the attempts of jobs whose work starts now (where the claim did not); returns those not lost."""
        jobs = [self.held[i] for i in job_ids if i in self.held]
        due = [j.id for j in jobs if not j.charged]
        begun = leases.begin(due, self.identity.key, self.identity.boot_id) if due else set()
        for job in jobs:
            if job.id in begun:
                job.attempts, job.charged = job.attempts + 1, True
        return {j.id for j in jobs if j.charged and (j.id in begun or j.id not in due)}

    def _still_held(self, job_ids: list[int]) -> set[int]:
        return leases.held(job_ids, self.identity.key, self.identity.boot_id)

    def _run_one(self, job: ClaimedJob) -> None:
        self.ctx.update(state="busy", job=job.id, job_key=job.key, progress=0.0, detail=None,
                        job_started=time.time())
        try:
            if job.id not in self._begin([job.id]):
                raise LeaseLost(f"job {job.id} was taken from this worker before it began")
            result = self.worker.process(job, self.ctx)
        except ImmediateStop:
            raise
        except LeaseLost as exc:
            log.warning("%s: %s; dropped without finishing (its new holder runs it)", self.identity.key, exc)
            self.ctx.update(lost=self.ctx.status.get("lost", 0) + 1)
        except PermanentError as exc:
            self._fail(job, str(exc), retry=False)
        except Exception as exc:
            log.warning("%s: job %s failed: %s", self.identity.key, job.id, exc)
            log.debug("%s", traceback.format_exc())
            self._fail(job, f"{type(exc).__name__}: {exc}", retry=True)
        else:
            self.finished.append(job.id)
            if result:
                self.results[job.id] = result
            self.ctx.update(done=self.ctx.status.get("done", 0) + 1)
        del self.held[job.id]
        self.processed += 1
        self._flush()

    def _fail(self, job: ClaimedJob, error: str, retry: bool) -> None:
        queue.fail(job, self.identity.key, error, retry=retry, boot_id=self.identity.boot_id)
        self.ctx.update(failed=self.ctx.status.get("failed", 0) + 1)

    def _flush(self, force: bool = False) -> None:
        """Complete finished jobs in one statement, at most every FLUSH_SECONDS unless forced."""
        if not self.finished or (not force and time.monotonic() - self.last_flush < self.FLUSH_SECONDS):
            return
        done = queue.complete(self.finished, self.identity.key, self.results, boot_id=self.identity.boot_id)
        if done < len(self.finished):
            log.warning("%s: %d finished job(s) had been taken from this worker; their new holders finish them",
                        self.identity.key, len(self.finished) - done)
        self.finished, self.results = [], {}
        self.last_flush = time.monotonic()

    def _shutdown(self, heartbeat: Heartbeat, upkeep: Upkeep) -> None:
        """Complete what finished, release what did not, remove our row: nothing is left behind."""
        try:
            self._flush(force=True)
            self._release(list(self.held))
            self.worker.teardown()
        finally:
            upkeep.stop()
            heartbeat.stop()
            registry.remove(self.identity)
            close_old_connections()
            log.info("%s: stopped", self.identity.key)
