"""Who may look and who may act: the admin's permissions, its groups, the stream's re-checks, the login's lockout.

* ``workers.view_dashboard``: the dashboard, its tables, the plots, the failures page and ``/events/``;
  ``workers.operate_queues``: the queue buttons and retry / ignore on failures;
  ``workers.control_supervisor``: supervisord's programs and their numbers;
  ``workers.manage_libraries``: adding, changing, deleting and scanning libraries.
  Staff without them get 403 everywhere; superusers have them all.
* Migration 0009 makes them and the ``viewer`` and ``operator`` groups, and takes them away again;
  0010 lets both groups read the track, job, library and calibration lists (and takes that back).
* The job list's retry and cancel need ``operate_queues`` (not ``change_job``).
* An open stream is closed within a few seconds of its user logging out or losing the permission.
* django-axes: 5 failed logins for one username from one IP lock that pair out (429).
"""
from __future__ import annotations

import asyncio
import time

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import Group, Permission
from django.test import Client, override_settings
from django.urls import reverse

from workers.jobs import queue
from workers.library.libraries import add_library
from workers.live import views
from workers.live.views import (CONTROL_PERMISSION, MANAGE_LIBRARIES_PERMISSION, OPERATE_PERMISSION,
                                VIEW_PERMISSION, ensure_groups, permission)
from workers.models import Job, Library

EVENTS = "/events/?channel=workers&channel=queues&channel=jobs"
LOOK = ["/admin/dashboard/", "/admin/dashboard/plots/", "/admin/dashboard/supervisor/table/", "/admin/failures/",
        EVENTS]
ACT = [("/admin/dashboard/queues/", {"action": "pause:tag"}),
       ("/admin/dashboard/supervisor/", {"action": "stop", "group": "scanner"}),
       ("/admin/dashboard/supervisor/numprocs/", {"group": "tagger", "numprocs": "3"}),
       ("/admin/failures/", {"action": "unignore"})]


@pytest.fixture
def make_client(django_user_model):
    def make(name: str, group: str | None = None, perms=()):
        user = django_user_model.objects.create_user(name, password="pw", is_staff=True)
        if group:
            user.groups.add(ensure_groups()[group])
        user.user_permissions.add(*(permission(p) for p in perms))
        client = Client()
        client.force_login(user)
        return client, django_user_model.objects.get(id=user.id)
    return make


def _get(client, url):
    response = client.get(url)
    if getattr(response, "streaming", False):
        response.close()
    return response


# --- the groups -----------------------------------------------------------------------------


def migrate(target: str | None = None):
    """Migrate the workers app to ``target``, or to its latest migration."""
    from django.db import connection
    from django.db.migrations.executor import MigrationExecutor

    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate([("workers", target)] if target else executor.loader.graph.leaf_nodes("workers"))


def group_codes(name: str) -> set[str]:
    return set(Group.objects.get(name=name).permissions.values_list("codename", flat=True))


@pytest.mark.django_db(transaction=True)
def test_migration_0009_makes_the_permissions_and_groups_and_takes_them_back():
    migrate("0008_features_identity_tokens")  # back first: a flush by an earlier test leaves 0009 applied, but empty
    assert not Group.objects.filter(name__in=["viewer", "operator"]).exists()
    migrate("0009_admin_permissions")
    assert group_codes("viewer") == {"view_dashboard"}
    assert group_codes("operator") == {"view_dashboard", "operate_queues", "manage_libraries"}
    assert Permission.objects.filter(content_type__app_label="workers", codename="control_supervisor").exists()
    migrate("0008_features_identity_tokens")
    assert not Group.objects.filter(name__in=["viewer", "operator"]).exists()
    assert not Permission.objects.filter(codename__in=["view_dashboard", "operate_queues", "manage_libraries"]).exists()
    assert Permission.objects.filter(codename="control_supervisor").exists(), "0004's permission stays"
    migrate()
    assert Group.objects.filter(name__in=["viewer", "operator"]).count() == 2


