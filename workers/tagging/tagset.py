"""From raw network scores to the tags written into a file.

``build_tags`` is a pure function of the stored per-label scores and a
calibration, so that recalibrator processes (no ML, no torch) produce
exactly what a tagger would have written, and a file whose tags would not
change can be skipped.

The pipeline, per label: raw score → ``calibration.scale`` → a strength
(0 at "clearly absent", 1 at "clearly present") → kept in a tier when the
tier's bound reaches its cut-off. The bounds use the spread of the label's
score over the track's 3 s patches (``TIER_SPREAD``): "strict" asks that the
label hold across the track (mean minus one spread), "regular" judges the
mean alone, "loose" also takes a label that is strong in parts of it (mean
plus one spread). Labels collapse onto their canonical value (the strongest
synonym gives the value its strength and bounds), contradictions
(``categories.OPPOSING``) are resolved once, by strength, among every value
any tier keeps, so the tiers nest (strict ⊆ regular ⊆ loose) and never
disagree about which side won, and each category lists its values
strongest first.

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

from workers.tagging.categories import CATEGORIES, GENRE, LABELS, OPPOSING, get_label

#: Bumped when the meaning of written tags changes (names, keys, rules).
SCHEMA = "earmark/1"

#: Cut-offs on the scaled strength. "regular" is what the library writes by
#: default; "strict" writes fewer, surer tags; "loose" more, for discovery.
TIERS: dict[str, float] = {"strict": 0.75, "regular": 0.5, "loose": 0.3}
#: The weakest strength a fallback genre may have (``build_tags(genre_floor=…)``):
#: 30% of the regular cut-off; below it a track's genre would be a guess.
GENRE_FLOOR = 0.15
DEFAULT_TIER = "regular"

#: How many spreads (the standard deviation of a label's score over the
#: track's patches) each tier adds to the mean before scaling it. A label
#: that is strong in one passage and absent elsewhere has a large spread:
#: strict refuses it, loose accepts it. Without spreads (or with a spread of
#: 0) every tier judges the mean alone. Non-negative for the looser tier,
#: non-positive for the stricter, so a stricter tier keeps a subset.
TIER_SPREAD: dict[str, float] = {"strict": -1.0, "regular": 0.0, "loose": 1.0}

#: Tiers written besides the main lists in full mode, as ``<category>_<tier>``.
EXTRA_TIERS: tuple[str, ...] = ("strict", "loose")

#: The tier that keeps the most: a label it refuses, every tier refuses
#: (checked below), so most labels are dismissed after two ``scale`` calls.
LOOSEST = "loose"
if not all(TIERS[t] >= TIERS[LOOSEST] and TIER_SPREAD[t] <= TIER_SPREAD[LOOSEST] for t in TIERS):
    raise ValueError(f"every tier must keep a subset of what {LOOSEST!r} keeps")

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
    empty list when nothing passed), for the chosen tier. ``tiers`` maps every
    tier name to such a mapping (``tiers[tier] == categories``); full mode
    writes the ``EXTRA_TIERS`` lists besides the main ones. ``strengths``
    holds each written value's scaled strength (for display and debugging;
    not written to files).
    ``scores`` holds every label's raw score rounded to 3 decimals in full
    mode and is ``None`` in minimal mode. ``version`` names schema, models,
    calibration and, when not the default, the tier.
    """

    categories: dict[str, list[str]]
    version: str
    mode: str = "minimal"
    scores: dict[str, float] | None = None
    strengths: dict[str, dict[str, float]] = field(default_factory=dict, compare=False)
    tiers: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    low_confidence: tuple[str, ...] = ()  # categories whose value is a fallback below the threshold
    measured: dict[str, list[str]] = field(default_factory=dict)  # tempo, key, loudness keys (tagging.measures)

    def fields(self) -> dict[str, list[str]]:
        """The tag keys and values to write, in the namespace's key spelling.

        Keys are lower-case ``[a-z0-9_]`` (``genre``, ``genre_strict``,
        ``version``, ``score_mtt_female_vocal``); ``workers.tagfiles.namespace`` spells
        them per tag family. Empty categories are left out, so the writer
        removes them. Full mode adds the strict and loose lists.
        """
        out: dict[str, list[str]] = {}
        for category in CATEGORIES:
            values = self.categories.get(category) or []
            if values:
                out[category] = list(values)
        if self.mode == "full":
            for tier in EXTRA_TIERS:
                for category in CATEGORIES:
                    values = self.tiers.get(tier, {}).get(category) or []
                    if values:
                        out[tier_key(category, tier)] = list(values)
        for category in self.low_confidence:
            out[f"{category}_confidence"] = ["low"]
        out.update(self.measured)
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
            "low_confidence": list(self.low_confidence),
        }


