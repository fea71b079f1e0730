"""What the live dashboard shows, read from the database: one function per event channel.

Each function returns a ``Snapshot``: a flat ``{key: value}`` dict of
JSON-ready values (the unit the broker diffs and the browser replaces), plus
``refresh_at``, the wall-clock time at which the snapshot goes stale by itself
although the database did not change (a heartbeat turning late, a finished job
leaving the one-minute throughput window). The broker re-reads at that time
even without a commit; otherwise it re-reads only after one.

Values never contain anything that moves on every heartbeat of a healthy
worker, so an idle system produces no events: a fresh heartbeat is shown as
"at most ``late_after()`` seconds old", and only a late one carries its age
(in steps, see ``late_step``).
"""
from __future__ import annotations

import datetime
import time
from dataclasses import dataclass

from django.conf import settings
from django.db import connection
from django.utils import timezone

from workers.jobs import queue, registry
from workers.library import scan
from workers.live import eta
from workers.models import Job, Library, Meta

CHANNELS = ("workers", "queues", "jobs")
THROUGHPUT_WINDOW_S = 60
RECENT_FAILURES = 10
# A running scan's rate and time left move with the clock: re-read its row at least this often.
SCAN_ETA_REFRESH_S = 5.0
ERROR_PREVIEW_CHARS = 400

# The worker-row fields the dashboard shows (the row holds more: boot id, pid start time...).
WORKER_FIELDS = ("host", "queue", "number", "pid", "state", "job", "job_key", "file", "progress", "detail",
                 "device", "gpu_memory", "done", "failed")
SCAN_FIELDS = ("gen", "state", "full", "folders_total", "folders_done", "files_seen", "files_read", "new",
               "changed", "failed", "missing", "error")


@dataclass
class Snapshot:
    state: dict
    refresh_at: float | None = None  # epoch seconds; None: only a database change can alter it


def _earliest(*times: float | None) -> float | None:
    known = [t for t in times if t is not None]
    return min(known) if known else None


# --- workers -----------------------------------------------------------------


def late_after() -> float:
    """Seconds after which a heartbeat counts as late: two missed beats and a margin."""
    return 2 * settings.EARMARK_HEARTBEAT_INTERVAL + 1


def late_step(age: float) -> int:
    """How finely a late heartbeat's age is shown: 5 s steps in the first minute, then minutes, then hours.

    Coarser steps for older silences keep a dead worker's row (until it is
    reaped) from sending an event every second.
    """
    return 5 if age < 60 else 60 if age < 3600 else 3600


