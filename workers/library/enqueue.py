"""Queue work for given paths: the core of the hooks (``manage.py enqueue``, ``POST /api/enqueue``) and the watcher.

``enqueue_paths`` takes files and folders and checks each one: it exists, lies
inside a library (roots resolved, ``paths.is_within``: no ``..`` or symlink
gets out), is no symlink leading out of its library, is audio, can be read.
For the good ones it queues targeted folder jobs (``workers.library.targeted``):

* a file: a job for its folder, which reads the new or changed file (and the
  rest of the folder: it marks missing what is gone from it);
* a folder: a job for it and the folders below it.

One job per folder however many of its files are named (a burst of 10,000
paths in 200 folders queues at most 200 jobs), none for a file or folder that
a folder named in the same call covers, and none where an active job for the
same folder is still queued (the queue's dedup key). Every path gets an
``Outcome``; nothing is queued for a bad one.

A file that was deleted does not exist, so naming it is an error: name its
folder instead (the folder's job marks the file missing; a folder's job also
marks missing the tracks of known folders below it that are gone).
"""
from __future__ import annotations

import errno
import os
import stat as statmod
from dataclasses import dataclass, field

from workers.audio import diagnose
from workers.audio.formats import EXTENSIONS, format_for_path
from workers.library import fileinfo, paths, scan, targeted
from workers.models import Library, Track
from workers.tagfiles.tempfiles import TEMP_PREFIX_BYTES

DEFAULT_PRIORITY = 20  # before library scans' folder jobs (scan.FOLDER_PRIORITY) and their tag jobs


@dataclass
class Outcome:
    path: str  # as given (text; undecodable bytes escaped like workers.library.paths)
    ok: bool
    error: str = ""  # a clear sentence when not ok
    job_ids: list[int] = field(default_factory=list)
    track_ids: list[int] = field(default_factory=list)


@dataclass
class Target:
    """What a good path names: the folder to scan in its library, and the track's path for a file."""

    library: Library
    root: bytes  # the library's resolved root
    folder: bytes  # resolved, inside the root
    recursive: bool  # a folder: its subfolders too
    track_path: str | None = None  # a file: its track's path as stored (``paths.to_text``)

    @property
    def folder_text(self) -> str:
        return paths.to_text(self.folder)


def enqueue_paths(paths: list[str | bytes], libraries=None, priority: int = DEFAULT_PRIORITY,
                  reason: str = "") -> list[Outcome]:
    """files or folders; `libraries`, when given, is an iterable of Library the caller may touch (others → error 'outside the allowed libraries')."""
    return submit(paths, libraries, priority, reason)[0]


def submit(given: list[str | bytes], libraries=None, priority: int = DEFAULT_PRIORITY,
           reason: str = "") -> tuple[list[Outcome], list[Target | None]]:
    """``enqueue_paths``, with what each path named (None for a bad one), for callers that then wait on it."""
    checker = Checker(libraries)
    outcomes, targets = [], []
    for raw in given:
        raw = os.fsencode(raw)
        found = checker.check(raw)
        ok = isinstance(found, Target)
        outcomes.append(Outcome(paths.to_text(raw), ok, "" if ok else found))
        targets.append(found if ok else None)
    good = [t for t in targets if t is not None]
    jobs, covering = _plan(good, priority, reason)
    ids = targeted.enqueue_jobs(list(jobs.values())) if jobs else {}
    tracks = _known_tracks(good)
    for outcome, target in zip(outcomes, targets):
        if target is not None:
            job_id = ids.get(covering[id(target)])
            outcome.job_ids = [job_id] if job_id else []
            outcome.track_ids = tracks.get(target.track_path or target.folder_text, [])
    return outcomes, targets


def _plan(good: list[Target], priority: int, reason: str) -> tuple[dict, dict]:
    """The jobs to queue (by key) and, for each target, the key of the job that covers it.

    A target below a folder named recursively in the same call is covered by
    that folder's job; the files of one folder share one job.
    """
    trees = {(t.library.id, t.folder) for t in good if t.recursive}
    jobs, covering = {}, {}
    for t in good:
        cover = _covering_tree(t, trees)
        if cover is not None:
            key = targeted.job_key(t.library.id, [paths.to_text(cover)], True)
        else:
            folder_text = t.folder_text
            key = targeted.job_key(t.library.id, [folder_text], t.recursive)
            if key not in jobs:
                jobs[key] = targeted.new_job(t.library.id, [folder_text], t.recursive, priority, reason)
        covering[id(t)] = key
    return jobs, covering


def _covering_tree(t: Target, trees: set) -> bytes | None:
    """The folder named recursively in this call that holds ``t`` (not ``t`` itself when it is that folder)."""
    folder = t.folder if not t.recursive else os.path.dirname(t.folder)
    root = t.root.rstrip(b"/") or b"/"
    while True:
        if (t.library.id, folder) in trees and (folder != t.folder or not t.recursive):
            return folder
        if len(folder) <= len(root) or folder == b"/":
            return None
        folder = os.path.dirname(folder)


