"""Finding tracks by what Earmark heard: a list filter per category with counts, a strength filter, tag search;
tempo, key and loudness filters and key search.

Everything runs on ``TrackTag`` (one row per written value, indexed by
category and value), never on the JSON lists in ``Track.earmark_tags``: a
JSON scan of 100,000 rows per page view is what made such filters slow. The
counts in a filter's sidebar are one ``GROUP BY value`` over the category's
rows (cached for a minute); choosing a value adds one ``id IN (…)`` per
category to the list's query.

Tempo, key and loudness are columns of ``Track`` with an index each (``bpm``,
``musical_key``, ``loudness_lufs``), so their filters are index range or
equality lookups; their sidebar counts (one ``COUNT`` per choice on the index)
are cached for a minute too. The ranges and the 24 keys are
``workers.tagging.feature_groups``', which the playlists use as well.
"""
from __future__ import annotations

from django.contrib import admin
from django.core.cache import cache
from django.db.models import Count, Q

from workers.audio.formats import FORMATS
from workers.models import Track, TrackTag
from workers.tagging import feature_groups as groups
from workers.tagging.categories import CATEGORIES

#: The strength choices of ``StrengthFilter``: how sure the chosen tags must be.
STRENGTHS = (("0.6", "≥ 0.6"), ("0.75", "≥ 0.75 (sure)"), ("0.9", "≥ 0.9 (very sure)"))
STRENGTH_PARAM = "strength"
#: Values listed per category in the sidebar; the rest are reached by search.
MAX_CHOICES = 40
COUNTS_SECONDS = 60


def min_strength(request) -> float | None:
    """The strength chosen in the sidebar, applied to every category filter (None: any)."""
    raw = request.GET.get(STRENGTH_PARAM)
    return float(raw) if raw in {value for value, _ in STRENGTHS} else None


def has_tag(category: str, value: str, strength: float | None = None) -> Q:
    """Tracks with a tag row of this category and value (and at least this strength).

    ``id IN (SELECT track_id …)``, not a correlated ``EXISTS``: the inner
    query reads the (category, value) index once, where ``EXISTS`` probed
    it once per track (measured 2× slower at 100,000 tracks).
    """
    rows = TrackTag.objects.filter(category=category, value=value)
    if strength is not None:
        rows = rows.filter(strength__gte=strength)
    return Q(pk__in=rows.values("track_id"))


class CategoryFilter(admin.SimpleListFilter):
    """Tracks whose written tags include the chosen value of one category; each choice with its count."""

    category = ""

    def __init__(self, request, params, model, model_admin):
        self.request = request
        super().__init__(request, params, model, model_admin)

    def lookups(self, request, model_admin):
        return [(value, f"{value} ({n:,})") for value, n in value_counts(self.category)]

    def queryset(self, request, queryset):
        if not self.value():
            return queryset
        return queryset.filter(has_tag(self.category, self.value(), min_strength(request)))


def value_counts(category: str) -> list[tuple[str, int]]:
    """The category's values with their track counts, most first; cached for ``COUNTS_SECONDS``.

    A count a minute old is good enough for a sidebar, and five ``GROUP BY``
    over every tag row were a third of the list's time at 100,000 tracks.
    """
    key = f"earmark:tag-counts:{category}"
    counts = cache.get(key)
    if counts is None:
        rows = (TrackTag.objects.filter(category=category).values("value").annotate(n=Count("id"))
                .order_by("-n", "value")[:MAX_CHOICES])
        counts = [(row["value"], row["n"]) for row in rows]
        cache.set(key, counts, COUNTS_SECONDS)
    return counts


def category_filter(category: str) -> type[CategoryFilter]:
    return type(f"{category.capitalize()}Filter", (CategoryFilter,),
                {"category": category, "title": f"{category} (Earmark)", "parameter_name": category})


CATEGORY_FILTERS = [category_filter(category) for category in CATEGORIES]


class StrengthFilter(admin.SimpleListFilter):
    """Only tags at least this sure count for the category filters (the filtering happens there)."""

    title = "tag strength"
    parameter_name = STRENGTH_PARAM

    def lookups(self, request, model_admin):
        return STRENGTHS

    def queryset(self, request, queryset):
        chosen = [c for c in CATEGORIES if request.GET.get(c)]
        if self.value() and not chosen:  # no category chosen: any tag that sure
            return queryset.filter(pk__in=TrackTag.objects.filter(strength__gte=min_strength(request))
                                   .values("track_id"))
        return queryset


