"""Library scans: one library job fans out into per-folder jobs that N scanners share.

A scan has a generation number. Each folder job lists one directory, reads new
and changed audio files with mutagen, queues subfolders as jobs of their own,
stamps every file it saw with the generation and marks the folder's vanished
files missing. The last folder job to finish queues a finalize job, which marks
missing whatever lies in folders that no longer exist. A root that is gone or
empty while the database knows tracks under it (an unmounted NAS) fails the
scan and marks nothing.

Symlinks: the scanner walks the real tree and never follows a directory link
(so loops cannot hang it and no folder is scanned twice). A file link is
scanned when it resolves inside the library root; one that leads outside, or
nowhere, becomes a failed track and is never read.
"""
from __future__ import annotations

import hashlib
import logging
import os
import stat as statmod
from dataclasses import dataclass, field

from django.db import transaction
from django.utils import timezone

from . import fileinfo, paths, queue
from .audio.formats import format_for_path
from .models import Job, Library, Meta, Track
from .runtime import PermanentError
from .tagging.manifest import current_model_version

log = logging.getLogger(__name__)

TAG_PRIORITY = 100


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
        _queue_folders(library, [root], gen, full)
    return state


def _queue_folders(library: Library, folders: list[bytes], gen: int, full: bool) -> None:
    jobs = []
    for folder in folders:
        text = paths.to_text(folder)
        jobs.append(queue.NewJob(key=folder_key(library.id, text), library_id=library.id, priority=40,
                                 payload={"kind": "folder", "folder": text, "gen": gen, "full": full}))
    queue.enqueue_many("scan", jobs)


def finalize(library: Library, gen: int) -> dict:
    """Mark missing the tracks this scan never saw, unless the root has vanished meanwhile."""
    try:
        check_root(library)
    except ScanError as exc:
        _set_progress(library.id, gen, state="failed", error=str(exc))
        Library.objects.filter(id=library.id).update(last_scan_error=str(exc))
        raise PermanentError(str(exc)) from None
    missing = Track.objects.filter(library=library, scan_gen__lt=gen).exclude(state=Track.State.MISSING).update(
        state=Track.State.MISSING, error="", updated_at=timezone.now())
    Library.objects.filter(id=library.id).update(last_scan_at=timezone.now(), last_scan_error="")
    return _set_progress(library.id, gen, state="done", add={"missing": missing},
                         finished_at=timezone.now().isoformat())


def _set_progress(library_id: int, gen: int, add: dict | None = None, subfolders: int = 0,
                  folder_done: bool = False, **fields) -> dict:
    """Update the scan's progress row atomically; returns it (``{}`` if another scan replaced it)."""
    with transaction.atomic():
        row = Meta.objects.select_for_update().filter(key=progress_key(library_id)).first()
        if row is None or row.value.get("gen") != gen:
            return {}
        value = dict(row.value)
        for k, v in (add or {}).items():
            value[k] = value.get(k, 0) + v
        value["folders_total"] += subfolders
        value["folders_done"] += 1 if folder_done else 0
        value.update(fields)
        row.value, row.updated_at = value, timezone.now()
        row.save(update_fields=["value", "updated_at"])
        return value


# --- one folder ----------------------------------------------------------------


@dataclass
class FolderResult:
    files_seen: int = 0
    files_read: int = 0
    new: int = 0
    changed: int = 0
    failed: int = 0
    missing: int = 0
    subfolders: list[bytes] = field(default_factory=list)
    error: str = ""

    def counts(self) -> dict:
        return {k: getattr(self, k) for k in ("files_seen", "files_read", "new", "changed", "failed", "missing")}


