"""Targeted folder jobs: a scan of named folders only, for hooks and the watcher (``workers.library.enqueue``).

A library scan (``workers.library.scan``) walks the whole tree under one
generation and ends with a finalize that marks missing what it never saw. A
targeted job reads only its folders (and, for a folder named by the caller,
the folders below it) with the library scan's own ``folders.read_folder`` and
``folders.write_folder``: new files become tracks with a tag job, changed files
are read again, files gone from a folder are marked missing, and known folders
below a named folder that no longer exist have their tracks marked missing.
There is no progress row, no done marker and no finalize: running a job twice
reads the same folders twice and changes nothing the second time.

Generations: each targeted job takes a generation of its own, above every
generation a track of its library holds (``next_gen``: the latest scan's and
the last targeted job's, in one meta row per library, ``targeted:<id>``), so
that ``track_rows.mark_missing`` (only below the generation) sees every file
the folder held before, and a library scan started later starts above it
(``scan.start`` starts above the highest track generation).

Dedup: one active job per folder and kind (the key names the folder), so a
burst of events for the files of one folder queues one job. A job already
running may have listed its folder before the file the caller reports
arrived, so ``enqueue_jobs`` first renames the key of a running job with the
same key (the running job goes on; only its key changes), and the new job is
queued beside it.
"""
from __future__ import annotations

import hashlib
import json
import os
import time

from django.db import connection, transaction
from django.utils import timezone

from workers.jobs import dialect, queue
from workers.library import folders, paths, scan, track_rows
from workers.models import Job, Library, Meta, Track
from workers.tagging.manifest import current_model_version

KIND = "target"
META = Meta._meta.db_table


def gen_key(library_id: int) -> str:
    return f"targeted:{library_id}"


def job_key(library_id: int, folders_text: list[str], recursive: bool) -> str:
    """One active job per folder (or list of folders) and kind; a digest, as keys are bounded and paths are not."""
    digest = hashlib.sha1("\0".join(folders_text).encode()).hexdigest()[:24]
    return f"target:{library_id}:{'tree' if recursive else 'folder'}:{digest}"


def new_job(library_id: int, folders_text: list[str], recursive: bool, priority: int, reason: str = "",
            sweep: bool | None = None) -> queue.NewJob:
    """The job for these folders; ``recursive``: their subfolders too; ``sweep``: look for vanished subfolders.

    A folder named by the caller is swept (its known subfolders that are gone
    have their tracks marked missing); the jobs it fans out into are not, as
    the first job's sweep covered every folder below it.
    """
    payload = {"kind": KIND, "folder": folders_text[0], "recursive": recursive, "priority": priority,
               "sweep": recursive if sweep is None else sweep}
    if len(folders_text) > 1:
        payload["folders"] = folders_text
    if reason:
        payload["reason"] = reason[:200]
    return queue.NewJob(key=job_key(library_id, folders_text, recursive), payload=payload, library_id=library_id,
                        priority=priority)


def enqueue_jobs(jobs: list[queue.NewJob]) -> dict[str, int]:
    """Queue targeted jobs (dedup by key, see the module's notes); returns each key's active job id.

    In one transaction: a running job with one of these keys is renamed
    (``<key>#<id>``) so that the new job is queued beside it, since the
    running one may have listed its folder before the caller's change.
    """
    keys = [j.key for j in jobs]
    with transaction.atomic():
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            running = Job.objects.filter(queue="scan", key__in=chunk, state=Job.State.RUNNING).values_list("id", "key")
            for job_id, key in list(running):
                Job.objects.filter(id=job_id, state=Job.State.RUNNING).update(key=f"{key}#{job_id}")
        queue.enqueue_many("scan", jobs)
        ids: dict[str, int] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            ids.update(Job.objects.filter(queue="scan", key__in=chunk, state__in=Job.ACTIVE_STATES)
                       .values_list("key", "id"))
    return ids


