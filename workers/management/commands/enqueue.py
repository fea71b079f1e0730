"""``manage.py enqueue PATH… [--wait] [--timeout S]``: queue the scan and tagging of files or folders (hooks)."""
from django.core.management.base import BaseCommand, CommandError

from workers.library import enqueue, waiting


class Command(BaseCommand):
    help = ("Queue files or folders inside a library for scanning and tagging (for Lidarr, beets and Picard hooks). "
            "Exits non-zero if a path was refused or, with --wait, a track failed or the wait timed out.")

    def add_arguments(self, parser):
        parser.add_argument("paths", nargs="+", metavar="PATH", help="Audio files or folders inside a library.")
        parser.add_argument("--wait", action="store_true",
                            help="Block until every resulting track is tagged or failed, printing the tags written.")
        parser.add_argument("--timeout", type=float, default=None, metavar="S",
                            help="With --wait: give up after S seconds (exit status 1).")
        parser.add_argument("--priority", type=int, default=enqueue.DEFAULT_PRIORITY,
                            help="Queue priority, lower runs first (default %(default)s; library scans use 40).")

    def handle(self, *args, paths, wait, timeout, priority, **options):
        outcomes, targets = enqueue.submit(paths, priority=priority, reason="manage.py enqueue")
        for o in outcomes:
            if o.ok:
                jobs = ", ".join(map(str, o.job_ids)) or "already done"
                self.stdout.write(f"queued {o.path} (job {jobs})")
            else:
                self.stdout.write(f"error {o.path}: {o.error}")
        refused = sum(not o.ok for o in outcomes)
        result = None
        if wait:
            result = waiting.wait(outcomes, targets, timeout=timeout, say=self.stdout.write)
        problems = [f"{refused} path(s) refused"] if refused else []
        if result is not None and result.failed:
            problems.append(f"{len(result.failed)} failed")
        if result is not None and result.timed_out:
            problems.append("the wait timed out")
        if problems:
            raise CommandError("; ".join(problems))
