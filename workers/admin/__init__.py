"""The Django admin: where the user watches and steers Earmark.

Every page reads the database (never a worker's memory); every action only
writes rows (queue a job, retry, cancel) for the workers to pick up. Admin
actions are POSTs through Django's CSRF-protected changelist form. The live
dashboard itself lives in ``workers.live.views``; the admin index links to it.
Layer 4 and thin: may import every package below; ``common`` holds what the
pages share, and no page module imports another (or this package).
"""
from __future__ import annotations

import json

from django import forms
from django.contrib import admin, messages
from django.db.models import Count
from django.urls import reverse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe

from workers.library import libraries, paths, scan
from workers.live import plots
from workers.jobs import queue
from workers.admin.common import ComputedRows
from workers.models import Job, Library, Meta, Score, Track

ADMIN_PRIORITY = 60  # work asked for by a person runs before bulk work (scan-queued tags are 100)
JOB_HISTORY = 50

admin.site.index_template = "workers/admin_index.html"
admin.site.site_header = "Earmark"
admin.site.site_title = "Earmark"


def _pre(text: str):
    return format_html('<pre style="white-space:pre-wrap;margin:0">{}</pre>', text) if text else "—"


def _json(value):
    return _pre(json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True)) if value else "—"


def _short(text: str, n: int = 80) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


# --- libraries -------------------------------------------------------------------------


class LibraryForm(forms.ModelForm):
    class Meta:
        model = Library
        fields = ["name", "root", "enabled", "write_mode"]

    def clean_root(self):
        """An existing directory, stored resolved (the same check as ``library add``)."""
        return libraries.validate_root(self.cleaned_data["root"])


@admin.register(Library)
class LibraryAdmin(admin.ModelAdmin):
    form = LibraryForm
    list_display = ["name", "root", "enabled", "write_mode", "track_count", "scan_status", "last_scan_at"]
    list_filter = ["enabled", "write_mode"]
    search_fields = ["name", "root"]
    actions = ["scan", "full_scan"]
    readonly_fields = ["scan_progress", "last_scan_at", "last_scan_error", "distribution"]
    fieldsets = [
        (None, {"fields": ["name", "root", "enabled", "write_mode"]}),
        ("Scans", {"fields": ["scan_progress", "last_scan_at", "last_scan_error"]}),
        ("Distribution", {"fields": ["distribution"]}),
    ]

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(n_tracks=Count("tracks"))

    @admin.display(description="tracks", ordering="n_tracks")
    def track_count(self, obj):
        return obj.n_tracks

    @admin.display(description="last scan")
    def scan_status(self, obj):
        p = scan.progress(obj)
        if not p:
            return "never scanned"
        return f"{p.get('state')}: {p.get('folders_done', 0)}/{p.get('folders_total', 0)} folders, {p.get('files_seen', 0)} files"

    @admin.display(description="current scan")
    def scan_progress(self, obj):
        return _json(scan.progress(obj)) if obj.pk else "—"

    @admin.display(description="tracks per value")
    def distribution(self, obj):
        if not obj.pk:
            return "—"
        what, charts = plots.distribution_charts(Track.objects.filter(library=obj))
        link = reverse("earmark-plots") + f"?library={obj.pk}"
        return format_html('<p>{} (<a href="{}">larger page</a>)</p>{}', what, link,
                           mark_safe("".join(charts)))  # noqa: S308 - plots escapes every text it draws

    def _request_scans(self, request, queryset, full: bool):
        queued = [lib.name for lib in queryset if scan.request_scan(lib, full=full, priority=ADMIN_PRIORITY)]
        skipped = queryset.count() - len(queued)
        kind = "full scan" if full else "scan"
        if queued:
            self.message_user(request, f"Queued a {kind} of {', '.join(queued)}.", messages.SUCCESS)
        if skipped:
            self.message_user(request, f"{skipped} already had a scan queued or running.", messages.WARNING)

    @admin.action(description="Scan (new and changed files)", permissions=["change"])
    def scan(self, request, queryset):
        self._request_scans(request, queryset, full=False)

    @admin.action(description="Full scan (re-read every file)", permissions=["change"])
    def full_scan(self, request, queryset):
        self._request_scans(request, queryset, full=True)


