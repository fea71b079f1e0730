"""``manage.py run_watcher``: the library watcher (supervisord runs one per host); see ``workers.library.watch``."""
from django.core.management.base import BaseCommand

from workers.library.watch import Watcher


class Command(BaseCommand):
    help = ("Watch every enabled library (inotify, or polling where inotify cannot see changes) and queue "
            "folder scans for what changed, once each folder has settled.")

    def add_arguments(self, parser):
        parser.add_argument("--max-seconds", type=float, default=None,
                            help="exit after this long (tests, benchmarks); default: until SIGTERM")

    def handle(self, *args, **options):
        Watcher().run(max_seconds=options["max_seconds"])
