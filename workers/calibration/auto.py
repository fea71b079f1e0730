"""The automatic trigger: a new calibration when the library has grown enough since the last one.

A new calibration is computed when the number of tagged tracks first reaches
``EARMARK_CALIBRATION_MIN_TRACKS`` (100) and again each time it has grown by
``EARMARK_CALIBRATION_GROWTH`` (0.2, i.e. 20%) since the current one. It runs
as a maintenance service (``workers.jobs.maintenance``) in whichever worker
takes the maintenance turn; it looks at the database at most every
``EARMARK_CALIBRATION_CHECK_SECONDS`` (30) per process, and one process per
interval (a conditional update on a meta row) does the counting.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from datetime import timedelta

from django.utils import timezone

from workers.calibration.compute import NotEnoughTracks, Recalibration, enqueue_stale, min_tracks, recalibrate, setting
from workers.jobs import maintenance, queue
from workers.models import Meta, Track
from workers.tagging import calibrated

log = logging.getLogger("earmark.calibration")

AUTO_KEY = "calibration:auto"
DEFAULT_GROWTH = 0.2
DEFAULT_CHECK_SECONDS = 30.0


def growth() -> float:
    return setting("EARMARK_CALIBRATION_GROWTH", DEFAULT_GROWTH, float)


def check_seconds() -> float:
    return setting("EARMARK_CALIBRATION_CHECK_SECONDS", DEFAULT_CHECK_SECONDS, float)


_last_check = -math.inf


@dataclass
class Due:
    """Whether a new calibration is due, and the numbers that decided it."""

    due: bool
    tagged: int
    needed: int
    current: dict | None


def auto_due() -> Due:
    """Compare the tagged tracks with the minimum (first time) or the current calibration's count × (1 + growth).

    An imported calibration counts the tracks of the library it came from,
    so it stands until this library has grown past that size by the same
    margin (``manage.py calibrate`` computes one at any time).
    """
    tagged = Track.objects.filter(state=Track.State.TAGGED).count()
    pointer = calibrated.current_pointer()
    needed = min_tracks()
    if pointer is not None:
        # The epsilon keeps 100 × 1.2 from needing 121 through rounding.
        needed = max(needed, math.ceil(pointer.get("track_count", 0) * (1 + growth()) - 1e-9))
    return Due(tagged >= needed, tagged, needed, pointer)


def auto_recalibrate() -> Recalibration | None:
    """Compute and activate a calibration when ``auto_due``; otherwise sweep for stale tracks.

    The sweep re-queues tracks that a race left on an older calibration (a
    tagger that wrote with the old one just after the switch); it waits
    until the calibrate queue is idle, so a large recalibration in progress
    is not offered its own jobs again every interval. A library whose
    tagged tracks lack usable scores (a model upgrade half done) is not
    retried until the count moves, so it costs one count per interval.
    """
    due = auto_due()
    if not due.due:
        if due.current and not queue.has_pending("calibrate"):
            enqueue_stale(due.current["version"], exclude_failed=True)
        return None
    blocked = Meta.objects.filter(key=AUTO_KEY).values_list("value", flat=True).first() or {}
    if blocked.get("blocked_at") == due.tagged:
        return None
    try:
        result = recalibrate()
    except NotEnoughTracks as exc:
        Meta.objects.filter(key=AUTO_KEY).update(value={"blocked_at": due.tagged, "reason": str(exc)})
        log.info("calibration due (%d tagged tracks) but not possible yet: %s", due.tagged, exc)
        return None
    Meta.objects.filter(key=AUTO_KEY).update(value={})
    log.info("auto calibration at %d tagged tracks: %s (%d tracks rewritten)", due.tagged,
             result.calibration.version, result.jobs)
    return result


def _take_turn(interval: float) -> bool:
    """True for one caller per interval across all processes: whoever moves the meta row's time wins."""
    now = timezone.now()
    Meta.objects.get_or_create(key=AUTO_KEY, defaults={"value": {}, "updated_at": now - timedelta(days=1)})
    due = now - timedelta(seconds=interval)
    return Meta.objects.filter(key=AUTO_KEY, updated_at__lt=due).update(updated_at=now) == 1


def maybe_recalibrate() -> Recalibration | None:
    """A maintenance service: cheap on every pass, never raises.

    No database access unless ``check_seconds()`` passed in this process,
    then one conditional update decides which process counts. A failure is
    logged: it must not fail the tagging job it runs after.
    """
    global _last_check
    interval = check_seconds()
    now = time.monotonic()
    if now - _last_check < interval:
        return None
    _last_check = now
    try:
        if not _take_turn(interval):
            return None
        return auto_recalibrate()
    except Exception:  # noqa: BLE001 - a best-effort hook; the next interval tries again
        log.exception("automatic calibration check failed")
        return None




@maintenance.register("recalibrated")
def _service() -> int:
    return int(maybe_recalibrate() is not None)


def reset() -> None:
    """Forget this process's trigger clock (tests; a process that switched databases)."""
    global _last_check
    _last_check = -math.inf
