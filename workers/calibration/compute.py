"""Computing a library calibration from stored scores, and making it current.

All from stored scores (no networks, no torch):

* ``compute`` loads every tagged track's mean scores into one numpy matrix
  (one SQL query, one ``frombuffer``) and takes the 5th/95th percentiles and
  a 100-bin histogram per label in a few vectorized passes: 100,000 tracks ×
  100 labels in about a second (``python -m bench.calibration``). Its
  version is a digest of the model version and the percentiles, so the same
  scores always give the same version and nothing needs rewriting.
* ``activate`` makes it current (the ``calibration:current`` meta row that
  ``workers.tagging.calibrated.current`` reads) and enqueues one
  ``calibrate`` job per tagged track whose tags were written with another
  version; recalibrator workers (``workers.calibration.recalibrate_worker``)
  rewrite those files, and skip every file whose tags come out the same.

``workers.calibration.auto`` decides when; ``workers.calibration.transfer``
moves a calibration between libraries as JSON.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np
from django.conf import settings
from django.db import connection
from django.utils import timezone

from workers.jobs import queue
from workers.models import Calibration, Job, Meta, Score, Track
from workers.tagging import scores as stored_scores
from workers.tagging.categories import LABELS
from workers.tagging.calibrated import CURRENT_KEY
from workers.tagging.manifest import current_model_version

log = logging.getLogger("earmark.calibration")

PERCENTILES = (5.0, 95.0)
BINS = 100
#: The label order the tagger stores scores in (MTT's 50, then MSD's 50).
LABEL_ORDER: tuple[str, ...] = tuple(LABELS)
JOB_PRIORITY = 100
DEFAULT_MIN_TRACKS = 100


class NotEnoughTracks(Exception):
    """Fewer tagged tracks with stored scores than a calibration needs."""

    def __init__(self, found: int, needed: int):
        super().__init__(f"{found} tagged track(s) with stored scores; a calibration needs at least {needed}")
        self.found, self.needed = found, needed


def min_tracks() -> int:
    """``EARMARK_CALIBRATION_MIN_TRACKS``: the fewest tagged tracks a calibration is computed from."""
    return setting("EARMARK_CALIBRATION_MIN_TRACKS", DEFAULT_MIN_TRACKS, int)


def setting(name: str, default, cast):
    """A Django setting when the project defines it, else the environment, else the default.

    Read at call time so tests (``override_settings``) and operators (env)
    can both change it without a restart of the settings module.
    """
    value = getattr(settings, name, None)
    if value is None:
        value = os.environ.get(name)
    return default if value in (None, "") else cast(value)


# ------------------------------------------------------------------ statistics

@dataclass
class ScoreMatrix:
    """Every tagged track's mean scores of one model version: ``means[track, label]``."""

    model_version: str
    labels: tuple[str, ...]
    means: np.ndarray
    skipped: int = 0

    @property
    def tracks(self) -> int:
        return int(self.means.shape[0])


def dominant_model_version(labels: tuple[str, ...] = LABEL_ORDER) -> str | None:
    """The model version to calibrate: the installed one when it has scores, else the most common."""
    digest = stored_scores.labels_digest(labels)
    installed = current_model_version()
    with_scores = Score.objects.filter(labels_version=digest)
    if installed and with_scores.filter(model_version=installed).exists():
        return installed
    with connection.cursor() as cur:
        cur.execute(f"SELECT model_version, COUNT(*) FROM {Score._meta.db_table} WHERE labels_version = %s "
                    "GROUP BY model_version ORDER BY 2 DESC, 1 LIMIT 1", [digest])
        row = cur.fetchone()
    return row[0] if row else None


