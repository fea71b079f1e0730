"""``manage.py calibrate``: compute, export or import the library's calibration.

    calibrate [--min-tracks N] [--wait [--timeout S]]
        Compute a calibration from the stored scores of the tagged tracks
        (at least N, default $EARMARK_CALIBRATION_MIN_TRACKS or 100), make it
        current and queue a rewrite of every track tagged with another one.
        --wait then blocks until the recalibrators have finished those jobs
        (exit 1 if any failed, 2 on timeout).
    calibrate --export FILE [--calibration V]
        Write the current calibration (or the one named V) as JSON ("-": stdout).
    calibrate --import FILE [--force] [--no-activate] [--wait]
        Store a calibration exported elsewhere and make it current. --force
        accepts one computed for other model weights than this library's.

Too few tagged tracks is an error (exit 1) naming how many there are.
"""
from __future__ import annotations

import json
import sys
import time

from django.core.management.base import BaseCommand, CommandError

from workers.calibration import compute, transfer
from workers.tagging import calibrated
from workers.models import Calibration, Job


class Command(BaseCommand):
    help = "Compute a new calibration from stored scores (and queue the rewrites), or export/import one as JSON."

    def add_arguments(self, parser):
        parser.add_argument("--min-tracks", type=int, default=None,
                            help="Fewest tagged tracks to calibrate over "
                                 "(default: $EARMARK_CALIBRATION_MIN_TRACKS, else 100).")
        parser.add_argument("--wait", action="store_true",
                            help="Wait until the recalibration jobs the new calibration queued have finished.")
        parser.add_argument("--timeout", type=float, default=None, help="Give up waiting after this many seconds.")
        io = parser.add_mutually_exclusive_group()
        io.add_argument("--export", metavar="FILE", help="Write a calibration as JSON ('-' for stdout).")
        io.add_argument("--import", dest="import_", metavar="FILE", help="Read a calibration from JSON and use it.")
        parser.add_argument("--calibration", dest="cal_version", metavar="V", default=None,
                            help="With --export: which calibration (default: the current one).")
        parser.add_argument("--force", action="store_true", help="With --import: accept other model weights.")
        parser.add_argument("--no-activate", action="store_true", help="With --import: store it but do not use it.")

    def handle(self, *args, **options):
        if options["export"]:
            return self.export(options["export"], options["cal_version"])
        if options["import_"]:
            row = self.import_(options["import_"], options["force"], not options["no_activate"])
        else:
            row = self.compute(options["min_tracks"])
        if options["wait"] and not options["no_activate"]:
            self.wait(row.version, options["timeout"])

    def compute(self, min_tracks: int | None) -> Calibration:
        try:
            result = compute.recalibrate(min_count=min_tracks)
        except compute.NotEnoughTracks as exc:
            raise CommandError(f"not calibrated: {exc}") from None
        row = result.calibration
        timings = result.describe_timings()
        self.stdout.write(f"calibration {row.version} ({'new' if result.created else 'unchanged'}) over "
                          f"{row.track_count} tracks of {row.model_version} [{timings}]; "
                          f"{result.jobs} track(s) queued for recalibration")
        return row

    def export(self, path: str, version: str | None) -> None:
        row = (Calibration.objects.filter(version=version).first() if version else calibrated.current_row())
        if row is None:
            raise CommandError(f"no calibration {version}" if version else "no calibration is current yet")
        text = json.dumps(transfer.export_json(row), indent=1, sort_keys=False) + "\n"
        if path == "-":
            self.stdout.write(text, ending="")
        else:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            self.stderr.write(f"wrote calibration {row.version} to {path}")

    def import_(self, path: str, force: bool, activate: bool) -> Calibration:
        try:
            with (sys.stdin if path == "-" else open(path, encoding="utf-8")) as f:
                document = json.load(f)
        except (OSError, ValueError) as exc:
            raise CommandError(f"cannot read {path}: {exc}") from None
        try:
            row, created = transfer.import_json(document, source=path, force=force)
        except transfer.ImportRefused as exc:
            raise CommandError(f"not imported: {exc}") from None
        message = f"{'imported' if created else 'already had'} calibration {row.version} ({row.track_count} tracks)"
        if activate:
            message += f"; now current, {compute.activate(row)} track(s) queued for recalibration"
        self.stdout.write(message)
        return row

    def wait(self, version: str, timeout: float | None) -> None:
        """Poll the calibrate queue until nothing is queued or running; report failures of this version."""
        deadline = None if timeout is None else time.monotonic() + timeout
        active = Job.objects.filter(queue="calibrate", state__in=Job.ACTIVE_STATES)
        last_report = 0.0
        while (left := active.count()) > 0:
            if deadline is not None and time.monotonic() > deadline:
                self.stderr.write(f"timed out with {left} recalibration job(s) left (are recalibrators running?)")
                sys.exit(2)
            if time.monotonic() - last_report > 5:
                self.stdout.write(f"waiting: {left} recalibration job(s) queued or running")
                last_report = time.monotonic()
            time.sleep(0.5)
        failed = Job.objects.filter(queue="calibrate", state=Job.State.FAILED, key__endswith=f":{version}").count()
        if failed:
            self.stderr.write(f"{failed} recalibration job(s) failed; see `manage.py queue status` and the admin")
            sys.exit(1)
        self.stdout.write("recalibration finished")
