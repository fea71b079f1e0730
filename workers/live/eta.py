"""How long until the work in sight is done, at its rate: one rule for a queue and for a library scan.

A queue's rate is its jobs finished in the last minute (``snapshots.throughput``);
a scan's is its folders done per minute since it started. A scan finds
folders as it goes (``folders_total`` grows), so its time left is for the
folders found so far: it can grow while the scan runs, and it is exact only
near the end.
"""
from __future__ import annotations

import datetime

from django.utils import timezone
from django.utils.dateparse import parse_datetime


def text(left: float, per_minute: float, paused: bool = False) -> str:
    """``left`` units at ``per_minute``: "12 min", "3.5 h", "< 1 min"; "" with nothing left, "—" with no rate."""
    if not left:
        return ""
    if paused:
        return "paused"
    if not per_minute:
        return "—"
    minutes = left / per_minute
    if minutes < 1:
        return "< 1 min"
    if minutes < 90:
        return f"{round(minutes)} min"
    return f"{minutes / 60:.1f} h"


def scan(progress: dict, now: datetime.datetime | None = None) -> dict:
    """A running scan's ``rate`` (folders per minute since it started) and ``eta``; {} for a scan not running."""
    started = parse_datetime(progress.get("started_at") or "")
    if progress.get("state") != "running" or started is None:
        return {}
    now = now or timezone.now()
    if timezone.is_naive(started):
        started = timezone.make_aware(started, datetime.timezone.utc)
    minutes = max((now - started).total_seconds(), 1.0) / 60
    done, total = progress.get("folders_done") or 0, progress.get("folders_total") or 0
    rate = done / minutes
    return {"rate": round(rate, 1) if rate < 10 else round(rate), "eta": text(max(total - done, 0), rate)}


def scan_text(progress: dict) -> str:
    """One line for a page: "3 min left at 40 folders/min (of the 120 folders found so far)"; "" when not running."""
    found = scan(progress)
    if not found or not found["eta"]:
        return ""
    if found["eta"] == "—":
        return "time left: not known yet (no folder done)"
    return (f"{found['eta']} left at {found['rate']} folders/min "
            f"(of the {progress.get('folders_total') or 0} folders found so far)")
