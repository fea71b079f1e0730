"""The job queues: enqueue, claim, complete, fail, rescue, and their maintenance.

One table serves every queue (``Job.queue``). The contract (DESIGN.md):
at-least-once delivery with leases, a claim in one statement, retries with
exponential backoff, quarantine after ``max_attempts``, dedup of active jobs by
key, pause/resume per queue, and pruning so the table stays bounded. The only
SQLite/PostgreSQL difference lives in ``workers.jobs.dialect``.
"""
from __future__ import annotations

import json
import random
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Count
from django.utils import timezone

from workers.jobs import dialect
from workers.jobs.leases import held_by, id_in
from workers.jobs.leases import ts as _ts
from workers.models import Job, Meta, Track

QUEUES = ("scan", "tag", "calibrate")
BACKOFF_BASE_S = 10.0
BACKOFF_CAP_S = 3600.0

JOB = Job._meta.db_table
META = Meta._meta.db_table


@dataclass
class ClaimedJob:
    id: int
    queue: str
    key: str
    payload: dict
    track_id: int | None
    library_id: int | None
    attempts: int
    max_attempts: int
    charged: bool = True  # the claim counted an attempt (else ``leases.begin`` does, when work starts)


@dataclass
class RescueResult:
    requeued: int = 0
    failed: int = 0


@dataclass
class NewJob:
    """What ``enqueue_many`` takes: one job to add unless an active one has its key."""

    key: str
    payload: dict = field(default_factory=dict)
    track_id: int | None = None
    library_id: int | None = None
    priority: int = 100
    max_attempts: int = 3


def _check_queue(queue: str) -> None:
    if queue not in QUEUES:
        raise ValueError(f"unknown queue {queue!r}; expected one of {', '.join(QUEUES)}")


def paused_key(queue: str) -> str:
    return f"queue:{queue}:paused"


# --- adding work -----------------------------------------------------------


def enqueue(queue: str, key: str, payload: dict | None = None, **fields) -> bool:
    """Add one job; False when an active job with the same key already exists."""
    return enqueue_many(queue, [NewJob(key=key, payload=payload or {}, **fields)]) == 1


def enqueue_many(queue: str, jobs: list[NewJob]) -> int:
    """Add jobs in one statement, skipping keys that already have an active job.

    The partial unique index on (queue, key) over active states does the dedup:
    the insert ignores conflicts, so concurrent enqueuers never race.
    """
    _check_queue(queue)
    if not jobs:
        return 0
    now = _ts(timezone.now())
    # One transaction: the rows and the wake-up of idle workers commit together
    # (one commit, and no notification for rows that never became visible).
    with transaction.atomic(), connection.cursor() as cur:
        created = _insert_ignoring_conflicts(cur, queue, jobs, now)
        if created:
            dialect.notify(connection, dialect.queue_channel(queue))
    return created


_INSERT_COLUMNS = ("queue", "key", "payload", "track_id", "library_id", "state", "priority", "attempts",
                   "max_attempts", "run_after", "claimed_by", "boot_id", "last_error", "created_at")


def _insert_ignoring_conflicts(cur, queue: str, jobs: list[NewJob], now) -> int:
    """INSERT ... ON CONFLICT DO NOTHING, returning how many rows went in.

    Plain parameter rows, no model instances: the scanner enqueues a tag job
    for every file it reads, and building ``Job`` objects cost more than the insert.
    """
    placeholders = "(" + ", ".join(["%s"] * len(_INSERT_COLUMNS)) + ")"
    created = 0
    for start in range(0, len(jobs), 500):
        chunk = jobs[start : start + 500]
        params = []
        for j in chunk:
            params += [queue, j.key, json.dumps(j.payload), j.track_id, j.library_id, "queued", j.priority, 0,
                       j.max_attempts, now, "", "", "", now]
        cur.execute(
            f"INSERT INTO {JOB} ({', '.join(_INSERT_COLUMNS)}) VALUES {', '.join([placeholders] * len(chunk))} "
            "ON CONFLICT DO NOTHING",
            params,
        )
        created += max(cur.rowcount, 0)
    return created


# --- claiming and finishing ------------------------------------------------


