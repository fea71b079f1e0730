"""One folder of a scan: list it, read its new and changed files, and write what it found in one go.

Reading (stat, mutagen) happens outside any transaction; what a folder found
is collected in ``FolderWrites`` and written in one short transaction by
``write_folder``/``finish_writes`` (``workers.library.track_rows`` builds the
bulk statements), since other scanner processes wait for that write lock.

Symlinks: the scanner walks the real tree and never follows a directory link
(so loops cannot hang it and no folder is scanned twice). A file link is
scanned when it resolves inside the library root; one that leads outside, or
nowhere, becomes a failed track and is never read.
"""
from __future__ import annotations

import errno
import logging
import os
import stat as statmod
from dataclasses import dataclass, field

from django.db import connection, transaction
from django.utils import timezone

from workers.audio.formats import format_for_path
from workers.features import FEATURES_VERSION
from workers.jobs import queue
from workers.jobs.runtime import PermanentError
from workers.library import fileinfo, moves, paths, track_rows
from workers.library.scan import progress_for, resolved_root
from workers.models import Job, Library, Track
from workers.tagfiles.tempfiles import TEMP_PREFIX_BYTES, remove_stale_temp_files
from workers.tagging.manifest import current_model_version

log = logging.getLogger(__name__)

TAG_PRIORITY = 100
TRACK = Track._meta.db_table
JOB = Job._meta.db_table
_UNSET = object()


@dataclass
class FolderResult:
    files_seen: int = 0
    files_read: int = 0
    new: int = 0
    changed: int = 0
    failed: int = 0
    missing: int = 0
    moved: int = 0  # new paths that are known tracks' files, moved or renamed (``workers.library.moves``)
    subfolders: list[bytes] = field(default_factory=list)
    error: str = ""

    def counts(self) -> dict:
        return {k: getattr(self, k)
                for k in ("files_seen", "files_read", "new", "changed", "failed", "missing", "moved")}


@dataclass
class KnownTrack:
    """A track the database already has: as much of it as a rescan needs (no model instance, no tags)."""

    id: int
    size: int | None
    mtime_ns: int | None
    state: str
    model_version: str
    has_tag_job: bool = False  # an active tag job exists (queued or running)
    device: int | None = None
    inode: int | None = None
    features_version: str = ""


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
    moved: list = field(default_factory=list)  # ``moves.Move``: new paths that are known tracks, moved
    identity: list = field(default_factory=list)  # (track id, device, inode) of unchanged files with a new identity
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
    folder_text = paths.to_text(folder)
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
        if entry.name.startswith(TEMP_PREFIX_BYTES):
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
                    f"AND j.state IN ('queued', 'running')), t.device, t.inode, t.features_version "
                    f"FROM {TRACK} t WHERE t.folder = %s", [folder_text])
        rows = cur.fetchall()
    known = writes.known = {path: KnownTrack(track_id, size, mtime_ns, state, model_version, bool(has_job),
                                             device, inode, features_version)
                            for track_id, lib_id, path, size, mtime_ns, state, model_version, has_job, device, inode,
                            features_version in rows if lib_id == library.id}
    if model_version is _UNSET:
        model_version = current_model_version()
    for i, (entry, kind) in enumerate(files):
        text = paths.to_text(entry.path)
        writes.seen.append(text)
        track = _scan_file(library, entry.path, text, kind, known.get(text), folder_text, gen, full, result, writes)
        if track is not None and _needs_tagging(track, model_version) and not getattr(track, "has_tag_job", False):
            writes.tag.append(track)
        if progress and i % 50 == 0:
            progress(i / max(1, len(files)), folder_text)
    if writes.create:
        _find_moves(writes, result, model_version)
    result.files_seen = len(writes.seen)
    return result, writes


def _find_moves(writes: FolderWrites, result: FolderResult, model_version) -> None:
    """Take the new paths that are known tracks' files (``moves.find``) out of the inserts: they are moves."""
    found = moves.find(writes.create)
    if not found:
        return
    taken = {id(move.new) for move in found}
    writes.create = [t for t in writes.create if id(t) not in taken]
    writes.tag = [t for t in writes.tag if id(t) not in taken]
    for move in found:
        move.needs_tag = _needs_tagging(move, model_version) and not move.has_tag_job
    writes.moved = found
    result.new -= len(found)
    result.moved += len(found)


