"""Library scans: one library job fans out into per-folder jobs that N scanners share.

A scan has a generation number. Each folder job lists one directory, reads new
and changed audio files with mutagen, stamps every file it saw with the
generation and marks the folder's vanished files missing; it goes on into
small subtrees below it and queues the rest as jobs of their own, several
folders to a job (``_process_folder``), and writes all it found in one
transaction. The last folder job to finish queues a finalize job, which marks
missing whatever lies in folders that no longer exist. A root that is gone or
empty while the database knows tracks under it (an unmounted NAS) fails the
scan and marks nothing.

Symlinks: the scanner walks the real tree and never follows a directory link
(so loops cannot hang it and no folder is scanned twice). A file link is
scanned when it resolves inside the library root; one that leads outside, or
nowhere, becomes a failed track and is never read.
"""
from __future__ import annotations

import errno
import functools
import hashlib
import json
import logging
import os
import stat as statmod
import time
from dataclasses import dataclass, field

from django.db import connection, transaction
from django.utils import timezone

from workers.jobs import dialect, queue
from workers.library import fileinfo, paths
from workers.audio.formats import format_for_path
from workers.models import Job, Library, Meta, Track
from workers.jobs.runtime import PermanentError
from workers.tagging.manifest import current_model_version

log = logging.getLogger(__name__)

TAG_PRIORITY = 100
META = Meta._meta.db_table
TRACK = Track._meta.db_table
JOB = Job._meta.db_table
_UNSET, _NOW, _PER_ROW = object(), object(), object()  # markers
# How scan work is cut into jobs (see ``_process_folder``): a job goes on into a
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
        _queue_folders(library, [root], gen, full)
    return state


def _queue_folders(library: Library, folders: list[bytes], gen: int, full: bool, per_job: int = 1) -> None:
    """Queue folder jobs of up to ``per_job`` folders each (a job of several lists them all in ``folders``)."""
    jobs = []
    for start in range(0, len(folders), per_job):
        texts = [paths.to_text(f) for f in folders[start : start + per_job]]
        payload = {"kind": "folder", "folder": texts[0], "gen": gen, "full": full}
        if len(texts) > 1:
            payload["folders"] = texts
        jobs.append(queue.NewJob(key=folder_key(library.id, "\0".join(texts)), library_id=library.id, priority=40,
                                 payload=payload))
    queue.enqueue_many("scan", jobs)


