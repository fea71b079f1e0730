"""``manage.py scan [NAME ...] [--full] [--wait]``: queue library scans."""
import sys
import time

from django.core.management.base import BaseCommand, CommandError

from workers.library import scan
from workers.models import Job, Library


class Command(BaseCommand):
    help = "Queue a scan of the named libraries (all enabled ones by default)."

    def add_arguments(self, parser):
        parser.add_argument("names", nargs="*")
        parser.add_argument("--full", action="store_true", help="Re-read every file, not only new and changed ones.")
        parser.add_argument("--wait", action="store_true", help="Show progress until the scans are done.")
        parser.add_argument("--timeout", type=float, default=None, help="With --wait: give up after this many seconds.")

    def handle(self, *args, names, full, wait, timeout, **options):
        libraries = list(Library.objects.filter(name__in=names)) if names else list(Library.objects.filter(enabled=True))
        unknown = set(names) - {lib.name for lib in libraries}
        if unknown:
            raise CommandError(f"no library named {', '.join(sorted(unknown))}")
        for lib in libraries:
            queued = scan.request_scan(lib, full=full)
            self.stdout.write(f"{lib.name}: {'scan queued' if queued else 'a scan request is already queued'}"
                              f"{' (full)' if full and queued else ''}")
        if wait:
            ok = self.wait(libraries, timeout)
            if not ok:
                raise CommandError("scan failed or timed out; see `manage.py library show NAME`")

    def wait(self, libraries, timeout) -> bool:
        """Draw a progress bar per library until every scan has finished."""
        deadline = time.monotonic() + timeout if timeout else None
        started = {lib.id: scan.progress(lib).get("gen", 0) for lib in libraries}
        while True:
            states = [self.status(lib, started[lib.id]) for lib in libraries]
            line = "  ".join(f"{lib.name} {self.bar(s)}" for lib, s in zip(libraries, states))
            sys.stdout.write("\r" + line[:200])
            sys.stdout.flush()
            if all(s.get("state") in ("done", "failed") for s in states):
                sys.stdout.write("\n")
                for lib, s in zip(libraries, states):
                    self.stdout.write(f"{lib.name}: {s.get('state')} — {s.get('files_seen', 0)} files, "
                                      f"{s.get('new', 0)} new, {s.get('changed', 0)} changed, "
                                      f"{s.get('failed', 0)} failed, {s.get('missing', 0)} missing"
                                      + (f"; {s['error']}" if s.get("error") else ""))
                return all(s.get("state") == "done" for s in states)
            if deadline and time.monotonic() > deadline:
                sys.stdout.write("\n")
                return False
            time.sleep(0.3)

    @staticmethod
    def status(lib, previous_gen) -> dict:
        """The scan's state, or the request job's failure if the scan never started."""
        state = scan.progress(lib)
        if state.get("gen", 0) > previous_gen:
            return state
        request = Job.objects.filter(queue="scan", key=f"library:{lib.id}").order_by("-id").first()
        if request and request.state == Job.State.FAILED:
            return {"state": "failed", "error": request.last_error}
        return {"state": "queued"}

    @staticmethod
    def bar(state, width=24) -> str:
        total, done = state.get("folders_total", 0), state.get("folders_done", 0)
        frac = done / total if total else 0.0
        fill = int(frac * width)
        return f"[{'#' * fill}{'.' * (width - fill)}] {done}/{total} folders {state.get('files_seen', 0)} files"