def claim(queue: str, worker_id: str, boot_id: str, limit: int = 1, lease_seconds: float | None = None,
          charge: bool = True) -> list[ClaimedJob]:
    """Claim up to ``limit`` ready jobs in one statement (nothing if the queue is paused).

    ``attempts`` counts the times a job's processing began, so that a job
    that kills its worker every time reaches ``max_attempts`` and is
    quarantined by the rescuer. A worker that starts on what it claims at
    once lets the claim count (``charge``); one that claims ahead of its work
    (a batch, a lookahead) claims uncharged and charges each job with
    ``begin`` when it starts on it, so that its death charges only that job.
    """
    now = timezone.now()
    lease = now + timedelta(seconds=lease_seconds or settings.EARMARK_LEASE_SECONDS)
    # The picked ids in a materialized CTE, evaluated exactly once: as ``WHERE id IN (SELECT …
    # LIMIT n FOR UPDATE SKIP LOCKED)`` PostgreSQL may run the sub-select again for the
    # semi-join, and each run skips the rows the last one locked, so one claim took more
    # than ``limit`` jobs (found by tests/jobs/test_queue_properties.py).
    sql = (
        f"WITH picked AS MATERIALIZED (SELECT id FROM {JOB} WHERE queue = %s AND state = 'queued' "
        f"AND run_after <= %s AND NOT EXISTS (SELECT 1 FROM {META} WHERE key = %s) "
        f"ORDER BY priority, id LIMIT %s{dialect.claim_lock_clause(connection)}) "
        f"UPDATE {JOB} SET state = 'running', claimed_by = %s, boot_id = %s, lease_expires = %s, "
        f"attempts = attempts + {1 if charge else 0}, started_at = %s "
        "WHERE id IN (SELECT id FROM picked) "
        "RETURNING id, queue, key, payload, track_id, library_id, attempts, max_attempts"
    )
    params = [queue, _ts(now), paused_key(queue), limit, worker_id, boot_id, _ts(lease), _ts(now)]
    with connection.cursor() as cur:
        cur.execute(sql, params)
        rows = cur.fetchall()
    jobs = [ClaimedJob(r[0], r[1], r[2], _json(r[3]), r[4], r[5], r[6], r[7], charge) for r in rows]
    jobs.sort(key=lambda j: j.id)
    return jobs


def _json(value):
    return json.loads(value) if isinstance(value, (str, bytes)) else (value or {})


def complete(job_ids: list[int], worker_id: str, results: dict[int, dict] | None = None,
             boot_id: str | None = None) -> int:
    """Mark jobs done, only where this worker still holds them (a rescued job is not ours)."""
    if not job_ids:
        return 0
    # Raw statements: this is the worker's hot path, and the ORM's query
    # building cost more than the UPDATE itself (bench.queue).
    now = _ts(timezone.now())
    results = results or {}
    plain = [i for i in job_ids if i not in results]
    done_sql = f"UPDATE {JOB} SET state = 'done', finished_at = %s, lease_expires = NULL, last_error = ''"
    mine, params = held_by(worker_id, boot_id)
    statements = []
    for start in range(0, len(plain), 500):  # SQLite bounds the number of parameters
        chunk = plain[start : start + 500]
        statements.append((f"{done_sql} WHERE {mine} AND {id_in(chunk)}", [now, *params, *chunk]))
    for job_id, result in results.items():
        statements.append((f"{done_sql}, result = %s WHERE {mine} AND id = %s",
                           [now, json.dumps(result), *params, job_id]))
    done = 0
    # One transaction (one commit) for the whole batch, however many statements it takes.
    with transaction.atomic() if len(statements) > 1 else nullcontext():
        with connection.cursor() as cur:
            for sql, params in statements:
                cur.execute(sql, params)
                done += max(cur.rowcount, 0)
    return done


def backoff_seconds(attempts: int) -> float:
    """Exponential backoff with a little jitter so retried jobs do not stampede."""
    base = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** max(0, attempts - 1))
    return base * (1 + random.random() * 0.2)


def fail(job: ClaimedJob, worker_id: str, error: str, retry: bool = True, boot_id: str | None = None) -> str:
    """Record a failure: back to the queue after a backoff, or failed for good.

    Returns the job's new state (``"lost"`` when the job is no longer ours).
    ``retry=False`` is for errors that no retry can fix (a file that is not
    audio), so they do not burn the queue's time.
    """
    now = timezone.now()
    final = not retry or job.attempts >= job.max_attempts
    qs = Job.objects.filter(id=job.id, state="running", claimed_by=worker_id)
    if boot_id is not None:
        qs = qs.filter(boot_id=boot_id)
    if final:
        changed = qs.update(state="failed", finished_at=now, lease_expires=None, last_error=error, claimed_by="",
                            boot_id="")
        return "failed" if changed else "lost"
    changed = qs.update(
        state="queued",
        run_after=now + timedelta(seconds=backoff_seconds(job.attempts)),
        lease_expires=None,
        last_error=error,
        claimed_by="",
        boot_id="",
    )
    return "queued" if changed else "lost"


