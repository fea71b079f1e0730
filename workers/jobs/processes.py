"""Is a process on this host still the one we knew? A pid plus its kernel start time says.

A pid alone is not enough: after a crash the kernel may give the same pid to
an unrelated process. Worker rows and temporary-file names therefore record
both, and these two functions compare them.
"""
from __future__ import annotations

import os


def start_time(pid: int) -> str:
    """Field 22 of ``/proc/<pid>/stat`` (ticks since boot), or "" when unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return ""
    # The command name (field 2) may hold spaces, so split after its ')'.
    fields = stat.rsplit(b")", 1)[1].split()
    return fields[19].decode() if len(fields) > 19 else ""


def is_gone(pid: int, start: str) -> bool:
    """True when ``pid`` no longer runs, or now belongs to another process than the one started at ``start``."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    return bool(start) and start_time(pid) not in ("", start)
