"""How a library is watched (``choose_mode``), where it must be polled, and the poll itself: a stat walk compared with the last one.

inotify sees the changes made through this machine's kernel only. On a
network or FUSE file system (NFS, SMB/CIFS, 9p, CephFS, sshfs, rclone,
mergerfs …) files written by another machine, or behind the FUSE daemon's
back, make no event, so such a library is polled instead (``needs_polling``,
from the mount holding the root in ``/proc/self/mountinfo``).

A poll (``walk``) lists every folder and stats its files: per folder a digest
of its entries' names, kinds, sizes and ``mtime_ns``, and its subfolders'
names. ``diff`` compares two walks and says what changed in the same words
as ``workers.library.inotify``: a folder whose files changed (``listing``), a
folder that appeared (``changed``, a directory) and one that is gone
(``gone``). A 100,000-file library costs about a second of CPU
per walk and a few bytes per folder between walks.

Before anything is queued, for a poll as for an inotify event, ``folder_state``
compares a folder's audio files with its track rows, by the scanner's own rule.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass

from django.conf import settings
from django.db.models import Q

from workers.audio.formats import format_for_path
from workers.library import paths
from workers.library.inotify import Change
from workers.models import Job, Library, Track
from workers.tagfiles.tempfiles import TEMP_PREFIX_BYTES

MOUNTINFO = "/proc/self/mountinfo"

#: File systems whose changes inotify does not see (made elsewhere), by mountinfo type, as a person names them.
REMOTE = {"nfs": "NFS", "nfs4": "NFS", "cifs": "SMB/CIFS", "smb3": "SMB", "smbfs": "SMB", "9p": "9p",
          "afs": "AFS", "ceph": "CephFS", "glusterfs": "GlusterFS", "lustre": "Lustre", "gpfs": "GPFS",
          "beegfs": "BeeGFS", "vboxsf": "VirtualBox shared folder", "virtiofs": "virtiofs",
          "davfs": "WebDAV", "fuse": "FUSE"}
#: FUSE types that are a local disk (every change goes through this kernel): inotify works.
LOCAL_FUSE = {"fuseblk"}


@dataclass(frozen=True)
class Mount:
    point: str
    fstype: str


def mount_of(path: str, mountinfo: str | None = None) -> Mount | None:
    """The mount holding ``path`` (the longest mount point above it); None when mountinfo cannot be read."""
    if mountinfo is None:
        try:
            with open(MOUNTINFO, encoding="utf-8", errors="surrogateescape") as f:
                mountinfo = f.read()
        except OSError:
            return None
    best: Mount | None = None
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or not tail:
            continue
        point = _unescape(fields[4])
        inside = path == point or point == "/" or path.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best.point)):  # a later mount on one point wins
            best = Mount(point, tail[0])
    return best


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in mount points as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def needs_polling(mount: Mount | None) -> str:
    """Why a library on ``mount`` must be polled (a person's words), or "" when inotify sees its changes."""
    if mount is None:
        return ""
    kind = mount.fstype
    if kind in LOCAL_FUSE:
        return ""
    name = REMOTE.get(kind) or (f"FUSE ({kind.split('.', 1)[1]})" if kind.startswith("fuse.") else "")
    if not name:
        return ""
    return (f"the library is on a {name} mount ({kind} at {mount.point}): inotify does not see changes "
            "made by other machines or behind the file system's back")


def choose_mode(library: Library, root: bytes, mountinfo: str | None = None) -> tuple[str, str]:
    """(``inotify`` | ``poll`` | ``off``, why) for a library, before its watches are set up."""
    if not library.enabled:
        return "off", "the library is disabled"
    if library.watch == Library.Watch.OFF:
        return "off", "the library's watch setting is off: it is scanned only when asked"
    if getattr(settings, "EARMARK_WATCH_FORCE_POLL", False):
        return "poll", "EARMARK_WATCH_FORCE_POLL is set"
    if library.watch == Library.Watch.POLL:
        return "poll", "the library's watch setting is poll"
    mount = mount_of(os.fsdecode(root), mountinfo)
    remote = needs_polling(mount)
    where = f"{mount.fstype} at {mount.point}" if mount else "mount unknown"
    if library.watch == Library.Watch.INOTIFY:
        return "inotify", "the library's watch setting is inotify" + (f"; but {remote}" if remote else f" ({where})")
    if remote:
        return "poll", remote
    return "inotify", f"inotify sees every change on {where}"


# --- the stat walk ----------------------------------------------------------------------


@dataclass(frozen=True)
class Folder:
    digest: bytes  # of its entries: names, kinds, sizes, mtimes
    subfolders: frozenset


class Unreadable(OSError):
    """The root could not be listed."""


def walk(root: bytes, skip: tuple[bytes, ...] = (), previous: dict | None = None) -> dict[bytes, Folder]:
    """Every folder under ``root`` (symlinked folders not followed), with the digest of its entries.

    A folder below the root that cannot be listed keeps what ``previous``
    knew of it and below it, so a permission change does not look like a
    deleted subtree; the root that cannot be listed raises ``Unreadable``.
    """
    out: dict[bytes, Folder] = {}
    todo = [root]
    while todo:
        folder = todo.pop()
        try:
            found = _folder(folder)
        except OSError as exc:
            if folder == root:
                raise Unreadable(exc.errno, exc.strerror) from None
            _keep(previous or {}, folder, out)
            continue
        digest, subs = found
        subs = frozenset(s for s in subs if folder + b"/" + s not in skip)
        out[folder] = Folder(digest, subs)
        todo += [folder + b"/" + s for s in subs]
    return out


def _folder(folder: bytes) -> tuple[bytes, list[bytes]]:
    h = hashlib.blake2b(digest_size=16)
    subs = []
    with os.scandir(folder) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        if e.name.startswith(TEMP_PREFIX_BYTES):
            continue
        try:
            if e.is_dir(follow_symlinks=False):
                subs.append(e.name)
                h.update(b"d\0" + e.name + b"\0")
                continue
            st = e.stat(follow_symlinks=False)
        except OSError:  # vanished between the listing and the stat: the next walk sees it settled
            h.update(b"?\0" + e.name + b"\0")
            continue
        h.update(b"f\0%s\0%d\0%d\0" % (e.name, st.st_size, st.st_mtime_ns))
    return h.digest(), subs


def _keep(previous: dict, folder: bytes, out: dict) -> None:
    prefix = folder + b"/"
    for f, known in previous.items():
        if f == folder or f.startswith(prefix):
            out[f] = known


def diff(old: dict[bytes, Folder], new: dict[bytes, Folder]) -> list[Change]:
    """What changed between two walks, as inotify would have said it (see the module's notes)."""
    changes = []
    for folder, now in new.items():
        before = old.get(folder)
        if before is None:
            parent = os.path.dirname(folder)
            if parent in old and parent in new:  # the topmost new folder; what is below it comes with it
                changes.append(Change("changed", folder, True))
        elif before.digest != now.digest:
            changes.append(Change("listing", folder, True))
    for folder in old:
        if folder not in new:
            parent = os.path.dirname(folder)
            if parent in new:
                changes.append(Change("gone", folder, True))
    return changes


# --- a folder against its track rows ---------------------------------------------------


def folder_state(library: Library, folder: bytes, gone_dirs=()) -> tuple[str, bool]:
    """(``fresh`` | ``stale`` | ``busy``, sweep): whether a folder scan would find anything to do here.

    ``stale``: a file is new, changed or vanished, or a known subfolder
    (``gone_dirs``) is gone (then ``sweep``); ``busy``: only files whose track
    has a running job (a tag write about to be recorded) differ; ``fresh``:
    every audio file is its track's, as recorded. A folder that is gone or
    cannot be listed is ``fresh``: its parent's change, or nothing, says more.
    """
    files: dict[str, tuple] = {}
    try:
        with os.scandir(folder) as it:
            for e in it:
                if e.name.startswith(TEMP_PREFIX_BYTES) or not format_for_path(e.name):
                    continue
                try:
                    if e.is_dir(follow_symlinks=False):
                        continue
                    st = e.stat()  # through a file symlink, as the scanner reads it
                    files[paths.to_text(e.path)] = (st.st_size, st.st_mtime_ns)
                except OSError:
                    files[paths.to_text(e.path)] = (None, None)
    except OSError:
        return "fresh", False
    rows = Track.objects.filter(folder=paths.to_text(folder), library_id=library.id).values_list(
        "id", "path", "size", "mtime_ns", "state")
    known = {path: (track_id, size, mtime_ns, state) for track_id, path, size, mtime_ns, state in rows}
    differ: list[int | None] = []
    for path, facts in files.items():
        row = known.get(path)
        if row is None or row[3] == Track.State.MISSING or (row[1], row[2]) != facts:
            differ.append(row[0] if row else None)
    differ += [None for path, row in known.items() if path not in files and row[3] != Track.State.MISSING]
    sweep = False
    for gone in gone_dirs:
        text = paths.to_text(gone)
        below = Track.objects.filter(Q(folder=text) | Q(folder__startswith=text + "/"), library_id=library.id)
        if not os.path.isdir(gone) and below.exclude(state=Track.State.MISSING).exists():
            sweep = True
    if not differ and not sweep:
        return "fresh", False
    if not sweep and None not in differ:
        running = set(Job.objects.filter(track_id__in=differ, state=Job.State.RUNNING).values_list("track_id", flat=True))
        if running >= set(differ):
            return "busy", False
    return "stale", sweep
