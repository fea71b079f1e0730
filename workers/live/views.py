"""The live dashboard, its event stream, the plots page and supervisor control.

``events`` is django-eventstream's view behind two additions: staff only,
checked before any stream opens (non-staff are sent to the login page), and a
full snapshot of each channel right after the stream opens, so that a client
that connects or reconnects starts from the truth and then applies deltas
(see ``workers.live.broker`` for the sequence numbers that keep the two in step).
"""
from __future__ import annotations

import asyncio
import functools
import logging
import time
from importlib import import_module

from asgiref.sync import sync_to_async
from django.conf import settings

from django.contrib import admin, messages
from django.contrib.admin.views.decorators import staff_member_required
from django.core.exceptions import PermissionDenied
from django.http import HttpResponseForbidden, StreamingHttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_POST
from django_eventstream.utils import sse_encode_event
from django_eventstream.views import events as eventstream_events

from workers.jobs import queue, registry
from workers.live import numprocs, plots, snapshots, supervised, supervisor_client
from workers.live.broker import EVENT_SNAPSHOT, Broker, get_broker
from workers.live.channels import READ_PERMISSION, StaffChannelManager
from workers.models import Library, Track

#: The admin's permissions (migration 0009; ``control_supervisor`` from 0004), all on the Meta content type.
VIEW_PERMISSION = READ_PERMISSION  # workers.view_dashboard
OPERATE_PERMISSION = "workers.operate_queues"
CONTROL_PERMISSION = "workers.control_supervisor"
MANAGE_LIBRARIES_PERMISSION = "workers.manage_libraries"
PERMISSION_NAMES = {
    VIEW_PERMISSION: "Can view the live dashboard, its plots and event stream",
    OPERATE_PERMISSION: "Can pause, resume, retry and cancel queues and failures",
    CONTROL_PERMISSION: "Can start, stop and restart supervisord programs",
    MANAGE_LIBRARIES_PERMISSION: "Can add, change, delete and scan libraries",
}
#: How often an open stream checks again that its session still holds a user allowed to read it.
RECHECK_SECONDS = 2.0
KEEP_ALIVE = b"event: keep-alive\ndata:\n\n"
log = logging.getLogger("earmark.admin")


# --- the event stream ---------------------------------------------------------------


def require_permission(perm: str):
    """Django's ``permission_required`` for admin views: 403 (not a login redirect) for staff without ``perm``."""
    def decorate(view):
        @functools.wraps(view)
        def wrapped(request, *args, **kwargs):
            if not request.user.has_perm(perm):
                raise PermissionDenied(f"needs the '{perm}' permission")
            return view(request, *args, **kwargs)
        return wrapped
    return decorate


@staff_member_required
def events(request):
    """``/events/?channel=workers&channel=queues&channel=jobs``: snapshots, then deltas (needs view_dashboard)."""
    if not request.user.has_perm(VIEW_PERMISSION):
        return HttpResponseForbidden("the event stream needs the 'view dashboard' permission")
    broker = get_broker()
    response = eventstream_events(request)
    channels = sorted(StaffChannelManager().get_channels_for_request(request, {}))
    if isinstance(response, StreamingHttpResponse) and response.is_async and channels:
        allowed = functools.partial(still_allowed, request.session.session_key, request.user.pk)
        response.streaming_content = _with_snapshots(response.streaming_content, broker, channels, allowed)
    return response


def still_allowed(session_key: str | None, user_id) -> bool:
    """Whether the stream's session still holds its user, active staff with view_dashboard (read afresh)."""
    from django.contrib.auth import get_user

    if not session_key:
        return False
    holder = type("SessionHolder", (), {})()
    holder.session = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
    user = get_user(holder)  # checks the session's auth hash too: a changed password logs out
    return bool(user.is_authenticated and user.pk == user_id and user.is_active and user.is_staff
                and user.has_perm(VIEW_PERMISSION))


async def _with_snapshots(stream, broker: Broker, channels: list[str], allowed=None):
    """Pass django-eventstream's stream through, adding snapshots after it opens and seqs to keep-alives.

    The snapshots are taken after the stream's listener is registered, so no
    delta that follows them can miss this client unnoticed. Every
    ``RECHECK_SECONDS`` ``allowed()`` is asked again (in a thread); when the
    user has logged out, been deactivated or lost the permission, the stream ends.
    """
    try:
        opened = False
        async for chunk in _rechecked(stream, allowed):
            if not opened:
                opened = True
                yield chunk
                if b"stream-error" not in chunk:
                    yield await asyncio.to_thread(_snapshot_events, broker, channels)
            elif chunk == KEEP_ALIVE:
                yield sse_encode_event("keep-alive", {"seq": broker.seqs()}, json_encode=True).encode()
            else:
                yield chunk
    finally:
        await stream.aclose()


