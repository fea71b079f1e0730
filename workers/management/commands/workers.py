"""``manage.py workers status [--json]``: the live workers, from their meta rows."""
import json

from django.core.management.base import BaseCommand

from workers.jobs import registry


class Command(BaseCommand):
    help = "Show live workers (one per meta row): host, queue, pid, state, job, heartbeat age."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        sub.add_parser("status").add_argument("--json", action="store_true")
        sub.add_parser("reap", help="Remove rows of dead workers and requeue their jobs now.")

    def handle(self, *args, action, **options):
        if action == "reap":
            from workers.jobs import maintenance

            self.stdout.write(str(maintenance.run_once()))
            return
        rows = [
            {k: w.get(k) for k in ("id", "host", "queue", "pid", "state", "job", "file", "progress", "device",
                                   "gpu_memory", "heartbeat_age")}
            for w in registry.live_workers()
        ]
        if options["json"]:
            self.stdout.write(json.dumps(rows, indent=2, ensure_ascii=False))
            return
        if not rows:
            self.stdout.write("no live workers")
        for w in rows:
            self.stdout.write(f"{w['id']:40} pid {w['pid']:<7} {w['state']:9} job {w['job'] or '-':<8} "
                              f"heartbeat {w['heartbeat_age']}s ago  {w['file'] or ''}")
