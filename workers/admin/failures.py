"""``/admin/failures/``: every failure in one place, grouped by reason, with retry and ignore.

Three kinds, because a person fixes them in different places: failed
tracks (the file: not audio, truncated, quarantined after killing taggers,
a failed tag write; scan-time failures included), failed jobs (the work:
a scan folder that could not be read, a recalibration that failed), and
the errors of each library's latest scan (a folder the scanner could not
list). Reasons are grouped by their text with paths, numbers and worker
ids taken out, so "cannot read /music/a/1.mp3" and ".../2.mp3" are one row.

Retry: a failed track's file is read again now (``folders.rescan_track``:
a file fixed since, say by a permission change that left its mtime alone,
is found fixed) and queued for tagging when it is readable; a failed job
is put back in its queue with fresh attempts (``queue.retry``). Ignore
hides a group until its reason comes back with new failures; the list of
ignored reasons is one meta row (``failures:ignored``), so it is the same
for every staff member and survives restarts.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.shortcuts import redirect, render
from django.utils import timezone

from workers.admin.common import ADMIN_PRIORITY
from workers.jobs import queue
from workers.library import folders, scan
from workers.live.views import OPERATE_PERMISSION, VIEW_PERMISSION, log_action
from workers.models import Job, Library, Meta, Track

IGNORED_KEY = "failures:ignored"
EXAMPLES = 5
RETRY_AT_ONCE = 500  # tracks re-read per click: each is a file read inside the request

_PATH = re.compile(r"(/[^\s:;,'\")]+)+")
_WORKER = re.compile(r"worker:[\w.-]+:\w+:\w+")
_NUMBER = re.compile(r"\d+(\.\d+)?")


def reason_of(error: str) -> str:
    """The error with its particulars (paths, worker ids, numbers) replaced, so alike failures group."""
    text = (error or "no reason recorded").strip().splitlines()[0]
    return _NUMBER.sub("N", _WORKER.sub("[worker]", _PATH.sub("[path]", text)))[:300]


@dataclass
class Group:
    kind: str  # "track", "job" or "scan"
    where: str  # the queue of a job, the library of a track or scan error
    reason: str
    ids: list = field(default_factory=list)
    examples: list = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.kind}|{self.where}|{self.reason}"


def groups(include_ignored: bool = False) -> list[Group]:
    """Every failure, grouped; the largest groups first."""
    found: dict[str, Group] = {}

    def add(kind: str, where: str, error: str, ident, example: str) -> None:
        group = Group(kind, where, reason_of(error))
        group = found.setdefault(group.key, group)
        group.ids.append(ident)
        if len(group.examples) < EXAMPLES:
            group.examples.append(example)

    libraries = dict(Library.objects.values_list("id", "name"))
    for track_id, library_id, path, error in (Track.objects.filter(state=Track.State.FAILED)
                                              .values_list("id", "library_id", "path", "error").iterator(2000)):
        add("track", libraries.get(library_id, "?"), error, track_id, path)
    for job_id, queue_name, key, error in (Job.objects.filter(state=Job.State.FAILED)
                                           .values_list("id", "queue", "key", "last_error").iterator(2000)):
        add("job", queue_name, error, job_id, f"job {job_id} ({key})")
    for library_id, name in libraries.items():
        for error in scan.current_errors(library_id):
            add("scan", name, error, library_id, error)
    ignored = set() if include_ignored else ignored_keys()
    return sorted((g for g in found.values() if g.key not in ignored), key=lambda g: (-len(g.ids), g.key))


def ignored_keys() -> set[str]:
    row = Meta.objects.filter(key=IGNORED_KEY).first()
    return set(row.value.get("keys", [])) if row else set()


def ignore(keys: list[str]) -> None:
    keys = sorted(ignored_keys() | set(keys))
    Meta.objects.update_or_create(key=IGNORED_KEY, defaults={"value": {"keys": keys}, "updated_at": timezone.now()})


def unignore_all() -> None:
    Meta.objects.filter(key=IGNORED_KEY).delete()


def retry(chosen: list[Group]) -> dict[str, int]:
    """Retry the chosen groups (see the module docstring); returns what was done, for the message."""
    done = defaultdict(int)
    job_ids = [i for g in chosen if g.kind == "job" for i in g.ids]
    if job_ids:
        done["jobs requeued"] = queue.retry(job_ids)
    track_ids = [i for g in chosen if g.kind == "track" for i in g.ids][:RETRY_AT_ONCE]
    jobs = []
    for track in Track.objects.filter(id__in=track_ids).select_related("library"):
        fresh = folders.rescan_track(track)
        if fresh is None:
            done["tracks still unreadable"] += 1
            continue
        jobs.append(queue.NewJob(key=f"tag:{track.id}", payload={"force": True, "requested_by": "failures"},
                                 track_id=track.id, library_id=track.library_id, priority=ADMIN_PRIORITY))
    if jobs:
        done["tracks queued for tagging"] = queue.enqueue_many("tag", jobs)
    for library in Library.objects.filter(id__in={i for g in chosen if g.kind == "scan" for i in g.ids}):
        done["scans queued"] += int(scan.request_scan(library, priority=ADMIN_PRIORITY))
    return dict(done)


def failures_page(request):
    """The page: the groups with their counts and examples, and the two actions on a selection.

    Looking needs ``workers.view_dashboard``; retry and ignore need ``workers.operate_queues`` (403 without).
    """
    if not request.user.has_perm(VIEW_PERMISSION):
        raise PermissionDenied("the failures page needs the 'view dashboard' permission")
    if request.method == "POST":
        if not request.user.has_perm(OPERATE_PERMISSION):
            raise PermissionDenied("retry and ignore need the 'operate queues' permission")
        by_key = {g.key: g for g in groups(include_ignored=True)}
        chosen = [by_key[k] for k in request.POST.getlist("group") if k in by_key]
        action = request.POST.get("action")
        if action == "unignore":
            unignore_all()
            log_action(request, "unignore", "every ignored reason shown again", what="failures")
            messages.success(request, "Every ignored reason is shown again.")
        elif not chosen:
            messages.warning(request, "Choose at least one group first.")
        elif action == "retry":
            done = retry(chosen)
            log_action(request, "retry", f"{len(chosen)} group(s): {done}", what="failures")
            messages.success(request, "Retried: " + (", ".join(f"{n} {what}" for what, n in done.items()) or "nothing"))
        elif action == "ignore":
            ignore([g.key for g in chosen])
            log_action(request, "ignore", f"{len(chosen)} group(s)", what="failures")
            messages.success(request, f"Ignored {len(chosen)} group(s).")
        return redirect("earmark-failures")
    shown = groups()
    context = {
        **admin.site.each_context(request),
        "title": "Failures",
        "groups": shown,
        "total": sum(len(g.ids) for g in shown),
        "ignored": len(ignored_keys()),
        "can_act": request.user.has_perm(OPERATE_PERMISSION),
    }
    return render(request, "workers/failures.html", context)
