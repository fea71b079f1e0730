"""The scanner's worker: each job is a library, folder or finalize step of a scan, or a targeted folder job.

A folder job reads top to bottom in ``process_folder``: list and read its
folders (``folders.read_folder``), then one transaction writes what they
found, queues what is left and counts the progress (``scan``).
"""
from __future__ import annotations

import time

from django.db import transaction

from workers.jobs import queue
from workers.jobs.queue import ClaimedJob
from workers.jobs.runtime import Context, PermanentError, Worker
from workers.library import folders, paths, scan, targeted, track_rows
from workers.models import Library
from workers.tagging.manifest import current_model_version


# What a folder job returns when it has nothing to do: it already committed, or its scan is over.
SKIPPED = {"skipped": "already done, or its scan is over"}


class ScanWorker(Worker):
    queue = "scan"
    batch_size = 1  # a folder job is already a batch of files

    def process(self, job: ClaimedJob, ctx: Context) -> dict:
        ctx.update(file=job.payload.get("folder") or job.key)
        return process_job(job.payload, job.library_id, progress=ctx.progress)



def process_job(payload: dict, library_id: int, progress=None) -> dict:
    """Run one scan job of any kind; returns its result for the job row."""
    library = Library.objects.filter(id=library_id).first()
    if library is None:
        raise PermanentError("the library no longer exists")
    kind = payload.get("kind")
    if kind == "library":
        try:
            state = scan.start(library, bool(payload.get("full")))
        except scan.ScanError as exc:
            Library.objects.filter(id=library.id).update(last_scan_error=str(exc))
            raise PermanentError(str(exc)) from None
        return {"gen": state["gen"], **({"follow_up": True} if state.get("absorbed") else {})}
    if kind == "finalize":
        return scan.finalize(library, payload["gen"])
    if kind == "folder":
        return process_folder(library, payload, progress)
    if kind == targeted.KIND:  # folders named by a hook or the watcher (``workers.library.enqueue``)
        return targeted.process(library, payload, progress)
    raise PermanentError(f"unknown scan job kind {kind!r}")


def process_folder(library: Library, payload: dict, progress) -> dict:
    """One folder job: its folders, and the small subtrees below them while its time budget lasts.

    A folder's subfolders are scanned in the same job (depth first) when there
    are at most ``scan.FOLDERS_PER_JOB`` of them; more become jobs of up to that
    many folders each, so that N workers share them. A library of
    Artist/Album/track folders then takes a few dozen jobs, not one per
    ten-file album: a job's claim, commits and progress update cost more than
    stat-ing ten files, so rescans run several times faster. Once a job has
    run ``scan.INLINE_SECONDS`` (a first scan, where reading files takes the
    time), what it has not reached is shared out the same way. Every folder
    is counted in the progress row as before, scanned inline or not, and all a
    job found is written in one transaction.

    A job runs again when its worker died after that transaction committed
    (the rescuer cannot know): the transaction also writes the job's done
    marker, and a job whose marker is there does nothing (``SKIPPED``), so
    that no folder is counted twice and no scan finalizes early.
    """
    gen, full = payload["gen"], bool(payload.get("full"))
    if not scan.folder_job_is_due(library.id, gen, payload):
        return dict(SKIPPED)
    started = time.monotonic()
    root, model_version = scan.resolved_root(library), current_model_version()
    todo = [(paths.to_bytes(f), False) for f in reversed(scan.job_folders(payload))]
    scanned: list[tuple[folders.FolderResult, folders.FolderWrites]] = []
    fanned: list[list[bytes]] = []  # sibling folders to share out as jobs of several folders
    while todo:
        if scanned and time.monotonic() - started >= scan.INLINE_SECONDS:
            break
        folder, inside = todo.pop()
        result, writes = folders.read_folder(library, folder, gen, full, progress, root, model_version, inside)
        scanned.append((result, writes))
        if len(result.subfolders) <= scan.FOLDERS_PER_JOB:
            todo += [(sub, True) for sub in reversed(result.subfolders)]
        else:
            fanned.append(result.subfolders)
    total = folders.FolderResult()
    for result, _ in scanned:
        for k, v in result.counts().items():
            setattr(total, k, getattr(total, k) + v)
    errors = [result.error for result, _ in scanned if result.error]
    fields = {"errors": (scan.current_errors(library.id) + errors)[-20:]} if errors else {}
    inserts = [track_rows.prepare_insert(writes.create) for _, writes in scanned]
    # One transaction for all the job changed: tracks and tag jobs, the folders left as jobs, the progress row.
    with transaction.atomic():
        if not scan.claim_folder_job(library.id, gen, payload):  # a twin committed first
            return dict(SKIPPED)
        seen_ids, tag = [], []
        for (result, writes), prepared in zip(scanned, inserts):
            folder_seen, folder_tag = folders.write_folder(library, writes, gen, result, prepared)
            seen_ids += folder_seen
            tag += folder_tag
            total.missing += result.missing
        folders.finish_writes(library, seen_ids, tag, gen)
        for siblings in fanned:
            scan.queue_folders(library, siblings, gen, full, per_job=scan.fan_out(siblings))
        if todo:  # not reached in time
            left = [folder for folder, _ in reversed(todo)]
            scan.queue_folders(library, left, gen, full, per_job=scan.fan_out(left))
        state = scan.set_progress(library.id, gen, add=total.counts(),
                              subfolders=sum(len(result.subfolders) for result, _ in scanned),
                              folder_done=len(scanned), **fields)
        if state and state["folders_done"] >= state["folders_total"] and state["state"] == "running":
            scan.set_progress(library.id, gen, state="finalizing")
            queue.enqueue("scan", f"finalize:{library.id}:{gen}", {"kind": "finalize", "gen": gen},
                          library_id=library.id, priority=scan.FINALIZE_PRIORITY)
    return {**total.counts(), "folders": len(scanned), "subfolders": len(todo) + sum(map(len, fanned)),
            **({"error": "; ".join(errors)} if errors else {})}