def scan_folder(library: Library, folder: bytes, gen: int, full: bool, progress=None) -> FolderResult:
    """Scan one directory (not its subdirectories, which become jobs of their own)."""
    root = resolved_root(library)
    if not paths.is_within(os.path.realpath(folder), root):
        raise PermanentError(f"{paths.to_text(folder)} is outside the library root {library.root}")
    result = FolderResult()
    folder_text = paths.to_text(folder)
    try:
        entries = list(os.scandir(folder))
    except OSError as exc:
        # Keep what we knew under an unreadable folder: it is not proven gone.
        result.error = f"cannot list {folder_text}: {exc.strerror}"
        Track.objects.filter(library=library, folder__startswith=folder_text).update(scan_gen=gen)
        return result
    files = []
    for entry in entries:
        kind = _classify(entry, root)
        if kind == "dir":
            result.subfolders.append(entry.path)
        elif kind is not None:
            files.append((entry, kind))
    known = {t.path: t for t in Track.objects.filter(library=library, folder=folder_text)}
    seen: list[str] = []
    tag_jobs: list[queue.NewJob] = []
    model_version = current_model_version()
    for i, (entry, kind) in enumerate(files):
        text = paths.to_text(entry.path)
        seen.append(text)
        track = _scan_file(library, entry.path, kind, known.get(text), folder_text, gen, full, result)
        if track is not None and _needs_tagging(track, model_version):
            tag_jobs.append(queue.NewJob(key=f"tag:{track.id}", track_id=track.id, library_id=library.id,
                                         priority=TAG_PRIORITY))
        if progress and i % 50 == 0:
            progress(i / max(1, len(files)), folder_text)
    result.files_seen = len(seen)
    _stamp_seen(library, seen, gen)
    result.missing = Track.objects.filter(library=library, folder=folder_text, scan_gen__lt=gen).exclude(
        state=Track.State.MISSING).update(state=Track.State.MISSING, updated_at=timezone.now())
    queue.enqueue_many("tag", tag_jobs)
    return result


def _stamp_seen(library: Library, seen: list[str], gen: int) -> None:
    """Mark the files this scan saw (in chunks: SQLite bounds the number of parameters)."""
    for start in range(0, len(seen), 900):
        Track.objects.filter(library=library, path__in=seen[start : start + 900]).update(scan_gen=gen)


def _classify(entry: os.DirEntry, root: bytes) -> str | None:
    """``"dir"``, ``"file"``, ``"link-outside"``, ``"link-broken"``, or None to ignore.

    Directory symlinks are never followed (loops, double scans); file symlinks
    count only when they resolve inside the library root.
    """
    try:
        if entry.is_dir(follow_symlinks=False):
            return "dir"
        if not format_for_path(entry.name):
            return None
        if entry.is_file(follow_symlinks=False):
            return "file"
        if not entry.is_symlink():
            return None  # sockets, FIFOs, devices: never audio
    except OSError:
        return None
    return _classify_link(entry.path, root)


def _classify_link(path: bytes, root: bytes) -> str | None:
    target = os.path.realpath(path)
    if not paths.is_within(target, root):
        return "link-outside"
    if not os.path.exists(target):
        return "link-broken"
    return "file" if os.path.isfile(target) else None