LIST_VIEWS = {"view_track", "view_job", "view_library", "view_calibration"}


@pytest.mark.django_db(transaction=True)
def test_migration_0010_lets_both_groups_read_the_lists_and_takes_that_back():
    migrate("0008_features_identity_tokens")  # back first: a flush leaves the groups' migrations applied, but empty
    migrate("0009_admin_permissions")
    assert not group_codes("viewer") & LIST_VIEWS and not group_codes("operator") & LIST_VIEWS
    migrate("0010_group_view_permissions")
    assert group_codes("viewer") == {"view_dashboard"} | LIST_VIEWS
    assert group_codes("operator") == {"view_dashboard", "operate_queues", "manage_libraries"} | LIST_VIEWS
    migrate("0009_admin_permissions")
    assert group_codes("viewer") == {"view_dashboard"}, "the grants are taken back"
    assert Permission.objects.filter(codename__in=LIST_VIEWS).count() == len(LIST_VIEWS), "Django's rows stay"
    migrate()
    assert group_codes("viewer") >= LIST_VIEWS


# --- who may look and act ---------------------------------------------------------------------


@pytest.mark.django_db
def test_staff_without_permissions_are_refused_everywhere(make_client):
    client, _ = make_client("nobody")
    for url in LOOK:
        response = _get(client, url)
        assert response.status_code == 403, (url, response.status_code)
    for url, data in ACT:
        assert client.post(url, data).status_code == 403, url
    assert not queue.is_paused("tag")
    assert client.get(reverse("admin:workers_library_add")).status_code == 403
    assert client.get(reverse("admin:workers_library_changelist")).status_code == 403


@pytest.mark.django_db
def test_a_viewer_looks_but_does_not_act(make_client, tmp_path):
    client, _ = make_client("look", group="viewer")
    for url in LOOK[:-1]:  # the stream opens for a viewer: test_an_open_stream_is_closed_after_logout
        response = _get(client, url)
        assert response.status_code == 200, (url, response.status_code)
    queue.enqueue("tag", "t")
    Job.objects.update(state="failed", last_error="boom")
    for url, data in ACT + [("/admin/failures/", {"action": "retry", "group": ["job|tag|boom"]})]:
        assert client.post(url, data).status_code == 403, url
    assert not queue.is_paused("tag") and Job.objects.get().state == "failed"
    assert client.get(reverse("admin:workers_library_add")).status_code == 403


@pytest.mark.django_db
def test_an_operator_steers_queues_and_libraries_but_not_supervisor(make_client, tmp_path):
    client, user = make_client("op", group="operator")
    assert client.get("/admin/dashboard/").status_code == 200
    assert 'value="pause:tag"' in client.get("/admin/dashboard/").content.decode()
    assert client.post("/admin/dashboard/queues/", {"action": "pause:tag"}).status_code == 302
    assert queue.is_paused("tag")
    assert client.post("/admin/dashboard/queues/", {"action": "resume:tag"}).status_code == 302
    assert not queue.is_paused("tag")
    entries = LogEntry.objects.filter(user=user, object_repr="queue: tag")
    assert list(entries.order_by("id").values_list("change_message", flat=True)) == ["pause", "resume"]
    for url, data in ACT[1:3]:
        assert client.post(url, data).status_code == 403, url
    assert client.post("/admin/failures/", {"action": "unignore"}).status_code == 302
    assert LogEntry.objects.filter(user=user, object_repr="failures: unignore").exists()
    assert client.get(reverse("admin:workers_library_add")).status_code == 200
    library = add_library("music", str(tmp_path))
    changelist = reverse("admin:workers_library_changelist")
    assert 'value="scan"' in client.get(changelist).content.decode()
    client.post(changelist, {"action": "scan", "_selected_action": [library.id]})
    assert Job.objects.filter(queue="scan", library_id=library.id).exists()
    assert LogEntry.objects.filter(user=user, object_repr="music", change_message="scan queued").exists()
    client.post(reverse("admin:workers_library_delete", args=[library.id]), {"post": "yes"})
    assert not Library.objects.exists()


