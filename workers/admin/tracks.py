"""The admin's track pages: a file's facts, the user's tags, Earmark's tags and scores, tempo, key and
loudness, and its jobs.

Actions queue a retag (run the models again) or a recalibration (rewrite the
tags from the stored scores); the workers do the work.
"""
from __future__ import annotations

import math

import numpy as np
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.shortcuts import get_object_or_404
from django.urls import path, reverse
from django.utils.html import format_html
from django.utils.safestring import mark_safe

from workers.admin import listen
from workers.admin.common import ADMIN_PRIORITY, WorkerRows, json_block, pre, short, table
from workers.admin.track_filters import (CATEGORY_FILTERS, BpmFilter, FormatFilter, KeyFilter, LoudnessFilter,
                                         StrengthFilter, key_search, tag_search)
from workers.jobs import queue
from workers.library import paths
from workers.live import plots
from workers.live.views import log_action
from workers.features import FEATURES_VERSION
from workers.models import Library, Score, Track
from workers.tagfiles.namespace import read_earmark_tags
from workers.tagging import feature_groups
from workers.tagging import scores as stored_scores
from workers.tagging.categories import CATEGORIES
from workers.tagging.labels import combined_labels

JOB_HISTORY = 50
TOP_LABELS = 20
#: Big JSON the list never shows (``features`` holds each track's loudness histogram for its album gain).
LIST_DEFERRED = ("features", "tags")


def score_rows(score: Score) -> list[tuple[str, float, float]]:
    """(label, mean, spread), strongest first; labels by name when the installed label list fits."""
    means = stored_scores.unpack(score.means)
    spreads = stored_scores.unpack(score.spreads)
    names = _label_names(len(means))
    order = np.argsort(-means, kind="stable")
    return [(names[i], float(means[i]), float(spreads[i]) if i < len(spreads) else float("nan")) for i in order]


def _label_names(n: int) -> list[str]:
    """The installed label names, or indices: the page must show even when the models are not installed."""
    try:
        names = combined_labels()
    except Exception:  # models not installed, or an unreadable labels.json: fall back to indices
        names = []
    return list(names) if len(names) == n else [f"#{i}" for i in range(n)]


def tags_in_file(track: Track):
    """What the file holds in Earmark's namespace now; any failure to read is shown, not raised."""
    try:
        return read_earmark_tags(paths.to_bytes(track.path), track.format or None)
    except Exception as exc:
        return f"could not read the file's tags: {type(exc).__name__}: {exc}"