async def _rechecked(stream, allowed):
    """``stream``'s chunks, ending as soon as ``allowed()`` (asked every RECHECK_SECONDS) says no."""
    if allowed is None:
        async for chunk in stream:
            yield chunk
        return
    def in_thread() -> bool:
        from django.db import connections

        try:
            return allowed()
        except Exception:  # noqa: BLE001 - fail closed: the client reconnects and is checked afresh
            log.exception("event stream: could not check its user; closing it")
            return False
        finally:
            connections.close_all()  # this thread's connections only; the pool thread may be anyone's next

    check = sync_to_async(in_thread, thread_sensitive=False)
    pending = None
    next_check = time.monotonic() + RECHECK_SECONDS
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(stream.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=max(0.0, next_check - time.monotonic()))
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + RECHECK_SECONDS
                if not await check():
                    log.info("event stream closed: its session's user may no longer read it")
                    return
            if done:
                try:
                    chunk = pending.result()
                except StopAsyncIteration:
                    return
                pending = None
                yield chunk
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            try:
                await pending
            except (asyncio.CancelledError, StopAsyncIteration, Exception):  # noqa: BLE001 - closing anyway
                pass


def _snapshot_events(broker: Broker, channels: list[str]) -> bytes:
    return "".join(sse_encode_event(EVENT_SNAPSHOT, snap, json_encode=True)
                   for snap in broker.snapshots(channels)).encode()


def events_url() -> str:
    return reverse("earmark-events") + "?" + "&".join(f"channel={c}" for c in snapshots.CHANNELS)


# --- the dashboard ----------------------------------------------------------------------


def supervisor_context(user) -> dict:
    """The process table beside the worker rows, or why there is none; never raises."""
    try:
        processes = supervisor_client.process_table()
    except supervisor_client.SupervisorError as exc:
        return {"supervisor_error": str(exc), "processes": [], "groups": []}
    groups = [g for g in supervisor_client.groups(processes) if g not in supervisor_client.UNCONTROLLABLE_GROUPS]
    chosen = numprocs.chosen()
    scalable = [{"group": g, "count": sum(p.group == g for p in processes), "chosen": g in chosen}
                for g in groups if g in numprocs.SCALABLE_GROUPS]
    return {"supervisor_error": "", "processes": processes, "groups": groups,
            "supervisor_rows": supervised.rows(processes, registry.live_workers()),
            "can_control": user.has_perm(CONTROL_PERMISSION), "actions": supervisor_client.ACTIONS,
            "scalable": scalable, "numprocs_min": numprocs.MIN_PROCESSES, "numprocs_max": numprocs.MAX_PROCESSES,
            "numprocs_file": numprocs.conf_path()}


@require_permission(VIEW_PERMISSION)
def supervisor_table(request):
    """The supervisor section alone, which the dashboard reads again every few seconds."""
    return render(request, "workers/supervisor.html", supervisor_context(request.user))


@require_permission(VIEW_PERMISSION)
def dashboard(request):
    """Queues, throughput, workers, scans and failures, live; supervisord's processes as of loading."""
    initial = {name: {"channel": name, "seq": None, "state": snap.state}
               for name, snap in snapshots.read_all().items()}
    context = {
        **admin.site.each_context(request),
        "title": "Dashboard",
        "initial_state": initial,
        "events_url": events_url(),
        "late_after": snapshots.late_after(),
        "queue_names": queue.QUEUES,
        "throughput_charts": plots.throughput_charts(),
        "can_steer": request.user.has_perm(STEER_PERMISSION),
        **supervisor_context(request.user),
    }
    return render(request, "workers/dashboard.html", context)


#: Who may pause, resume, retry and cancel from the dashboard (and retry or ignore failures).
STEER_PERMISSION = OPERATE_PERMISSION
QUEUE_ACTIONS = {"pause": queue.pause, "resume": queue.resume,
                 "retry": lambda name: queue.retry(queue=name), "cancel": lambda name: queue.cancel(queue=name)}


@require_POST
def queue_control(request):
    """One of the dashboard's per-queue buttons (each asked for confirmation in the page)."""
    if not request.user.has_perm(STEER_PERMISSION):
        raise PermissionDenied
    action, _, name = request.POST.get("action", "").partition(":")
    if action not in QUEUE_ACTIONS or name not in queue.QUEUES:
        messages.error(request, "Unknown queue action.")
        return redirect("earmark-dashboard")
    n = QUEUE_ACTIONS[action](name)
    done = f"{action}" + (f": {n} job(s)" if isinstance(n, int) else "")
    log_action(request, name, done, what="queue")
    messages.success(request, f"{action} {name}" + (f": {n} job(s)" if isinstance(n, int) else "") + ".")
    return redirect("earmark-dashboard")


