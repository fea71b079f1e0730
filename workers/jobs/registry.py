"""Live workers as ``Meta`` rows: identity, heartbeats, and reaping the dead.

A worker is ``worker:<host>:<queue>:<n>`` where ``n`` is supervisord's process
number. Each process start gets a fresh boot id, so a restarted process never
inherits the claims of the one it replaces (``queue.rescue_predecessor``).
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from workers.jobs import dialect
from workers.jobs import processes
from workers.models import Meta

PREFIX = "worker:"


@dataclass(frozen=True)
class Identity:
    host: str
    queue: str
    number: str
    pid: int
    boot_id: str
    pid_start: str

    @property
    def key(self) -> str:
        return f"{PREFIX}{self.host}:{self.queue}:{self.number}"


def new_identity(queue: str, number: str | int | None = None) -> Identity:
    """Identity for this process; the number defaults to supervisord's, else ``p<pid>``."""
    pid = os.getpid()
    if number is None:
        number = os.environ.get("EARMARK_WORKER_NUMBER") or f"p{pid}"
    return Identity(
        host=settings.EARMARK_HOSTNAME,
        queue=queue,
        number=str(number),
        pid=pid,
        boot_id=uuid.uuid4().hex[:16],
        pid_start=processes.start_time(pid),
    )


def write(identity: Identity, state: dict) -> None:
    """Create or refresh the worker's row; ``updated_at`` is the heartbeat."""
    value = {
        "host": identity.host,
        "queue": identity.queue,
        "number": identity.number,
        "pid": identity.pid,
        "pid_start": identity.pid_start,
        "boot_id": identity.boot_id,
        **state,
    }
    # One commit for the row and the dashboard broker's wake-up (PostgreSQL): heartbeats are frequent.
    with transaction.atomic():
        Meta.objects.update_or_create(key=identity.key, defaults={"value": value, "updated_at": timezone.now()})
        dialect.notify(connection, dialect.STATE_CHANNEL)


def remove(identity: Identity) -> None:
    """Delete the row, but only our own incarnation's (a successor may already own the key)."""
    row = Meta.objects.filter(key=identity.key).first()
    if row and row.value.get("boot_id") == identity.boot_id:
        row.delete()
        dialect.notify(connection, dialect.STATE_CHANNEL)


def live_workers() -> list[dict]:
    """Every worker row, with its heartbeat age in seconds."""
    now = timezone.now()
    out = []
    for row in Meta.objects.filter(key__startswith=PREFIX).order_by("key"):
        out.append({"id": row.key, **row.value, "heartbeat_age": round((now - row.updated_at).total_seconds(), 1)})
    return out


def _dead_on_this_host(value: dict) -> bool:
    """A worker on our own host whose process is gone (or replaced) is dead right now."""
    if value.get("host") != settings.EARMARK_HOSTNAME:
        return False
    pid = value.get("pid")
    return bool(pid) and processes.is_gone(pid, value.get("pid_start", ""))


def reap(heartbeat_timeout: float | None = None) -> int:
    """Delete the rows of workers that are dead: a stale heartbeat, or a dead pid on this host.

    Their jobs are then rescued by ``queue.rescue`` (no row, no owner).
    """
    timeout = heartbeat_timeout or settings.EARMARK_HEARTBEAT_TIMEOUT
    stale = timezone.now() - timedelta(seconds=timeout)
    n, _ = Meta.objects.filter(key__startswith=PREFIX, updated_at__lt=stale).delete()
    for row in Meta.objects.filter(key__startswith=PREFIX, key__contains=f":{settings.EARMARK_HOSTNAME}:"):
        if _dead_on_this_host(row.value):
            n += Meta.objects.filter(key=row.key, updated_at=row.updated_at).delete()[0]
    if n:
        dialect.notify(connection, dialect.STATE_CHANNEL)
    return n
