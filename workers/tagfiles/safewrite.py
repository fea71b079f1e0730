"""Write Earmark's tags into a user's file without ever risking the file.

A tag write that dies half way (full disk, power cut, a mutagen bug, a
killed worker) must never leave a damaged song behind, and the audio must
never change. So ``safe_write_tags`` never edits the original:

1. refuse (``FileChangedError``) when the file is not what the scanner saw:
   another program may be editing it, and the scanner must look again;
2. do nothing when the file already holds exactly these tags, so that
   tagging twice, or recalibrating without effect, costs one tag parse;
3. clone the file into ``.earmark-tmp-*`` in the same directory (a reflink
   where the filesystem can, so the copy is nearly free; else an in-kernel
   copy) and write the tags into the clone;
4. verify the clone: the tags read back, the user's tags are unchanged, the
   stream parameters (duration, rate, channels, codec) match, the first
   packets still decode to the same samples, and the audio bytes are
   identical (see ``verify_same_audio`` for how, per format, and what it costs);
5. give the clone the original's identity (owner and group where allowed,
   mode with set-id bits, ``user.*`` extended attributes, POSIX ACL, atime;
   ``identity.copy_identity``), fsync it, check the original is still the
   file the clone was made from, ``os.replace`` the clone over it and fsync
   the directory, so that after a crash the path holds either the old file
   or the new one, whole. The new file's mtime is the time of the write, so
   music servers and backups see the change.

A user's program may save the file while this runs. Right before the
rename the original's stat identity is compared with the one taken at the
start (inode, device, link count, size, mtime and ctime: the kernel moves
ctime on every write or ``utime``, so an edit that restored the mtime is
seen), and its first and last MiB with the clone's as copied (for
filesystems without a real ctime, such as vfat); any difference raises
``FileChangedError`` and the user's file stays as they left it. The window
between that last check and the rename cannot be closed without locks that
other programs do not take; it is kept as small as it can be: the last
``lstat`` is the step right before ``os.replace``.

Hard-linked files are refused (``TagWriteError``, ``errno`` ``EMLINK``):
a rename gives the path a new inode, so the file's other names would keep
the old bytes and silently become a separate file. Writing the verified
clone's bytes back into the original inode would keep the links, but a
crash half way through would damage every name of the file at once, and
no backup can be restored by a process that has died; so Earmark skips
such files and says why.

Any failure removes the clone and raises ``TagWriteError`` with a reason a
person can act on; the original is untouched. Leftover clones from killed
processes are found by their prefix, and their names say which process
wrote them (``.earmark-tmp-<host>-<pid>-<start>-…``), so the scanner
removes a dead writer's clone at once and never mistakes a clone for a
track (``remove_stale_temp_files``).

The caller resolves the path and checks it lies inside a library root; this
module refuses to operate on anything but a regular file at that path (a
symlink swapped in since the scan is refused, never followed).
"""
from __future__ import annotations

import errno
import fcntl
import os
import stat
import tempfile
import time
from contextlib import contextmanager

from workers.audio.fingerprint import audio_fingerprint
from workers.audio.formats import format_for_path
from workers.tagfiles import identity, namespace as tagfile, standard as standard_fields
from workers.tagfiles.errors import REASONS, FileChangedError, SafeWriteError, TagWriteError, WriteResult
from workers.tagfiles.tempfiles import TEMP_PREFIX, writer_tag
from workers.tagfiles.verify import verify_same_audio

# Linux ioctl that makes dst share src's blocks (btrfs, XFS, bcachefs, ...).
FICLONE = 0x40049409
_COPY_BLOCK = 8 << 20

# ---------------------------------------------------------------- the write

