"""What a safe tag write can fail with, and what it reports when it succeeds.

Both errors cross process boundaries (a GPU tagger's decode processes write
tags), so they pickle with their fields.
"""
from __future__ import annotations

import errno
from dataclasses import dataclass, field

REASONS = {
    errno.ENOSPC: "no space left on device while writing tags",
    errno.EDQUOT: "disk quota exceeded while writing tags",
    errno.EROFS: "read-only filesystem",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EIO: "input/output error (the disk may be failing)",
    errno.ENAMETOOLONG: "file name too long for a temporary copy",
    errno.EMFILE: "too many open files",
    # Not from the kernel: the safe writer's own refusal (``identity.refuse_hard_links``).
    errno.EMLINK: "the file has hard links; replacing it would break them, "
                  "so Earmark does not write tags into hard-linked files",
}


class SafeWriteError(Exception):
    """Base of the errors ``safe_write_tags`` raises."""


class FileChangedError(SafeWriteError):
    """The file differs from what the scanner recorded; rescan before tagging."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{reason}: {path}")
        self.path = path
        self.reason = reason

    def __reduce__(self):  # picklable: a GPU tagger's decode processes write tags and raise these
        return type(self), (self.path, self.reason)


#: Write failures no retry can fix: no permission, or a hard-linked file (which Earmark
#: never replaces). Any other (a busy NAS, a full disk, a read-only remount that the
#: next mount undoes) is retried with backoff.
PERMANENT_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EMLINK})


class TagWriteError(SafeWriteError):
    """The tags could not be written safely; the original is untouched.

    ``reason`` is for people (the admin shows it); ``errno`` and ``stage``
    (``read``, ``copy``, ``write``, ``verify``, ``replace``) are for code,
    e.g. to stop retrying on a read-only filesystem.
    """

    def __init__(self, reason: str, *, stage: str = "", errno_: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.stage = stage
        self.errno = errno_

    @property
    def permanent(self) -> bool:
        """True when no retry can fix it (``PERMANENT_ERRNOS``); any other failure is retried with backoff."""
        return self.errno in PERMANENT_ERRNOS

    def __reduce__(self):
        return _tag_write_error, (self.reason, self.stage, self.errno)


def _tag_write_error(reason: str, stage: str, errno_: int | None) -> TagWriteError:
    return TagWriteError(reason, stage=stage, errno_=errno_)


@dataclass(frozen=True)
class WriteResult:
    """What happened, and the file's new identity for the database.

    ``size`` and ``mtime_ns`` describe the file now at the path, written or
    not. ``copy_method`` is ``reflink``, ``copy_file_range`` or ``copy``;
    ``verify_method`` is ``bytes`` or ``packets``. ``owner_preserved`` is
    False when the process could not give the new file the original's owner
    and group (it then belongs to the worker's user). ``timings`` are
    seconds per stage, for benchmarks and the admin. ``device`` and
    ``inode`` are the file's now (a write gives it a new inode);
    ``audio_fingerprint`` is set when the caller asked for it.
    """

    path: str
    changed: bool
    size: int
    mtime_ns: int
    copy_method: str | None = None
    verify_method: str | None = None
    owner_preserved: bool = True
    timings: dict[str, float] = field(default_factory=dict)
    device: int | None = None
    inode: int | None = None
    audio_fingerprint: str = ""
