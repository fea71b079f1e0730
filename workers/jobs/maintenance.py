"""Periodic upkeep that any worker may run: reap dead workers, rescue their jobs, prune, and the concerns' services.

The queue core knows only its own upkeep. A concern above it (failing a scan
that stalled, the automatic calibration) registers a service here with
``register``; each returns how many things it did, reported by name.

Only one process runs it per interval: a conditional UPDATE on one meta row is
the lock (whoever moves its timestamp forward wins), so many workers do not
repeat the same scans of the job table.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
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
    services: dict[str, int] = field(default_factory=dict)  # registered service name -> what it did


#: name -> service; filled by ``register`` when the concern's module is imported (``WorkersConfig.ready``).
SERVICES: dict[str, Callable[[], int]] = {}


def register(name: str):
    """Decorator: run ``fn()`` on every maintenance pass; it returns a count (0: nothing to do)."""
    def add(fn: Callable[[], int]) -> Callable[[], int]:
        SERVICES[name] = fn
        return fn
    return add


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
    for name, service in SERVICES.items():
        result.services[name] = _run_service(name, service)
    if result.reaped or result.requeued or result.quarantined or any(result.services.values()):
        log.info("maintenance: %s", result)
    return result


def maybe_run() -> MaintenanceResult | None:
    return run_once() if take_turn() else None


def _run_service(name: str, service: Callable[[], int]) -> int:
    """A failing service is logged and skipped: it must not stop the queue's own upkeep."""
    try:
        return int(service() or 0)
    except Exception:  # noqa: BLE001 - the next pass tries again
        log.exception("maintenance service %s failed", name)
        return 0