def safe_write_tags(
    path: str | bytes | os.PathLike,
    tags,
    expected_size: int | None = None,
    expected_mtime_ns: int | None = None,
    standard: "standard_fields.Request | None" = None,
    fingerprint: bool = False,
    *,
    fmt: str | None = None,
) -> WriteResult:
    """Replace Earmark's tags in ``path`` with ``tags``, safely (module docstring).

    ``tags`` is a ``TagSet`` (its ``fields()`` are written) or a mapping of
    tag keys to values as ``tagfile.normalize_fields`` accepts.
    ``expected_size`` / ``expected_mtime_ns`` are what the scanner recorded;
    when given and different, ``FileChangedError`` is raised. ``fmt`` defaults
    to what the extension says. ``standard`` puts genre and mood in the
    standard fields by its policy (``workers.tagfiles.standard``); without it
    they are left as they are, and so is the record of what Earmark put there.
    ``fingerprint`` adds the audio stream's fingerprint of the file now at the
    path to the result (``workers.audio.fingerprint``: tens of ms, so the tag
    writes ask for it only while the track has none: once per file).
    """
    path = os.fsdecode(path)
    fmt = fmt or format_for_path(path)
    wanted = _fields(tags)
    timings: dict[str, float] = {}

    before = _stat_regular(path)
    _check_expected(path, before, expected_size, expected_mtime_ns)
    with _stage("read", timings, path):
        original = tagfile.open_tags(path, fmt)
        planned = (standard_fields.plan(original, standard) if standard is not None
                   else standard_fields.Plan({}, standard_fields.read_record(original) or None))
        wanted = {**wanted, **planned.record_fields()}
        if original.earmark() == wanted and not planned.changes:
            return WriteResult(path, False, before.st_size, before.st_mtime_ns, timings=timings,
                               device=before.st_dev, inode=before.st_ino,
                               audio_fingerprint=audio_fingerprint(path) if fingerprint else "")
        identity.refuse_hard_links(before)
        original.check_rewritable()
        user_before = original.user()
        standard_after = {name: planned.changes.get(name, original.standard_raw(name))
                          for name in standard_fields.fields_of(original)}

    directory, name = os.path.split(path)
    fd, tmp = _make_temp(directory, name)
    try:
        with _stage("copy", timings, path):
            copy_method = _clone_into(path, fd, before.st_size)
            copied = identity.fingerprint(fd, before.st_size)
        with _stage("write", timings, path):
            tagfile.write_tags(tmp, wanted, planned, fmt)
        with _stage("verify", timings, path):
            _verify_tags(tmp, fmt, wanted, user_before, standard_after)
            verify_method = verify_same_audio(path, tmp, fmt)
        with _stage("replace", timings, path):
            owner_kept = identity.copy_identity(path, fd, before)
            os.fsync(fd)
            os.close(fd)
            fd = -1
            _check_unchanged(path, before, copied)
            os.replace(tmp, path)
            tmp = None
            _fsync_directory(directory)
    finally:
        if fd >= 0:
            os.close(fd)
        if tmp is not None:
            _remove_quietly(tmp)

    after = os.stat(path)
    return WriteResult(path, True, after.st_size, after.st_mtime_ns, copy_method,
                       verify_method, owner_kept, timings, device=after.st_dev, inode=after.st_ino,
                       audio_fingerprint=audio_fingerprint(path) if fingerprint else "")


@contextmanager
def _stage(name: str, timings: dict[str, float], path: str):
    """Time one stage and turn anything it raises into a clear TagWriteError.

    ``FileChangedError`` and ``TagWriteError`` pass through unchanged; the
    original vanishing while it is read or copied is a ``FileChangedError``
    (the scanner marks it missing); any other OSError (also one wrapped by
    mutagen) is named by its errno, so a full disk reads "no space left on
    device while writing tags"; a
    ``TagFileError`` keeps its own explanation; anything else (a parse or
    decoder failure) is prefixed with what was being done.
    """
    start = time.perf_counter()
    try:
        yield
    except SafeWriteError:
        raise
    except tagfile.TagFileError as exc:
        raise TagWriteError(str(exc), stage=name) from exc
    except Exception as exc:
        oserror = tagfile.find_oserror(exc)
        if oserror is not None and oserror.errno == errno.ENOENT and name in ("read", "copy"):
            raise FileChangedError(path, "the file no longer exists") from exc
        if oserror is not None:
            raise TagWriteError(_os_reason(oserror, name), stage=name, errno_=oserror.errno) from exc
        raise TagWriteError(f"{_STAGE_WORDS[name]}: {exc}", stage=name) from exc
    finally:
        timings[name] = time.perf_counter() - start


_STAGE_WORDS = {
    "read": "cannot read the file's tags",
    "copy": "cannot copy the file",
    "write": "cannot write the tags",
    "verify": "verification failed",
    "replace": "cannot replace the original",
}


def _os_reason(exc: OSError, stage: str) -> str:
    """A person-readable reason for an OSError, naming the cause first."""
    reason = REASONS.get(exc.errno)
    if reason is None:
        reason = f"{_STAGE_WORDS[stage]}: {exc.strerror or exc}"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        reason = f"{reason} ({_STAGE_WORDS[stage]})"
    return reason


# ------------------------------------------------------ identity and checks

def _fields(tags) -> tagfile.Fields:
    """A TagSet's fields, or a plain mapping's, validated and normalised."""
    return tagfile.normalize_fields(tags.fields() if hasattr(tags, "fields") else tags)