def tag_search(term: str) -> Q:
    """Tracks with a written tag equal to ``term`` in any category (``piano``, ``female vocal``).

    Values are written lower-case, so the search lower-cases the term and
    names every category: an equality the (category, value) index answers,
    where a case-insensitive ``LIKE`` read every tag row.
    """
    rows = TrackTag.objects.filter(category__in=CATEGORIES, value=term.strip().lower())
    return Q(pk__in=rows.values("track_id"))


class FormatFilter(admin.SimpleListFilter):
    """The file formats Earmark reads, as fixed choices: ``SELECT DISTINCT format`` scanned every track."""

    title = "format"
    parameter_name = "format"

    def lookups(self, request, model_admin):
        return [(fmt, fmt) for fmt in FORMATS]

    def queryset(self, request, queryset):
        return queryset.filter(format=self.value()) if self.value() else queryset


def _cached(key: str, compute):
    value = cache.get(key)
    if value is None:
        value = compute()
        cache.set(key, value, COUNTS_SECONDS)
    return value


class _RangeFilter(admin.SimpleListFilter):
    """One measure in ranges (``feature_groups``), each with its count, and "not measured"."""

    ranges: tuple[groups.Range, ...] = ()
    field = ""
    none_label = "not measured"

    @staticmethod
    def range_q(r: groups.Range):
        raise NotImplementedError

    def _counts(self) -> dict[str, int]:
        def compute():
            counts = {r.slug: Track.objects.filter(self.range_q(r)).count() for r in self.ranges}
            counts[groups.NONE] = Track.objects.filter(**{f"{self.field}__isnull": True}).count()
            return counts
        return _cached(f"earmark:range-counts:{self.field}", compute)

    def lookups(self, request, model_admin):
        counts = self._counts()
        return [(r.slug, f"{r.label} ({counts.get(r.slug, 0):,})") for r in self.ranges] + \
            [(groups.NONE, f"{self.none_label} ({counts.get(groups.NONE, 0):,})")]

    def queryset(self, request, queryset):
        if self.value() == groups.NONE:
            return queryset.filter(**{f"{self.field}__isnull": True})
        chosen = next((r for r in self.ranges if r.slug == self.value()), None)
        return queryset.filter(self.range_q(chosen)) if chosen else queryset


class BpmFilter(_RangeFilter):
    """Tempo in ranges of the whole-beat BPM players show (``feature_groups``), and tracks without one."""

    title = "tempo (BPM)"
    parameter_name = "bpm"
    ranges = groups.BPM_RANGES
    field = "bpm"
    none_label = "no BPM"
    range_q = staticmethod(groups.bpm_q)


class LoudnessFilter(_RangeFilter):
    """Integrated loudness (EBU R128) in ranges, loudest first, and tracks not measured."""

    title = "loudness"
    parameter_name = "loudness"
    ranges = groups.LOUDNESS_RANGES
    field = "loudness_lufs"
    range_q = staticmethod(groups.loudness_q)


def key_counts() -> dict[str, int]:
    """Tracks per ``musical_key`` ("" for none): one ``GROUP BY`` on its index, cached for a minute."""
    def compute():
        return {row["musical_key"]: row["n"]
                for row in Track.objects.values("musical_key").annotate(n=Count("id")).order_by()}
    return _cached("earmark:key-counts", compute)


class KeyFilter(admin.SimpleListFilter):
    """Each of the 24 keys in Camelot order, in all three notations, with its count; and "none"."""

    title = "key"
    parameter_name = "key"

    def lookups(self, request, model_admin):
        counts = key_counts()
        choices = []
        for name in groups.KEYS:
            n = groups.notations(name)
            choices.append((name, f"{name} · {n.standard} · {n.camelot} · {n.open_key} ({counts.get(name, 0):,})"))
        return choices + [(groups.NONE, f"none ({counts.get('', 0):,})")]

    def queryset(self, request, queryset):
        if self.value() == groups.NONE:
            return queryset.filter(musical_key="")
        if self.value() in groups.KEYS:
            return queryset.filter(musical_key=self.value())
        return queryset


def key_search(term: str) -> Q | None:
    """Tracks in the key the term names (``A minor``, ``Am``, ``8A``, ``1m``: ``feature_groups.key_from_search``)."""
    name = groups.key_from_search(term)
    return Q(musical_key=name) if name else None
