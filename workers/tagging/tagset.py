"""From raw network scores to the tags written into a file.

``build_tags`` is a pure function of the stored per-label scores and a
calibration, so that recalibrator processes (no ML, no torch) produce
exactly what a tagger would have written, and a file whose tags would not
change can be skipped.

The pipeline, per label: raw score → ``calibration.scale`` → a strength in
[0, 1] → kept when it reaches the tier's cut-off. Kept labels collapse onto
their canonical value (the strongest synonym gives the value its strength),
contradictions (``categories.OPPOSING``) keep the stronger side, and each
category lists its values strongest first.

Without a library calibration, ``Uncalibrated`` scales each raw score by its
label's default threshold (``categories.default_threshold``) so that the
threshold lands exactly on the "regular" cut-off; a real calibration
(per-label p5/p95 min-max) plugs in through the same two-member protocol.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from .categories import CATEGORIES, LABELS, OPPOSING, get_label

#: Bumped when the meaning of written tags changes (names, keys, rules).
SCHEMA = "earmark/1"

#: Cut-offs on the scaled strength. "regular" is what the library writes by
#: default; "strict" writes fewer, surer tags; "loose" more, for discovery.
TIERS: dict[str, float] = {"strict": 0.75, "regular": 0.5, "loose": 0.3}
DEFAULT_TIER = "regular"

MODES = ("minimal", "full")

#: The tag key of the version field, and of each category's list.
VERSION_KEY = "version"


@runtime_checkable
class Calibration(Protocol):
    """What ``build_tags`` needs from a calibration.

    ``version`` names it in the written version tag (and so decides whether a
    file must be rewritten after recalibration); ``scale`` maps a label's raw
    sigmoid output to a strength comparable across labels, monotone in the
    raw score: 0 at "clearly absent", 1 at "clearly present" (for p5/p95
    min-max: 0 at the library's p5, 1 at its p95). Do not clip above 1: a
    score beyond p95 must still outrank one at p95 when contradictions are
    resolved and values ordered.
    """

    version: str

    def scale(self, label: str, raw: float) -> float: ...


class Uncalibrated:
    """The calibration used before a library has its own statistics.

    Maps a raw score so that the label's default threshold becomes the
    "regular" cut-off (0.5): strength = raw / (2 × threshold), uncapped (see
    ``Calibration``). "strict" then asks for 1.5× the threshold and "loose"
    for 0.6×.
    """

    version = "uncalibrated"

    def scale(self, label: str, raw: float) -> float:
        return raw * TIERS[DEFAULT_TIER] / get_label(label).threshold


UNCALIBRATED = Uncalibrated()


@dataclass(frozen=True)
class TagSet:
    """The tags for one file.

    ``categories`` maps every category to its values, strongest first (an
    empty list when nothing passed). ``strengths`` holds each written value's
    scaled strength (for display and debugging; not written to files).
    ``scores`` holds every label's raw score rounded to 3 decimals in full
    mode and is ``None`` in minimal mode. ``version`` names schema, models,
    calibration and, when not the default, the tier.
    """

    categories: dict[str, list[str]]
    version: str
    mode: str = "minimal"
    scores: dict[str, float] | None = None
    strengths: dict[str, dict[str, float]] = field(default_factory=dict, compare=False)

    def fields(self) -> dict[str, list[str]]:
        """The tag keys and values to write, in the namespace's key spelling.

        Keys are lower-case ``[a-z0-9_]`` (``genre``, ``version``,
        ``score_mtt_female_vocal``); ``workers.tagfile`` spells them per tag
        family. Empty categories are left out, so the writer removes them.
        """
        out: dict[str, list[str]] = {}
        for category in CATEGORIES:
            values = self.categories.get(category) or []
            if values:
                out[category] = list(values)
        out[VERSION_KEY] = [self.version]
        if self.scores is not None:
            for label, value in self.scores.items():
                out[score_key(label)] = [format_score(value)]
        return out

    def as_dict(self) -> dict:
        """A JSON-ready form (for the database or the admin)."""
        return {
            "version": self.version,
            "mode": self.mode,
            "categories": {k: list(v) for k, v in self.categories.items()},
            "scores": dict(self.scores) if self.scores is not None else None,
        }


def score_key(label: str) -> str:
    """The tag key of a label's score: ``"mtt:female vocal"`` → ``score_mtt_female_vocal``.

    Lower-case ASCII letters, digits and underscores only, so the same key is
    legal as an ID3 TXXX description, an MP4 freeform name and a Vorbis
    comment field name (0x20-0x7D without '='); distinct labels never collide
    (checked in the tests).
    """
    get_label(label)
    return "score_" + re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")


def format_score(value: float) -> str:
    """A score as written into files: three decimals, no exponent."""
    return f"{value:.3f}"


def format_version(models: str | Sequence[str], calibration_version: str,
                   tier: str = DEFAULT_TIER) -> str:
    """``earmark/1 models=MTT_musicnn@abcd1234+MSD_musicnn@ef567890 calibration=uncalibrated``.

    ``models`` is either the joined string (as stored in ``Track.model_version``)
    or the list of ``name@hash`` parts. The tier appears only when it is not
    the default, so the common version string stays short.
    """
    joined = models if isinstance(models, str) else "+".join(models)
    if not joined or any(ch.isspace() for ch in joined + calibration_version):
        raise ValueError("model and calibration versions must be non-empty and without spaces")
    version = f"{SCHEMA} models={joined} calibration={calibration_version}"
    if tier != DEFAULT_TIER:
        version += f" tier={tier}"
    return version


def build_tags(
    scores: Mapping[str, float],
    spreads: Mapping[str, float] | None = None,
    calibration: Calibration | None = None,
    mode: str = "minimal",
    *,
    models: str | Sequence[str],
    tier: str = DEFAULT_TIER,
) -> TagSet:
    """The ``TagSet`` for one track's per-label mean scores.

    ``scores`` maps label ids (``"mtt:guitar"``) to the mean raw sigmoid
    output over the track's patches; any subset of the 100 labels may be
    given (a track scored by one model only). ``spreads`` (the per-label
    spread over patches) is validated but does not change the decision in
    this schema: a mean is what both calibrations are defined on, and the
    argument is here so callers pass what they store and a later schema can
    use it without changing every call site. ``calibration`` defaults to
    ``UNCALIBRATED``. ``models`` names the networks with their weight hashes
    for the version tag.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if tier not in TIERS:
        raise ValueError(f"tier must be one of {tuple(TIERS)}, got {tier!r}")
    calibration = calibration or UNCALIBRATED
    _check_scores(scores, "scores")
    if spreads is not None:
        _check_scores(spreads, "spreads")

    strengths = _canonical_strengths(scores, calibration, TIERS[tier])
    for category, side_a, side_b in OPPOSING:
        _resolve(strengths[category], side_a, side_b)

    categories = {c: _ranked(strengths[c]) for c in CATEGORIES}
    return TagSet(
        categories=categories,
        version=format_version(models, calibration.version, tier),
        mode=mode,
        scores=_rounded(scores) if mode == "full" else None,
        strengths={c: {v: round(strengths[c][v], 3) for v in categories[c]} for c in CATEGORIES},
    )


def _check_scores(values: Mapping[str, float], what: str) -> None:
    """Refuse unknown labels and non-finite numbers before they reach a file.

    A label list that drifted from the networks' outputs, or a NaN from a
    broken decode, must fail loudly here rather than write nonsense tags.
    """
    for label, value in values.items():
        get_label(label)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{what}[{label!r}] is not a finite number: {value!r}")


def _canonical_strengths(scores: Mapping[str, float], calibration: Calibration,
                         cutoff: float) -> dict[str, dict[str, float]]:
    """Per category, each canonical value that passed with its best strength.

    Synonyms merge by maximum: "female" is as strong as its strongest voter,
    so adding a synonym label never weakens or duplicates a value.
    """
    out: dict[str, dict[str, float]] = {c: {} for c in CATEGORIES}
    for label_id, raw in scores.items():
        label = LABELS[label_id]
        if label.category is None:
            continue
        strength = float(calibration.scale(label_id, float(raw)))
        if strength < cutoff:
            continue
        bucket = out[label.category]
        bucket[label.canonical] = max(strength, bucket.get(label.canonical, 0.0))
    return out


def _resolve(values: dict[str, float], side_a: frozenset[str], side_b: frozenset[str]) -> None:
    """Drop the weaker of two contradicting sides, in place.

    A side's strength is its best value. Only a real conflict (both sides
    present) removes anything; on an exact tie side A is kept, so the result
    never depends on dict order.
    """
    best_a = max((values[v] for v in side_a if v in values), default=None)
    best_b = max((values[v] for v in side_b if v in values), default=None)
    if best_a is None or best_b is None:
        return
    loser = side_b if best_a >= best_b else side_a
    for value in loser:
        values.pop(value, None)


def _ranked(values: dict[str, float]) -> list[str]:
    """Values strongest first; equal strengths by name, for stable output."""
    return [v for v, _ in sorted(values.items(), key=lambda kv: (-kv[1], kv[0]))]


def _rounded(scores: Mapping[str, float]) -> dict[str, float]:
    """Every given label's raw score to 3 decimals, in table order."""
    return {label: round(float(scores[label]), 3) for label in LABELS if label in scores}
