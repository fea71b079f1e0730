"""What makes a file "the same file" to the safe writer: its identity, kept across the rename.

The safe write builds a new inode (the clone) and renames it over the user's
file, so everything that belongs to the inode rather than to the bytes must
be carried over by hand, or it is silently lost: owner and group, the mode
with its set-id and sticky bits, extended attributes (``user.*``: file
managers' comments, download origins, checksums; ``system.posix_acl_access``:
the POSIX ACL) and the access time. ``copy_identity`` does that and then
checks it held. The modification time is the one thing deliberately *not*
kept: a tag write is a change, and music servers and backups must see it.

It also tells, right before the rename, whether the original is still the
file the clone was made from (``same_file``, ``fingerprint``): the stat
identity (inode, device, link count, size, mtime and ctime: the ctime moves
on every write, ``utime``, chmod or link, and no user program can set it
back) and, because some filesystems keep no real ctime (vfat and exFAT
report the creation time there, and their mtime has 2 s resolution), a hash
of the bytes where tags live: the file's first and last MiB (ID3v2, FLAC
and Vorbis comments, an MP4 ``moov`` atom at either end, ID3v1/APE tails).
"""
from __future__ import annotations

import errno
import hashlib
import os
import stat

from workers.tagfiles.errors import REASONS, FileChangedError, TagWriteError

FINGERPRINT_SPAN = 1 << 20

# Extended attributes that belong to the user and must survive a write exactly; a
# failure to copy one fails the write. Others (security.*: the LSM's label, which a
# new file in the same folder gets anyway; trusted.*) are copied where allowed.
KEPT_PREFIXES = ("user.", "system.posix_acl_")


# ------------------------------------------------------------ hard links

def refuse_hard_links(st: os.stat_result) -> None:
    """A hard-linked file cannot be replaced and stay linked: refuse it, leaving every link as it is.

    ``os.replace`` gives the path a new inode; the file's other names would
    keep the old bytes and silently become a separate file. Writing in place
    instead is not crash-safe (a crash mid-copy damages every name at once),
    so Earmark does not write tags into hard-linked files. ``EMLINK`` is the
    code callers can match; the reason names the link count.
    """
    if st.st_nlink > 1:
        reason = REASONS[errno.EMLINK].replace("the file has hard links", f"the file has {st.st_nlink} hard links")
        raise TagWriteError(reason, stage="read", errno_=errno.EMLINK)


# ------------------------------------------------- is it still the same file

def same_file(path: str, before: os.stat_result) -> None:
    """Raise ``FileChangedError`` unless ``path`` has ``before``'s stat identity.

    The ctime is what catches an edit that kept size and mtime (a program
    that restores mtime with ``os.utime``, or a same-second save on a
    filesystem with coarse mtimes): the kernel moves it on every change.
    """
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        raise FileChangedError(path, "the file no longer exists") from None
    if not stat.S_ISREG(now.st_mode):
        raise FileChangedError(path, "the path is no longer a regular file")
    if now.st_nlink != before.st_nlink:
        raise FileChangedError(path, "the file's hard links changed while its tags were being written")
    if _stat_key(now) != _stat_key(before):
        raise FileChangedError(path, "the file changed while its tags were being written")


def _stat_key(st) -> tuple:
    return st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def fingerprint(fd: int, size: int) -> bytes:
    """A hash of the file's first and last ``FINGERPRINT_SPAN`` bytes (all of a small file).

    Cheap (two reads, usually from the page cache) and covers where tag
    editors write; it is the check that still works where ctime does not.
    """
    digest = hashlib.sha256(str(size).encode())
    if size <= 2 * FINGERPRINT_SPAN:
        spans = [(0, size)]
    else:
        spans = [(0, FINGERPRINT_SPAN), (size - FINGERPRINT_SPAN, FINGERPRINT_SPAN)]
    for offset, length in spans:
        digest.update(_pread_all(fd, length, offset))
    return digest.digest()