def rescan_track(track: Track) -> Track | None:
    """Re-read one known file now (a tagger found it changed); returns it when it is scannable.

    Marks the track missing when the file is gone; a file that became bad
    becomes a failed track, as in a folder scan.
    """
    path = paths.to_bytes(track.path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        Track.objects.filter(id=track.id).update(state=Track.State.MISSING, updated_at=timezone.now())
        return None
    except OSError:
        mode = 0
    kind = None
    if statmod.S_ISREG(mode):
        kind = "file"
    elif statmod.S_ISLNK(mode):
        kind = _classify_link(path, resolved_root(track.library))
    if kind is None:
        Track.objects.filter(id=track.id).update(state=Track.State.FAILED, error="no longer a regular audio file")
        return None
    return _scan_file(track.library, path, kind, track, track.folder, track.scan_gen, True, FolderResult())


def _scan_file(library, path: bytes, kind, track, folder_text, gen, full, result) -> Track | None:
    """Create or refresh one track; returns it when it is (newly) scanned, else None."""
    text = paths.to_text(path)
    if kind == "link-outside":
        return _record_failure(library, track, text, folder_text, gen, None,
                               "symlink leads outside the library root; not followed", result)
    if kind == "link-broken":
        return _record_failure(library, track, text, folder_text, gen, None, "broken symlink: its target does not exist", result)
    try:
        st = os.stat(path)
    except OSError:
        return _record_failure(library, track, text, folder_text, gen, None,
                               "the file vanished while it was being scanned", result)
    unchanged = track is not None and track.size == st.st_size and track.mtime_ns == st.st_mtime_ns
    if unchanged and not full and track.state != Track.State.MISSING:
        return track if track.state in (Track.State.SCANNED, Track.State.TAGGED) else None
    result.files_read += 1
    try:
        info = fileinfo.read(path)
    except fileinfo.BadFile as exc:
        return _record_failure(library, track, text, folder_text, gen, st, str(exc), result)
    fields = dict(
        folder=folder_text, size=st.st_size, mtime_ns=st.st_mtime_ns, format=info.format, codec=info.codec,
        duration=info.duration, sample_rate=info.sample_rate, channels=info.channels, bitrate=info.bitrate,
        artist=info.tag("artist"), album=info.tag("album"), title=info.tag("title"), tags=info.tags,
        state=Track.State.SCANNED, error="", scan_gen=gen, scanned_at=timezone.now(),
    )
    if track is None:
        result.new += 1
        return Track.objects.create(library=library, path=text, **fields)
    if not unchanged:
        result.changed += 1
        fields.update(model_version="", calibration_version="")
    for k, v in fields.items():
        setattr(track, k, v)
    track.save()
    return track


def _record_failure(library, track, text, folder_text, gen, st, error, result) -> None:
    result.failed += 1
    fields = dict(folder=folder_text, state=Track.State.FAILED, error=error, scan_gen=gen, scanned_at=timezone.now(),
                  size=st.st_size if st else None, mtime_ns=st.st_mtime_ns if st else None)
    if track is None:
        Track.objects.create(library=library, path=text, **fields)
    else:
        Track.objects.filter(id=track.id).update(**fields)
    return None


def _needs_tagging(track: Track, model_version: str | None) -> bool:
    """Scanned tracks need tags; tagged ones only when the models changed."""
    if track.state == Track.State.SCANNED:
        return True
    return track.state == Track.State.TAGGED and model_version is not None and track.model_version != model_version


# --- the worker --------------------------------------------------------------


def process_job(payload: dict, library_id: int, progress=None) -> dict:
    """Run one scan job of any kind; returns its result for the job row."""
    library = Library.objects.filter(id=library_id).first()
    if library is None:
        raise PermanentError("the library no longer exists")
    kind = payload.get("kind")
    if kind == "library":
        try:
            state = start(library, bool(payload.get("full")))
        except ScanError as exc:
            Library.objects.filter(id=library.id).update(last_scan_error=str(exc))
            raise PermanentError(str(exc)) from None
        return {"gen": state["gen"]}
    if kind == "finalize":
        return finalize(library, payload["gen"])
    if kind == "folder":
        return _process_folder(library, payload, progress)
    raise PermanentError(f"unknown scan job kind {kind!r}")


def _process_folder(library: Library, payload: dict, progress) -> dict:
    gen, full = payload["gen"], bool(payload.get("full"))
    result = scan_folder(library, paths.to_bytes(payload["folder"]), gen, full, progress)
    fields = {}
    if result.error:
        fields["errors"] = (_current_errors(library.id) + [result.error])[-20:]
    with transaction.atomic():
        _queue_folders(library, result.subfolders, gen, full)
        state = _set_progress(library.id, gen, add=result.counts(), subfolders=len(result.subfolders),
                              folder_done=True, **fields)
        if state and state["folders_done"] >= state["folders_total"] and state["state"] == "running":
            _set_progress(library.id, gen, state="finalizing")
            queue.enqueue("scan", f"finalize:{library.id}:{gen}", {"kind": "finalize", "gen": gen},
                          library_id=library.id, priority=30)
    return {**result.counts(), "subfolders": len(result.subfolders), **({"error": result.error} if result.error else {})}


def _current_errors(library_id: int) -> list:
    row = Meta.objects.filter(key=progress_key(library_id)).first()
    return list(row.value.get("errors", [])) if row else []


def progress(library: Library) -> dict:
    """The latest scan's progress row (empty when the library was never scanned)."""
    row = Meta.objects.filter(key=progress_key(library.id)).first()
    return dict(row.value) if row else {}


def is_scanning(library: Library) -> bool:
    return progress(library).get("state") in ("running", "finalizing") or Job.objects.filter(
        queue="scan", library=library, state__in=Job.ACTIVE_STATES).exists()
