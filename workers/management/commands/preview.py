"""``manage.py preview LIBRARY [--sample N] [--json]``: the genre and mood each standard-tags policy would write."""
import json

from django.core.management.base import BaseCommand, CommandError

from workers.models import Library
from workers.tagging.preview import preview


class Command(BaseCommand):
    help = "Show, for sample tracks with stored scores, what each standard-tags policy would put in genre and mood."

    def add_arguments(self, parser):
        parser.add_argument("library")
        parser.add_argument("--sample", type=int, default=5)
        parser.add_argument("--json", action="store_true")

    def handle(self, *args, library, sample, json: bool, **options):
        lib = Library.objects.filter(name=library).first()
        if lib is None:
            raise CommandError(f"no library named {library!r}")
        rows = preview(lib, sample)
        if json:
            self.stdout.write(_dumps(rows))
            return
        if not rows:
            self.stdout.write(f"{lib.name}: no track has stored scores yet (tag some first)")
        for row in rows:
            self.stdout.write(row["path"] + (f": {row['error']}" if row["error"] else ""))
            if row["error"]:
                continue
            self.stdout.write(f"  earmark   {_line(row['earmark'])}"
                              + ("  (genre: low confidence)" if "genre" in row["low_confidence"] else ""))
            self.stdout.write(f"  file now  {_line(row['now'])}")
            for policy, fields in row["policies"].items():
                marker = "*" if policy == lib.standard_tags else " "
                self.stdout.write(f" {marker}{policy:10} {_line(fields)}")


def _line(fields: dict) -> str:
    return "  ".join(f"{name}: {', '.join(values) or '-'}" for name, values in fields.items())


def _dumps(rows) -> str:
    return json.dumps(rows, indent=2, ensure_ascii=False)