def load_scores(model_version: str | None = None, labels: tuple[str, ...] = LABEL_ORDER,
                timings: dict[str, float] | None = None) -> ScoreMatrix:
    """Read the mean-score blobs of every tagged track in one query, into one float32 matrix.

    Raw SQL and one ``b"".join``: the ORM would build a model instance per
    row, which costs more than the whole statistics pass at 100,000 tracks.
    A blob of the wrong length (a truncated row) is skipped, not guessed at.
    ``timings`` (when given) receives seconds for ``query`` (choosing the
    model version, running the query, fetching the rows) and ``decode``.
    """
    timings = {} if timings is None else timings
    start = time.perf_counter()
    model_version = model_version or dominant_model_version(labels)
    width = len(labels)
    if model_version is None:
        return ScoreMatrix("", labels, np.empty((0, width), np.float32))
    sql = (f"SELECT s.means FROM {Score._meta.db_table} s JOIN {Track._meta.db_table} t ON t.id = s.track_id "
           "WHERE s.model_version = %s AND s.labels_version = %s AND t.state = %s")
    with connection.cursor() as cur:
        cur.execute(sql, [model_version, stored_scores.labels_digest(labels), Track.State.TAGGED])
        rows = cur.fetchall()
    timings["query"] = time.perf_counter() - start
    start = time.perf_counter()
    blobs = [bytes(row[0]) for row in rows]
    expected = 4 * width
    good = [b for b in blobs if len(b) == expected]
    means = np.frombuffer(b"".join(good), dtype="<f4").reshape(len(good), width)
    timings["decode"] = time.perf_counter() - start
    return ScoreMatrix(model_version, labels, means, skipped=len(blobs) - len(good))


def statistics(means: np.ndarray, labels: tuple[str, ...]) -> dict[str, dict]:
    """Per label: p5, p95, min, max and a ``BINS``-bin histogram over [min, max].

    Vectorized over the whole matrix: one percentile pass (a partition per
    label on a label-major copy, which is contiguous per label) and one
    ``bincount`` for all 100 histograms at once. float32 throughout, as the
    scores are stored: twice as fast as float64 and as exact as the data.
    """
    if means.ndim != 2 or means.shape[1] != len(labels) or means.shape[0] == 0:
        raise ValueError("statistics need a (tracks, labels) matrix with at least one track")
    by_label = np.ascontiguousarray(means.T, dtype=np.float32)
    low_p, high_p = np.percentile(by_label, PERCENTILES, axis=1)
    lo, hi = by_label.min(axis=1), by_label.max(axis=1)
    counts = histograms(by_label, lo, hi)
    return {
        label: {"p5": float(low_p[i]), "p95": float(high_p[i]), "min": float(lo[i]), "max": float(hi[i]),
                "counts": counts[i].tolist()}
        for i, label in enumerate(labels)
    }


def histograms(by_label: np.ndarray, lo: np.ndarray, hi: np.ndarray, bins: int = BINS) -> np.ndarray:
    """``(labels, bins)`` counts of each row of ``by_label`` over its own [lo, hi].

    The maximum falls in the last bin; a constant label puts everything in
    the first. One ``bincount`` over offset bin indices does every label.
    """
    span = np.where(hi > lo, hi - lo, 1).astype(by_label.dtype)
    index = ((by_label - lo[:, None]) * (bins / span)[:, None]).astype(np.int64)
    np.clip(index, 0, bins - 1, out=index)
    index += (np.arange(by_label.shape[0]) * bins)[:, None]
    return np.bincount(index.ravel(), minlength=by_label.shape[0] * bins).reshape(-1, bins)


def version_of(model_version: str, stats: dict[str, dict]) -> str:
    """``cal-<digest>``: names the percentiles, so equal statistics share one version."""
    key = json.dumps([model_version, [[label, s["p5"], s["p95"]] for label, s in stats.items()]])
    return "cal-" + hashlib.sha1(key.encode()).hexdigest()[:12]


# ------------------------------------------------------------- compute, activate

@dataclass
class Recalibration:
    """What ``recalibrate`` did: the calibration, whether it is new, jobs queued, seconds per step."""

    calibration: Calibration
    created: bool
    jobs: int
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        """The whole run: load, stats, save and enqueue (not the load's own parts again)."""
        return sum(v for k, v in self.timings.items() if not k.startswith("load_"))

    def describe_timings(self) -> str:
        """``load 0.41s (query 0.30s, decode 0.11s), stats 0.62s, save 0.01s, enqueue 1.90s``."""
        parts = []
        for key, value in self.timings.items():
            if key.startswith("load_"):
                continue
            text = f"{key} {value:.2f}s"
            if key == "load":
                inner = ", ".join(f"{k[5:]} {v:.2f}s" for k, v in self.timings.items() if k.startswith("load_"))
                text += f" ({inner})" if inner else ""
            parts.append(text)
        return ", ".join(parts)