def _known_tracks(good: list[Target]) -> dict[str, list[int]]:
    """The tracks known now: a file's own, a folder's files' (not its subfolders'), by path or folder text."""
    files = sorted({t.track_path for t in good if t.track_path})
    dirs = sorted({t.folder_text for t in good if not t.track_path})
    found: dict[str, list[int]] = {}
    for start in range(0, len(files), 500):
        for track_id, path in Track.objects.filter(path__in=files[start : start + 500]).values_list("id", "path"):
            found[path] = [track_id]
    for start in range(0, len(dirs), 500):
        rows = Track.objects.filter(folder__in=dirs[start : start + 500]).exclude(state=Track.State.MISSING)
        for track_id, folder in rows.order_by("id").values_list("id", "folder"):
            found.setdefault(folder, []).append(track_id)
    return found


class Checker:
    """Checks paths against the libraries (loaded once, roots resolved once)."""

    def __init__(self, libraries=None):
        self.allowed = None if libraries is None else {lib.id for lib in libraries}
        # Deepest root first, so a library nested in another's tree owns its own files.
        self.roots = sorted(((lib, scan.resolved_root(lib)) for lib in Library.objects.all()),
                            key=lambda pair: len(pair[1]), reverse=True)
        self._dirs: dict[bytes, bytes] = {}  # a folder as given → resolved (a burst names few folders)

    def library_of(self, path: bytes) -> tuple[Library, bytes] | None:
        for lib, root in self.roots:
            if paths.is_within(path, root):
                return lib, root
        return None

    def check(self, raw: bytes) -> Target | str:
        """What ``raw`` names, or why it is refused (a sentence)."""
        if not raw.strip():
            return "the path is empty"
        if b"\0" in raw:
            return "the path contains a NUL byte, which no file name can"
        absolute = raw if raw.startswith(b"/") else os.path.join(os.getcwdb(), raw)
        head, tail = os.path.split(absolute.rstrip(b"/") or b"/")
        # Where the entry itself lies: its folder resolved, its own name not (so a symlink is seen as one).
        location = os.path.realpath(absolute) if tail in (b"", b".", b"..") else os.path.join(self._real(head), tail)
        try:
            st = os.lstat(location)
        except (FileNotFoundError, NotADirectoryError):
            return "the path does not exist"
        except OSError as exc:
            return f"the path is unreadable: {_strerror(exc)}"
        home, entry = self.library_of(location), location
        if statmod.S_ISLNK(st.st_mode):
            target = os.path.realpath(location)
            if home is None:  # a link from outside into a library: what it names is the file in there
                home, entry = self.library_of(target), target
            elif not paths.is_within(target, home[1]):
                return (f"the path is a symlink leading out of its library {home[0].name} "
                        f"(to {paths.to_text(target)}); it is not followed")
            try:
                st = os.stat(location)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    return "the path is a symlink loop: it leads back to itself"
                if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                    return "the path is a broken symlink: its target does not exist"
                return f"the path is unreadable: {_strerror(exc)}"
            if statmod.S_ISDIR(st.st_mode):
                entry = target  # the scanner never follows a folder link: the folder is scanned where it is
        if home is None:
            return "the path is outside every library"
        library, root = home
        if self.allowed is not None and library.id not in self.allowed:
            return "the path is outside the allowed libraries"
        if not library.enabled:
            return f"the path is in library {library.name}, which is disabled"
        if statmod.S_ISDIR(st.st_mode):
            if not os.access(entry, os.R_OK | os.X_OK):
                return "the folder is unreadable: permission denied"
            return Target(library, root, entry, True)
        error = _not_audio(entry, st)
        if error:
            return error
        return Target(library, root, os.path.dirname(entry), False, paths.to_text(entry))

    def _real(self, folder: bytes) -> bytes:
        real = self._dirs.get(folder)
        if real is None:
            real = self._dirs[folder] = os.path.realpath(folder)
        return real


def _not_audio(entry: bytes, st: os.stat_result) -> str:
    """Why the file at ``entry`` (stat ``st``, its target's) is no track, or "" when it may well be one.

    Its name, its first bytes and, only when those say nothing, its headers
    (``fileinfo.read``): a file that passes may still turn out damaged, and
    then becomes a failed track with the reason, like any file a scan finds.
    """
    name = os.path.basename(entry)
    if not statmod.S_ISREG(st.st_mode):
        return "the path is not audio: it is neither a regular file nor a folder"
    if name.startswith(TEMP_PREFIX_BYTES):
        return "the file is not audio: it is a temporary copy made by Earmark's tag writer"
    if not format_for_path(entry):
        ext = os.path.splitext(name)[1].decode(errors="replace") or "a name without an extension"
        known = ", ".join(sorted(EXTENSIONS))
        return f"the file is not audio: {ext} is not an audio format Earmark reads ({known})"
    if st.st_size == 0:
        return "the file is not audio: it is empty (0 bytes)"
    try:
        with open(entry, "rb"):
            pass
    except OSError as exc:
        return f"the file is unreadable: {_strerror(exc)}"
    if diagnose.sniff(diagnose.native(entry)) in diagnose.AUDIO_SIGNATURES:
        return ""
    try:
        fileinfo.read(entry)
    except fileinfo.BadFile as exc:
        reason = str(exc)
        if reason.startswith("not audio: "):
            return f"the file is not audio: {reason.removeprefix('not audio: ')}"
        return f"the file is not usable audio: {reason}"
    return ""


def _strerror(exc: OSError) -> str:
    return (exc.strerror or str(exc)).lower() if exc.errno not in (errno.EACCES, errno.EPERM) else "permission denied"
