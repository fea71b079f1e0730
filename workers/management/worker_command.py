"""The shared shape of ``run_scanner``, ``run_tagger`` and ``run_recalibrator``."""
from __future__ import annotations

import sys

from django.core.management.base import BaseCommand

from workers.jobs.runtime import Runner, Worker


class WorkerCommand(BaseCommand):
    """Parses the common worker flags and hands a ``Worker`` to the runner."""

    requires_system_checks: list = []

    def add_arguments(self, parser):
        parser.add_argument("--exit-when-idle", action="store_true",
                            help="Exit 0 once the queue has nothing to claim and nothing running.")
        parser.add_argument("--batch", type=int, default=None, help="Jobs claimed per statement.")
        parser.add_argument("--number", default=None,
                            help="Process number in the worker id (default: $EARMARK_WORKER_NUMBER, else p<pid>).")
        parser.add_argument("--max-jobs", type=int, default=None, help="Exit after this many jobs.")

    def make_worker(self, options) -> Worker:
        raise NotImplementedError

    def handle(self, *args, **options):
        runner = Runner(self.make_worker(options), number=options["number"], exit_when_idle=options["exit_when_idle"],
                        batch_size=options["batch"], max_jobs=options["max_jobs"])
        sys.exit(runner.run())
