"""``manage.py make_demo_library PATH --tracks N``: invent a music library.

Thin wrapper over ``workers.audio.demo.build_library``; see there for what is
written and why.
"""
from __future__ import annotations

import os
import sys

from django.core.management.base import BaseCommand, CommandError

from workers.audio.formats import FORMATS
from workers.audio.demo import DEFAULT_FORMATS, build_library


class Command(BaseCommand):
    help = "Write a deterministic demo library of synthesized, tagged audio files."

    def add_arguments(self, parser):
        parser.add_argument("path", help="root folder of the library (created if missing)")
        parser.add_argument("--tracks", type=int, required=True, help="number of files")
        parser.add_argument("--seed", type=int, default=0, help="same seed, same library (default 0)")
        parser.add_argument("--min-seconds", type=float, default=20.0)
        parser.add_argument("--max-seconds", type=float, default=40.0)
        parser.add_argument("--formats", default=",".join(DEFAULT_FORMATS),
                            help=f"comma-separated, from: {', '.join(FORMATS)}")
        parser.add_argument("--jobs", type=int, default=1,
                            help=f"processes to render with (this machine has {os.cpu_count()} CPUs)")
        parser.add_argument("--overwrite", action="store_true", help="rewrite files that exist")

    def handle(self, *args, **opts):
        formats = tuple(f.strip() for f in opts["formats"].split(",") if f.strip())
        unknown = [f for f in formats if f not in FORMATS]
        if unknown:
            raise CommandError(f"unknown formats {unknown}; choose from {', '.join(FORMATS)}")
        try:
            summary = build_library(
                opts["path"], opts["tracks"], seed=opts["seed"], min_seconds=opts["min_seconds"],
                max_seconds=opts["max_seconds"], formats=formats, jobs=max(1, opts["jobs"]),
                overwrite=opts["overwrite"], progress=self._progress if opts["verbosity"] > 0 else None,
            )
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        if opts["verbosity"] > 0 and sys.stderr.isatty():
            self.stderr.write("")
        self.stdout.write(summary.describe())

    def _progress(self, done: int, total: int) -> None:
        """A single updating line on a terminal; every 10% otherwise."""
        if sys.stderr.isatty():
            self.stderr.write(f"\r{done}/{total}", ending="")
        elif total >= 10 and done % max(1, total // 10) == 0:
            self.stderr.write(f"{done}/{total}")