def write_folder(library: Library, writes: FolderWrites, gen: int, result: FolderResult,
                 prepared_insert: list | None = None) -> tuple[list[int], list]:
    """Store what ``read_folder`` found: new and changed tracks, missing marks (call inside a transaction).

    Returns the ids of the known tracks seen (to stamp with the generation)
    and the tracks that need a tag job, for ``finish_writes``, which takes
    many folders' worth at once.
    """
    if writes.unlisted:
        Track.objects.filter(library=library, folder__startswith=writes.folder_text, scan_gen__lt=gen).update(
            scan_gen=gen)
        return [], []
    lost = [move.new for move in moves.write(writes.moved, library.id, gen)]  # inserted as new tracks instead
    track_rows.insert_tracks(writes.create, prepared_insert)
    track_rows.insert_tracks(lost)
    result.new, result.moved = result.new + len(lost), result.moved - len(lost)
    for track_id, fields in writes.update:
        track_rows.update_track(track_id, fields)
    track_rows.set_identity(writes.identity)
    seen = set(writes.seen)
    result.missing = track_rows.mark_missing([t.id for p, t in writes.known.items() if p not in seen], gen,
                                             library.id)
    lost_ids = {id(t) for t in lost}
    tag = writes.tag + lost + [m for m in writes.moved if m.needs_tag and id(m.new) not in lost_ids]
    return [t.id for p, t in writes.known.items() if p in seen], tag


def finish_writes(library: Library, seen_ids: list[int], tag: list, gen: int) -> None:
    """Stamp the known tracks seen with the generation and queue the tag jobs (inside the same transaction)."""
    track_rows.stamp_seen(seen_ids, gen)
    queue.enqueue_many("tag", [queue.NewJob(key=f"tag:{t.id}", track_id=t.id, library_id=library.id,
                                            priority=TAG_PRIORITY) for t in tag])


def _remove_dead_clones(folder: bytes) -> None:
    """Delete the clones left in ``folder`` by tag writers that died mid-write (a SIGKILL, a power cut)."""
    removed = remove_stale_temp_files(folder)
    if removed:
        log.info("removed %d temporary file(s) left by dead tag writers in %s", removed, paths.to_text(folder))


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

    ``track`` may have been read long before (by a tagger), while a scan
    moved on: only the fields the re-read set are written, and its
    generation goes up to the latest scan's (the file was just seen), never
    down. A whole-row save wrote back the old generation, and the running
    scan's finalize then marked the file missing.
    """
    path = paths.to_bytes(track.path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:  # unless a scan found it moved meanwhile (``workers.library.moves``)
        Track.objects.filter(id=track.id, path=track.path).update(state=Track.State.MISSING,
                                                                  updated_at=timezone.now())
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
    gen = max(track.scan_gen, scan_gen_of(track.library_id))
    scanned = _scan_file(track.library, path, track.path, kind, track, track.folder, gen, True,
                         FolderResult(), writes)
    for track_id, fields in writes.update:  # a failure too is recorded as a folder scan records it
        track_rows.update_track(track_id, fields)
    if scanned is None:
        return None
    track.scan_gen = Track.objects.filter(id=track.id).values_list("scan_gen", flat=True).first() or gen
    return track  # with the fresh fields _scan_file set on it


def scan_gen_of(library_id: int) -> int:
    """The latest scan's generation: a file seen now has been seen by it (or will be, if it is running)."""
    return progress_for(library_id).get("gen", 0)


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
        ident = fileinfo.identity(st)
        if (track.device, track.inode) != (ident["device"], ident["inode"]):  # stored before Earmark kept it
            writes.identity.append((track.id, ident["device"], ident["inode"]))
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
        state=Track.State.SCANNED, error="", scan_gen=gen, scanned_at=now, **fileinfo.identity(st),
    )
    if track is None:
        result.new += 1
        track = NewTrack({"library_id": library.id, "path": text, **fields})
        writes.create.append(track)
        return track
    if not unchanged:
        result.changed += 1
        fields.update(model_version="", calibration_version="", audio_fingerprint="")  # the audio may differ
    elif track.state == Track.State.TAGGED:
        fields["state"] = Track.State.TAGGED  # a full scan re-reads the file; its tags are still good
    for k, v in fields.items():
        setattr(track, k, v)
    writes.update.append((track.id, {**fields, "updated_at": now}))  # what ``track.save()`` would write
    return track


def _record_failure(library, track, text, folder_text, gen, st, error, result, writes: FolderWrites) -> None:
    result.failed += 1
    fields = dict(folder=folder_text, state=Track.State.FAILED, error=error, scan_gen=gen, scanned_at=timezone.now(),
                  size=st.st_size if st else None, mtime_ns=st.st_mtime_ns if st else None,
                  **(fileinfo.identity(st) if st else {"device": None, "inode": None}))
    if track is None:
        writes.create.append(NewTrack({"library_id": library.id, "path": text, **fields}))
    else:
        writes.update.append((track.id, fields))
    return None


def _needs_tagging(track: Track, model_version: str | None) -> bool:
    """Scanned tracks need tags; tagged ones only when the models or the tempo, key and loudness methods changed
    (``workers.features.FEATURES_VERSION``: a track tagged before it has none, and gets them once)."""
    if track.state == Track.State.SCANNED:
        return True
    return track.state == Track.State.TAGGED and model_version is not None and (
        track.model_version != model_version or track.features_version != FEATURES_VERSION)