def tier_key(category: str, tier: str) -> str:
    """The tag key of a category's list in another tier: ``genre_strict``, ``mood_loose``."""
    if category not in CATEGORIES or tier not in TIERS:
        raise ValueError(f"unknown category or tier: {category!r}, {tier!r}")
    return f"{category}_{tier}"


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
    genre_floor: float | None = None,
) -> TagSet:
    """The ``TagSet`` for one track's per-label mean scores.

    ``scores`` maps label ids (``"mtt:guitar"``) to the mean raw sigmoid
    output over the track's patches; any subset of the 100 labels may be
    given (a track scored by one model only). ``spreads`` (the per-label
    spread over patches) moves the strict and loose bounds (``TIER_SPREAD``);
    the regular tier, and so the default lists, depend on the means alone.
    ``calibration`` defaults to ``UNCALIBRATED``. ``models`` names the
    networks with their weight hashes for the version tag. ``tier`` picks
    the tier of the main lists (``categories``). With ``genre_floor``, a
    track whose genres all miss the threshold gets its best genre anyway when
    that one's strength reaches the floor, flagged in ``low_confidence``
    (players show a genre for every track; a weak one beats none).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if tier not in TIERS:
        raise ValueError(f"tier must be one of {tuple(TIERS)}, got {tier!r}")
    calibration = calibration or UNCALIBRATED
    _check_scores(scores, "scores")
    if spreads is not None:
        _check_scores(spreads, "spreads")

    evidence = _canonical_evidence(scores, spreads or {}, calibration)
    for category, side_a, side_b in OPPOSING:
        _resolve(evidence[category], side_a, side_b)

    tiers = {name: {c: _ranked(evidence[c], name) for c in CATEGORIES} for name in TIERS}
    categories = tiers[tier]
    low_confidence: tuple[str, ...] = ()
    if genre_floor is not None and not categories[GENRE]:
        best = _best_genre(scores, calibration, genre_floor)
        if best is not None:
            categories[GENRE], evidence[GENRE][best[0]] = [best[0]], Evidence(best[1], {})
            low_confidence = (GENRE,)
    return TagSet(
        categories=categories,
        version=format_version(models, calibration.version, tier),
        mode=mode,
        scores=_rounded(scores) if mode == "full" else None,
        strengths={c: {v: round(evidence[c][v].strength, 3) for v in categories[c]} for c in CATEGORIES},
        tiers=tiers,
        low_confidence=low_confidence,
    )


def _best_genre(scores: Mapping[str, float], calibration: Calibration, floor: float) -> tuple[str, float] | None:
    """The strongest genre (canonical value, strength) at or above ``floor``; None when none reaches it."""
    best = None
    for label_id, raw in scores.items():
        label = LABELS[label_id]
        if label.category != GENRE:
            continue
        strength = float(calibration.scale(label_id, float(raw)))
        if strength >= floor and (best is None or (strength, label.canonical) > (best[1], best[0])):
            best = (label.canonical, strength)
    return best


def _check_scores(values: Mapping[str, float], what: str) -> None:
    """Refuse unknown labels and non-finite numbers before they reach a file.

    A label list that drifted from the networks' outputs, or a NaN from a
    broken decode, must fail loudly here rather than write nonsense tags.
    """
    for label, value in values.items():
        get_label(label)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{what}[{label!r}] is not a finite number: {value!r}")


class Evidence:
    """A canonical value's scaled strength and its bound in each tier (a plain slotted class: one per kept value)."""

    __slots__ = ("strength", "bounds")

    def __init__(self, strength: float, bounds: dict[str, float]):
        self.strength = strength
        self.bounds = bounds

    def passes(self, tier: str) -> bool:
        return self.bounds[tier] >= TIERS[tier]

    def merge(self, other: "Evidence") -> None:
        """Keep the best of two synonyms, strength and each bound on its own, in place."""
        self.strength = max(self.strength, other.strength)
        for tier, bound in other.bounds.items():
            if bound > self.bounds[tier]:
                self.bounds[tier] = bound


