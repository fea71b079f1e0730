"""Stored scores: float32 vectors in the database, without torch.

The tagger stores each track's per-label means and spreads once; the
recalibrator and the admin read them back here.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np

from workers.models import Score, Track


def pack(values) -> bytes:
    return np.asarray(values, dtype="<f4").tobytes()


def unpack(blob) -> np.ndarray:
    return np.frombuffer(bytes(blob), dtype="<f4")


def labels_digest(labels) -> str:
    """Names the label order the vectors follow, so a changed vocabulary is never misread."""
    return hashlib.sha1(json.dumps(list(labels)).encode()).hexdigest()[:16]


def save(track: Track, model_version: str, labels, means, spreads, patches: int) -> Score:
    score, _ = Score.objects.update_or_create(
        track=track,
        defaults=dict(model_version=model_version, labels_version=labels_digest(labels), means=pack(means),
                      spreads=pack(spreads), patches=patches),
    )
    return score


def as_mappings(score: Score, labels) -> tuple[dict[str, float], dict[str, float]]:
    """``({label: mean}, {label: spread})`` for ``build_tags``; refuses a label-order mismatch."""
    if score.labels_version != labels_digest(labels):
        raise ValueError(f"scores of track {score.track_id} follow another label list; retag the track")
    means, spreads = unpack(score.means), unpack(score.spreads)
    return ({label: float(v) for label, v in zip(labels, means)},
            {label: float(v) for label, v in zip(labels, spreads)})