def heartbeat(age: float) -> dict:
    """``{"late": False, "within": s}`` while fresh; ``{"late": True, "age": s}`` once late (in steps)."""
    if age <= late_after():
        return {"late": False, "within": round(late_after())}
    step = late_step(age)
    return {"late": True, "age": int(age // step * step)}


def heartbeat_changes_in(age: float) -> float:
    """Seconds until ``heartbeat(age)`` would show something else."""
    if age <= late_after():
        return late_after() - age + 0.05
    step = late_step(age)
    return (age // step + 1) * step - age + 0.05


def worker_row(raw: dict) -> dict:
    row = {f: raw.get(f) for f in WORKER_FIELDS}
    row["heartbeat"] = heartbeat(raw["heartbeat_age"])
    return row


def workers_snapshot() -> Snapshot:
    """One entry per live worker row, keyed by its id (``worker:<host>:<queue>:<n>``).

    Refresh: when some worker's heartbeat would turn late, or its late age
    reach the next step, if no heartbeat (a commit) comes first.
    """
    now = time.time()
    state, refresh = {}, None
    for raw in registry.live_workers():
        state[raw["id"]] = worker_row(raw)
        refresh = _earliest(refresh, now + heartbeat_changes_in(raw["heartbeat_age"]))
    return Snapshot(state, refresh)


# --- queues ------------------------------------------------------------------


def _finished_since(since) -> list[tuple[str, str, object]]:
    """(queue, state, finished_at) of jobs finished since ``since``, over the ``job_finished`` index.

    The state list is written into the SQL as literals, exactly as the
    partial index's condition reads: SQLite proves a partial index usable
    only from literal terms (with bound parameters, or a GROUP BY to satisfy,
    it scans the whole table instead). The states are constants, not input.
    """
    states = ", ".join(f"'{s}'" for s in Job.FINISHED_STATES)
    sql = (f"SELECT queue, state, finished_at FROM {Job._meta.db_table} "
           f"WHERE state IN ({states}) AND finished_at >= %s")
    with connection.cursor() as cur:
        cur.execute(sql, [connection.ops.adapt_datetimefield_value(since)])
        return cur.fetchall()


def throughput(now=None) -> tuple[dict[str, int], float | None]:
    """Jobs finished (done or failed, not cancelled) in the last minute, per queue; and when that count next drops."""
    now = now or timezone.now()
    per_queue = {q: 0 for q in queue.QUEUES}
    oldest = None
    for name, state, finished_at in _finished_since(now - datetime.timedelta(seconds=THROUGHPUT_WINDOW_S)):
        if state == Job.State.CANCELLED:
            continue
        per_queue[name] = per_queue.get(name, 0) + 1
        oldest = finished_at if oldest is None or finished_at < oldest else oldest
    if oldest is None:
        return per_queue, None
    oldest = _as_datetime(oldest)
    return per_queue, (oldest + datetime.timedelta(seconds=THROUGHPUT_WINDOW_S)).timestamp() + 0.05


def _as_datetime(value):
    """A raw ``finished_at`` as an aware datetime (SQLite returns text, PostgreSQL a datetime)."""
    if isinstance(value, str):
        from django.utils.dateparse import parse_datetime

        value = parse_datetime(value)
    return value if timezone.is_aware(value) else timezone.make_aware(value, datetime.timezone.utc)


def queues_snapshot() -> Snapshot:
    """Counts per queue and state with the paused flag and time left (``queue:<name>``), and ``throughput``."""
    paused = set(Meta.objects.filter(key__startswith="queue:", key__endswith=":paused").values_list("key", flat=True))
    per_queue, refresh = throughput()
    state = {}
    for name, counts in queue.counts().items():
        is_paused = queue.paused_key(name) in paused
        left = eta.text(counts.get("queued", 0) + counts.get("running", 0), per_queue.get(name, 0), is_paused)
        state[f"queue:{name}"] = {**counts, "paused": is_paused, "eta": left}
    state["throughput"] = {"per_minute": per_queue, "total": sum(per_queue.values())}
    return Snapshot(state, refresh)


# --- jobs: scans and failures ----------------------------------------------------


def scan_row(library: Library, progress: dict) -> dict:
    row = {"library": library.name, "library_id": library.id, "root": library.root,
           **{f: progress.get(f) for f in SCAN_FIELDS}}
    row["state"] = row["state"] or "never scanned"
    row["errors"] = len(progress.get("errors") or [])
    row["last_scan_error"] = library.last_scan_error
    row.update({"rate": None, "eta": "", **eta.scan(progress)})
    return row


def recent_failures(limit: int = RECENT_FAILURES) -> list[dict]:
    """The latest failed jobs with their reasons (cut short; the Job admin has them in full)."""
    out = []
    # queue IN (...) lets SQLite seek the (queue, state) index to the failed rows instead of scanning.
    rows = (Job.objects.filter(queue__in=queue.QUEUES, state=Job.State.FAILED).select_related("track")
            .order_by("-finished_at", "-id")[:limit])
    for job in rows:
        error = job.last_error
        out.append({
            "id": job.id, "queue": job.queue, "key": job.key, "attempts": job.attempts,
            "path": job.track.path if job.track else "",
            "error": error if len(error) <= ERROR_PREVIEW_CHARS else error[:ERROR_PREVIEW_CHARS] + "…",
            "finished_at": job.finished_at.isoformat() if job.finished_at else None,
        })
    return out


def jobs_snapshot() -> Snapshot:
    """Scan progress per library (``scan:<library id>``, with rate and time left) and ``failures``, the recent failed jobs.

    Refresh: every ``SCAN_ETA_REFRESH_S`` while a scan runs (its rate falls when no folder is done).
    """
    rows = {m.key: m.value for m in Meta.objects.filter(key__startswith="scan:")}
    state, refresh = {}, None
    for library in Library.objects.order_by("name"):
        key = scan.progress_key(library.id)
        state[key] = scan_row(library, rows.get(key, {}))
        if state[key]["state"] == "running":
            refresh = time.time() + SCAN_ETA_REFRESH_S
    state["failures"] = recent_failures()
    return Snapshot(state, refresh)


READERS = {"workers": workers_snapshot, "queues": queues_snapshot, "jobs": jobs_snapshot}


def read(channel: str) -> Snapshot:
    return READERS[channel]()


def read_all() -> dict[str, Snapshot]:
    return {channel: read(channel) for channel in CHANNELS}