def label_evidence(label: str, raw: float, spread: float, calibration: Calibration) -> Evidence:
    """Scale one label's mean, and the mean moved by each tier's share of the spread.

    Scaling the moved raw score (rather than scaling the spread) works for any
    monotone calibration, not only linear ones.
    """
    strength = float(calibration.scale(label, raw))
    bounds = {}
    for tier, weight in TIER_SPREAD.items():
        bounds[tier] = strength if not weight or not spread else float(calibration.scale(label, raw + weight * spread))
    return Evidence(strength, bounds)


def _canonical_evidence(scores: Mapping[str, float], spreads: Mapping[str, float],
                        calibration: Calibration) -> dict[str, dict[str, Evidence]]:
    """Per category, each canonical value that some tier keeps, with its evidence.

    Synonyms merge by maximum: "female" is as strong as its strongest voter,
    so adding a synonym label never weakens or duplicates a value. (The
    recalibrator runs this for every file; it builds objects only for the
    few labels that pass.)
    """
    out: dict[str, dict[str, Evidence]] = {c: {} for c in CATEGORIES}
    loose_cutoff, loose_weight = TIERS[LOOSEST], TIER_SPREAD[LOOSEST]
    for label_id, raw in scores.items():
        label = LABELS[label_id]
        if label.category is None:
            continue
        raw, spread = float(raw), abs(float(spreads.get(label_id, 0.0)))
        if calibration.scale(label_id, raw + loose_weight * spread) < loose_cutoff:
            continue
        evidence = label_evidence(label_id, raw, spread, calibration)
        bucket = out[label.category]
        known = bucket.get(label.canonical)
        if known is None:
            bucket[label.canonical] = evidence
        else:
            known.merge(evidence)
    return out


def _resolve(values: dict[str, Evidence], side_a: frozenset[str], side_b: frozenset[str]) -> None:
    """Drop the weaker of two contradicting sides, in place.

    A side's strength is its best value's. Only a real conflict (both sides
    present) removes anything; on an exact tie side A is kept, so the result
    never depends on dict order. Resolving once among every value any tier
    keeps (rather than per tier) means a tier never lists the side another
    tier rejected.
    """
    best_a = max((values[v].strength for v in side_a if v in values), default=None)
    best_b = max((values[v].strength for v in side_b if v in values), default=None)
    if best_a is None or best_b is None:
        return
    loser = side_b if best_a >= best_b else side_a
    for value in loser:
        values.pop(value, None)


def _ranked(values: dict[str, Evidence], tier: str) -> list[str]:
    """The values a tier keeps, strongest first; equal strengths by name, for stable output."""
    kept = [(v, e.strength) for v, e in values.items() if e.passes(tier)]
    return [v for v, _ in sorted(kept, key=lambda kv: (-kv[1], kv[0]))]


def _rounded(scores: Mapping[str, float]) -> dict[str, float]:
    """Every given label's raw score to 3 decimals, in table order."""
    return {label: round(float(scores[label]), 3) for label in LABELS if label in scores}
