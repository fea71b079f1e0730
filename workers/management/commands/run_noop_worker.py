"""``manage.py run_noop_worker QUEUE``: completes jobs without doing any work.

For tests and benchmarks of the queue and runtime themselves: every claimed
job id is appended to ``--log`` (one line each, O_APPEND), so a test can prove
that each job ran exactly once across processes; like every real worker's
write, the line is written only after ``Context.ensure_held``. ``--sleep``
simulates work; ``--hold-gil`` simulates work that never releases the GIL (a
codec or a lock wait inside one C call), by calling libc's ``usleep`` through
``ctypes.PyDLL``, which keeps the GIL for the whole call.
"""
import ctypes
import os
import time

from workers.management.worker_command import WorkerCommand
from workers.jobs.queue import QUEUES
from workers.jobs.runtime import Worker


class NoopWorker(Worker):
    def __init__(self, queue: str, log_path: str | None, sleep: float, hold_gil: float = 0.0):
        self.queue, self.sleep, self.hold_gil = queue, sleep, hold_gil
        self.log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if log_path else None

    def process(self, job, ctx):
        if self.sleep:
            time.sleep(self.sleep)
        if self.hold_gil:
            ctypes.PyDLL(None).usleep(int(self.hold_gil * 1e6))
        if self.log_fd is not None:
            ctx.ensure_held(job.id)
            os.write(self.log_fd, f"{job.id}\n".encode())
        return None


class Command(WorkerCommand):
    help = "Run a worker that completes jobs of QUEUE without doing anything (tests, benchmarks)."

    def add_arguments(self, parser):
        parser.add_argument("queue", choices=QUEUES)
        parser.add_argument("--log", default=None)
        parser.add_argument("--sleep", type=float, default=0.0)
        parser.add_argument("--hold-gil", type=float, default=0.0, help="Seconds of work that holds the GIL.")
        super().add_arguments(parser)

    def make_worker(self, options):
        return NoopWorker(options["queue"], options["log"], options["sleep"], options["hold_gil"])
