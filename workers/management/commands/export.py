"""``manage.py export navidrome|playlists``: what players need to use Earmark's tags."""
import os

from django.core.management.base import BaseCommand, CommandError

from workers.models import Library
from workers.tagging import navidrome, playlists


class Command(BaseCommand):
    help = "Export the navidrome.toml snippet for Earmark's tags, or playlists per genre, mood and instrument."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        nd = sub.add_parser("navidrome", help="Print (or write) the navidrome.toml snippet that imports Earmark's tags.")
        nd.add_argument("--out", metavar="FILE", help="Write the snippet to FILE instead of printing it.")
        pl = sub.add_parser("playlists", help="Write one playlist per genre, mood and instrument value into DIR.")
        pl.add_argument("--out", metavar="DIR", required=True, help="The directory the playlists go in (made if missing).")
        pl.add_argument("--format", default="nsp", choices=playlists.FORMATS,
                        help="nsp: Navidrome smart playlists (default); m3u: M3U8 files with relative paths.")
        pl.add_argument("--library", metavar="NAME", help="Only the values (and, for m3u, the tracks) of this library.")
        pl.add_argument("--limit", type=int, default=playlists.DEFAULT_LIMIT,
                        help="nsp: at most this many tracks per playlist, in random order (0: no limit).")

    def handle(self, *args, action, **options):
        getattr(self, f"do_{action}")(**options)

    def do_navidrome(self, out=None, **_):
        text = navidrome.snippet()
        if out is None:
            self.stdout.write(text, ending="")
            return
        with open(out, "w", encoding="utf-8") as f:
            f.write(text)
        self.stdout.write(f"wrote the navidrome.toml snippet to {out}; append it to navidrome.toml, then run a full scan")

    def do_playlists(self, out, format, library=None, limit=playlists.DEFAULT_LIMIT, verbosity=1, **_):
        lib = None
        if library is not None:
            lib = Library.objects.filter(name=library).first()
            if lib is None:
                raise CommandError(f"no library named {library!r}")
        if limit < 0:
            raise CommandError("--limit must be 0 (no limit) or more")
        made = playlists.build(format, library=lib, base_dir=os.path.abspath(out), limit=limit)
        written = playlists.write(out, made)
        for playlist in made:
            if verbosity > 1:
                self.stdout.write(f"  {playlist.filename}\t{playlist.tracks} track(s)")
            if playlist.skipped:
                self.stderr.write(f"{playlist.filename}: {playlist.skipped} file(s) left out: "
                                  "a line break in the name cannot be written in a playlist")
            if playlist.raw_names:
                self.stderr.write(f"{playlist.filename}: {playlist.raw_names} name(s) are not UTF-8 "
                                  "and are written as their raw bytes")
        self.stdout.write(f"wrote {len(written)} {format} playlist(s) to {out}")