def fingerprint_path(path: str, size: int) -> bytes:
    """``fingerprint`` of the file at ``path``, opened without following links or blocking on a FIFO."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        return fingerprint(fd, size)
    finally:
        os.close(fd)


def _pread_all(fd: int, length: int, offset: int) -> bytes:
    chunks = []
    while length > 0:
        chunk = os.pread(fd, length, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
        length -= len(chunk)
    return b"".join(chunks)


# -------------------------------------------------- carrying identity over

def copy_identity(original_path: str, fd: int, original: os.stat_result) -> bool:
    """Give the clone ``fd`` the original's owner, xattrs, ACL, mode and atime; True if the owner was kept.

    Order matters: chown first (it clears set-id bits and file
    capabilities), then the extended attributes (setting an ACL rewrites the
    mode's group bits), then the mode, then the atime (last, as nothing
    after it reads the clone). ``mkstemp`` creates 0600 files: without the
    mode a shared library's files would become unreadable to the music
    server. Changing the owner needs privileges a worker
    usually lacks: then the file stays the worker's and this returns False.
    A ``user.*`` attribute or ACL that cannot be kept fails the write
    (``TagWriteError``): it is never dropped silently.
    """
    owner_kept = _copy_owner(fd, original)
    _copy_xattrs(original_path, fd)
    os.fchmod(fd, stat.S_IMODE(original.st_mode))
    _keep_atime(fd, original)
    _check_kept(original_path, fd, original, owner_kept)
    return owner_kept


def _copy_owner(fd: int, original: os.stat_result) -> bool:
    current = os.fstat(fd)
    if (current.st_uid, current.st_gid) == (original.st_uid, original.st_gid):
        return True
    try:
        os.fchown(fd, original.st_uid, original.st_gid)
    except PermissionError:
        return False
    return True


def _keep_atime(fd: int, original: os.stat_result) -> None:
    """The original's atime on the clone, its mtime left as the time of the write.

    A tag write is not a play: tools that look at atime (tiering, "recently
    played" heuristics) should see none. Best effort: losing an atime is not
    worth failing a write for, where a filesystem refuses to set one.
    """
    try:
        os.utime(fd, ns=(original.st_atime_ns, os.fstat(fd).st_mtime_ns))
    except OSError:
        pass


def _copy_xattrs(original_path: str, fd: int) -> None:
    """Make the clone's extended attributes the original's: copy each, remove extras.

    Extras come from the folder: a default ACL gives every new file an
    access ACL, which the original may not have.
    """
    wanted = _xattrs(original_path)
    for name in set(_xattrs(fd)) - set(wanted):
        _apply(fd, name, lambda: os.removexattr(fd, name))
    for name, value in wanted.items():
        _apply(fd, name, lambda: os.setxattr(fd, name, value))


def _apply(fd: int, name: str, change) -> None:
    """Run ``change`` on attribute ``name``; a failure fails the write only for an attribute we promise to keep."""
    try:
        change()
    except OSError as exc:
        if name.startswith(KEPT_PREFIXES):
            raise _xattr_error(name, exc) from exc


def _xattrs(target) -> dict[str, bytes]:
    """All extended attributes of a path (not followed) or fd; none where the filesystem has none."""
    kwargs = {} if isinstance(target, int) else {"follow_symlinks": False}
    try:
        names = os.listxattr(target, **kwargs)
    except FileNotFoundError:
        raise FileChangedError(target, "the file no longer exists") from None
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    values = {}
    for name in names:
        try:
            values[name] = os.getxattr(target, name, **kwargs)
        except OSError as exc:
            if name.startswith(KEPT_PREFIXES) or exc.errno != errno.ENODATA:
                raise _xattr_error(name, exc) from exc
    return values


def _kept_xattrs(target) -> dict[str, bytes]:
    return {name: value for name, value in _xattrs(target).items() if name.startswith(KEPT_PREFIXES)}


def _check_kept(original_path: str, fd: int, original: os.stat_result, owner_kept: bool) -> None:
    """Read the clone's identity back: what we promise to keep must be there before it replaces the original."""
    if _kept_xattrs(fd) != _kept_xattrs(original_path):
        raise TagWriteError("cannot keep the file's extended attributes or ACL on the new copy", stage="replace")
    now = os.fstat(fd)
    if owner_kept and stat.S_IMODE(now.st_mode) != stat.S_IMODE(original.st_mode):
        raise TagWriteError(f"cannot keep the file's permissions ({stat.S_IMODE(original.st_mode):o} became "
                            f"{stat.S_IMODE(now.st_mode):o})", stage="replace")


def _xattr_error(name: str, exc: OSError) -> TagWriteError:
    return TagWriteError(f"cannot keep the file's extended attribute {name} ({exc.strerror or exc})",
                         stage="replace", errno_=exc.errno)