def next_gen(library_id: int) -> int:
    """A generation for one targeted job: above the latest scan's and every earlier targeted job's."""
    key = gen_key(library_id)
    with transaction.atomic():
        with connection.cursor() as cur:
            cur.execute(f"SELECT value FROM {META} WHERE key = %s{dialect.row_lock_clause(connection)}", [key])
            row = cur.fetchone()
        if row is None:
            highest = Track.objects.filter(library_id=library_id).order_by("-scan_gen").values_list(
                "scan_gen", flat=True).first() or 0
            with connection.cursor() as cur:  # a twin may insert it first (PostgreSQL): then lock theirs
                cur.execute(f"INSERT INTO {META} (key, value, updated_at) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                            [key, f'{{"gen": {int(highest)}}}', connection.ops.adapt_datetimefield_value(timezone.now())])
                cur.execute(f"SELECT value FROM {META} WHERE key = %s{dialect.row_lock_clause(connection)}", [key])
                row = cur.fetchone()
        value = row[0]
        last = (json.loads(value) if isinstance(value, (str, bytes)) else dict(value or {})).get("gen", 0)
        gen = max(int(last), int(scan.progress_for(library_id).get("gen", 0))) + 1
        Meta.objects.filter(key=key).update(value={"gen": gen}, updated_at=timezone.now())
    return gen


def process(library: Library, payload: dict, progress=None) -> dict:
    """Run one targeted job: read its folders (and below them, when recursive), then write it all in one go.

    A recursive job goes on into subfolders while it has run less than
    ``scan.INLINE_SECONDS``; the folders it has not reached then become
    targeted jobs of up to ``scan.FOLDERS_PER_JOB`` folders each.
    """
    recursive, priority = bool(payload.get("recursive")), int(payload.get("priority", scan.FOLDER_PRIORITY))
    named = [paths.to_bytes(f) for f in scan.job_folders(payload)]
    gen = next_gen(library.id)
    started = time.monotonic()
    root, model_version = scan.resolved_root(library), current_model_version()
    todo = [(folder, False) for folder in reversed(named)]
    scanned: list[tuple[folders.FolderResult, folders.FolderWrites]] = []
    while todo:
        if recursive and scanned and time.monotonic() - started >= scan.INLINE_SECONDS:
            break
        folder, inside = todo.pop()
        result, writes = folders.read_folder(library, folder, gen, False, progress, root, model_version, inside)
        scanned.append((result, writes))
        if recursive:
            todo += [(sub, True) for sub in reversed(result.subfolders)]
    named_text = set(scan.job_folders(payload)) if payload.get("sweep") else set()
    swept = [w.folder_text for _, w in scanned if w.folder_text in named_text and not w.unlisted]
    inserts = [track_rows.prepare_insert(writes.create) for _, writes in scanned]
    total = folders.FolderResult()
    with transaction.atomic():
        seen_ids, tag = [], []
        for (result, writes), prepared in zip(scanned, inserts):
            folder_seen, folder_tag = folders.write_folder(library, writes, gen, result, prepared)
            seen_ids += folder_seen
            tag += folder_tag
            for k, v in result.counts().items():
                setattr(total, k, getattr(total, k) + v)
        total.missing += sum(_sweep(library, folder, gen) for folder in swept)
        folders.finish_writes(library, seen_ids, tag, gen)
        _hurry_tag_jobs(seen_ids + [t.id for t in tag if t.id], priority)
        left = [paths.to_text(folder) for folder, _ in reversed(todo)]
        per_job = scan.fan_out(left) if left else 1
        queue.enqueue_many("scan", [new_job(library.id, left[i : i + per_job], True, priority,
                                            payload.get("reason", ""), sweep=False)
                                    for i in range(0, len(left), per_job)])
    errors = [result.error for result, _ in scanned if result.error]
    return {**total.counts(), "folders": len(scanned), "queued_folders": len(left), "gen": gen,
            **({"error": "; ".join(errors)} if errors else {})}


def _sweep(library: Library, folder_text: str, gen: int) -> int:
    """Mark missing the tracks of known folders below ``folder_text`` that no longer exist; returns how many.

    A library scan's finalize does this for the whole library; a targeted
    job does it below the folder it was given (a folder deleted, or renamed
    and so gone under its old name, is reported by its parent's path).
    """
    prefix = folder_text.rstrip("/") + "/"
    known = (Track.objects.filter(library=library, folder__startswith=prefix)
             .exclude(state=Track.State.MISSING).values_list("folder", flat=True).distinct())
    gone = [f for f in known if not _is_dir(paths.to_bytes(f))]
    if not gone:
        return 0
    ids = []
    for start in range(0, len(gone), 500):
        ids += Track.objects.filter(library=library, folder__in=gone[start : start + 500]).exclude(
            state=Track.State.MISSING).values_list("id", flat=True)
    return track_rows.mark_missing(ids, gen, library.id)


def _is_dir(path: bytes) -> bool:
    """A real directory now (a symlink in its place is not: the scanner never follows one)."""
    try:
        return os.path.isdir(path) and not os.path.islink(path)
    except OSError:
        return False


def _hurry_tag_jobs(track_ids: list[int], priority: int) -> None:
    """Give the queued tag jobs of these tracks the caller's priority, where it is sooner than theirs."""
    for start in range(0, len(track_ids), 500):
        Job.objects.filter(queue="tag", state=Job.State.QUEUED, track_id__in=track_ids[start : start + 500],
                           priority__gt=priority).update(priority=priority)
