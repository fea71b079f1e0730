"""inotify(7) over a library's tree, through ctypes: what changed, as bytes paths, and what was missed.

Why not ``watchfiles`` (the Rust ``notify`` crate): it drops the kernel's
queue-overflow event (``IN_Q_OVERFLOW`` comes without a path, and a pathless
event is skipped), so a watcher built on it cannot know that it missed
changes; and a name that is not UTF-8 stops its watch with an error, where
Earmark stores such names exactly (``workers.library.paths``). This is the
part of it Earmark needs: one inotify instance per library, one watch per
directory (``Tree``), new directories watched as they appear, and every
event turned into a ``Change`` on a path.

A ``Change`` is one of

* ``changed``: a file or folder was created, written, closed after writing,
  had its metadata changed, or was moved here;
* ``gone``: a file or folder was deleted or moved away;
* ``listing``: something in the folder changed, which is not known (a mount
  inside it went away; a poll, ``workers.library.polling``);
* ``overflow``: the kernel's event queue overflowed, events were lost;
* ``root-gone``: the root itself was deleted, moved or unmounted.

The tag writer's temporary clones (``.earmark-tmp-*``) never make a change:
they are created, written and renamed over a track for every tag write.
A full watch table (``fs.inotify.max_user_watches``) raises ``WatchLimit``.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
from dataclasses import dataclass

from workers.tagfiles.tempfiles import TEMP_PREFIX_BYTES

IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x2, 0x4, 0x8
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_MOVE_SELF, IN_UNMOUNT, IN_Q_OVERFLOW, IN_IGNORED = 0x400, 0x800, 0x2000, 0x4000, 0x8000
IN_ONLYDIR, IN_DONT_FOLLOW, IN_EXCL_UNLINK, IN_ISDIR = 0x01000000, 0x02000000, 0x04000000, 0x40000000
MASK = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
        | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR | IN_DONT_FOLLOW | IN_EXCL_UNLINK)
GONE = IN_DELETE | IN_MOVED_FROM
CHANGED = IN_CREATE | IN_MOVED_TO | IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE
_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len
LIMITS = "/proc/sys/fs/inotify/max_user_watches"


class WatchLimit(OSError):
    """The kernel refused another watch or instance (``max_user_watches`` or ``max_user_instances``)."""


@dataclass(frozen=True)
class Change:
    kind: str  # "changed", "gone", "listing", "overflow", "root-gone"
    path: bytes
    is_dir: bool = False


_libc = None


def _lib():
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        lib.inotify_init1.argtypes = [ctypes.c_int]
        lib.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        lib.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
        _libc = lib
    return _libc


def watch_limit() -> int | None:
    try:
        with open(LIMITS) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _limit_error(what: str) -> WatchLimit:
    limit = watch_limit()
    return WatchLimit(errno.ENOSPC, f"the inotify {what} limit is reached"
                      + (f" (fs.inotify.max_user_watches = {limit})" if limit and what == "watch" else ""))


class Tree:
    """Watches on every directory under ``root`` (symlinked folders are not followed, as the scanner does not).

    ``skip`` holds folders not to watch (another library's root inside this one).
    """

    def __init__(self, root: bytes, skip: tuple[bytes, ...] = ()):
        self.root = root.rstrip(b"/") or b"/"
        self.skip = skip
        fd = _lib().inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            if err in (errno.EMFILE, errno.ENFILE):
                raise _limit_error("instance")
            raise OSError(err, os.strerror(err))
        self.fd = fd
        self.paths: dict[int, bytes] = {}  # wd -> folder
        self.wds: dict[bytes, int] = {}  # folder -> wd
        self.unreadable = 0  # folders that could not be listed (their subfolders are not watched)
        try:
            self.root_wd = self._add(self.root)
            if self.root_wd is None:
                raise FileNotFoundError(errno.ENOENT, "the library root does not exist", os.fsdecode(self.root))
            self._add_below(self.root)
        except BaseException:
            self.close()
            raise

    def fileno(self) -> int:
        return self.fd

    @property
    def folders(self) -> int:
        return len(self.paths)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _add(self, folder: bytes) -> int | None:
        wd = _lib().inotify_add_watch(self.fd, folder, MASK)
        if wd < 0:
            err = ctypes.get_errno()
            if err == errno.ENOSPC:
                raise _limit_error("watch")
            if err in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                return None  # gone meanwhile, or not a folder (IN_ONLYDIR, IN_DONT_FOLLOW)
            if err == errno.EACCES:
                self.unreadable += 1
                return None
            raise OSError(err, os.strerror(err), os.fsdecode(folder))
        old = self.paths.get(wd)
        if old is not None and old != folder:  # the same folder seen under a new name: forget the old one
            self.wds.pop(old, None)
        self.paths[wd], self.wds[folder] = folder, wd
        return wd

    def _add_below(self, top: bytes) -> None:
        todo = [top]
        while todo:
            folder = todo.pop()
            try:
                with os.scandir(folder) as entries:
                    subs = [e.path for e in entries if e.is_dir(follow_symlinks=False)
                            and not e.name.startswith(TEMP_PREFIX_BYTES)]
            except OSError:
                self.unreadable += 1
                continue
            for sub in subs:
                if sub in self.skip:
                    continue
                if self._add(sub) is not None:
                    todo.append(sub)

    def add_tree(self, top: bytes) -> None:
        """Watch a folder that appeared and everything below it."""
        if top not in self.skip and self._add(top) is not None:
            self._add_below(top)

    def forget_tree(self, top: bytes) -> None:
        """Drop the watches of a folder moved away and of everything below it (moved back, it is added anew)."""
        prefix = top + b"/"
        for folder in [f for f in self.wds if f == top or f.startswith(prefix)]:
            wd = self.wds.pop(folder)
            self.paths.pop(wd, None)
            _lib().inotify_rm_watch(self.fd, wd)  # EINVAL when the kernel dropped it already: fine

    def read(self) -> list[Change]:
        """Every event waiting now, as changes (never blocks)."""
        changes: list[Change] = []
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return changes
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                raise
            if not data:
                return changes
            offset = 0
            while offset + _HEADER.size <= len(data):
                wd, mask, _cookie, length = _HEADER.unpack_from(data, offset)
                offset += _HEADER.size
                name = data[offset : offset + length].rstrip(b"\0")
                offset += length
                self._event(wd, mask, name, changes)

    def _event(self, wd: int, mask: int, name: bytes, out: list[Change]) -> None:
        if mask & IN_Q_OVERFLOW:
            out.append(Change("overflow", self.root))
            return
        folder = self.paths.get(wd)
        if folder is None:
            return  # a watch dropped a moment ago
        if mask & IN_IGNORED or (not name and mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT)):
            if wd == self.root_wd:
                out.append(Change("root-gone", self.root))
            elif mask & IN_UNMOUNT:  # a file system mounted inside the library went away
                out.append(Change("listing", folder, True))
            if mask & IN_IGNORED:
                self.paths.pop(wd, None)
                if self.wds.get(folder) == wd:
                    del self.wds[folder]
            return
        if not name or name.startswith(TEMP_PREFIX_BYTES):
            return  # the folder's own metadata, or the tag writer's clone
        path = folder + b"/" + name if folder != b"/" else b"/" + name
        is_dir = bool(mask & IN_ISDIR)
        if path in self.skip:
            return
        if mask & GONE:
            if is_dir:
                self.forget_tree(path)
            out.append(Change("gone", path, is_dir))
        elif mask & CHANGED:
            if is_dir:
                if not mask & (IN_CREATE | IN_MOVED_TO):
                    return  # a subfolder's own metadata: its files make their own events
                self.add_tree(path)  # WatchLimit goes up to the watcher
            out.append(Change("changed", path, is_dir))
