"""``manage.py untag LIBRARY|PATH... [--dry-run]``: take Earmark's tags out of files (``workers.library.untag``)."""
from django.core.management.base import BaseCommand, CommandError

from workers.library import untag


class Command(BaseCommand):
    help = ("Remove every tag Earmark wrote and put back the genre and mood it replaced, so each file's tags "
            "read as before Earmark; the audio is never touched.")

    def add_arguments(self, parser):
        parser.add_argument("targets", nargs="+", help="Library names, or files and folders inside a library.")
        parser.add_argument("--dry-run", action="store_true", help="List what would change; change nothing.")

    def handle(self, *args, targets, dry_run, **options):
        try:
            changes = untag.untag(targets, dry_run=dry_run)
        except untag.UntagError as exc:
            raise CommandError(str(exc)) from None
        for change in changes:
            self.stdout.write(("would " if dry_run and not change.error else "") + change.describe())
        failed = [c for c in changes if c.error]
        verb = "would be untagged" if dry_run else "untagged"
        self.stdout.write(f"{len(changes) - len(failed)} file(s) {verb}, {len(failed)} failed")
        if failed:
            raise CommandError(f"{len(failed)} file(s) could not be untagged")