def _failed_job() -> Job:
    queue.enqueue("tag", "t")
    Job.objects.update(state="failed", last_error="boom")
    return Job.objects.get()


@pytest.mark.django_db
def test_both_groups_read_the_track_and_job_lists_and_only_operators_retry_there(make_client, library):
    job, jobs = _failed_job(), reverse("admin:workers_job_changelist")
    tracks = reverse("admin:workers_track_changelist")
    viewer, _ = make_client("look", group="viewer")
    operator, user = make_client("op", group="operator")
    for client in (viewer, operator):
        for url in (tracks, jobs, reverse("admin:workers_job_change", args=[job.id]),
                    reverse("admin:workers_library_changelist")):
            assert client.get(url).status_code == 200, url
    assert 'value="retry"' not in viewer.get(jobs).content.decode()
    viewer.post(jobs, {"action": "retry", "_selected_action": [job.id]})
    assert Job.objects.get().state == "failed", "a viewer's retry does nothing"
    assert 'value="retry"' in operator.get(jobs).content.decode() and 'value="cancel"' in operator.get(jobs).content.decode()
    operator.post(jobs, {"action": "retry", "_selected_action": [job.id]})
    assert Job.objects.get().state == "queued"
    operator.post(jobs, {"action": "cancel", "_selected_action": [job.id]})
    assert Job.objects.get().state == "cancelled"
    assert LogEntry.objects.filter(user=user, object_repr__in=["jobs: retry", "jobs: cancel"]).count() == 2


@pytest.mark.django_db
def test_the_job_actions_need_operate_queues_not_change_job(make_client):
    job, jobs = _failed_job(), reverse("admin:workers_job_changelist")
    editor, user = make_client("editor")
    user.user_permissions.add(*Permission.objects.filter(codename__in=["view_job", "change_job"]))
    assert 'value="retry"' not in editor.get(jobs).content.decode()
    editor.post(jobs, {"action": "retry", "_selected_action": [job.id]})
    assert Job.objects.get().state == "failed"
    operator, user = make_client("queues", perms=(OPERATE_PERMISSION,))
    user.user_permissions.add(Permission.objects.get(codename="view_job"))
    operator.post(jobs, {"action": "retry", "_selected_action": [job.id]})
    assert Job.objects.get().state == "queued"


@pytest.mark.django_db
def test_staff_without_permissions_get_no_track_or_job_list(make_client):
    client, _ = make_client("nobody")
    for name in ("admin:workers_track_changelist", "admin:workers_job_changelist"):
        assert client.get(reverse(name)).status_code == 403, name


@pytest.mark.django_db
def test_the_library_actions_need_manage_libraries(make_client, tmp_path):
    client, looker = make_client("looker", group="viewer")
    looker.user_permissions.add(Permission.objects.get(codename="view_library"),
                                Permission.objects.get(codename="delete_library"))
    library = add_library("music", str(tmp_path))
    changelist = reverse("admin:workers_library_changelist")
    page = client.get(changelist)
    assert page.status_code == 200 and 'value="scan"' not in page.content.decode()
    client.post(changelist, {"action": "scan", "_selected_action": [library.id]})
    assert client.post(reverse("admin:workers_library_delete", args=[library.id]), {"post": "yes"}).status_code == 403
    assert Library.objects.exists() and not Job.objects.filter(queue="scan").exists()


@pytest.mark.django_db
def test_superusers_have_every_permission(admin_user):
    assert all(admin_user.has_perm(p) for p in (VIEW_PERMISSION, OPERATE_PERMISSION, CONTROL_PERMISSION,
                                                MANAGE_LIBRARIES_PERMISSION))


# --- an open stream is closed when its user may no longer read it -------------------------------


