"""Periodic upkeep that any worker may run: reap dead workers, rescue their jobs, prune, fail stalled scans.

Only one process runs it per interval: a conditional UPDATE on one meta row is
the lock (whoever moves its timestamp forward wins), so many workers do not
repeat the same scans of the job table.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from workers.jobs import queue, registry
from workers.models import Meta

log = logging.getLogger(__name__)
LOCK_KEY = "maintenance:last_run"


@dataclass
class MaintenanceResult:
    reaped: int = 0
    requeued: int = 0
    quarantined: int = 0
    pruned: int = 0
    scans_failed: int = 0


def interval() -> float:
    """Often enough that a dead worker's jobs are back within the heartbeat timeout."""
    return max(0.5, min(5.0, settings.EARMARK_HEARTBEAT_TIMEOUT / 6))


def take_turn() -> bool:
    """True for exactly one caller per interval, across every process and host."""
    now = timezone.now()
    Meta.objects.get_or_create(key=LOCK_KEY, defaults={"value": {}, "updated_at": now - timedelta(days=1)})
    due = now - timedelta(seconds=interval())
    return Meta.objects.filter(key=LOCK_KEY, updated_at__lt=due).update(updated_at=now) == 1


def run_once() -> MaintenanceResult:
    """One pass; the staleness margin leaves room for the interval so jobs return in time."""
    timeout = max(settings.EARMARK_HEARTBEAT_TIMEOUT - interval(), interval())
    result = MaintenanceResult(reaped=registry.reap(timeout))
    rescued = queue.rescue(timeout)
    result.requeued, result.quarantined = rescued.requeued, rescued.failed
    result.pruned = queue.prune()
    from workers.library.scanner import fail_stalled_scans  # here: the scanner imports the runtime, which imports this

    result.scans_failed = fail_stalled_scans()
    if result.reaped or result.requeued or result.quarantined or result.scans_failed:
        log.info("maintenance: %s", result)
    return result


def maybe_run() -> MaintenanceResult | None:
    return run_once() if take_turn() else None