def _stat_regular(path: str) -> os.stat_result:
    """lstat the path; a vanished file or a non-regular one has changed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise FileChangedError(path, "the file no longer exists") from None
    except OSError as exc:
        raise TagWriteError(_os_reason(exc, "read"), stage="read", errno_=exc.errno) from exc
    if not stat.S_ISREG(st.st_mode):
        raise FileChangedError(path, "the path is no longer a regular file")
    return st


def _check_expected(path: str, st: os.stat_result, size: int | None, mtime_ns: int | None) -> None:
    """Refuse a file whose size or mtime differ from the scanner's record."""
    if size is not None and st.st_size != size:
        raise FileChangedError(path, f"the file's size changed since the scan ({size} -> {st.st_size} bytes)")
    if mtime_ns is not None and st.st_mtime_ns != mtime_ns:
        raise FileChangedError(path, "the file was modified since the scan")


def _check_unchanged(path: str, before: os.stat_result, copied: bytes) -> None:
    """Re-check just before replacing, so a concurrent edit is not lost.

    Between reading the original and replacing it, a user's tagger may have
    saved it; replacing would silently drop that edit. The stat identity
    (ctime included) is checked, then the content fingerprint against the
    clone's as copied, then the stat identity once more as the very last
    step before ``os.replace``: an edit landing between that ``lstat`` and
    the rename is still lost, a window no check can close without locks
    that other programs do not take; nothing else runs inside it.
    """
    identity.same_file(path, before)
    if identity.fingerprint_path(path, before.st_size) != copied:
        raise FileChangedError(path, "the file's content changed while its tags were being written "
                                     "(its size and modification time did not)")
    identity.same_file(path, before)


def _verify_tags(tmp: str, fmt: str | None, wanted: tagfile.Fields, user_before: dict, standard_after: dict) -> None:
    """The copy holds exactly our tags, the standard fields as planned, and the user's other tags as they were."""
    written = tagfile.open_tags(tmp, fmt)
    if written.earmark() != wanted:
        raise TagWriteError("verification failed: the written tags do not read back", stage="verify")
    others = {k: v for k, v in written.user().items() if not written.is_standard_key(k)}
    if others != {k: v for k, v in user_before.items() if not written.is_standard_key(k)}:
        raise TagWriteError("verification failed: the user's own tags would change", stage="verify")
    for name, raw in standard_after.items():
        if (written.standard_raw(name) or {}).get("text") != (raw or {}).get("text"):
            raise TagWriteError(f"verification failed: the {name} field does not read back as planned",
                                stage="verify")


# ------------------------------------------------------------------ copying

def _make_temp(directory: str, name: str) -> tuple[int, str]:
    """Create the clone's file next to the original: same filesystem, so the
    final rename is atomic; the original's extension, so tag libraries and
    FFmpeg recognise the format from the name as they do for the original."""
    suffix = os.path.splitext(name)[1]
    try:
        return tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{writer_tag()}-", suffix=suffix, dir=directory or ".")
    except OSError as exc:
        raise TagWriteError(_os_reason(exc, "copy"), stage="copy", errno_=exc.errno) from exc


def _clone_into(src_path: str, dst_fd: int, size: int) -> str:
    """Fill ``dst_fd`` with ``src_path``'s bytes; return the method used.

    A reflink first (shared blocks, copy-on-write: near-free on btrfs/XFS),
    then ``copy_file_range`` (in-kernel, may itself share blocks on NFS 4.2
    or XFS), then a plain read/write loop for filesystems that refuse both.
    """
    with open(src_path, "rb") as src:
        src_fd = src.fileno()
        try:
            fcntl.ioctl(dst_fd, FICLONE, src_fd)
            return "reflink"
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
                raise
        try:
            _copy_file_range(src_fd, dst_fd, size)
            return "copy_file_range"
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
        os.lseek(src_fd, 0, os.SEEK_SET)
        os.lseek(dst_fd, 0, os.SEEK_SET)
        os.ftruncate(dst_fd, 0)
        while block := os.read(src_fd, _COPY_BLOCK):
            view = memoryview(block)
            while view:
                view = view[os.write(dst_fd, view):]
        return "copy"


def _copy_file_range(src_fd: int, dst_fd: int, size: int) -> None:
    """Copy the whole file in the kernel, tolerating short copies."""
    copy_range = getattr(os, "copy_file_range", None)
    if copy_range is None:
        raise OSError(errno.ENOSYS, "copy_file_range unavailable")
    copied = 0
    while True:
        n = copy_range(src_fd, dst_fd, max(size - copied, _COPY_BLOCK), copied, copied)
        if n == 0:
            break
        copied += n
    if copied < size:
        raise OSError(errno.EIO, f"short copy: {copied} of {size} bytes")


def _fsync_directory(directory: str) -> None:
    """Make the rename durable; filesystems that cannot sync a directory say so with EINVAL."""
    dfd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(dfd)


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


