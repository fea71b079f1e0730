"""``manage.py library add|set|remove|list|show``: manage the libraries Earmark listens to."""
import json

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from workers.library import scan
from workers.library.libraries import add_library, remove_library, summary, update_library
from workers.models import Library


class Command(BaseCommand):
    help = "Add, list and show libraries."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        add = sub.add_parser("add", help="Add a library (an existing directory).")
        add.add_argument("name")
        add.add_argument("path")
        add.add_argument("--write-mode", default="minimal", choices=Library.WriteMode.values)
        add.add_argument("--no-scan", dest="scan_now", action="store_false", help="Do not queue a scan now.")
        add.add_argument("--standard-tags", default=Library.StandardTags.FILL_EMPTY,
                         choices=Library.StandardTags.values, help="What goes into the standard genre and mood.")
        add.add_argument("--key-notation", default=Library.KeyNotation.STANDARD, choices=Library.KeyNotation.values,
                         help="The standard key field's notation: standard (Am), camelot (8A) or open (1m).")
        change = sub.add_parser("set", help="Change a library's settings (tags change at the next tagging).")
        change.add_argument("name")
        change.add_argument("--write-mode", choices=Library.WriteMode.values)
        change.add_argument("--standard-tags", choices=Library.StandardTags.values)
        change.add_argument("--standard-limit", action="append", default=[], metavar="CATEGORY=N",
                            help="Values at most per standard field (genre, mood; 0 leaves it out), repeatable.")
        change.add_argument("--id3v23-separator", help="Joins several values in ID3v2.3 files (default /).")
        change.add_argument("--analysis", choices=Library.Analysis.values,
                            help="fast (default): stop scoring a file once its tags are settled; full: every patch.")
        change.add_argument("--key-notation", choices=Library.KeyNotation.values,
                            help="The standard key field's notation: standard (Am), camelot (8A) or open (1m).")
        remove = sub.add_parser("remove", help="Forget a library: cancel its jobs, delete its rows (not its files).")
        remove.add_argument("name")
        sub.add_parser("list", help="One line per library.")
        show = sub.add_parser("show", help="Track counts and failed files of one library.")
        show.add_argument("name")
        show.add_argument("--json", action="store_true")

    def handle(self, *args, action, **options):
        getattr(self, f"do_{action}")(**options)

    def do_add(self, name, path, write_mode, scan_now=True, standard_tags=Library.StandardTags.FILL_EMPTY,
               key_notation=Library.KeyNotation.STANDARD, **_):
        try:
            lib = add_library(name, path, write_mode, standard_tags, key_notation=key_notation)
        except ValidationError as exc:
            raise CommandError("; ".join(exc.messages)) from None
        self.stdout.write(f"added library {lib.name} at {lib.root}")
        if scan_now:
            scan.request_scan(lib)
            self.stdout.write("scan queued (the scanners start on it at once; `manage.py scan` waits for it)")

    def do_set(self, name, write_mode=None, standard_tags=None, standard_limit=(), id3v23_separator=None,
               analysis=None, key_notation=None, **_):
        lib = Library.objects.filter(name=name).first()
        if lib is None:
            raise CommandError(f"no library named {name!r}")
        try:
            changed = update_library(lib, write_mode=write_mode, standard_tags=standard_tags,
                                     limits=dict(_limit(item) for item in standard_limit),
                                     id3v23_separator=id3v23_separator, analysis=analysis,
                                     key_notation=key_notation)
        except ValidationError as exc:
            raise CommandError("; ".join(exc.messages)) from None
        self.stdout.write(f"{lib.name}: " + (", ".join(f"{k} = {v}" for k, v in changed.items()) or "nothing changed"))

    def do_remove(self, name, **_):
        lib = Library.objects.filter(name=name).first()
        if lib is None:
            raise CommandError(f"no library named {name!r}")
        done = remove_library(lib)
        self.stdout.write(f"removed library {name}: {done['cancelled']} queued job(s) cancelled, "
                          f"{done['rows_deleted']} row(s) deleted; its files are untouched")

    def do_list(self, **_):
        for lib in Library.objects.all():
            s = summary(lib, failed_limit=0)
            flag = "" if lib.enabled else "\tdisabled"
            self.stdout.write(f"{lib.name}\t{lib.root}\t{s['tracks']} tracks\t{lib.write_mode}"
                              f"\tstandard tags {lib.standard_tags}\t{lib.analysis} analysis{flag}")

    def do_show(self, name, json: bool = False, **_):
        lib = Library.objects.filter(name=name).first()
        if lib is None:
            raise CommandError(f"no library named {name!r}")
        data = summary(lib)
        if json:
            self.stdout.write(_dumps(data))
            return
        self.stdout.write(f"{lib.name}: {lib.root} ({data['tracks']} tracks, write mode {lib.write_mode})")
        for state, n in data["by_state"].items():
            self.stdout.write(f"  {state:8} {n}")
        for f in data["failed"]:
            self.stdout.write(f"  failed: {f['path']}: {f['error']}")


def _limit(item: str) -> tuple[str, int]:
    category, _, n = item.partition("=")
    if not n.isdigit():
        raise CommandError(f"--standard-limit wants CATEGORY=N, got {item!r}")
    return category, int(n)


def _dumps(data) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False)