@admin.register(Track)
class TrackAdmin(WorkerRows, admin.ModelAdmin):
    """Tracks come from scans; the page shows them and queues work on them."""

    list_display = ["short_path", "library", "state", "format", "artist", "title", "duration",
                    "bpm_column", "key_column", "loudness_column", *(f"tags_{category}" for category in CATEGORIES)]
    list_filter = ["library", "state", FormatFilter, *CATEGORY_FILTERS, StrengthFilter, "genre_low_confidence",
                   BpmFilter, KeyFilter, LoudnessFilter]
    search_fields = ["path", "artist", "title"]  # and tag values and keys: ``get_search_results``
    list_select_related = ["library"]
    actions = ["retag", "recalibrate"]
    show_full_result_count = False  # a COUNT(*) per page is slow on a large library
    fieldsets = [
        ("File", {"fields": ["library", "path", "state", "error", "format", "codec", "duration", "sample_rate",
                             "channels", "bitrate", "size", "mtime_ns", "scanned_at"]}),
        ("The user's tags", {"fields": ["artist", "album", "title", "user_tags"]}),
        ("Listen", {"fields": ["player"]}),
        ("Earmark", {"fields": ["written_tags", "file_tags", "model_version", "calibration_version",
                                "tagged_at", "top_labels", "scores"]}),
        ("Tempo, key and loudness", {"fields": ["measured"]}),
        ("Jobs", {"fields": ["job_history"]}),
    ]

    @admin.display(description="path", ordering="path")
    def short_path(self, obj):
        return short(obj.path, 90)

    def get_queryset(self, request):
        """The list leaves out the JSON it never shows; the track page reads everything."""
        qs = super().get_queryset(request)
        match = getattr(request, "resolver_match", None)
        if match is not None and match.url_name == "workers_track_changelist":
            qs = qs.defer(*LIST_DEFERRED)
        return qs

    def get_search_results(self, request, queryset, search_term):
        """Paths, artists and titles as Django searches them, a tag Earmark wrote (``piano``), or a key (``Am``, ``8A``)."""
        found, may_have_duplicates = super().get_search_results(request, queryset, search_term)
        if search_term.strip():
            found = found | queryset.filter(tag_search(search_term))
            in_key = key_search(search_term)
            if in_key is not None:
                found = found | queryset.filter(in_key)
        return found, may_have_duplicates

    @admin.display(description="BPM", ordering="bpm")
    def bpm_column(self, obj):
        return "—" if obj.bpm is None else f"{obj.bpm:.1f}"

    @admin.display(description="key", ordering="musical_key")
    def key_column(self, obj):
        """The key, and as the library writes it to files when that is Camelot or Open Key (``A minor (8A)``)."""
        if not obj.musical_key:
            return "—"
        forms = feature_groups.notations(obj.musical_key)
        notation = obj.library.key_notation
        if forms is None or notation == Library.KeyNotation.STANDARD:
            return obj.musical_key
        return f"{obj.musical_key} ({forms.camelot if notation == Library.KeyNotation.CAMELOT else forms.open_key})"

    @admin.display(description="loudness", ordering="loudness_lufs")
    def loudness_column(self, obj):
        return "—" if obj.loudness_lufs is None else f"{obj.loudness_lufs:.1f} LUFS"

    @admin.display(description="measured")
    def measured(self, obj):
        """Tempo, key, loudness and ReplayGain as stored, with confidences, and why anything is missing."""
        rows = measured_rows(obj)
        return table(["measure", "value", "note"], rows) if rows else "not measured yet"

    @admin.display(description="tags read at scan")
    def user_tags(self, obj):
        return json_block(obj.tags)

    @admin.display(description="what Earmark wrote")
    def written_tags(self, obj):
        """Per category, each value with its calibrated strength (0 clearly absent, 1 clearly present)."""
        rows = [(t.category, t.value, "—" if t.strength is None else f"{t.strength:.2f}")
                for t in obj.tag_rows.order_by("category", "rank")]
        return table(["category", "value", "strength"], rows) if rows else "nothing written yet"

    @admin.display(description="play")
    def player(self, obj):
        url = reverse("admin:workers_track_audio", args=[obj.pk])
        return format_html('<audio controls preload="none" src="{}"></audio>', url)

    @admin.display(description="strongest labels")
    def top_labels(self, obj):
        score = Score.objects.filter(track=obj).first()
        if score is None:
            return "no scores stored"
        rows = score_rows(score)[:TOP_LABELS]
        return mark_safe(plots.bar_chart([(name, round(mean * 100)) for name, mean, _ in rows],  # noqa: S308
                                         "mean score × 100, strongest first"))  # plots escapes its labels

    def get_urls(self):
        audio = path("<int:track_id>/audio/", self.admin_site.admin_view(self.audio_view), name="workers_track_audio")
        return [audio, *super().get_urls()]

    def audio_view(self, request, track_id: int):
        """The file for the page's player: staff who may view tracks, inside the library root, with ranges."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        return listen.audio_response(request, get_object_or_404(Track.objects.select_related("library"), pk=track_id))

    @admin.display(description="tags in the file now")
    def file_tags(self, obj):
        tags = tags_in_file(obj)
        return pre(tags) if isinstance(tags, str) else json_block(tags)

    @admin.display(description="stored scores")
    def scores(self, obj):
        score = Score.objects.filter(track=obj).first()
        if score is None:
            return "no scores stored"
        rows = ((name, f"{mean:.4f}", f"{spread:.4f}") for name, mean, spread in score_rows(score))
        return format_html("<p>{}, {} patches</p>{}", score.model_version, score.patches,
                           table(["label", "mean", "spread"], rows))

    @admin.display(description="job history")
    def job_history(self, obj):
        jobs = obj.jobs.order_by("-id")[:JOB_HISTORY]
        if not jobs:
            return "no jobs"
        rows = ((format_html('<a href="{}">{}</a>', reverse("admin:workers_job_change", args=[j.id]), j.id),
                 j.queue, j.state, j.attempts, j.finished_at or j.created_at, short(j.last_error, 120))
                for j in jobs)
        return table(["job", "queue", "state", "attempts", "when", "error"], rows)

    def _enqueue(self, request, queryset, queue_name: str):
        """One forced job per track, deduplicated by key, so a job already waiting is not queued twice."""
        jobs = [queue.NewJob(key=f"{queue_name}:{t.id}", payload={"force": True, "requested_by": "admin"},
                             track_id=t.id, library_id=t.library_id, priority=ADMIN_PRIORITY)
                for t in queryset.only("id", "library_id")]
        created = queue.enqueue_many(queue_name, jobs)
        log_action(request, queue_name, f"queued {created} job(s) for {len(jobs)} chosen track(s)", what="tracks")
        self.message_user(request, f"Queued {created} {queue_name} job(s); "
                                   f"{len(jobs) - created} already had one queued or running.", messages.SUCCESS)

    @admin.action(description="Retag (run the models again)", permissions=["change"])
    def retag(self, request, queryset):
        self._enqueue(request, queryset, "tag")

    @admin.action(description="Recalibrate (rewrite tags from stored scores)", permissions=["change"])
    def recalibrate(self, request, queryset):
        self._enqueue(request, queryset, "calibrate")


def _peak(peak: float | None) -> str:
    if peak is None:
        return "—"
    return f"{peak:.6f} ({20 * math.log10(peak):+.2f} dBTP)" if peak > 0 else f"{peak:.6f}"


def _gain(gain: float | None) -> str:
    return "—" if gain is None else f"{gain:+.2f} dB"


def measured_rows(track: Track) -> list[tuple[str, str, str]]:
    """(measure, value, note) for the track page: what ``workers.tagging.measures`` stored, and the reasons."""
    f = track.features or {}
    reasons = f.get("reasons") or {}
    if not f and track.bpm is None and not track.musical_key and track.loudness_lufs is None:
        return []
    rows = []
    if track.bpm is not None:
        rows.append(("tempo", f"{track.bpm:.1f} BPM (files: {int(round(track.bpm))})",
                     f"confidence {track.bpm_confidence or 0:.2f}"))
    else:
        rows.append(("tempo", "—", reasons.get("tempo") or "not measured"))
    if track.musical_key:
        forms = feature_groups.notations(track.musical_key)
        short = f.get("key_short") or (forms and forms.standard) or ""
        camelot = f.get("key_camelot") or (forms and forms.camelot) or ""
        open_key = f.get("key_open") or (forms and forms.open_key) or ""
        rows.append(("key", f"{track.musical_key}: {short} (standard) · {camelot} (Camelot) · {open_key} (Open Key)",
                     f"confidence {track.key_confidence or 0:.2f}; files get the "
                     f"{track.library.get_key_notation_display()} form"))
    else:
        rows.append(("key", "—", reasons.get("key") or "not measured"))
    if track.loudness_lufs is not None:
        rows.append(("loudness", f"{track.loudness_lufs:.2f} LUFS", "integrated, EBU R128 / ITU-R BS.1770-4"
                     + ("; the signal clips" if f.get("clipped") else "")))
    else:
        rows.append(("loudness", "—", reasons.get("loudness") or "not measured"))
    rows.append(("track gain", _gain(track.track_gain_db), "ReplayGain 2.0, to −18 LUFS"))
    rows.append(("track peak", _peak(track.track_peak), "true peak"))
    no_album = "the album's other tracks are not all measured yet" if (track.album or "").strip() else "no album tag"
    rows.append(("album gain", _gain(track.album_gain_db), "" if track.album_gain_db is not None else no_album))
    rows.append(("album peak", _peak(track.album_peak), ""))
    for name, reason in sorted(reasons.items()):
        if name not in ("tempo", "key", "loudness"):  # those are on their own rows
            rows.append((f"{name}: not measurable", "—", reason))
    version = track.features_version or f.get("version") or ""
    if version:
        rows.append(("method", version, "" if version == FEATURES_VERSION else
                     f"an older method: measured again ({FEATURES_VERSION}) at the next full scan"))
    return rows


def _tags_column(category: str):
    """A list column with the track's values of one category, strongest first (from the row's JSON)."""
    def column(self, obj):
        return ", ".join((obj.earmark_tags or {}).get(category) or []) or "—"
    column.short_description = category
    return column


for _category in CATEGORIES:
    setattr(TrackAdmin, f"tags_{_category}", _tags_column(_category))
