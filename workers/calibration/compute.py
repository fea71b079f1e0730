"""Library calibration: what a "high" score means for each label in this library.

A network's raw sigmoid output means different things on different labels
and libraries (a rare tag rarely passes 0.2; a common one idles there). A
calibration records, per label, the 5th and 95th percentile of the stored
mean scores over the library's tagged tracks; ``LibraryCalibration.scale``
maps a raw score to ``(raw - p5) / (p95 - p5)``, the strength the tag tiers
(``workers.tagging.tagset``) cut: strict 0.75, regular 0.5, loose 0.3.

The life of a calibration, all from stored scores (no networks, no torch):

* ``compute`` loads every tagged track's mean scores into one numpy matrix
  (one SQL query, one ``frombuffer``) and takes the percentiles and a
  100-bin histogram per label in a few vectorized passes: 100,000 tracks ×
  100 labels in about a second (``python -m bench.calibration``). Its
  version is a digest of the model version and the percentiles, so the same
  scores always give the same version and nothing needs rewriting.
* ``activate`` makes it current (the ``calibration:current`` meta row) and
  enqueues one ``calibrate`` job per tagged track whose tags were written
  with another version; recalibrator workers (``workers.calibration.recalibrate_worker``)
  rewrite those files, and skip every file whose tags come out the same.
* ``current`` gives each process the calibration in force, cached and
  re-checked with one primary-key read at most every ``REFRESH_SECONDS``.
* ``maybe_recalibrate`` is the automatic trigger taggers call after each
  job: a new calibration when the number of tagged tracks first reaches
  ``EARMARK_CALIBRATION_MIN_TRACKS`` (100) and again each time it has grown
  by ``EARMARK_CALIBRATION_GROWTH`` (0.2, i.e. 20%) since the current one.
  It looks at the database at most every ``EARMARK_CALIBRATION_CHECK_SECONDS``
  (30) per process, and one process per interval (a conditional update on a
  meta row, as ``workers.jobs.maintenance`` does) does the counting.
* ``export_json`` / ``import_json``: the calibration as a JSON document, so
  that a small library can start from a larger one's.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np
from django.conf import settings
from django.db import connection
from django.utils import timezone

from workers.jobs import queue
from workers.models import Calibration, Job, Meta, Score, Track
from workers.tagging import scores as stored_scores
from workers.tagging.categories import LABELS, get_label
from workers.tagging.tagset import UNCALIBRATED

log = logging.getLogger("earmark.calibration")

CURRENT_KEY = "calibration:current"
AUTO_KEY = "calibration:auto"
EXPORT_FORMAT = "earmark-calibration/1"

PERCENTILES = (5.0, 95.0)
BINS = 100
#: The smallest p95 - p5 span a label is scaled by, on the raw sigmoid scale.
#: A label the library never varies on (p95 ≈ p5) would otherwise turn noise
#: of 0.001 into "clearly present"; with this floor it must rise at least
#: 0.005 above the library's p5 to reach "regular".
MIN_SPAN = 0.01
#: How stale a process's cached current calibration may be, in seconds.
REFRESH_SECONDS = 1.0

#: The label order the tagger stores scores in (MTT's 50, then MSD's 50).
LABEL_ORDER: tuple[str, ...] = tuple(LABELS)

DEFAULT_MIN_TRACKS = 100
DEFAULT_GROWTH = 0.2
DEFAULT_CHECK_SECONDS = 30.0
JOB_PRIORITY = 100


class NotEnoughTracks(Exception):
    """Fewer tagged tracks with stored scores than a calibration needs."""

    def __init__(self, found: int, needed: int):
        super().__init__(f"{found} tagged track(s) with stored scores; a calibration needs at least {needed}")
        self.found, self.needed = found, needed


class ImportRefused(ValueError):
    """A calibration document that is malformed or does not fit this library."""


# --------------------------------------------------------------------- settings

def _setting(name: str, default, cast):
    """A Django setting when the project defines it, else the environment, else the default.

    Read at call time so tests (``override_settings``) and operators (env)
    can both change it without a restart of the settings module.
    """
    value = getattr(settings, name, None)
    if value is None:
        value = os.environ.get(name)
    return default if value in (None, "") else cast(value)


def min_tracks() -> int:
    return _setting("EARMARK_CALIBRATION_MIN_TRACKS", DEFAULT_MIN_TRACKS, int)


def growth() -> float:
    return _setting("EARMARK_CALIBRATION_GROWTH", DEFAULT_GROWTH, float)


def check_seconds() -> float:
    return _setting("EARMARK_CALIBRATION_CHECK_SECONDS", DEFAULT_CHECK_SECONDS, float)


# ------------------------------------------------------------- the calibration

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
    from workers.tagging.manifest import current_model_version

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


def current_pointer() -> dict | None:
    """The ``calibration:current`` meta value (id, version, track_count), or None before any."""
    value = Meta.objects.filter(key=CURRENT_KEY).values_list("value", flat=True).first()
    return value or None


def current_row() -> Calibration | None:
    pointer = current_pointer()
    return Calibration.objects.filter(id=pointer["id"]).first() if pointer else None


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


# ---------------------------------------------------------------- current()

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
    """Forget the cached calibration and trigger clock (tests; a process that switched databases)."""
    global _last_check
    _cache.calibration, _cache.checked = UNCALIBRATED, -math.inf
    _last_check = -math.inf


# --------------------------------------------------------------- the auto trigger

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
    pointer = current_pointer()
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
    """The taggers' hook: cheap when called after every job, never raises.

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


