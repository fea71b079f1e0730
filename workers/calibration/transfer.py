"""A calibration as a JSON document, so that a small library can start from a larger one's.

``export_json`` writes what ``import_json`` reads back; the import checks the
document field by field and refuses one computed for other networks than
this library's (percentiles of one model say nothing about another's).
"""
from __future__ import annotations

import math

from workers.calibration.compute import BINS, dominant_model_version
from workers.models import Calibration
from workers.tagging.categories import get_label

EXPORT_FORMAT = "earmark-calibration/1"


class ImportRefused(ValueError):
    """A calibration document that is malformed or does not fit this library."""


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
