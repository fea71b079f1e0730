"""``manage.py run_noop_worker QUEUE``: completes jobs without doing any work.

For tests and benchmarks of the queue and runtime themselves: every claimed
job id is appended to ``--log`` (one line each, O_APPEND), so a test can prove
that each job ran exactly once across processes. ``--sleep`` simulates work.
"""
import os
import time

from workers.management.worker_command import WorkerCommand
from workers.jobs.queue import QUEUES
from workers.jobs.runtime import Worker


class NoopWorker(Worker):
    def __init__(self, queue: str, log_path: str | None, sleep: float):
        self.queue, self.sleep = queue, sleep
        self.log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if log_path else None

    def process(self, job, ctx):
        if self.sleep:
            time.sleep(self.sleep)
        if self.log_fd is not None:
            os.write(self.log_fd, f"{job.id}\n".encode())
        return None


class Command(WorkerCommand):
    help = "Run a worker that completes jobs of QUEUE without doing anything (tests, benchmarks)."

    def add_arguments(self, parser):
        parser.add_argument("queue", choices=QUEUES)
        parser.add_argument("--log", default=None)
        parser.add_argument("--sleep", type=float, default=0.0)
        super().add_arguments(parser)

    def make_worker(self, options):
        return NoopWorker(options["queue"], options["log"], options["sleep"])