# --------------------------------------------------------------- export, import

def export_json(calibration: Calibration) -> dict:
    """The calibration as a JSON-ready document (``import_json`` reads it back)."""
    return {
        "format": EXPORT_FORMAT,
        "version": calibration.version,
        "model_version": calibration.model_version,
        "track_count": calibration.track_count,
        "created_at": calibration.created_at.isoformat() if calibration.created_at else None,
        "source": calibration.source,
        "stats": calibration.stats,
    }


def import_json(document: dict, source: str = "", force: bool = False) -> tuple[Calibration, bool]:
    """Store an exported calibration; returns (row, created). Does not activate it.

    Refuses a document whose scores came from other networks than this
    library's (percentiles of one model say nothing about another's outputs)
    unless ``force``; the version is kept, so files name the calibration
    they were written with wherever it was computed.
    """
    version, model_version, stats, track_count = _validated(document)
    local = dominant_model_version()
    if local and local != model_version and not force:
        raise ImportRefused(f"the calibration describes models {model_version}, but this library's scores "
                            f"come from {local}; use --force to import it anyway")
    existing = Calibration.objects.filter(version=version).first()
    if existing is not None:
        if _percentiles(existing.stats) != _percentiles(stats):
            raise ImportRefused(f"a different calibration named {version} already exists")
        return existing, False
    row = Calibration.objects.create(
        version=version, model_version=model_version, stats=stats, track_count=track_count,
        source=f"imported{' from ' + source if source else ''}"[:500],
    )
    return row, True


def _percentiles(stats: dict) -> list:
    return [(label, s["p5"], s["p95"]) for label, s in sorted(stats.items())]


def _validated(document) -> tuple[str, str, dict, int]:
    """Check an import document field by field; ``ImportRefused`` says what is wrong."""
    if not isinstance(document, dict) or document.get("format") != EXPORT_FORMAT:
        raise ImportRefused(f"not an Earmark calibration (expected format {EXPORT_FORMAT!r})")
    version, model_version = document.get("version"), document.get("model_version")
    if not isinstance(version, str) or not version or len(version) > 100 or any(c.isspace() for c in version):
        raise ImportRefused("the version must be a non-empty string without spaces, at most 100 characters")
    if not isinstance(model_version, str) or not model_version:
        raise ImportRefused("the document names no model version")
    stats = document.get("stats")
    if not isinstance(stats, dict) or not stats:
        raise ImportRefused("the document holds no per-label statistics")
    clean = {label: _validated_label(label, entry) for label, entry in stats.items()}
    track_count = document.get("track_count")
    if not isinstance(track_count, int) or track_count < 0:
        raise ImportRefused("track_count must be a non-negative integer")
    return version, model_version, clean, track_count


def _validated_label(label: str, entry) -> dict:
    try:
        get_label(label)
    except KeyError as exc:
        raise ImportRefused(str(exc.args[0])) from None
    if not isinstance(entry, dict):
        raise ImportRefused(f"{label}: statistics must be an object")
    numbers = {}
    for name in ("p5", "p95", "min", "max"):
        value = entry.get(name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ImportRefused(f"{label}: {name} must be a finite number")
        numbers[name] = float(value)
    if not numbers["min"] <= numbers["p5"] <= numbers["p95"] <= numbers["max"]:
        raise ImportRefused(f"{label}: expected min <= p5 <= p95 <= max")
    counts = entry.get("counts")
    if not isinstance(counts, list) or len(counts) != BINS or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts):
        raise ImportRefused(f"{label}: counts must be {BINS} non-negative integers")
    return {**numbers, "counts": counts}
