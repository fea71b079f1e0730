"""Fast analysis: score a spread sample of a file's patches, and stop once its tags cannot change.

The networks cost ~60 ms per 3 s patch (both of them, one CPU thread), about
ten times the decode; a four-minute song has 80 patches, and most of them
only repeat what the first twenty said. A library in ``fast`` analysis
(``Library.analysis``, the default) scores the patches in ``spread_order``,
a low-discrepancy order over the whole file (the first few already sample the
intro, the middle and the end, not the first minute), and after each
``STEP`` patches asks ``StopRule.settled`` whether more patches could still
change a written tag. ``full`` analysis scores every patch.

What decides the tags (``tagset.build_tags``) is a handful of comparisons of
the per-label mean and spread over the patches: each canonical value's tier
bound (mean + w·spread, scaled by the calibration in force) against the
tier's cut-off, the stronger side of each contradiction, the order of the
first values in a written list, and the fallback genre's place. The rule
estimates each mean's and spread's standard error from the patches scored so
far (with the finite-population correction: the last patch of a file leaves
no error), turns each comparison into the chance that the rest of the file
would still flip it, and calls the tags settled when those chances add up to
at most ``BUDGET`` (a flat "every comparison ``z`` errors clear" is the
stricter ``budget=None``; on real music it scored 83% of the patches against
56% for the budget, with the same tags). A label near its threshold keeps the
file going, up to every patch; a file far from every threshold stops at
``MIN_PATCHES``. A file with fewer patches than that is always scored whole.
The calibration in force decides the distances: a library calibrated on its
own narrow score ranges makes every tag more sensitive, and its files are
scored further.

A long file's patches wait here in a ``PatchStore`` until the decode ends (the
order needs them all); at most ``MAX_KEPT`` of them (20 minutes, ~29 MB), so
a longer file keeps an evenly strided subset, chosen while it streams.

Pure numpy on top of the torch-free tag rules: the networks come in as a
function (``Convergence`` yields the patch indices to score next).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from workers.tagging.categories import CATEGORIES, GENRE, LABELS, OPPOSING
from workers.tagging.tagset import DEFAULT_TIER, EXTRA_TIERS, GENRE_FLOOR, LOOSEST, TIER_SPREAD, TIERS, UNCALIBRATED

FAST, FULL = "fast", "full"
#: Patches scored before the first look (36 s of audio): a file this short or shorter is scored whole.
MIN_PATCHES = 12
#: Patches scored between two looks.
STEP = 4
#: Expected number of comparisons the unscored rest of a file could still flip, at most, to stop.
BUDGET = 0.1
#: How many standard errors a comparison must clear under the strict rule (``budget=None``), and a
#: contradiction's weaker side must be below its cut-off to be taken as absent.
Z = 3.0
#: Ranks fixed within each written list: the first two are what the standard genre and mood fields take.
RANK_DEPTH = 2
#: Patches kept for the spread order; a longer file keeps every 2nd, 4th, ... (20 minutes of patches).
MAX_KEPT = 400
GOLDEN = (math.sqrt(5) - 1) / 2


def spread_order(n: int) -> np.ndarray:
    """A permutation of ``range(n)`` whose every prefix is spread evenly over the file.

    The Kronecker sequence ``frac(1/2 + k·φ⁻¹)`` (golden-ratio steps, the
    best-spread of its kind), mapped onto patch indices, first visits kept;
    any patch it has not reached after ``4n`` steps follows in file order.
    It starts in the middle of the file and never at its first patch.
    """
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    k = np.arange(4 * n, dtype=np.float64)
    hits = np.floor(np.mod(0.5 + k * GOLDEN, 1.0) * n).astype(np.int64)
    _, first = np.unique(hits, return_index=True)
    order = hits[np.sort(first)]
    if len(order) < n:
        order = np.concatenate([order, np.setdiff1d(np.arange(n), order)])
    return order


class Running:
    """Per-label power sums of the patch scores so far (float64): mean, spread and their standard errors."""

    def __init__(self, width: int):
        self.n = 0
        self.sums = np.zeros((4, width), dtype=np.float64)  # sum of x, x², x³, x⁴

    def add(self, scores: np.ndarray) -> None:
        x = np.asarray(scores, dtype=np.float64)
        self.n += len(x)
        x2 = x * x
        self.sums += np.stack([x.sum(0), x2.sum(0), (x2 * x).sum(0), (x2 * x2).sum(0)])

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, spread) as ``pipeline.Analysis`` holds them: the spread is the population std."""
        mean, var = self._moments()[:2]
        return mean.astype(np.float32), np.sqrt(var).astype(np.float32)

    def _moments(self):
        n = max(1, self.n)
        s1, s2, s3, s4 = self.sums / n
        var = np.maximum(s2 - s1 * s1, 0.0)
        m4 = np.maximum(s4 - 4 * s1 * s3 + 6 * s1 * s1 * s2 - 3 * s1 ** 4, 0.0)
        return s1, var, m4

    def errors(self, population: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(mean, spread, se of the mean, se of the spread) as estimates of the whole file's values.

        Sampling without replacement from ``population`` patches: the errors
        shrink by the finite-population correction and vanish at the last one.
        """
        mean, var, m4 = self._moments()
        n = self.n
        fpc = math.sqrt(max(population - n, 0) / (population - 1)) if population > 1 else 0.0
        sample_var = var * n / (n - 1) if n > 1 else var
        se_mean = np.sqrt(sample_var / max(1, n)) * fpc
        spread = np.sqrt(var)
        with np.errstate(divide="ignore", invalid="ignore"):
            se_spread = np.where(spread > 0, np.sqrt(np.maximum(m4 - var * var, 0.0) / max(1, n)) / (2 * spread), 0.0)
        return mean, spread, se_mean, se_spread * fpc


@dataclass
class StopRule:
    """When a fast analysis may stop: the comparisons that shape the written tags are settled.

    ``calibration`` is the one in force (the tags are judged as they would be
    written now); ``tiers`` the tiers whose lists are written (the main one,
    and the strict and loose lists in full write mode); ``genre_floor`` the
    fallback genre's floor where the library writes genres to the standard
    field (``apply.writes_genres``), else None.

    Each comparison is a distance (how far the estimate is from flipping it,
    in strength units) and that distance's standard error. With ``budget``
    None every distance must be ``z`` errors clear; with a budget, the
    expected number of comparisons that the rest of the file would still flip
    (the sum of ``Φ(-distance / error)``) must be at most ``budget``.
    """

    calibration: object = UNCALIBRATED
    tiers: tuple[str, ...] = (DEFAULT_TIER,)
    genre_floor: float | None = GENRE_FLOOR
    z: float = Z
    budget: float | None = BUDGET
    min_patches: int = MIN_PATCHES
    step: int = STEP
    rank_depth: int | None = RANK_DEPTH

    def first(self, population: int) -> int:
        """Patches to score before the first look."""
        return min(population, self.min_patches)

    def settled(self, running: Running, labels: tuple[str, ...], population: int) -> bool:
        """Whether more of the file's ``population`` patches could still change a written tag."""
        if running.n >= population:
            return True
        if running.n < self.first(population):
            return False
        return self.judge(self.decisions(running, labels, population))

    def judge(self, decisions) -> bool:
        if self.budget is None:
            return all(distance > self.z * error for distance, error in decisions)
        flips = 0.0
        for distance, error in decisions:
            flips += 0.5 * math.erfc(distance / (error * math.sqrt(2))) if error > 0 else float(distance <= 0)
            if flips > self.budget:
                return False
        return True

    def decisions(self, running: Running, labels: tuple[str, ...], population: int):
        """Every comparison ``build_tags`` makes, as (distance, error) pairs."""
        mean, spread, se_mean, se_spread = running.errors(population)
        values = self._estimates(labels, mean, spread, se_mean, se_spread)
        yield from self._tier_decisions(values)
        yield from self._side_decisions(values)
        yield from self._rank_decisions(values)
        yield from self._fallback_decisions(labels, mean, se_mean, values)

    # -- the comparisons build_tags makes ----------------------------------------------------------

    def _estimates(self, labels, mean, spread, se_mean, se_spread) -> dict:
        """Per (category, canonical value): for the strength and each tier's bound, (estimate, error), scaled.

        A value's strength and bounds are the maximum over its synonyms, as
        ``tagset`` merges them; the error is the strongest synonym's.
        """
        scale = self.calibration.scale
        tiers = dict.fromkeys((*self.tiers, LOOSEST))
        out: dict[tuple[str, str], dict[str, tuple[float, float]]] = {}
        for i, label_id in enumerate(labels):
            label = LABELS.get(label_id)
            if label is None or label.category is None:
                continue
            m, s, em, es = float(mean[i]), float(spread[i]), float(se_mean[i]), float(se_spread[i])
            entry = out.setdefault((label.category, label.canonical), {})
            parts = {"strength": (m, em)}
            for tier in tiers:
                w = TIER_SPREAD[tier]
                parts[tier] = (m + w * s, math.sqrt(em * em + w * w * es * es))
            for key, (raw, error) in parts.items():
                point = scale(label_id, raw)
                estimate = (point, abs(scale(label_id, raw + error) - point))
                if key not in entry or estimate[0] > entry[key][0]:
                    entry[key] = estimate
        return out

    def _tier_decisions(self, values):
        for entry in values.values():
            for tier in self.tiers:
                point, error = entry[tier]
                yield abs(point - TIERS[tier]), error

    def _side_decisions(self, values):
        """Each contradiction whose two sides may both be present: which side is stronger."""
        for category, side_a, side_b in OPPOSING:
            best = []
            for side in (side_a, side_b):
                present = [values[(category, v)] for v in side if (category, v) in values
                           and values[(category, v)][LOOSEST][0] + self.z * values[(category, v)][LOOSEST][1]
                           >= TIERS[LOOSEST]]
                if not present:
                    break
                best.append(max((e["strength"] for e in present), key=lambda pe: pe[0]))
            else:
                (a, error_a), (b, error_b) = best
                yield abs(a - b), math.hypot(error_a, error_b)

    def _rank_decisions(self, values):
        """The order of the first ``rank_depth`` values of each written list."""
        for category in CATEGORIES:
            for tier in self.tiers:
                kept = sorted((e["strength"] for (c, _), e in values.items()
                               if c == category and e[tier][0] >= TIERS[tier]), key=lambda pe: -pe[0])
                depth = len(kept) - 1 if self.rank_depth is None else min(self.rank_depth, len(kept) - 1)
                for (a, error_a), (b, error_b) in zip(kept[:depth], kept[1:depth + 1]):
                    yield a - b, math.hypot(error_a, error_b)

    def _fallback_decisions(self, labels, mean, se_mean, values):
        """Where an empty genre list gets its best genre anyway: that genre against the floor and the runner-up."""
        if self.genre_floor is None or DEFAULT_TIER not in self.tiers:
            return
        if any(c == GENRE and e[DEFAULT_TIER][0] >= TIERS[DEFAULT_TIER] for (c, _), e in values.items()):
            return  # the list is not empty: no fallback
        best: dict[str, tuple[float, float]] = {}
        for i, label_id in enumerate(labels):
            label = LABELS.get(label_id)
            if label is not None and label.category == GENRE:
                point = self.calibration.scale(label_id, float(mean[i]))
                error = abs(self.calibration.scale(label_id, float(mean[i] + se_mean[i])) - point)
                if label.canonical not in best or point > best[label.canonical][0]:
                    best[label.canonical] = (point, error)
        ranked = sorted(best.values(), key=lambda pe: -pe[0])
        if not ranked:
            return
        yield abs(ranked[0][0] - self.genre_floor), ranked[0][1]
        if len(ranked) > 1 and ranked[0][0] >= self.genre_floor:
            yield ranked[0][0] - ranked[1][0], math.hypot(ranked[0][1], ranked[1][1])


def rule_for(library, calibration=None, analysis: str | None = None) -> StopRule | None:
    """The stop rule for a track of ``library`` (None: full analysis, every patch).

    ``analysis`` overrides the library's setting (``tag_file --full/--fast``).
    """
    from workers.tagging.apply import writes_genres

    mode = analysis or getattr(library, "analysis", FAST) or FAST
    if mode == FULL:
        return None
    full_write = getattr(library, "write_mode", "minimal") == "full"
    return StopRule(calibration=calibration or UNCALIBRATED,
                    tiers=(DEFAULT_TIER, *EXTRA_TIERS) if full_write else (DEFAULT_TIER,),
                    genre_floor=GENRE_FLOOR if library is not None and writes_genres(library) else None)


class PatchStore:
    """A file's patches kept for the spread order while it streams: all of them, or an even stride of a long one.

    Keeps patch ``i`` when ``i % stride == 0``; whenever more than
    ``limit`` are kept the stride doubles and every other kept patch goes, so
    memory stays under ``limit`` patches whatever the file's length and the
    kept ones stay evenly spread over all of it.
    """

    def __init__(self, limit: int = MAX_KEPT):
        self.limit, self.stride, self.seen = limit, 1, 0
        self.kept: list[tuple[int, np.ndarray]] = []

    def add(self, patches: np.ndarray) -> None:
        for patch in patches:
            if self.seen % self.stride == 0:
                self.kept.append((self.seen, np.array(patch, dtype=np.float32, copy=True)))
            self.seen += 1
            if len(self.kept) > self.limit:
                self.stride *= 2
                self.kept = [(i, p) for i, p in self.kept if i % self.stride == 0]

    def patches(self) -> np.ndarray:
        if not self.kept:
            return np.zeros((0, 0, 0), dtype=np.float32)
        return np.stack([p for _, p in self.kept])


class Convergence:
    """One file's fast analysis as a loop: ``while (idx := c.next()).size: c.add(score(patches[idx]))``.

    ``population`` is the number of patches to choose from; ``rule`` None
    scores them all in file order, in one go.
    """

    def __init__(self, population: int, width: int, labels: tuple[str, ...], rule: StopRule | None):
        self.population, self.labels, self.rule = population, labels, rule
        self.running = Running(width)
        self.order = spread_order(population) if rule is not None else np.arange(population)
        self.done = population == 0

    def next(self) -> np.ndarray:
        """The indices to score next (into the population); empty when the analysis is finished."""
        if self.done:
            return self.order[:0]
        n = self.running.n
        if self.rule is None:
            take = self.population
        elif n == 0:
            take = self.rule.first(self.population)
        elif self.rule.settled(self.running, self.labels, self.population):
            self.done = True
            return self.order[:0]
        else:
            take = min(self.rule.step, self.population - n)
        return self.order[n:n + take]

    def add(self, scores: np.ndarray) -> None:
        self.running.add(scores)
        if self.running.n >= self.population:
            self.done = True


def score_many(files: list[np.ndarray], rules: list, labels: tuple[str, ...], score) -> list[Running]:
    """Analyse several files' patches together: each round scores the next patches of every file not yet settled.

    ``score`` maps (k, 187, 96) patches to (k, labels) probabilities (the
    networks); one call per round, so a GPU sees every file's patches at once.
    Returns each file's ``Running`` (``result()`` gives its mean and spread).
    """
    loops = [Convergence(len(patches), len(labels), labels, rule) for patches, rule in zip(files, rules)]
    while rounds := [(i, chosen) for i, loop in enumerate(loops) if (chosen := loop.next()).size]:
        scores = score(np.concatenate([files[i][chosen] for i, chosen in rounds]))
        start = 0
        for i, chosen in rounds:
            loops[i].add(scores[start:start + len(chosen)])
            start += len(chosen)
    return [loop.running for loop in loops]
