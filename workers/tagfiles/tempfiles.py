"""The safe writer's temporary clones: their names, and removing those no live writer will finish.

A clone's name says which process wrote it (``.earmark-tmp-<host>-<pid>-<start>-…``),
so the scanner can remove a dead writer's clone at once and never mistake a
clone for a track. No PyAV, no mutagen: the scanner imports this on every folder.
"""
from __future__ import annotations

import hashlib
import os
import re
import socket
import time

from workers.jobs import processes

TEMP_PREFIX = ".earmark-tmp-"
TEMP_PREFIX_BYTES = TEMP_PREFIX.encode()


def _host_digest() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


_writer: tuple[int, str] | None = None


def writer_tag() -> str:
    """``<host digest>-<pid>-<process start time>``: who writes a clone, in its name."""
    global _writer
    pid = os.getpid()
    if _writer is None or _writer[0] != pid:  # computed once per process (a fork gets its own)
        _writer = (pid, f"{_host_digest()}-{pid}-{processes.start_time(pid) or '0'}")
    return _writer[1]


_TEMP_NAME = re.compile(rb"^" + re.escape(TEMP_PREFIX_BYTES) + rb"([0-9a-f]{8})-(\d+)-(\d+)-")


def _writer_is_dead(name: bytes) -> bool:
    """True when the clone's name says it was written by a process of this host that no longer runs."""
    match = _TEMP_NAME.match(name)
    if match is None or match.group(1).decode() != _host_digest():
        return False  # another host's writer (a shared NAS) or an old-style name: only age tells
    pid, start = int(match.group(2)), match.group(3).decode()
    return pid != os.getpid() and processes.is_gone(pid, "" if start == "0" else start)


def remove_stale_temp_files(directory: str | bytes | os.PathLike, older_than: float = 3600.0) -> int:
    """Delete the ``.earmark-tmp-*`` clones in ``directory`` that no live writer will finish.

    Left behind only when a worker was killed mid-write (every failure path
    removes its own). A clone whose name says its writer ran on this host
    and has died is removed at once; any other (another host's writer, an
    old-style name) once it is older than ``older_than`` seconds, so a scanner
    never deletes the clone a live worker is writing right now. Returns how
    many were removed.
    """
    directory = os.fsencode(directory)
    prefix = TEMP_PREFIX_BYTES
    cutoff = time.time() - older_than
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return 0
    for entry in entries:
        if not entry.name.startswith(prefix) or not entry.is_file(follow_symlinks=False):
            continue
        try:
            if _writer_is_dead(entry.name) or entry.stat(follow_symlinks=False).st_mtime < cutoff:
                os.unlink(entry.path)
                removed += 1
        except FileNotFoundError:
            continue
    return removed