def _fan_out(folders: list[bytes]) -> int:
    """Folders per job for many sibling folders: at most FOLDERS_PER_JOB, in at least MIN_FAN_OUT jobs."""
    jobs = max(MIN_FAN_OUT, -(-len(folders) // FOLDERS_PER_JOB))
    return max(1, -(-len(folders) // jobs))


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


@dataclass
class KnownTrack:
    """A track the database already has: as much of it as a rescan needs (no model instance, no tags)."""

    id: int
    size: int | None
    mtime_ns: int | None
    state: str
    model_version: str
    has_tag_job: bool = False  # an active tag job exists (queued or running)


@dataclass
class NewTrack:
    """A track to insert: its column values by attribute name; ``id`` is set once it is written."""

    row: dict
    id: int | None = None
    model_version: str = ""

    @property
    def state(self) -> str:
        return self.row["state"]


@dataclass
class FolderWrites:
    """A folder's changes, collected while its files are read and then written in one transaction.

    Reading (mutagen) happens outside any transaction; writing a whole folder
    at once costs one commit instead of one per file.
    """

    folder_text: str
    known: dict[str, KnownTrack] = field(default_factory=dict)  # path -> the track the database had
    seen: list[str] = field(default_factory=list)
    create: list[NewTrack] = field(default_factory=list)
    update: list[tuple[int, dict]] = field(default_factory=list)  # (track id, fields)
    tag: list = field(default_factory=list)  # tracks that need a tag job (created ones get ids on write)
    unlisted: bool = False  # the folder could not be listed: keep everything known under it


def scan_folder(library: Library, folder: bytes, gen: int, full: bool, progress=None) -> FolderResult:
    """Scan one directory (not its subdirectories, which become jobs of their own)."""
    result, writes = read_folder(library, folder, gen, full, progress)
    with transaction.atomic():
        finish_writes(library, *write_folder(library, writes, gen, result), gen)
    return result


def read_folder(library: Library, folder: bytes, gen: int, full: bool, progress=None, root: bytes | None = None,
                model_version=_UNSET, inside: bool = False) -> tuple[FolderResult, FolderWrites]:
    """List one directory and read its new and changed files; the database is only read.

    ``root`` and ``model_version`` may be passed in by a caller scanning many
    folders at once; ``inside`` says the folder is known to lie inside the
    root (a real subdirectory just listed), so its path is not resolved again.
    """
    root = root or resolved_root(library)
    if not inside and not paths.is_within(os.path.realpath(folder), root):
        raise PermanentError(f"{paths.to_text(folder)} is outside the library root {library.root}")
    result = FolderResult()
    folder_text = _text(folder)
    writes = FolderWrites(folder_text)
    try:
        entries = list(os.scandir(folder))
    except OSError as exc:
        # Keep what we knew under an unreadable folder: it is not proven gone.
        result.error = f"cannot list {folder_text}: {exc.strerror}"
        writes.unlisted = True
        return result, writes
    if not entries and folder == root and \
            Track.objects.filter(library=library).exclude(state=Track.State.MISSING).exists():
        # ``check_root``'s rule again: the drive may have gone away after the scan began.
        result.error = f"library root {library.root} is empty; is the drive mounted? Nothing was marked missing."
        writes.unlisted = True
        return result, writes
    files, clones = [], False
    for entry in entries:
        if entry.name.startswith(WRITER_CLONE_PREFIX):
            clones = True  # the tag writer's temporary copy: never a track
            continue
        kind = _classify(entry, root)
        if kind == "dir":
            result.subfolders.append(entry.path)
        elif kind is not None:
            files.append((entry, kind))
    if clones:
        _remove_dead_clones(folder)
    # By folder alone, then the library in Python: SQLite without statistics
    # would take the (library, state) index for both and read the whole library
    # for every folder. Tracks are then written by id (the primary key).
    # With each track: whether it already has an active tag job, so that a
    # rescan writes no tag job that the unique index would turn away anyway.
    with connection.cursor() as cur:  # raw: once per folder, and the ORM's query building cost more than the query
        cur.execute(f"SELECT t.id, t.library_id, t.path, t.size, t.mtime_ns, t.state, t.model_version, "
                    f"EXISTS (SELECT 1 FROM {JOB} j WHERE j.queue = 'tag' AND j.key = 'tag:' || t.id "
                    f"AND j.state IN ('queued', 'running')) FROM {TRACK} t WHERE t.folder = %s", [folder_text])
        rows = cur.fetchall()
    known = writes.known = {path: KnownTrack(track_id, size, mtime_ns, state, model_version, bool(has_job))
                            for track_id, lib_id, path, size, mtime_ns, state, model_version, has_job in rows
                            if lib_id == library.id}
    if model_version is _UNSET:
        model_version = current_model_version()
    for i, (entry, kind) in enumerate(files):
        text = _text(entry.path)
        writes.seen.append(text)
        track = _scan_file(library, entry.path, text, kind, known.get(text), folder_text, gen, full, result, writes)
        if track is not None and _needs_tagging(track, model_version) and not getattr(track, "has_tag_job", False):
            writes.tag.append(track)
        if progress and i % 50 == 0:
            progress(i / max(1, len(files)), folder_text)
    result.files_seen = len(writes.seen)
    return result, writes


def write_folder(library: Library, writes: FolderWrites, gen: int, result: FolderResult,
                 prepared_insert: list | None = None) -> tuple[list[int], list]:
    """Store what ``read_folder`` found: new and changed tracks, missing marks (call inside a transaction).

    Returns the ids of the known tracks seen (to stamp with the generation)
    and the tracks that need a tag job, for ``finish_writes``, which takes
    many folders' worth at once.
    """
    if writes.unlisted:
        Track.objects.filter(library=library, folder__startswith=writes.folder_text).update(scan_gen=gen)
        return [], []
    _insert_tracks(writes.create, prepared_insert)
    for track_id, fields in writes.update:
        Track.objects.filter(id=track_id).update(**fields)
    seen = set(writes.seen)
    result.missing = _mark_missing([t.id for p, t in writes.known.items() if p not in seen], gen)
    return [t.id for p, t in writes.known.items() if p in seen], writes.tag


def finish_writes(library: Library, seen_ids: list[int], tag: list, gen: int) -> None:
    """Stamp the known tracks seen with the generation and queue the tag jobs (inside the same transaction)."""
    _stamp_seen(seen_ids, gen)
    queue.enqueue_many("tag", [queue.NewJob(key=f"tag:{t.id}", track_id=t.id, library_id=library.id,
                                            priority=TAG_PRIORITY) for t in tag])


def _text(path: bytes) -> str:
    """``paths.to_text``, with a fast way for the usual name: valid UTF-8 without a backslash (same result)."""
    try:
        text = path.decode("utf-8")
    except UnicodeDecodeError:
        return paths.to_text(path)
    return paths.to_text(path) if "\\" in text else text


# Values of these Python types go to the database as they are for these fields (Django's
# conversion would return them unchanged); anything else takes ``get_db_prep_save``.
_PLAIN = {"CharField": str, "TextField": str, "IntegerField": int, "BigIntegerField": int, "FloatField": float,
          "ForeignKey": int}


@functools.lru_cache(maxsize=None)
def _insert_plan(vendor: str) -> tuple:
    """The parts of ``_insert_tracks``'s statement that never change: fields, SQL, converted defaults."""
    fields = [f for f in Track._meta.concrete_fields if not f.primary_key]
    columns = ", ".join(connection.ops.quote_name(f.column) for f in fields)
    placeholders = "(" + ", ".join(["%s"] * len(fields)) + ")"
    plain = [_PLAIN.get(f.get_internal_type()) for f in fields]
    static = [_NOW if getattr(f, "auto_now", False) or getattr(f, "auto_now_add", False)
              else _PER_ROW if callable(f.default)  # e.g. a fresh dict, or a uuid per row
              else f.get_db_prep_save(f.get_default(), connection) for f in fields]
    return fields, columns, placeholders, plain, static


def prepare_insert(new: list[NewTrack]) -> list[tuple[str, list, list[NewTrack]]]:
    """The INSERT statements for new tracks, built before the transaction that runs them.

    What ``bulk_create`` does, without most of its per-value cost: every
    concrete field of ``Track`` is written, with the value the scanner set,
    else the field's default (``auto_now`` fields: now), each converted for the
    database as Django converts it. Building them outside the transaction keeps
    the write lock short, which other scanner processes are waiting for.
    """
    if not new or not connection.features.can_return_rows_from_bulk_insert:
        return []
    fields, columns, placeholders, plain, static = _insert_plan(connection.vendor)
    now = timezone.now()
    defaults = [f.get_db_prep_save(now, connection) if value is _NOW else value for f, value in zip(fields, static)]
    per_statement = max(1, (connection.features.max_query_params or 30_000) // len(fields))
    statements = []
    for start in range(0, len(new), per_statement):
        chunk = new[start : start + per_statement]
        params = []
        for t in chunk:
            row = t.row
            for f, default, kind in zip(fields, defaults, plain):
                value = row.get(f.attname, _UNSET)
                if value is _UNSET:
                    params.append(f.get_db_prep_save(f.get_default(), connection) if default is _PER_ROW else default)
                elif value is None or type(value) is kind:
                    params.append(value)
                else:
                    params.append(f.get_db_prep_save(value, connection))
        statements.append((f"INSERT INTO {TRACK} ({columns}) VALUES {', '.join([placeholders] * len(chunk))} "
                           "RETURNING id, path", params, chunk))
    return statements


def _insert_tracks(new: list[NewTrack], prepared: list | None = None) -> None:
    """Insert new tracks and set their ids (``prepared``: what ``prepare_insert`` built for them)."""
    if not new:
        return
    if not connection.features.can_return_rows_from_bulk_insert:  # (SQLite < 3.35) the tag jobs need the ids
        for t in new:
            t.id = Track.objects.create(**t.row).id
        return
    with connection.cursor() as cur:
        for sql, params, chunk in prepare_insert(new) if prepared is None else prepared:
            cur.execute(sql, params)
            ids = {path: track_id for track_id, path in cur.fetchall()}
            for t in chunk:
                t.id = ids[t.row["path"]]


def _stamp_seen(track_ids: list[int], gen: int) -> None:
    """Mark the known tracks this scan saw (in chunks: SQLite bounds the number of parameters)."""
    with connection.cursor() as cur:
        for start in range(0, len(track_ids), 900):
            chunk = track_ids[start : start + 900]
            cur.execute(f"UPDATE {TRACK} SET scan_gen = %s WHERE id IN ({', '.join(['%s'] * len(chunk))})",
                        [gen, *chunk])


def _mark_missing(track_ids: list[int], gen: int) -> int:
    """Known tracks of a folder that this scan did not see (and nothing stamped since) are missing."""
    missing = 0  # rare (files removed): the ORM is fine here
    for start in range(0, len(track_ids), 900):
        missing += Track.objects.filter(id__in=track_ids[start : start + 900], scan_gen__lt=gen).exclude(
            state=Track.State.MISSING).update(state=Track.State.MISSING, updated_at=timezone.now())
    return missing


# ``workers.tagfiles.safewrite.TEMP_PREFIX`` as bytes (not imported from there: safewrite loads PyAV,
# which a scanner needs only when it meets a clone).
WRITER_CLONE_PREFIX = b".earmark-tmp-"


def _remove_dead_clones(folder: bytes) -> None:
    """Delete the clones left in ``folder`` by tag writers that died mid-write (a SIGKILL, a power cut)."""
    from workers.tagfiles.safewrite import remove_stale_temp_files

    removed = remove_stale_temp_files(folder)
    if removed:
        log.info("removed %d temporary file(s) left by dead tag writers in %s", removed, _text(folder))


def _classify(entry: os.DirEntry, root: bytes) -> str | None:
    """``"dir"``, ``"file"``, ``"link-outside"``, ``"link-broken"``, ``"link-loop"``, or None to ignore.

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
    try:
        os.path.realpath(path, strict=True)
    except OSError as exc:
        return "link-loop" if exc.errno == errno.ELOOP else "link-broken"
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
    writes = FolderWrites(track.folder)
    scanned = _scan_file(track.library, path, track.path, kind, track, track.folder, track.scan_gen, True,
                         FolderResult(), writes)
    if scanned is None:  # it failed: recorded as a folder scan records it
        for track_id, fields in writes.update:
            Track.objects.filter(id=track_id).update(**fields)
        return None
    track.save()  # _scan_file set the fresh fields on it
    return track


def _scan_file(library, path: bytes, text: str, kind, track, folder_text, gen, full, result, writes: FolderWrites):
    """Read one new or changed file into ``writes``; returns its track when it is (newly) scanned, else None.

    ``track`` is what the database has (a ``KnownTrack``, or a ``Track``), or None for a new file.
    """
    if kind == "link-outside":
        return _record_failure(library, track, text, folder_text, gen, None,
                               "symlink leads outside the library root; not followed", result, writes)
    if kind in ("link-broken", "link-loop"):
        reason = ("broken symlink: its target does not exist" if kind == "link-broken" else
                  "symlink loop: the link leads back to itself; not followed")
        return _record_failure(library, track, text, folder_text, gen, None, reason, result, writes)
    try:
        st = os.stat(path)
    except OSError:
        return _record_failure(library, track, text, folder_text, gen, None,
                               "the file vanished while it was being scanned", result, writes)
    unchanged = track is not None and track.size == st.st_size and track.mtime_ns == st.st_mtime_ns
    if unchanged and not full and track.state != Track.State.MISSING:
        return track if track.state in (Track.State.SCANNED, Track.State.TAGGED) else None
    result.files_read += 1
    try:
        info = fileinfo.read(path)
    except fileinfo.BadFile as exc:
        return _record_failure(library, track, text, folder_text, gen, st, str(exc), result, writes)
    now = timezone.now()
    fields = dict(
        folder=folder_text, size=st.st_size, mtime_ns=st.st_mtime_ns, format=info.format, codec=info.codec,
        duration=info.duration, sample_rate=info.sample_rate, channels=info.channels, bitrate=info.bitrate,
        artist=info.tag("artist"), album=info.tag("album"), title=info.tag("title"), tags=info.tags,
        state=Track.State.SCANNED, error="", scan_gen=gen, scanned_at=now,
    )
    if track is None:
        result.new += 1
        track = NewTrack({"library_id": library.id, "path": text, **fields})
        writes.create.append(track)
        return track
    if not unchanged:
        result.changed += 1
        fields.update(model_version="", calibration_version="")
    elif track.state == Track.State.TAGGED:
        fields["state"] = Track.State.TAGGED  # a full scan re-reads the file; its tags are still good
    for k, v in fields.items():
        setattr(track, k, v)
    writes.update.append((track.id, {**fields, "updated_at": now}))  # what ``track.save()`` would write
    return track


def _record_failure(library, track, text, folder_text, gen, st, error, result, writes: FolderWrites) -> None:
    result.failed += 1
    fields = dict(folder=folder_text, state=Track.State.FAILED, error=error, scan_gen=gen, scanned_at=timezone.now(),
                  size=st.st_size if st else None, mtime_ns=st.st_mtime_ns if st else None)
    if track is None:
        writes.create.append(NewTrack({"library_id": library.id, "path": text, **fields}))
    else:
        writes.update.append((track.id, fields))
    return None


def _needs_tagging(track: Track, model_version: str | None) -> bool:
    """Scanned tracks need tags; tagged ones only when the models changed."""
    if track.state == Track.State.SCANNED:
        return True
    return track.state == Track.State.TAGGED and model_version is not None and track.model_version != model_version


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
        if _set_progress(int(library_id), row.value.get("gen"), state="failed", error=error):
            Library.objects.filter(id=int(library_id)).update(last_scan_error=error)
            log.warning("library %s: %s", library_id, error)
            stalled += 1
    return stalled


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
    """One folder job: its folders, and the small subtrees below them while its time budget lasts.

    A folder's subfolders are scanned in the same job (depth first) when there
    are at most ``FOLDERS_PER_JOB`` of them; more become jobs of up to that
    many folders each, so that N workers share them. A library of
    Artist/Album/track folders then takes a few dozen jobs, not one per
    ten-file album: a job's claim, commits and progress update cost more than
    stat-ing ten files, so rescans run several times faster. Once a job has
    run ``INLINE_SECONDS`` (a first scan, where reading files takes the
    time), what it has not reached is shared out the same way. Every folder
    is counted in the progress row as before, scanned inline or not, and all a
    job found is written in one transaction.
    """
    gen, full = payload["gen"], bool(payload.get("full"))
    started = time.monotonic()
    root, model_version = resolved_root(library), current_model_version()
    todo = [(paths.to_bytes(f), False) for f in reversed(payload.get("folders") or [payload["folder"]])]
    scanned: list[tuple[FolderResult, FolderWrites]] = []
    fanned: list[list[bytes]] = []  # sibling folders to share out as jobs of several folders
    while todo:
        if scanned and time.monotonic() - started >= INLINE_SECONDS:
            break
        folder, inside = todo.pop()
        result, writes = read_folder(library, folder, gen, full, progress, root, model_version, inside)
        scanned.append((result, writes))
        if len(result.subfolders) <= FOLDERS_PER_JOB:
            todo += [(sub, True) for sub in reversed(result.subfolders)]
        else:
            fanned.append(result.subfolders)
    total = FolderResult()
    for result, _ in scanned:
        for k, v in result.counts().items():
            setattr(total, k, getattr(total, k) + v)
    errors = [result.error for result, _ in scanned if result.error]
    fields = {"errors": (_current_errors(library.id) + errors)[-20:]} if errors else {}
    inserts = [prepare_insert(writes.create) for _, writes in scanned]
    # One transaction for all the job changed: tracks and tag jobs, the folders left as jobs, the progress row.
    with transaction.atomic():
        seen_ids, tag = [], []
        for (result, writes), prepared in zip(scanned, inserts):
            folder_seen, folder_tag = write_folder(library, writes, gen, result, prepared)
            seen_ids += folder_seen
            tag += folder_tag
            total.missing += result.missing
        finish_writes(library, seen_ids, tag, gen)
        for siblings in fanned:
            _queue_folders(library, siblings, gen, full, per_job=_fan_out(siblings))
        if todo:  # not reached in time
            left = [folder for folder, _ in reversed(todo)]
            _queue_folders(library, left, gen, full, per_job=_fan_out(left))
        state = _set_progress(library.id, gen, add=total.counts(),
                              subfolders=sum(len(result.subfolders) for result, _ in scanned),
                              folder_done=len(scanned), **fields)
        if state and state["folders_done"] >= state["folders_total"] and state["state"] == "running":
            _set_progress(library.id, gen, state="finalizing")
            queue.enqueue("scan", f"finalize:{library.id}:{gen}", {"kind": "finalize", "gen": gen},
                          library_id=library.id, priority=30)
    return {**total.counts(), "folders": len(scanned), "subfolders": len(todo) + sum(map(len, fanned)),
            **({"error": "; ".join(errors)} if errors else {})}


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