def compute(min_count: int | None = None, model_version: str | None = None,
            timings: dict[str, float] | None = None) -> tuple[Calibration, bool]:
    """Compute a calibration from the stored scores; returns (row, created).

    Raises ``NotEnoughTracks`` below ``min_count`` (default: the setting).
    Computing twice from the same scores returns the existing row.
    ``timings`` (when given) receives seconds for ``load`` (of which
    ``query`` and ``decode``), ``stats`` and ``save``.
    """
    timings = {} if timings is None else timings
    needed = min_tracks() if min_count is None else min_count
    start = time.perf_counter()
    load: dict[str, float] = {}
    matrix = load_scores(model_version, timings=load)
    timings["load"] = time.perf_counter() - start
    timings.update({f"load_{k}": v for k, v in load.items()})
    if matrix.tracks < max(1, needed):
        raise NotEnoughTracks(matrix.tracks, max(1, needed))
    if matrix.skipped:
        log.warning("calibration: skipped %d score rows of the wrong length", matrix.skipped)
    t = time.perf_counter()
    stats = statistics(matrix.means, matrix.labels)
    timings["stats"] = time.perf_counter() - t
    t = time.perf_counter()
    row, created = Calibration.objects.get_or_create(
        version=version_of(matrix.model_version, stats),
        defaults=dict(model_version=matrix.model_version, stats=stats, track_count=matrix.tracks,
                      source="computed", seconds=round(time.perf_counter() - start, 3)),
    )
    timings["save"] = time.perf_counter() - t
    return row, created


def activate(calibration: Calibration) -> int:
    """Make ``calibration`` current and queue a rewrite of every track tagged with another; returns jobs queued.

    Jobs still queued for a calibration this one supersedes are cancelled:
    every job writes with the current calibration anyway, and two jobs for
    one track running side by side would only contend for its file.
    """
    now = timezone.now()
    Meta.objects.update_or_create(key=CURRENT_KEY, defaults={"value": _pointer_value(calibration), "updated_at": now})
    superseded = cancel_superseded(calibration.version)
    log.info("calibration %s is now current (%d tracks; %d queued jobs for older ones cancelled)",
             calibration.version, calibration.track_count, superseded)
    return enqueue_stale(calibration.version)


def cancel_superseded(version: str) -> int:
    """Cancel queued ``calibrate`` jobs that were queued for another calibration (not a person's forced ones)."""
    return (Job.objects.filter(queue="calibrate", state=Job.State.QUEUED, payload__has_key="calibration")
            .exclude(payload__calibration=version)
            .update(state=Job.State.CANCELLED, finished_at=timezone.now(),
                    last_error=f"superseded by calibration {version}"))


def recalibrate(min_count: int | None = None, model_version: str | None = None) -> Recalibration:
    """``compute`` then ``activate``: what ``manage.py calibrate``, the admin and the auto trigger run."""
    timings: dict[str, float] = {}
    row, created = compute(min_count, model_version, timings)
    t = time.perf_counter()
    jobs = activate(row)
    timings["enqueue"] = time.perf_counter() - t
    return Recalibration(row, created, jobs, timings)


def _pointer_value(calibration: Calibration) -> dict:
    return {"id": calibration.id, "version": calibration.version, "track_count": calibration.track_count}


def enqueue_stale(version: str, exclude_failed: bool = False) -> int:
    """One ``calibrate`` job per tagged track whose tags were written with another calibration.

    The key names the target version, so a job queued for an older version
    never hides this one behind the one-active-job-per-key rule. Disabled
    libraries are left alone (the sweep catches up once one is enabled).
    ``exclude_failed`` leaves out tracks whose last write failed (the
    periodic sweep uses it, so a read-only file is retried once per new
    calibration rather than every sweep).
    """
    stale = (Track.objects.filter(state=Track.State.TAGGED, score__isnull=False, library__enabled=True)
             .exclude(calibration_version=version))
    if exclude_failed:
        stale = stale.filter(error="")
    jobs = [queue.NewJob(key=job_key(track_id, version), payload={"calibration": version}, track_id=track_id,
                         library_id=library_id, priority=JOB_PRIORITY)
            for track_id, library_id in stale.values_list("id", "library_id").iterator(chunk_size=5000)]
    return queue.enqueue_many("calibrate", jobs)


def job_key(track_id: int, version: str) -> str:
    return f"calibrate:{track_id}:{version}"