def release(job_ids: list[int], worker_id: str, boot_id: str | None = None, uncharged=()) -> int:
    """Hand unfinished jobs back at once (graceful stop): their attempt is refunded.

    Jobs in ``uncharged`` were claimed ahead and never begun (``begin``), so
    there is nothing to refund.
    """
    if not job_ids:
        return 0
    mine, params = held_by(worker_id, boot_id)
    uncharged = set(uncharged)
    free = [i for i in job_ids if i in uncharged]
    refund = f"NOT {id_in(free)}" if free else "1 = 1"
    with connection.cursor() as cur:
        cur.execute(
            f"UPDATE {JOB} SET state = 'queued', claimed_by = '', boot_id = '', lease_expires = NULL, "
            f"attempts = CASE WHEN attempts > 0 AND {refund} THEN attempts - 1 ELSE attempts END "
            f"WHERE {mine} AND {id_in(job_ids)}",
            [*free, *params, *job_ids],
        )
        return cur.rowcount


# --- rescue and maintenance ------------------------------------------------

def _requeue_sql(where: str) -> str:
    """The rescuer's one statement: requeue, or quarantine after max attempts.

    A job back after its first lost worker runs again at once (a deploy, an
    OOM kill: nothing wrong with the job); one whose workers died twice or
    more waits a backoff first, so that a file that kills its worker steps
    aside for the rest of the queue until its last try.
    """
    return (
        f"UPDATE {JOB} SET "
        "state = CASE WHEN attempts >= max_attempts THEN 'failed' ELSE 'queued' END, "
        "last_error = CASE WHEN attempts >= max_attempts "
        "THEN 'worker died ' || CAST(attempts AS TEXT) || ' times on this job (last: ' || claimed_by || ')' "
        "ELSE 'worker ' || claimed_by || ' stopped without finishing this job; requeued' END, "
        "finished_at = CASE WHEN attempts >= max_attempts THEN %s ELSE NULL END, "
        "run_after = CASE WHEN attempts >= 2 THEN %s ELSE %s END, "
        "claimed_by = '', boot_id = '', lease_expires = NULL "
        f"WHERE state = 'running' AND ({where})"
    )


def rescue(heartbeat_timeout: float | None = None) -> RescueResult:
    """Requeue jobs whose lease expired or whose worker stopped heartbeating.

    A worker counts as gone when its meta row is missing or older than the
    heartbeat timeout, so its jobs come back even when their lease is long.
    """
    timeout = heartbeat_timeout or settings.EARMARK_HEARTBEAT_TIMEOUT
    now = timezone.now()
    stale = now - timedelta(seconds=timeout)
    where = (
        "lease_expires < %s OR NOT EXISTS "
        f"(SELECT 1 FROM {META} m WHERE m.key = {JOB}.claimed_by AND m.updated_at >= %s)"
    )
    return _requeue(where, [_ts(now), _ts(stale)])


def rescue_predecessor(worker_id: str, boot_id: str) -> RescueResult:
    """A restarted worker hands back whatever its previous incarnation held."""
    return _requeue("claimed_by = %s AND boot_id <> %s", [worker_id, boot_id])


def _requeue(where: str, params: list) -> RescueResult:
    moment = timezone.now()
    now, later = _ts(moment), _ts(moment + timedelta(seconds=backoff_seconds(2)))
    with transaction.atomic():
        with connection.cursor() as cur:
            cur.execute(f"SELECT COUNT(*), SUM(CASE WHEN attempts >= max_attempts THEN 1 ELSE 0 END) FROM {JOB} "
                        f"WHERE state = 'running' AND ({where})", params)
            total, failed = cur.fetchone()
            if not total:
                return RescueResult()
            if failed:
                cur.execute(f"SELECT track_id, attempts, claimed_by FROM {JOB} WHERE state = 'running' AND ({where}) "
                            "AND attempts >= max_attempts AND queue = 'tag' AND track_id IS NOT NULL", params)
                poisoned = cur.fetchall()
            cur.execute(_requeue_sql(where), [now, later, now, *params])
            if failed and poisoned:
                _fail_poisoned_tracks(poisoned, moment)
            # At commit: idle workers take the requeued jobs at once, and the dashboard sees them.
            dialect.notify(connection, *(dialect.queue_channel(q) for q in QUEUES), dialect.STATE_CHANNEL)
    return RescueResult(requeued=total - (failed or 0), failed=failed or 0)