def _collect(chunks, allowed, seconds):
    async def stream():
        for chunk in chunks:
            yield chunk
        while True:
            await asyncio.sleep(0.1)
            yield b"event: keep-alive\ndata:\n\n"

    class Broker:
        def snapshots(self, channels):
            return []

        def seqs(self):
            return {}

    async def run():
        out, started = [], time.monotonic()
        async for chunk in views._with_snapshots(stream(), Broker(), ["jobs"], allowed):
            out.append(chunk)
            if time.monotonic() - started > seconds:
                break
        return out, time.monotonic() - started

    return asyncio.run(run())


def test_the_stream_ends_within_a_few_seconds_once_it_is_no_longer_allowed(monkeypatch):
    monkeypatch.setattr(views, "RECHECK_SECONDS", 0.2)
    asked = []

    def allowed():
        asked.append(time.monotonic())
        return len(asked) < 3

    out, took = _collect([b"event: stream-open\ndata:\n\n"], allowed, seconds=10)
    assert len(asked) == 3 and took < 2, (len(asked), took)
    assert out[0].startswith(b"event: stream-open")


@pytest.mark.django_db(transaction=True)
def test_still_allowed_follows_logout_deactivation_and_the_permission(make_client):
    client, user = make_client("watch", group="viewer")
    key = client.session.session_key
    assert views.still_allowed(key, user.pk)
    assert not views.still_allowed(key, user.pk + 1), "another user's id"
    user.groups.clear()
    assert not views.still_allowed(key, user.pk), "the permission taken away"
    user.user_permissions.add(permission(VIEW_PERMISSION))
    assert views.still_allowed(key, user.pk)
    type(user).objects.filter(id=user.id).update(is_active=False)
    assert not views.still_allowed(key, user.pk), "deactivated"
    type(user).objects.filter(id=user.id).update(is_active=True)
    client.logout()
    assert not views.still_allowed(key, user.pk), "logged out"


@pytest.mark.slow
def test_an_open_stream_is_closed_after_logout(worker_env, tmp_path, django_user_model):
    from bench.live import SSEClient, WebServer, session_cookie

    user = django_user_model.objects.create_user("streamer", password="pw", is_staff=True)
    user.groups.add(ensure_groups()["viewer"])
    cookie = session_cookie(user)
    nobody = session_cookie(django_user_model.objects.create_user("nobody", password="pw", is_staff=True))
    web = WebServer(worker_env, tmp_path / "web.log").start()
    stream = SSEClient(web.port, cookie)
    try:
        refused = SSEClient(web.port, nobody)
        refused.close()
        assert refused.status == 403, "staff without view_dashboard"
        assert stream.status == 200
        stream.snapshots()
        browser = Client()
        browser.cookies["sessionid"] = cookie
        assert browser.post("/admin/logout/").status_code in (200, 302)
        logged_out = time.monotonic()
        with pytest.raises(ConnectionError):
            while time.monotonic() - logged_out < 10:
                stream.next(timeout=10, types=("keep-alive", "snapshot", "delta"))
        assert time.monotonic() - logged_out < 5, "closed within a few seconds"
    finally:
        stream.close()
        web.stop()


# --- the login's lockout ----------------------------------------------------------------------------


@pytest.mark.django_db
def test_five_failed_logins_lock_the_username_out_from_that_ip(django_user_model):
    django_user_model.objects.create_user("alice", password="right-password", is_staff=True)
    with override_settings(AXES_ENABLED=True):
        client = Client(REMOTE_ADDR="10.0.0.1")
        for _ in range(5):
            response = client.post("/admin/login/", {"username": "alice", "password": "wrong"})
            assert response.status_code in (200, 429)
        locked = client.post("/admin/login/", {"username": "alice", "password": "right-password"})
        assert locked.status_code == 429, "locked out, the right password too"
        elsewhere = Client(REMOTE_ADDR="10.0.0.2")
        assert elsewhere.post("/admin/login/", {"username": "alice", "password": "right-password"}).status_code == 302
