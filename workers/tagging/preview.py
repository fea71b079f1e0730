"""What each standard-tags policy would write, for a few tracks, before anything is written.

A user choosing a policy wants to see its effect on their own files: for
sample tracks with stored scores, the tags are built as the tagger would
(the calibration in force, the library's write mode and limits) and
``standard.plan`` is run on the file's parsed tags under every policy. Files
are only read.
"""
from __future__ import annotations

import os
import random

from workers.library import paths
from workers.models import Library, Track
from workers.tagfiles import namespace, standard
from workers.tagging import apply, calibrated, scores
from workers.tagging.categories import LABELS

LABEL_ORDER = tuple(LABELS)


def preview(library: Library, sample: int = 5) -> list[dict]:
    """Per sample track: its path, Earmark's values, and per policy the genre and mood fields after a write."""
    rows = []
    tracks = Track.objects.filter(id__in=sample_ids(library, sample)).select_related("score", "library").order_by("id")
    calibration = calibrated.current()
    for track in tracks:
        row = {"path": track.path, "earmark": {}, "policies": {}, "error": ""}
        try:
            means, spreads = scores.as_mappings(track.score, LABEL_ORDER)
            tagset = apply.plan(track, means, spreads, track.score.model_version, calibration).tagset
            tags = namespace.open_tags(os.fsdecode(paths.to_bytes(track.path)), track.format or None)
        except (OSError, ValueError, namespace.TagFileError) as exc:
            row["error"] = str(exc)
            rows.append(row)
            continue
        row["earmark"] = {name: list(tagset.categories.get(name) or []) for name in standard.CATEGORY_FIELDS}
        row["low_confidence"] = list(tagset.low_confidence)
        row["now"] = {name: _text(tags.standard_raw(name)) for name in standard.CATEGORY_FIELDS}
        for policy in standard.POLICIES:
            request = apply.standard_request(_with_policy(library, policy), tagset)
            planned = standard.plan(tags, request)
            row["policies"][policy] = {name: _text(planned.changes.get(name, tags.standard_raw(name)))
                                       for name in standard.CATEGORY_FIELDS}
        rows.append(row)
    return rows


def sample_ids(library: Library, n: int, rng: random.Random | None = None) -> list[int]:
    """Ids of up to ``n`` tracks with stored scores, picked at random points of the library's id range.

    Each pick is one seek on the primary key (the first scored track at or
    after a random id), so sampling costs the same at 100 tracks and at
    100,000; ``order_by("?")`` sorted the whole library for every page.
    A library with at most ``n`` scored tracks gives all of them.
    """
    scored = Track.objects.filter(library=library, score__isnull=False).order_by("id").values_list("id", flat=True)
    first = list(scored[: n + 1])
    if len(first) <= n:
        return first
    rng = rng or random.Random()
    low, high = first[0], scored.reverse().first()
    picked: set[int] = set()
    for _ in range(3 * n):  # a few more tries than picks: two points may land on one track
        found = scored.filter(id__gte=rng.randint(low, high)).first()
        if found is not None:
            picked.add(found)
        if len(picked) == n:
            break
    return sorted(picked)


def _with_policy(library: Library, policy: str) -> Library:
    """An unsaved copy of the library with another policy (the request reads only its tag settings)."""
    return Library(standard_tags=policy, standard_limits=library.standard_limits,
                   id3v23_separator=library.id3v23_separator)


def _text(raw) -> list[str]:
    return list((raw or {}).get("text") or [])
