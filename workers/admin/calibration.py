"""The admin's calibration pages: the versions, their per-label statistics and histograms, and "compute now".

Calibrations are made by ``workers.calibration.compute`` (the "Compute a new
calibration now" button here, ``manage.py calibrate``, or the automatic
trigger), never typed in, so the pages are read-only. Actions: make a
calibration current again (e.g. to roll back; the files are rewritten) and
download one as JSON for ``manage.py calibrate --import`` elsewhere.
Histograms are server-rendered SVG (``workers.live.plots``), one per label, with
the library's p5 and p95 marked.
"""
from __future__ import annotations

import json

from django.contrib import admin, messages
from django.http import HttpResponse, HttpResponseNotAllowed, HttpResponseRedirect
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe

from workers.calibration import auto, compute, transfer
from workers.tagging import calibrated
from workers.live import plots
from workers.admin.common import ComputedRows
from workers.models import Calibration
from workers.tagging.categories import LABELS

HISTOGRAM_WIDTH = 300
HISTOGRAM_HEIGHT = 120


def histogram_svgs(row: Calibration) -> list[str]:
    """One SVG histogram per label, with the library's p5 and p95 marked."""
    svgs = []
    for label, s in row.stats.items():
        lo, hi = float(s["min"]), float(s["max"])
        if hi <= lo:
            hi = lo + 1e-6
        svgs.append(plots.histogram(s["counts"], lo, hi, label, marks={"p5": s["p5"], "p95": s["p95"]},
                                    width=HISTOGRAM_WIDTH, height=HISTOGRAM_HEIGHT))
    return svgs


def _category(label: str) -> str:
    known = LABELS.get(label)
    return (known.category or "score only") if known else "?"


@admin.register(Calibration)
class CalibrationAdmin(ComputedRows, admin.ModelAdmin):
    list_display = ["version", "is_current", "track_count", "model_version", "source", "created_at"]
    list_filter = ["source"]
    search_fields = ["version", "model_version"]
    actions = ["make_current", "export_json"]
    fields = ["version", "is_current", "model_version", "track_count", "source", "seconds", "created_at",
              "label_table", "histograms"]
    readonly_fields = fields

    # -- permissions: calibrations are computed or imported, never edited (ComputedRows) ---

    def has_delete_permission(self, request, obj=None):
        """The current calibration cannot be deleted: files name it and processes use it."""
        if obj is not None and obj.version == _current_version():
            return False
        return super().has_delete_permission(request, obj)

    def has_compute_permission(self, request) -> bool:
        """Computing or activating rewrites files: the "add calibration" permission (the add form stays off)."""
        return request.user.has_perm("workers.add_calibration")

    def get_actions(self, request):
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)  # would allow deleting the current one in bulk
        return actions

    # -- the list ---------------------------------------------------------------------------

    @admin.display(description="current", boolean=True)
    def is_current(self, obj):
        return obj.version == _current_version()

    def changelist_view(self, request, extra_context=None):
        extra = {"can_compute": self.has_compute_permission(request), "calibration_status": status_line()}
        return super().changelist_view(request, {**extra, **(extra_context or {})})

    # -- the detail page --------------------------------------------------------------------

    @admin.display(description="per label")
    def label_table(self, obj):
        rows = format_html_join(
            "", "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            ((label, _category(label), f"{s['p5']:.4f}", f"{s['p95']:.4f}", f"{s['min']:.4f}", f"{s['max']:.4f}")
             for label, s in obj.stats.items()))
        return format_html("<table><thead><tr><th>label</th><th>category</th><th>p5</th><th>p95</th><th>min</th>"
                           "<th>max</th></tr></thead><tbody>{}</tbody></table>", rows)

    @admin.display(description="histograms (100 bins from min to max)")
    def histograms(self, obj):
        cells = "".join(f'<div class="module" style="padding:4px">{svg}</div>' for svg in histogram_svgs(obj))
        # plots escapes every text it draws (labels come from the database)
        return mark_safe(f'<div style="display:flex;flex-wrap:wrap;gap:8px">{cells}</div>')  # noqa: S308

    # -- compute now ------------------------------------------------------------------------

    def get_urls(self):
        compute = path("compute/", self.admin_site.admin_view(self.compute_view), name="workers_calibration_compute")
        return [compute, *super().get_urls()]

    def compute_view(self, request):
        """POST only (CSRF-protected): compute, activate, and report back on the list."""
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        if not self.has_compute_permission(request):
            self.message_user(request, "You may not compute calibrations.", messages.ERROR)
        else:
            self._compute(request)
        return HttpResponseRedirect(reverse("admin:workers_calibration_changelist"))

    def _compute(self, request) -> None:
        try:
            result = compute.recalibrate()
        except compute.NotEnoughTracks as exc:
            self.message_user(request, f"Not calibrated: {exc}.", messages.WARNING)
            return
        row = result.calibration
        what = "New calibration" if result.created else "The scores give the current calibration again:"
        self.message_user(request, f"{what} {row.version} over {row.track_count} tracks "
                                   f"({result.seconds:.1f} s); {result.jobs} track(s) queued "
                                   "for recalibration.", messages.SUCCESS)

    # -- actions ----------------------------------------------------------------------------

    @admin.action(description="Make current (rewrite every file's tags with it)", permissions=["compute"])
    def make_current(self, request, queryset):
        if queryset.count() != 1:
            self.message_user(request, "Select exactly one calibration.", messages.WARNING)
            return
        row = queryset.get()
        jobs = compute.activate(row)
        self.message_user(request, f"{row.version} is current; {jobs} track(s) queued for recalibration.",
                          messages.SUCCESS)

    @admin.action(description="Download as JSON (for calibrate --import)", permissions=["view"])
    def export_json(self, request, queryset):
        if queryset.count() != 1:
            self.message_user(request, "Select exactly one calibration.", messages.WARNING)
            return None
        row = queryset.get()
        response = HttpResponse(json.dumps(transfer.export_json(row), indent=1), content_type="application/json")
        response["Content-Disposition"] = f'attachment; filename="earmark-{row.version}.json"'
        return response


def _current_version() -> str | None:
    pointer = calibrated.current_pointer()
    return pointer.get("version") if pointer else None


def status_line() -> str:
    """Where the library stands: tagged tracks, the current calibration, when the next one comes."""
    due = auto.auto_due()
    current = (f"current calibration {due.current['version']} over {due.current.get('track_count', 0)} tracks"
               if due.current else "no calibration yet (tags use the uncalibrated thresholds)")
    return (f"{due.tagged} tagged tracks; {current}; the next one is computed automatically at "
            f"{due.needed} tagged tracks.")
