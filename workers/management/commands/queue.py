"""``manage.py queue status|retry|cancel|pause|resume|prune``: look at and steer the job queues."""
import json

from django.core.management.base import BaseCommand

from workers.jobs import queue as jobs
from workers.jobs.queue import QUEUES


class Command(BaseCommand):
    help = "Show queue counts; retry, cancel, pause, resume and prune jobs."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        status = sub.add_parser("status", help="Jobs per queue and state.")
        status.add_argument("--json", action="store_true")
        for name, text in (("retry", "Requeue failed and cancelled jobs."), ("cancel", "Cancel queued jobs.")):
            p = sub.add_parser(name, help=text)
            p.add_argument("queue", nargs="?", choices=QUEUES)
            p.add_argument("--id", type=int, action="append", dest="ids", help="Only these job ids (repeatable).")
        for name in ("pause", "resume"):
            sub.add_parser(name, help=f"{name.capitalize()} a queue.").add_argument("queue", choices=QUEUES)
        prune = sub.add_parser("prune", help="Delete finished jobs older than the retention period.")
        prune.add_argument("--older-than", type=float, default=None, help="Seconds (default: the configured retention).")

    def handle(self, *args, action, **options):
        getattr(self, f"do_{action}")(**options)

    def do_status(self, json=False, **_):
        data = jobs.counts()
        if json:
            self.stdout.write(_dumps(data))
            return
        states = list(next(iter(data.values())))
        self.stdout.write("queue      " + "".join(f"{s:>10}" for s in states) + "    paused")
        for name, row in data.items():
            paused = "yes" if jobs.is_paused(name) else ""
            self.stdout.write(f"{name:10} " + "".join(f"{row[s]:>10}" for s in states) + f"    {paused}")

    def do_retry(self, queue=None, ids=None, **_):
        self.stdout.write(f"requeued {jobs.retry(ids, queue)} jobs")

    def do_cancel(self, queue=None, ids=None, **_):
        self.stdout.write(f"cancelled {jobs.cancel(ids, queue)} jobs")

    def do_pause(self, queue, **_):
        jobs.pause(queue)
        self.stdout.write(f"paused {queue}")

    def do_resume(self, queue, **_):
        jobs.resume(queue)
        self.stdout.write(f"resumed {queue}")

    def do_prune(self, older_than=None, **_):
        self.stdout.write(f"pruned {jobs.prune(older_than)} finished jobs")


def _dumps(data) -> str:
    return json.dumps(data, indent=2)
