"""A scan's life: request, start a generation, progress, finalize, and failing scans that stalled.

A scan has a generation number. Its folder jobs (``workers.library.scan_worker``)
stamp every file they see with it; the last folder job queues a finalize job,
which marks missing whatever this generation never saw. A root that is gone
or empty while the database knows tracks under it (an unmounted NAS) fails the
scan and marks nothing. Progress lives in one meta row per library
(``scan:<id>``), updated atomically by every folder job.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os

from django.db import connection, transaction
from django.utils import timezone

from workers.jobs import dialect, maintenance, queue
from workers.jobs.runtime import PermanentError
from workers.library import paths
from workers.models import Job, Library, Meta, Track

log = logging.getLogger(__name__)

META = Meta._meta.db_table
FOLDER_PRIORITY = 40
FINALIZE_PRIORITY = 30
# How scan work is cut into jobs (see ``workers.library.scan_worker.process_folder``): a job goes on into a
# folder's subfolders when there are at most FOLDERS_PER_JOB of them and it has run
# less than INLINE_SECONDS; more subfolders, and what is left when time is up,
# become jobs of up to FOLDERS_PER_JOB folders each, at least MIN_FAN_OUT of them.
# INLINE_SECONDS = 0 and FOLDERS_PER_JOB = 1 give one job per folder.
FOLDERS_PER_JOB = 16
MIN_FAN_OUT = 8
INLINE_SECONDS = 0.25


class ScanError(Exception):
    """A scan that must not go on (its message is shown to the user)."""


def progress_key(library_id: int) -> str:
    return f"scan:{library_id}"


def folder_key(library_id: int, folder: str) -> str:
    """Job keys are bounded in length; folders are not, so the key holds a digest."""
    return f"folder:{library_id}:{hashlib.sha1(folder.encode()).hexdigest()[:20]}"


# --- starting and finishing a scan ------------------------------------------



def request_scan(library: Library, full: bool = False, priority: int = 50) -> bool:
    """Queue a scan of the library (one active scan request per library)."""
    return queue.enqueue("scan", f"library:{library.id}", {"kind": "library", "full": full},
                         library_id=library.id, priority=priority)


def resolved_root(library: Library) -> bytes:
    return os.path.realpath(os.fsencode(library.root))


def check_root(library: Library) -> bytes:
    """The real root; ``ScanError`` when it is gone or empty while tracks are known under it."""
    root = resolved_root(library)
    known = Track.objects.filter(library=library).exclude(state=Track.State.MISSING).exists()
    try:
        empty = not any(True for _ in os.scandir(root))
    except OSError as exc:
        raise ScanError(f"library root {library.root} cannot be read ({exc.strerror}); "
                        "is the drive mounted? Nothing was marked missing.") from None
    if empty and known:
        raise ScanError(f"library root {library.root} is empty but {library.name} has tracks there; "
                        "is the drive mounted? Nothing was marked missing.")
    return root


def start(library: Library, full: bool) -> dict:
    """Begin a new scan generation and queue the root folder."""
    root = check_root(library)
    gen = (Track.objects.filter(library=library).order_by("-scan_gen").values_list("scan_gen", flat=True).first() or 0) + 1
    previous = Meta.objects.filter(key=progress_key(library.id)).first()
    if previous and previous.value.get("gen", 0) >= gen:
        gen = previous.value["gen"] + 1
    state = {"gen": gen, "state": "running", "full": full, "folders_total": 1, "folders_done": 0,
             "files_seen": 0, "files_read": 0, "new": 0, "changed": 0, "failed": 0, "missing": 0,
             "errors": [], "started_at": timezone.now().isoformat()}
    with transaction.atomic():
        Meta.objects.update_or_create(key=progress_key(library.id), defaults={"value": state, "updated_at": timezone.now()})
        queue_folders(library, [root], gen, full)
    return state


def queue_folders(library: Library, folders: list[bytes], gen: int, full: bool, per_job: int = 1) -> None:
    """Queue folder jobs of up to ``per_job`` folders each (a job of several lists them all in ``folders``)."""
    jobs = []
    for start in range(0, len(folders), per_job):
        texts = [paths.to_text(f) for f in folders[start : start + per_job]]
        payload = {"kind": "folder", "folder": texts[0], "gen": gen, "full": full}
        if len(texts) > 1:
            payload["folders"] = texts
        jobs.append(queue.NewJob(key=folder_key(library.id, "\0".join(texts)), library_id=library.id, priority=FOLDER_PRIORITY,
                                 payload=payload))
    queue.enqueue_many("scan", jobs)


def fan_out(folders: list[bytes]) -> int:
    """Folders per job for many sibling folders: at most FOLDERS_PER_JOB, in at least MIN_FAN_OUT jobs."""
    jobs = max(MIN_FAN_OUT, -(-len(folders) // FOLDERS_PER_JOB))
    return max(1, -(-len(folders) // jobs))


def finalize(library: Library, gen: int) -> dict:
    """Mark missing the tracks this scan never saw, unless the root has vanished meanwhile."""
    try:
        check_root(library)
    except ScanError as exc:
        set_progress(library.id, gen, state="failed", error=str(exc))
        Library.objects.filter(id=library.id).update(last_scan_error=str(exc))
        raise PermanentError(str(exc)) from None
    missing = Track.objects.filter(library=library, scan_gen__lt=gen).exclude(state=Track.State.MISSING).update(
        state=Track.State.MISSING, error="", updated_at=timezone.now())
    Library.objects.filter(id=library.id).update(last_scan_at=timezone.now(), last_scan_error="")
    return set_progress(library.id, gen, state="done", add={"missing": missing},
                         finished_at=timezone.now().isoformat())


def set_progress(library_id: int, gen: int, add: dict | None = None, subfolders: int = 0,
                  folder_done: int = 0, **fields) -> dict:
    """Update the scan's progress row atomically; returns it (``{}`` if another scan replaced it).

    ``subfolders`` folders were found (to scan), ``folder_done`` folders were scanned.
    """
    # Raw statements: every folder job ends here, and the ORM's query building cost more than the row.
    key = progress_key(library_id)
    with transaction.atomic():
        with connection.cursor() as cur:
            cur.execute(f"SELECT value FROM {META} WHERE key = %s{dialect.row_lock_clause(connection)}", [key])
            row = cur.fetchone()
            value = _json(row[0]) if row else None
            if value is None or value.get("gen") != gen:
                return {}
            for k, v in (add or {}).items():
                value[k] = value.get(k, 0) + v
            value["folders_total"] += subfolders
            value["folders_done"] += int(folder_done)
            value.update(fields)
            cur.execute(f"UPDATE {META} SET value = %s, updated_at = %s WHERE key = %s",
                        [json.dumps(value), connection.ops.adapt_datetimefield_value(timezone.now()), key])
        return value


def _json(value) -> dict:
    return json.loads(value) if isinstance(value, (str, bytes)) else dict(value or {})


# --- one folder ----------------------------------------------------------------


@maintenance.register("scans_failed")
def fail_stalled_scans() -> int:
    """Fail the scans that can no longer finish; returns how many.

    A scan is done when its last folder job has run and its finalize job
    after it. A folder or finalize job that failed for good (quarantined after
    killing its scanner again and again, or cancelled) never reports, so its
    scan would say "running" until the next scan request. Once a running
    scan has no scan job left to run, it is failed here with the last job
    error, and nothing is marked missing. Run by maintenance.
    """
    stalled = 0
    for row in Meta.objects.filter(key__startswith="scan:"):
        state, library_id = row.value.get("state"), row.key.split(":", 1)[1]
        if state not in ("running", "finalizing") or not library_id.isdigit():
            continue
        jobs = Job.objects.filter(queue="scan", library_id=int(library_id))
        if jobs.filter(state__in=Job.ACTIVE_STATES).exists():
            continue
        last = jobs.filter(state__in=(Job.State.FAILED, Job.State.CANCELLED)).order_by("-finished_at", "-id").first()
        why = f"{last.last_error or last.state}" if last else "its jobs are gone"
        error = (f"the scan stopped before the end: a scan job could not be done ({why}); "
                 "nothing was marked missing. Scan again once the cause is fixed.")
        if set_progress(int(library_id), row.value.get("gen"), state="failed", error=error):
            Library.objects.filter(id=int(library_id)).update(last_scan_error=error)
            log.warning("library %s: %s", library_id, error)
            stalled += 1
    return stalled





def current_errors(library_id: int) -> list:
    row = Meta.objects.filter(key=progress_key(library_id)).first()
    return list(row.value.get("errors", [])) if row else []


def progress(library: Library) -> dict:
    """The latest scan's progress row (empty when the library was never scanned)."""
    row = Meta.objects.filter(key=progress_key(library.id)).first()
    return dict(row.value) if row else {}


def is_scanning(library: Library) -> bool:
    return progress(library).get("state") in ("running", "finalizing") or Job.objects.filter(
        queue="scan", library=library, state__in=Job.ACTIVE_STATES).exists()
