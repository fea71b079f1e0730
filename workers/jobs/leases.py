"""Leases: which jobs a worker still holds, charging an attempt as work begins, and extending them.

A lease is a running job's ``claimed_by`` (the worker) and ``boot_id`` (this
incarnation of it) with an expiry that the worker's heartbeat keeps
pushing out. Every write a worker makes to a job it holds is conditional on
the lease (``held_by``), so a job rescued from a worker that looked dead is
never completed, failed or released by it afterwards; ``held`` is the fence
a worker checks before a write outside the database (a tag write).
"""
from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.db import connection
from django.utils import timezone

from workers.models import Job, Meta

JOB = Job._meta.db_table
META = Meta._meta.db_table


def ts(dt):
    """A datetime as the database stores it, for raw SQL parameters."""
    return connection.ops.adapt_datetimefield_value(dt)


def held_by(worker_id: str, boot_id: str | None) -> tuple[str, list]:
    """The WHERE clause (and its parameters) of a job this worker holds: running, claimed by this incarnation.

    ``boot_id=None`` accepts any incarnation of the worker id (tests and
    one-shot tools that never restart); the runner always passes its own.
    """
    if boot_id is None:
        return "state = 'running' AND claimed_by = %s", [worker_id]
    return "state = 'running' AND claimed_by = %s AND boot_id = %s", [worker_id, boot_id]


def id_in(ids) -> str:
    return f"id IN ({', '.join(['%s'] * len(ids))})"


def begin(job_ids: list[int], worker_id: str, boot_id: str | None = None) -> set[int]:
    """Charge an attempt to claimed jobs whose processing starts now; returns those still ours.

    A job missing from the answer was rescued from this worker (its lease
    or heartbeat looked dead) and may be running elsewhere: do not start it.
    """
    if not job_ids:
        return set()
    mine, params = held_by(worker_id, boot_id)
    with connection.cursor() as cur:
        cur.execute(f"UPDATE {JOB} SET attempts = attempts + 1 WHERE {mine} AND {id_in(job_ids)} RETURNING id",
                    [*params, *job_ids])
        return {row[0] for row in cur.fetchall()}


def held(job_ids: list[int], worker_id: str, boot_id: str, margin_seconds: float | None = None) -> set[int]:
    """The jobs among ``job_ids`` that no rescuer can take from this worker for ``margin_seconds`` more.

    The fence before a write that must not happen twice (a tag write): the
    job is still ours, its lease runs past the margin, and our heartbeat is
    fresh enough that the rescuer's timeout is at least the margin away.
    Between this check and the write the worker has ``margin_seconds``;
    the heartbeat process keeps both clocks moving meanwhile. Hosts'
    clocks must agree to well within the margin (NTP), as for every lease.
    """
    if not job_ids:
        return set()
    timeout = settings.EARMARK_HEARTBEAT_TIMEOUT
    margin = timeout / 2 if margin_seconds is None else margin_seconds
    now = timezone.now()
    mine, params = held_by(worker_id, boot_id)
    with connection.cursor() as cur:
        cur.execute(f"SELECT id FROM {JOB} WHERE {mine} AND {id_in(job_ids)} AND lease_expires > %s "
                    f"AND EXISTS (SELECT 1 FROM {META} m WHERE m.key = %s AND m.updated_at >= %s)",
                    [*params, *job_ids, ts(now + timedelta(seconds=margin)), worker_id,
                     ts(now - timedelta(seconds=timeout - margin))])
        return {row[0] for row in cur.fetchall()}


def extend_leases(worker_id: str, boot_id: str, lease_seconds: float | None = None) -> int:
    """Push out the leases of every job this worker (this boot) holds."""
    lease = timezone.now() + timedelta(seconds=lease_seconds or settings.EARMARK_LEASE_SECONDS)
    return Job.objects.filter(state="running", claimed_by=worker_id, boot_id=boot_id).update(lease_expires=lease)
