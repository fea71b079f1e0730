"""The calibration in force, as the tagger applies it: raw network score -> the strength tag tiers cut.

A network's raw sigmoid output means different things on different labels
and libraries (a rare tag rarely passes 0.2; a common one idles there). A
calibration (``workers.calibration`` computes and activates them) records per
label the 5th and 95th percentile of the library's stored mean scores;
``LibraryCalibration.scale`` maps a raw score to ``(raw - p5) / (p95 - p5)``.
``current`` gives each process the one in force, cached and re-checked with
one primary-key read at most every ``REFRESH_SECONDS``. Torch-free: the
recalibrator and the web process read it too.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

from workers.models import Calibration, Meta
from workers.tagging.tagset import UNCALIBRATED

CURRENT_KEY = "calibration:current"
#: The smallest p95 - p5 span a label is scaled by, on the raw sigmoid scale.
#: A label the library never varies on (p95 ≈ p5) would otherwise turn noise
#: of 0.001 into "clearly present"; with this floor it must rise at least
#: 0.005 above the library's p5 to reach "regular".
MIN_SPAN = 0.01
#: How stale a process's cached current calibration may be, in seconds.
REFRESH_SECONDS = 1.0


class LibraryCalibration:
    """A stored ``Calibration`` in the shape ``tagset.build_tags`` takes (its ``Calibration`` protocol).

    p5/p95 min-max, unclipped (a score beyond p95 must still outrank one at
    p95 when contradictions are resolved). A label the calibration does not
    cover (say, an imported calibration of a model with fewer labels) keeps
    the uncalibrated scaling rather than failing the track.
    """

    def __init__(self, version: str, stats: dict[str, dict]):
        self.version = version
        self._low = {label: float(s["p5"]) for label, s in stats.items()}
        self._span = {label: max(float(s["p95"]) - float(s["p5"]), MIN_SPAN) for label, s in stats.items()}

    @classmethod
    def from_row(cls, row: Calibration) -> "LibraryCalibration":
        return cls(row.version, row.stats)

    def scale(self, label: str, raw: float) -> float:
        low = self._low.get(label)
        if low is None:
            return UNCALIBRATED.scale(label, raw)
        return (raw - low) / self._span[label]

    def __repr__(self):
        return f"LibraryCalibration({self.version!r}, {len(self._low)} labels)"


def current_pointer() -> dict | None:
    """The ``calibration:current`` meta value (id, version, track_count), or None before any."""
    value = Meta.objects.filter(key=CURRENT_KEY).values_list("value", flat=True).first()
    return value or None


def current_row() -> Calibration | None:
    pointer = current_pointer()
    return Calibration.objects.filter(id=pointer["id"]).first() if pointer else None


@dataclass
class _Cache:
    calibration: object = UNCALIBRATED
    checked: float = -math.inf


_cache = _Cache()


def current(max_age: float = REFRESH_SECONDS, expect: str | None = None):
    """The calibration in force, for ``build_tags``: a ``LibraryCalibration`` or ``UNCALIBRATED``.

    Cached per process; re-checked (one primary-key read of the meta row) at
    most every ``max_age`` seconds, or at once when ``expect`` names a
    version other than the cached one (a recalibration job queued for a
    newer calibration than this process has seen). The row itself is read
    only when the version changed.
    """
    cached = _cache.calibration
    now = time.monotonic()
    if now - _cache.checked < max_age and (expect is None or expect == cached.version):
        return cached
    pointer = current_pointer()
    if pointer is None:
        calibration = UNCALIBRATED
    elif pointer.get("version") == cached.version:
        calibration = cached
    else:
        row = Calibration.objects.filter(id=pointer.get("id")).first()
        calibration = LibraryCalibration.from_row(row) if row else UNCALIBRATED
    _cache.calibration, _cache.checked = calibration, now
    return calibration


def reset_cache() -> None:
    """Forget the cached calibration (tests; a process that switched databases)."""
    _cache.calibration, _cache.checked = UNCALIBRATED, -math.inf


