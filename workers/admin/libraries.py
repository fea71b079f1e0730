"""The admin's library pages: add a music folder, watch its scans and tag distribution, ask for a scan."""
from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.db.models import Count
from django.urls import reverse
from django.utils.html import format_html
from django.utils.safestring import mark_safe

from workers.admin.common import ADMIN_PRIORITY, json_block, table
from workers.library import libraries, scan, watch
from workers.live import eta, plots
from workers.models import Library, Track


class LibraryForm(forms.ModelForm):
    class Meta:
        model = Library
        fields = ["name", "root", "enabled", "write_mode", "analysis", "standard_tags", "standard_limits",
                  "id3v23_separator", "key_notation", "watch", "poll_seconds"]

    def clean_root(self):
        """An existing directory, stored resolved (the same check as ``library add``)."""
        return libraries.validate_root(self.cleaned_data["root"])

    def clean_standard_limits(self):
        """A field → count object (``{"genre": 2, "mood": 2}``): junk is a form error here, not a failed tag job later."""
        value = self.cleaned_data["standard_limits"]
        return {} if value is None else libraries.validate_standard_limits(value)  # empty: no standard fields


@admin.register(Library)
class LibraryAdmin(admin.ModelAdmin):
    form = LibraryForm
    list_display = ["name", "root", "enabled", "write_mode", "analysis", "standard_tags", "track_count", "scan_status",
                    "last_scan_at"]
    list_filter = ["enabled", "write_mode", "analysis", "standard_tags"]
    search_fields = ["name", "root"]
    actions = ["scan", "full_scan"]
    readonly_fields = ["tag_preview", "scan_progress", "last_scan_at", "last_scan_error", "distribution", "watch_status"]
    fieldsets = [
        (None, {"fields": ["name", "root", "enabled", "write_mode", "analysis"]}),
        ("Standard fields (genre and mood where players look)",
         {"fields": ["standard_tags", "standard_limits", "id3v23_separator", "tag_preview"]}),
        ("Tempo, key and loudness (BPM, key and ReplayGain fields)", {"fields": ["key_notation"]}),
        ("Watching (new and changed files are scanned by themselves)",
         {"fields": ["watch", "poll_seconds", "watch_status"]}),
        ("Scans", {"fields": ["scan_progress", "last_scan_at", "last_scan_error"]}),
        ("Distribution", {"fields": ["distribution"]}),
    ]

    # Adding, changing, deleting and scanning need ``workers.manage_libraries`` (migration 0009); looking needs
    # the model's view permission or that one.
    def _manages(self, request) -> bool:
        return request.user.has_perm("workers.manage_libraries")

    def has_view_permission(self, request, obj=None):
        return super().has_view_permission(request, obj) or self._manages(request)

    def has_add_permission(self, request):
        return self._manages(request)

    def has_change_permission(self, request, obj=None):
        return self._manages(request)

    def has_delete_permission(self, request, obj=None):
        return self._manages(request)

    def has_manage_permission(self, request):
        return self._manages(request)

    def has_module_permission(self, request):
        return super().has_module_permission(request) or self._manages(request)

    def save_model(self, request, obj, form, change):
        """A library added here is scanned at once: adding it is asking for its music to be tagged."""
        super().save_model(request, obj, form, change)
        if not change and obj.enabled:
            scan.request_scan(obj, priority=ADMIN_PRIORITY)
            self.message_user(request, f"Queued a scan of {obj.name}.", messages.SUCCESS)

    def delete_model(self, request, obj):
        libraries.remove_library(obj)

    def delete_queryset(self, request, queryset):
        for library in queryset:
            libraries.remove_library(library)

    def get_queryset(self, request):
        """Counts the tracks in the list's one query, not one query per row."""
        return super().get_queryset(request).annotate(n_tracks=Count("tracks"))

    @admin.display(description="tracks", ordering="n_tracks")
    def track_count(self, obj):
        return obj.n_tracks

    @admin.display(description="last scan")
    def scan_status(self, obj):
        p = scan.progress(obj)
        if not p:
            return "never scanned"
        left = eta.scan_text(p)
        return (f"{p.get('state')}: {p.get('folders_done', 0)}/{p.get('folders_total', 0)} folders, "
                f"{p.get('files_seen', 0)} files" + (f"; {left}" if left else ""))

    @admin.display(description="preview")
    def tag_preview(self, obj):
        if not obj.pk:
            return "-"
        return format_html('<a href="{}">what each policy would write for sample tracks</a>',
                           reverse("earmark-preview", args=[obj.pk]))

    @admin.display(description="current scan")
    def scan_progress(self, obj):
        if not obj.pk:
            return "—"
        p = scan.progress(obj)
        left = eta.scan_text(p)
        return format_html("<p>{}</p>{}", left, json_block(p)) if left else json_block(p)

    @admin.display(description="watcher")
    def watch_status(self, obj):
        """Each host's watcher (``run_watcher``): how it watches this library and why, and what it last saw."""
        rows = watch.statuses(obj) if obj.pk else []
        if not rows:
            return "no watcher has reported on this library (is the watcher program running?)"
        return table(["host", "mode", "why", "folders", "last event", "last poll", "folders queued", "problem",
                      "reported"],
                     [[r.get("host"), f"{r.get('mode')} ({r.get('state')})", r.get("reason"), r.get("folders"),
                       r.get("last_event") or "—", r.get("last_poll") or "—", r.get("folders_queued", 0),
                       r.get("error") or r.get("missed") or "—", r.get("updated_at")] for r in rows])

    @admin.display(description="tracks per value")
    def distribution(self, obj):
        if not obj.pk:
            return "—"
        what, charts = plots.distribution_charts(Track.objects.filter(library=obj))
        link = reverse("earmark-plots") + f"?library={obj.pk}"
        return format_html('<p>{} (<a href="{}">larger page</a>)</p>{}', what, link,
                           mark_safe("".join(charts)))  # noqa: S308 - plots escapes every text it draws

    def _request_scans(self, request, queryset, full: bool):
        """Queues one scan per library and says which were already waiting, so a double click is harmless."""
        kind = "full scan" if full else "scan"
        queued = []
        for lib in queryset:
            if scan.request_scan(lib, full=full, priority=ADMIN_PRIORITY):
                queued.append(lib.name)
                self.log_change(request, lib, f"{kind} queued")  # the admin's own log, with the user
        skipped = queryset.count() - len(queued)
        if queued:
            self.message_user(request, f"Queued a {kind} of {', '.join(queued)}.", messages.SUCCESS)
        if skipped:
            self.message_user(request, f"{skipped} already had a scan queued or running.", messages.WARNING)

    @admin.action(description="Scan (new and changed files)", permissions=["manage"])
    def scan(self, request, queryset):
        self._request_scans(request, queryset, full=False)

    @admin.action(description="Full scan (re-read every file)", permissions=["manage"])
    def full_scan(self, request, queryset):
        self._request_scans(request, queryset, full=True)
