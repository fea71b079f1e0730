"""A scan's life: request, start a generation, progress, finalize, and failing scans that stalled.

A scan has a generation number. Its folder jobs (``workers.library.scan_worker``)
stamp every file they see with it; the last folder job queues a finalize job,
which marks missing whatever this generation never saw. A root that is gone
or empty while the database knows tracks under it (an unmounted NAS) fails the
scan and marks nothing. Progress lives in one meta row per library
(``scan:<id>``), updated atomically by every folder job.

Scans are safe under the races of a real deployment (issue 13):

- one scan runs per library at a time; a scan requested while one runs is
  absorbed into a single follow-up scan, started by the running scan's
  finalize (``start``);
- a folder job counts once, however often it runs: the transaction that
  writes its folders also writes its done marker (``scanned:<id>:<gen>:…``,
  ``claim_folder_job``), so a job rescued after its commit changes nothing;
- a track's ``scan_gen`` only ever goes up (``workers.library.track_rows``),
  so a late or stale write cannot make a finalize mark a present file missing.
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


def _digest(folders: list[str]) -> str:
    return hashlib.sha1("\0".join(folders).encode()).hexdigest()[:20]


def folder_key(library_id: int, gen: int, folders: list[str]) -> str:
    """A folder job's dedup key: its folders (as a digest: keys are bounded, folders are not) and its generation.

    With the generation in the key, a job left over from an earlier scan (a
    rescued job that already committed) never takes the place of the same
    folder's job in the next scan.
    """
    return f"folder:{library_id}:{gen}:{_digest(folders)}"


def done_key(library_id: int, gen: int, folders: list[str]) -> str:
    """The done marker of a folder job (not under ``scan:``, which holds one progress row per library)."""
    return f"scanned:{library_id}:{gen}:{_digest(folders)}"


def job_folders(payload: dict) -> list[str]:
    """The folders a folder job's payload names (the ones its key and done marker are made of)."""
    return payload.get("folders") or [payload["folder"]]


# --- starting and finishing a scan ------------------------------------------



def request_scan(library: Library, full: bool = False, priority: int = 50) -> bool:
    """Queue a scan of the library (one active scan request per library).

    A request made while a scan runs is queued all the same: its job
    (``start``) sees the running scan and leaves a follow-up scan to it.
    """
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
    """Begin a new scan generation and queue the root folder, or leave a follow-up to the running scan.

    Two scans of one library never run at once. They used to: the second
    scan replaced the progress row, so the first one's folder jobs counted
    for nothing, while the second one's jobs for the same folders were
    turned away by the queue's dedup as long as the first one's were still
    active, and the second scan never finished or marked missing what it had
    not seen. A request during a scan is now recorded in the progress row
    (``follow_up``, ``--full`` if any request was) and ``finalize`` starts one
    new scan for all of them once the running one is done, as most scanners
    do: the running scan may have read a folder before the change that
    prompted the request, so the request cannot simply be dropped. Checked
    and recorded under the progress row's lock, the same lock ``finalize``
    takes, so a request is either seen by the finalize or finds the scan done.
    """
    root = check_root(library)
    with transaction.atomic():
        previous = locked_progress(library.id) or {}
        if previous.get("state") in ("running", "finalizing"):
            follow_up = {"full": full or bool((previous.get("follow_up") or {}).get("full"))}
            return {**set_progress(library.id, previous["gen"], follow_up=follow_up), "absorbed": True}
        gen = max(previous.get("gen", 0), _highest_track_gen(library)) + 1
        state = {"gen": gen, "state": "running", "full": full, "folders_total": 1, "folders_done": 0,
                 "files_seen": 0, "files_read": 0, "new": 0, "changed": 0, "failed": 0, "missing": 0,
                 "errors": [], "started_at": timezone.now().isoformat()}
        Meta.objects.update_or_create(key=progress_key(library.id), defaults={"value": state, "updated_at": timezone.now()})
        Meta.objects.filter(key__startswith=f"scanned:{library.id}:").delete()  # earlier scans' done markers
        queue_folders(library, [root], gen, full)
    return state


def _highest_track_gen(library: Library) -> int:
    return Track.objects.filter(library=library).order_by("-scan_gen").values_list("scan_gen", flat=True).first() or 0


def _start_follow_up(library: Library, full: bool) -> None:
    """Start the scan that requests during the last one asked for (a root gone now fails it as a request would)."""
    try:
        start(library, full)
    except ScanError as exc:
        Library.objects.filter(id=library.id).update(last_scan_error=str(exc))
        log.warning("library %s: the follow-up scan did not start: %s", library.id, exc)


def queue_folders(library: Library, folders: list[bytes], gen: int, full: bool, per_job: int = 1) -> None:
    """Queue folder jobs of up to ``per_job`` folders each (a job of several lists them all in ``folders``)."""
    jobs = []
    for start in range(0, len(folders), per_job):
        texts = [paths.to_text(f) for f in folders[start : start + per_job]]
        payload = {"kind": "folder", "folder": texts[0], "gen": gen, "full": full}
        if len(texts) > 1:
            payload["folders"] = texts
        jobs.append(queue.NewJob(key=folder_key(library.id, gen, texts), library_id=library.id,
                                 priority=FOLDER_PRIORITY, payload=payload))
    queue.enqueue_many("scan", jobs)