# --- tracks ---------------------------------------------------------------------------------


def score_rows(score: Score) -> list[tuple[str, float, float]]:
    """(label, mean, spread), strongest first; labels by name when the installed label list fits."""
    import numpy as np

    means = np.frombuffer(bytes(score.means), dtype="<f4")
    spreads = np.frombuffer(bytes(score.spreads), dtype="<f4")
    names = _label_names(len(means))
    order = np.argsort(-means, kind="stable")
    return [(names[i], float(means[i]), float(spreads[i]) if i < len(spreads) else float("nan")) for i in order]


def _label_names(n: int) -> list[str]:
    try:
        from workers.tagging.labels import combined_labels

        names = combined_labels()
    except Exception:  # models not installed, or an unreadable labels.json: fall back to indices
        names = []
    return list(names) if len(names) == n else [f"#{i}" for i in range(n)]


def tags_in_file(track: Track):
    """What the file holds in Earmark's namespace now; any failure to read is shown, not raised."""
    try:
        from workers.tagfiles.namespace import read_earmark_tags

        return read_earmark_tags(paths.to_bytes(track.path), track.format or None)
    except Exception as exc:
        return f"could not read the file's tags: {type(exc).__name__}: {exc}"


@admin.register(Track)
class TrackAdmin(admin.ModelAdmin):
    list_display = ["short_path", "library", "state", "format", "artist", "title", "duration", "updated_at"]
    list_filter = ["library", "state", "format"]
    search_fields = ["path", "artist", "title"]
    list_select_related = ["library"]
    actions = ["retag", "recalibrate"]
    show_full_result_count = False  # a COUNT(*) per page is slow on a large library
    fieldsets = [
        ("File", {"fields": ["library", "path", "state", "error", "format", "codec", "duration", "sample_rate",
                             "channels", "bitrate", "size", "mtime_ns", "scanned_at"]}),
        ("The user's tags", {"fields": ["artist", "album", "title", "user_tags"]}),
        ("Earmark", {"fields": ["earmark_tags_written", "file_tags", "model_version", "calibration_version",
                                "tagged_at", "scores"]}),
        ("Jobs", {"fields": ["job_history"]}),
    ]

    def has_add_permission(self, request):
        return False  # tracks come from scans

    def get_readonly_fields(self, request, obj=None):
        return [f for fs in self.fieldsets for f in fs[1]["fields"]]

    @admin.display(description="path", ordering="path")
    def short_path(self, obj):
        return _short(obj.path, 90)

    @admin.display(description="tags read at scan")
    def user_tags(self, obj):
        return _json(obj.tags)

    @admin.display(description="tags written (database)")
    def earmark_tags_written(self, obj):
        return _json(getattr(obj, "earmark_tags", None))

    @admin.display(description="tags in the file now")
    def file_tags(self, obj):
        tags = tags_in_file(obj)
        return _pre(tags) if isinstance(tags, str) else _json(tags)

    @admin.display(description="stored scores")
    def scores(self, obj):
        score = Score.objects.filter(track=obj).first()
        if score is None:
            return "no scores stored"
        rows = format_html_join("", "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                                ((name, f"{mean:.4f}", f"{spread:.4f}") for name, mean, spread in score_rows(score)))
        return format_html('<p>{}, {} patches</p><table><thead><tr><th>label</th><th>mean</th><th>spread</th></tr>'
                           "</thead><tbody>{}</tbody></table>", score.model_version, score.patches, rows)

    @admin.display(description="job history")
    def job_history(self, obj):
        jobs = obj.jobs.order_by("-id")[:JOB_HISTORY]
        if not jobs:
            return "no jobs"
        rows = format_html_join("", '<tr><td><a href="{}">{}</a></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>'
                                "<td>{}</td></tr>",
                                ((reverse("admin:workers_job_change", args=[j.id]), j.id, j.queue, j.state,
                                  j.attempts, j.finished_at or j.created_at, _short(j.last_error, 120)) for j in jobs))
        return format_html("<table><thead><tr><th>job</th><th>queue</th><th>state</th><th>attempts</th>"
                           "<th>when</th><th>error</th></tr></thead><tbody>{}</tbody></table>", rows)

    def _enqueue(self, request, queryset, queue_name: str):
        jobs = [queue.NewJob(key=f"{queue_name}:{t.id}", payload={"force": True, "requested_by": "admin"},
                             track_id=t.id, library_id=t.library_id, priority=ADMIN_PRIORITY)
                for t in queryset.only("id", "library_id")]
        created = queue.enqueue_many(queue_name, jobs)
        self.message_user(request, f"Queued {created} {queue_name} job(s); "
                                   f"{len(jobs) - created} already had one queued or running.", messages.SUCCESS)

    @admin.action(description="Retag (run the models again)", permissions=["change"])
    def retag(self, request, queryset):
        self._enqueue(request, queryset, "tag")

    @admin.action(description="Recalibrate (rewrite tags from stored scores)", permissions=["change"])
    def recalibrate(self, request, queryset):
        self._enqueue(request, queryset, "calibrate")


# --- jobs ---------------------------------------------------------------------------------


@admin.register(Job)
class JobAdmin(admin.ModelAdmin):
    list_display = ["id", "queue", "key", "state", "priority", "attempts_of", "claimed_by", "created_at",
                    "finished_at", "short_error"]
    list_filter = ["queue", "state", "library"]
    search_fields = ["key", "last_error", "claimed_by"]
    actions = ["retry", "cancel"]
    show_full_result_count = False
    fields = ["queue", "key", "state", "priority", "attempts", "max_attempts", "run_after", "claimed_by", "boot_id",
              "lease_expires", "library", "track", "created_at", "started_at", "finished_at", "payload_json",
              "result_json", "error"]

    def has_add_permission(self, request):
        return False  # jobs come from scans and actions, with their dedup keys

    def get_readonly_fields(self, request, obj=None):
        return self.fields

    @admin.display(description="attempts")
    def attempts_of(self, obj):
        return f"{obj.attempts}/{obj.max_attempts}"

    @admin.display(description="error")
    def short_error(self, obj):
        return _short(obj.last_error)

    @admin.display(description="error (in full)")
    def error(self, obj):
        return _pre(obj.last_error)

    @admin.display(description="payload")
    def payload_json(self, obj):
        return _json(obj.payload)

    @admin.display(description="result")
    def result_json(self, obj):
        return _json(obj.result)

    @admin.action(description="Retry (failed or cancelled jobs)", permissions=["change"])
    def retry(self, request, queryset):
        n = queue.retry(list(queryset.values_list("id", flat=True)))
        self.message_user(request, f"Requeued {n} job(s).", messages.SUCCESS)

    @admin.action(description="Cancel (queued jobs; running ones finish)", permissions=["change"])
    def cancel(self, request, queryset):
        n = queue.cancel(list(queryset.values_list("id", flat=True)))
        self.message_user(request, f"Cancelled {n} job(s).", messages.SUCCESS)


# --- meta ---------------------------------------------------------------------------------


@admin.register(Meta)
class MetaAdmin(ComputedRows, admin.ModelAdmin):
    """Read-only: these rows are the workers' IPC; editing one by hand would lie to them."""

    list_display = ["key", "updated_at", "preview"]
    search_fields = ["key"]
    fields = ["key", "updated_at", "value_json"]
    readonly_fields = fields

    def has_delete_permission(self, request, obj=None):
        return False

    @admin.display(description="value")
    def preview(self, obj):
        return _short(json.dumps(obj.value, ensure_ascii=False), 120)

    @admin.display(description="value")
    def value_json(self, obj):
        return _json(obj.value)


# The Calibration page has a module of its own; importing it registers it.
from workers.admin import calibration as calibration_admin  # noqa: E402,F401