@require_permission(VIEW_PERMISSION)
def plots_page(request):
    """The distribution of tags (or, before tagging, of formats and states) per library and overall."""
    library_id = request.GET.get("library")
    library = get_object_or_404(Library, id=library_id) if library_id else None
    tracks = Track.objects.filter(library=library) if library else Track.objects.all()
    what, charts = plots.distribution_charts(tracks)
    context = {
        **admin.site.each_context(request),
        "title": f"Distribution: {library.name}" if library else "Distribution: all libraries",
        "what": what, "charts": charts, "library": library,
        "libraries": Library.objects.order_by("name"),
    }
    return render(request, "workers/plots.html", context)


# --- supervisor control ------------------------------------------------------------


def permission(perm: str):
    """One of the admin's permission rows, created if missing (migrations 0004 and 0009; a test flush removes them)."""
    from django.contrib.auth.models import Permission
    from django.contrib.contenttypes.models import ContentType

    from workers.models import Meta

    app_label, codename = perm.split(".")
    return Permission.objects.get_or_create(
        content_type=ContentType.objects.get_for_model(Meta), codename=codename,
        defaults={"name": PERMISSION_NAMES[perm]})[0]


def control_permission():
    return permission(CONTROL_PERMISSION)


def ensure_groups() -> dict:
    """The permissions and the ``viewer`` and ``operator`` groups as migrations 0009 and 0010 make them (a flush
    removes them)."""
    from django.apps import apps
    from django.contrib.auth.models import Group

    migration = import_module("workers.migrations.0009_admin_permissions")
    migration.create(apps, None)
    import_module("workers.migrations.0010_group_view_permissions").grant(apps, None)
    return {g.name: g for g in Group.objects.filter(name__in=migration.GROUPS)}


def log_action(request, target: str, message: str, what: str = "supervisor") -> None:
    """Record what a person did in the admin's log ("Recent actions", with the user) and the ``earmark.admin`` log.

    One entry per action, written ``what: target`` (``supervisor: scanner:scanner_00``, ``queue: tag``,
    ``failures: retry``, ``jobs: cancel``): the dashboard's controls and the bulk actions, which
    Django's admin does not log itself.
    """
    from django.contrib.admin.models import CHANGE, LogEntry

    label = f"{what}: {target}"
    LogEntry.objects.create(user_id=request.user.pk, content_type=None, object_id=None,
                            object_repr=label[:200], action_flag=CHANGE, change_message=message)
    log.info("%s: %s: %s", request.user.get_username(), label, message)


@require_POST
def supervisor_control(request):
    """Start, stop or restart one program group, or one ``process`` of it; needs the dedicated permission."""
    if not request.user.has_perm(CONTROL_PERMISSION):
        raise PermissionDenied("controlling supervisord needs the 'control supervisor' permission")
    action, group = request.POST.get("action", ""), request.POST.get("group", "")
    process = request.POST.get("process", "")
    if action not in supervisor_client.ACTIONS or not group:
        messages.error(request, "Choose a program group and start, stop or restart.")
        return redirect("earmark-dashboard")
    target = f"{group}:{process}" if process else group
    try:
        supervisor_client.control(action, group, process)
    except supervisor_client.SupervisorError as exc:
        messages.error(request, f"Could not {action} {target}: {exc}")
        log_action(request, target, f"{action} failed: {exc}")
    else:
        messages.success(request, f"{target}: {action} done.")
        log_action(request, target, f"{action} done")
    return redirect("earmark-dashboard")


@require_POST
def supervisor_numprocs(request):
    """Run another number of a program's processes (asked for confirmation in the page); needs the permission."""
    if not request.user.has_perm(CONTROL_PERMISSION):
        raise PermissionDenied("changing the number of processes needs the 'control supervisor' permission")
    group, count = request.POST.get("group", ""), request.POST.get("numprocs", "")
    try:
        done = numprocs.resize(group, count)
    except ValueError as exc:
        messages.error(request, f"Not changed: {exc}.")
    except supervisor_client.SupervisorError as exc:
        messages.error(request, f"Could not change the number of {group} processes: {exc}")
        log_action(request, group, f"numprocs {count} failed: {exc}")
    else:
        messages.success(request, f"{group}: {done.after} process(es) (was {done.before})"
                         + (", restarted." if done.restarted else "."))
        log_action(request, group, f"numprocs {done.before} → {done.after}")
    return redirect("earmark-dashboard")