def fan_out(folders: list[bytes]) -> int:
    """Folders per job for many sibling folders: at most FOLDERS_PER_JOB, in at least MIN_FAN_OUT jobs."""
    jobs = max(MIN_FAN_OUT, -(-len(folders) // FOLDERS_PER_JOB))
    return max(1, -(-len(folders) // jobs))


def finalize(library: Library, gen: int) -> dict:
    """Mark missing the tracks this scan never saw, unless the root has vanished meanwhile.

    Only a scan that is finalizing is finalized, so a finalize job run again
    (rescued after its commit) does nothing. The follow-up scan that requests
    during this one asked for starts in the same transaction, so it is never lost
    (unless the root is gone: the scan fails, and a follow-up would fail alike).
    """
    if progress_for(library.id).get("state") != "finalizing":
        return {"skipped": f"scan {gen} is not finalizing"}
    try:
        check_root(library)
    except ScanError as exc:
        set_progress(library.id, gen, state="failed", error=str(exc))
        Library.objects.filter(id=library.id).update(last_scan_error=str(exc))
        raise PermanentError(str(exc)) from None
    with transaction.atomic():
        current = locked_progress(library.id) or {}
        if current.get("gen") != gen or current.get("state") != "finalizing":
            return {"skipped": f"scan {gen} is not finalizing"}
        missing = Track.objects.filter(library=library, scan_gen__lt=gen).exclude(state=Track.State.MISSING).update(
            state=Track.State.MISSING, error="", updated_at=timezone.now())
        Library.objects.filter(id=library.id).update(last_scan_at=timezone.now(), last_scan_error="")
        Meta.objects.filter(key__startswith=f"scanned:{library.id}:").delete()
        done = set_progress(library.id, gen, state="done", add={"missing": missing},
                            finished_at=timezone.now().isoformat(), follow_up=None)
        if current.get("follow_up"):
            _start_follow_up(library, bool(current["follow_up"].get("full")))
    return done


def claim_folder_job(library_id: int, gen: int, payload: dict) -> bool:
    """Write a folder job's done marker (inside the job's transaction); False when it was already there.

    The marker commits with the job's rows and progress counts, or not at all,
    so a job whose worker died after the commit finds its marker when the
    rescuer runs it again, and counts nothing twice (counting twice finished
    scans early, and the finalize then marked missing the folders not yet
    scanned). A twin running at the same time waits on the marker's key and
    then finds it (PostgreSQL), or runs after the commit (SQLite's one writer).
    """
    with connection.cursor() as cur:
        cur.execute(f"INSERT INTO {META} (key, value, updated_at) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                    [done_key(library_id, gen, job_folders(payload)), "{}",
                     connection.ops.adapt_datetimefield_value(timezone.now())])
        return cur.rowcount == 1


def folder_job_is_due(library_id: int, gen: int, payload: dict) -> bool:
    """Whether a folder job still has work: its scan is the running one and the job has not committed yet.

    Checked before reading any file, so that a rescued job that already
    committed costs nothing; ``claim_folder_job`` decides in the transaction.
    """
    state = progress_for(library_id)
    return (state.get("gen") == gen and state.get("state") == "running"
            and not Meta.objects.filter(key=done_key(library_id, gen, job_folders(payload))).exists())


def set_progress(library_id: int, gen: int, add: dict | None = None, subfolders: int = 0,
                  folder_done: int = 0, **fields) -> dict:
    """Update the scan's progress row atomically; returns it (``{}`` if another scan replaced it).

    ``subfolders`` folders were found (to scan), ``folder_done`` folders were scanned.
    """
    # Raw statements: every folder job ends here, and the ORM's query building cost more than the row.
    key = progress_key(library_id)
    with transaction.atomic():
        value = locked_progress(library_id)
        if value is None or value.get("gen") != gen:
            return {}
        for k, v in (add or {}).items():
            value[k] = value.get(k, 0) + v
        value["folders_total"] += subfolders
        value["folders_done"] += int(folder_done)
        value.update(fields)
        with connection.cursor() as cur:
            cur.execute(f"UPDATE {META} SET value = %s, updated_at = %s WHERE key = %s",
                        [json.dumps(value), connection.ops.adapt_datetimefield_value(timezone.now()), key])
        return value


def locked_progress(library_id: int) -> dict | None:
    """The progress row, locked until the end of the caller's transaction (None when there is none)."""
    with connection.cursor() as cur:
        cur.execute(f"SELECT value FROM {META} WHERE key = %s{dialect.row_lock_clause(connection)}",
                    [progress_key(library_id)])
        row = cur.fetchone()
    return _json(row[0]) if row else None


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
        if _fail_scan(int(library_id), row.value.get("gen"), error):
            log.warning("library %s: %s", library_id, error)
            stalled += 1
    return stalled


def _fail_scan(library_id: int, gen: int, error: str) -> bool:
    """Fail a stalled scan, and start the follow-up scan asked for while it ran (a request is never lost)."""
    with transaction.atomic():
        current = locked_progress(library_id) or {}
        if not set_progress(library_id, gen, state="failed", error=error, follow_up=None):
            return False
        Library.objects.filter(id=library_id).update(last_scan_error=error)
        library = Library.objects.filter(id=library_id).first()
        if current.get("follow_up") and library:
            _start_follow_up(library, bool(current["follow_up"].get("full")))
    return True





def current_errors(library_id: int) -> list:
    row = Meta.objects.filter(key=progress_key(library_id)).first()
    return list(row.value.get("errors", [])) if row else []


def progress(library: Library) -> dict:
    """The latest scan's progress row (empty when the library was never scanned)."""
    return progress_for(library.id)


def progress_for(library_id: int) -> dict:
    row = Meta.objects.filter(key=progress_key(library_id)).first()
    return dict(row.value) if row else {}


def is_scanning(library: Library) -> bool:
    return progress(library).get("state") in ("running", "finalizing") or Job.objects.filter(
        queue="scan", library=library, state__in=Job.ACTIVE_STATES).exists()
