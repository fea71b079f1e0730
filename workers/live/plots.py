"""Plots for the admin, rendered on the server as SVG strings (no JavaScript, no plotting library).

Two renderers, generic over their data so that any admin page can use them:

* ``bar_chart``: horizontal bars with a label and a count per row (the
  distribution of tag values across a library, or any other counts);
* ``histogram``: bins over a value range with labelled vertical marks (a
  calibration's per-label histogram with its p5 and p95).

And the data half of the library plot: ``tag_distribution`` counts the tracks
per value of each category Earmark wrote (``Track.earmark_tags``); until
anything is tagged, ``field_distribution`` counts what the scanner knows
(format, state), so the page is never empty.

Every piece of text is XML-escaped: tag values come from files and users.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from xml.sax.saxutils import escape, quoteattr

from django.db.models import Count

# Sized for the admin's content column; colours from the admin's palette.
WIDTH = 460
BAR_HEIGHT = 16
BAR_GAP = 4
LABEL_WIDTH = 150
COUNT_WIDTH = 52
TITLE_HEIGHT = 22
# Colours follow the admin's theme, light or dark: inside the admin page the SVG is inline, so the
# admin's CSS variables apply (``--body-fg`` is near-black in the light theme, near-white in the dark
# one); each falls back to the light theme's colour where the SVG stands alone. The colours are given
# as presentation attributes too (the fallback of last resort) and as ``style`` (which wins, and may use var()).
BAR_COLOUR = "#79aec8"  # the admin's blue: readable on either background
MARK_COLOUR = "#ba2121"
TEXT_FILL = "var(--body-fg, #333)"
AXIS_STROKE = "var(--body-quiet-color, #999)"
MARK_STROKE = f"var(--error-fg, {MARK_COLOUR})"
FONT = "font-family:sans-serif;font-size:11px"
MAX_LABEL_CHARS = 24


def _text(x: float, y: float, content: str, anchor: str = "start", extra: str = "", fill: str = TEXT_FILL) -> str:
    """A label in the theme's text colour (``fill``: another CSS colour, e.g. a mark's)."""
    return (f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" style="{FONT};fill:{fill}"{extra}>'
            f"{escape(content)}</text>")


def _svg(width: float, height: float, title: str, body: list[str]) -> str:
    """The chart at its natural size, shrunk to fit a narrower column (a phone) rather than overflow it."""
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
            f'viewBox="0 0 {width:.0f} {height:.0f}" style="max-width:100%;height:auto" role="img" '
            f"aria-label={quoteattr(title)}><title>{escape(title)}</title>{''.join(body)}</svg>")


def _short(label: str) -> str:
    return label if len(label) <= MAX_LABEL_CHARS else label[: MAX_LABEL_CHARS - 1] + "…"


def bar_chart(items: Sequence[tuple[str, int]], title: str, width: int = WIDTH, limit: int = 25) -> str:
    """Horizontal bars, largest first as given; rows past ``limit`` are summed into "other"."""
    rows = list(items[:limit])
    if len(items) > limit:
        rows.append((f"other ({len(items) - limit})", sum(n for _, n in items[limit:])))
    top = max((n for _, n in rows), default=0) or 1
    span = width - LABEL_WIDTH - COUNT_WIDTH
    body = [_text(0, 14, title, extra=' font-weight="bold"')]
    for i, (label, count) in enumerate(rows):
        y = TITLE_HEIGHT + i * (BAR_HEIGHT + BAR_GAP)
        length = max(1.0, span * count / top) if count else 0.0
        body.append(_text(LABEL_WIDTH - 6, y + BAR_HEIGHT - 4, _short(label), anchor="end"))
        body.append(f'<rect x="{LABEL_WIDTH}" y="{y}" width="{length:.1f}" height="{BAR_HEIGHT}" '
                    f'fill="{BAR_COLOUR}"><title>{escape(label)}: {count}</title></rect>')
        body.append(_text(LABEL_WIDTH + length + 4, y + BAR_HEIGHT - 4, str(count)))
    if not rows:
        body.append(_text(0, TITLE_HEIGHT + 12, "nothing to show yet"))
    height = TITLE_HEIGHT + max(1, len(rows)) * (BAR_HEIGHT + BAR_GAP)
    return _svg(width, height, title, body)


def histogram(counts: Sequence[int], lo: float, hi: float, title: str, marks: Mapping[str, float] | None = None,
              width: int = WIDTH, height: int = 140) -> str:
    """Equal-width bins from ``lo`` to ``hi`` with vertical marks (e.g. ``{"p5": .., "p95": ..}``)."""
    if hi <= lo:
        raise ValueError("histogram range must have hi > lo")
    left, right, top_pad, bottom = 34, 8, TITLE_HEIGHT + 14, 18
    plot_w, plot_h = width - left - right, height - top_pad - bottom
    peak = max(counts, default=0) or 1
    bin_w = plot_w / max(1, len(counts))
    body = [_text(0, 14, title, extra=' font-weight="bold"')]
    for i, n in enumerate(counts):
        h = plot_h * n / peak
        if h:
            body.append(f'<rect x="{left + i * bin_w:.2f}" y="{top_pad + plot_h - h:.2f}" width="{max(bin_w - 0.5, 0.5):.2f}" '
                        f'height="{h:.2f}" fill="{BAR_COLOUR}"/>')
    base = top_pad + plot_h
    body.append(f'<line x1="{left}" y1="{base}" x2="{left + plot_w}" y2="{base}" stroke="#999" '
                f'style="stroke:{AXIS_STROKE}"/>')
    body.append(_text(left, base + 13, f"{lo:g}", anchor="middle"))
    body.append(_text(left + plot_w, base + 13, f"{hi:g}", anchor="middle"))
    body.append(_text(left - 4, top_pad + 8, str(max(counts, default=0)), anchor="end"))
    for name, value in (marks or {}).items():
        x = left + plot_w * min(1.0, max(0.0, (value - lo) / (hi - lo)))
        body.append(f'<line x1="{x:.2f}" y1="{top_pad - 4}" x2="{x:.2f}" y2="{base}" stroke="{MARK_COLOUR}" '
                    f'stroke-dasharray="3,2" style="stroke:{MARK_STROKE}"><title>{escape(name)} = {value:.4g}</title></line>')
        body.append(_text(x, top_pad - 6, f"{name} {value:.3g}", anchor="middle", fill=MARK_STROKE))
    return _svg(width, height, title, body)


def bin_values(values: Iterable[float], lo: float, hi: float, bins: int = 100) -> list[int]:
    """Count ``values`` into ``bins`` equal bins over [lo, hi]; values outside go to the end bins."""
    counts = [0] * bins
    scale = bins / (hi - lo)
    for v in values:
        counts[min(bins - 1, max(0, int((v - lo) * scale)))] += 1
    return counts


# --- the library's distribution --------------------------------------------------


def tag_distribution(tracks) -> dict[str, list[tuple[str, int]]]:
    """Tracks per written value, per category: ``{"genre": [("rock", 120), ...], ...}``.

    Reads ``Track.earmark_tags`` (``{"genre": ["rock", "pop"], ...}``); the
    version tag and per-label scores are not categories and are left out.
    """
    counters: dict[str, Counter] = {}
    for tags in tracks.exclude(earmark_tags={}).values_list("earmark_tags", flat=True).iterator(chunk_size=2000):
        for category, values in (tags or {}).items():
            if category == "version" or category.startswith("score") or not isinstance(values, list):
                continue
            counters.setdefault(category, Counter()).update(set(map(str, values)))
    return {c: counters[c].most_common() for c in _category_order(counters)}


def _category_order(categories: Iterable[str]) -> list[str]:
    try:
        from workers.tagging.categories import CATEGORIES
    except ImportError:  # pragma: no cover - the tagging package is part of the app
        CATEGORIES = ()
    known = [c for c in CATEGORIES if c in categories]
    return known + sorted(c for c in categories if c not in known)


def field_distribution(tracks, fields: Sequence[str] = ("format", "state")) -> dict[str, list[tuple[str, int]]]:
    """Tracks per value of plain model fields, for libraries with nothing tagged yet."""
    out = {}
    for name in fields:
        rows = tracks.values(name).annotate(n=Count("id")).order_by("-n", name)
        out[name] = [(str(r[name] or "(none)"), r["n"]) for r in rows]
    return out


def library_distribution(tracks) -> tuple[str, dict[str, list[tuple[str, int]]]]:
    """(what it shows, the counts): tag values once anything is tagged, else format and state."""
    tags = tag_distribution(tracks)
    if tags:
        return "tags written", tags
    return "scanned files (nothing tagged yet)", field_distribution(tracks)


def distribution_charts(tracks, title_prefix: str = "") -> tuple[str, list[str]]:
    """SVG bar charts, one per category, of ``library_distribution``."""
    what, groups = library_distribution(tracks)
    return what, [bar_chart(items, f"{title_prefix}{category}") for category, items in groups.items()]


def throughput_charts(minutes: int = 60, now=None) -> list[str]:
    """Jobs finished per minute over the last ``minutes``, one histogram per queue (tracks tagged per minute, …).

    Read from the finished jobs themselves (``finished_at``), so the chart
    needs no counters of its own and shows what really got done.
    """
    from datetime import timedelta

    from django.utils import timezone

    from workers.jobs.queue import QUEUES
    from workers.models import Job

    now = now or timezone.now()
    since = now - timedelta(minutes=minutes)
    per_queue = {q: [0] * minutes for q in QUEUES}
    for queue, finished in (Job.objects.filter(state="done", finished_at__gte=since)
                            .values_list("queue", "finished_at").iterator(5000)):
        slot = min(minutes - 1, int((finished - since).total_seconds() // 60))
        if queue in per_queue:
            per_queue[queue][slot] += 1
    return [histogram(counts, -minutes, 0, f"{queue}: jobs done per minute, last {minutes} min (minutes ago)")
            for queue, counts in per_queue.items()]