def _fail_poisoned_tracks(rows: list[tuple], moment: datetime) -> None:
    """Quarantined tag jobs fail their tracks too, with the reason.

    Otherwise the track stays "scanned" and every rescan would queue the
    file that kills taggers again. A failed track is tagged again only when
    its file changes, or when a person asks (retag in the admin).
    """
    for track_id, attempts, worker in rows:
        Track.objects.filter(id=track_id).update(
            state=Track.State.FAILED, updated_at=moment,
            error=f"quarantined: the tagger process died {attempts} times on this file (last: {worker}); "
                  "it is skipped until the file changes")


def prune(retention_seconds: float | None = None) -> int:
    """Delete finished jobs older than the retention period; returns how many."""
    keep = retention_seconds if retention_seconds is not None else settings.EARMARK_JOB_RETENTION_SECONDS
    cutoff = timezone.now() - timedelta(seconds=keep)
    deleted, _ = Job.objects.filter(state__in=Job.FINISHED_STATES, finished_at__lt=cutoff).delete()
    return deleted


# --- operator actions ------------------------------------------------------


def cancel(job_ids: list[int] | None = None, queue: str | None = None) -> int:
    """Cancel queued jobs (running ones finish; their worker owns them)."""
    qs = Job.objects.filter(state="queued")
    if job_ids is not None:
        qs = qs.filter(id__in=job_ids)
    if queue:
        qs = qs.filter(queue=queue)
    n = qs.update(state="cancelled", finished_at=timezone.now())
    if n:
        dialect.notify(connection, dialect.STATE_CHANNEL)
    return n


def retry(job_ids: list[int] | None = None, queue: str | None = None) -> int:
    """Put failed or cancelled jobs back in the queue with fresh attempts.

    A job whose key already has an active twin stays as it is (the dedup rule).
    """
    qs = Job.objects.filter(state__in=["failed", "cancelled"])
    if job_ids is not None:
        qs = qs.filter(id__in=job_ids)
    if queue:
        qs = qs.filter(queue=queue)
    active = Job.objects.filter(state__in=Job.ACTIVE_STATES)
    n = 0
    for job in qs.only("id", "queue", "key"):
        if active.filter(queue=job.queue, key=job.key).exists():
            continue
        n += Job.objects.filter(id=job.id).update(
            state="queued", attempts=0, run_after=timezone.now(), finished_at=None, claimed_by="", boot_id=""
        )
    if n:
        dialect.notify(connection, *(dialect.queue_channel(q) for q in QUEUES))
    return n


def pause(queue: str) -> None:
    _check_queue(queue)
    Meta.objects.update_or_create(key=paused_key(queue), defaults={"value": {"paused": True}, "updated_at": timezone.now()})
    dialect.notify(connection, dialect.STATE_CHANNEL)


def resume(queue: str) -> None:
    _check_queue(queue)
    Meta.objects.filter(key=paused_key(queue)).delete()
    dialect.notify(connection, dialect.queue_channel(queue))


def is_paused(queue: str) -> bool:
    return Meta.objects.filter(key=paused_key(queue)).exists()


def counts() -> dict[str, dict[str, int]]:
    """Jobs per queue and state, every state present (zeros included)."""
    out = {q: {s: 0 for s in Job.State.values} for q in QUEUES}
    for row in Job.objects.values("queue", "state").annotate(n=Count("id")):
        out.setdefault(row["queue"], {s: 0 for s in Job.State.values})[row["state"]] = row["n"]
    return out


def has_pending(queue: str) -> bool:
    """True while the queue has a job ready to claim now or one still running."""
    now = timezone.now()
    return Job.objects.filter(queue=queue, state="queued", run_after__lte=now).exists() or Job.objects.filter(
        queue=queue, state="running"
    ).exists()
