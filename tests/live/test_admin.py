"""The admin: access rules, pages, actions, plots and supervisor control (Django's test client)."""
from __future__ import annotations

import re

import numpy as np
import pytest
from django.test import Client, override_settings
from django.urls import reverse

from workers.live import plots, snapshots
from workers.jobs import queue
from workers.live.channels import StaffChannelManager
from workers.library.libraries import add_library
from workers.models import Job, Library, Meta, Score, Track
from workers.live.views import VIEW_PERMISSION, control_permission, permission

from tests.conftest import STANDARD_FORM, wait_for
from tests.supervisor_harness import Supervisor

EVENTS = "/events/?channel=workers&channel=queues&channel=jobs"


@pytest.fixture
def staff(django_user_model):
    """Staff who may look at the dashboard (``workers.view_dashboard``) and nothing more."""
    user = django_user_model.objects.create_user("staff", password="pw", is_staff=True)
    user.user_permissions.add(permission(VIEW_PERMISSION))
    return django_user_model.objects.get(id=user.id)


@pytest.fixture
def staff_client(staff):
    c = Client(enforce_csrf_checks=True)
    c.force_login(staff)
    return c


@pytest.fixture
def superuser_client(admin_user):
    c = Client(enforce_csrf_checks=True)
    c.force_login(admin_user)
    return c


@pytest.fixture
def library(tmp_path):
    root = tmp_path / "music"
    (root / "a").mkdir(parents=True)
    return add_library("music", str(root))


def make_track(library, name="a/song.mp3", **fields):
    defaults = dict(folder=library.root + "/a", format="mp3", state="scanned", artist="Ann", title="Song")
    return Track.objects.create(library=library, path=f"{library.root}/{name}", **{**defaults, **fields})


def csrf_post(client, url, data):
    """POST the way a browser does: the page's form first (CSRF cookie + token), then the submit."""
    page = client.get(url)
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.content.decode()).group(1)
    return client.post(url, {**data, "csrfmiddlewaretoken": token})


# --- access --------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("url", ["/admin/dashboard/", "/admin/dashboard/plots/", EVENTS])
def test_anonymous_users_are_sent_to_login_before_anything_opens(client, url):
    response = client.get(url)
    assert response.status_code == 302
    assert response["Location"].startswith("/admin/login/")
    assert not getattr(response, "streaming", False)


@pytest.mark.django_db
@pytest.mark.parametrize("url", ["/admin/dashboard/", EVENTS])
def test_non_staff_users_are_refused_too(client, django_user_model, url):
    client.force_login(django_user_model.objects.create_user("plain", password="pw"))
    response = client.get(url)
    assert response.status_code == 302 and response["Location"].startswith("/admin/login/")


@pytest.mark.django_db
def test_channel_manager_is_the_second_wall(staff, django_user_model):
    manager = StaffChannelManager()
    plain = django_user_model.objects.create_user("plain", password="pw")
    inactive = django_user_model.objects.create_user("gone", password="pw", is_staff=True, is_active=False)
    assert all(manager.can_read_channel(staff, c) for c in snapshots.CHANNELS)
    assert not manager.can_read_channel(staff, "secrets")
    nobody = django_user_model.objects.create_user("nobody", password="pw", is_staff=True)  # no view_dashboard
    for user in (None, plain, inactive, nobody):
        assert not any(manager.can_read_channel(user, c) for c in snapshots.CHANNELS)


@pytest.mark.django_db
def test_staff_see_the_dashboard_with_its_initial_state(staff_client, library):
    make_track(library)
    queue.enqueue("scan", "x")
    response = staff_client.get("/admin/dashboard/")
    assert response.status_code == 200
    html = response.content.decode()
    assert 'id="earmark-initial"' in html and EVENTS.replace("&", "&amp;") in html
    initial = response.context["initial_state"]
    assert initial["queues"]["state"]["queue:scan"]["queued"] == 1
    assert initial["jobs"]["state"][f"scan:{library.id}"]["state"] == "never scanned"
    assert "supervisord is not running" in html  # no supervisord in this test: the page says so


@pytest.mark.django_db
def test_admin_index_links_to_the_dashboard(staff_client):
    html = staff_client.get("/admin/").content.decode()
    assert 'href="/admin/dashboard/"' in html and 'href="/admin/dashboard/plots/"' in html


# --- libraries --------------------------------------------------------------------------


@pytest.mark.django_db
def test_library_form_wants_an_existing_directory(superuser_client, tmp_path):
    url = reverse("admin:workers_library_add")
    bad = csrf_post(superuser_client, url, {"name": "x", "root": str(tmp_path / "nope"), "write_mode": "minimal", **STANDARD_FORM})
    assert bad.status_code == 200 and "is not an existing directory" in bad.content.decode()
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    good = csrf_post(superuser_client, url, {"name": "x", "root": str(tmp_path / "link"), "write_mode": "minimal", **STANDARD_FORM})
    assert good.status_code == 302
    assert Library.objects.get(name="x").root == str((tmp_path / "real").resolve())


@pytest.mark.django_db
def test_scan_actions_are_csrf_protected_posts_that_queue_scans(superuser_client, library):
    url = reverse("admin:workers_library_changelist")
    refused = superuser_client.post(url, {"action": "scan", "_selected_action": [library.id]})
    assert refused.status_code == 403  # no CSRF token
    assert not Job.objects.exists()
    done = csrf_post(superuser_client, url, {"action": "full_scan", "_selected_action": [library.id]})
    assert done.status_code == 302
    job = Job.objects.get(queue="scan")
    assert job.key == f"library:{library.id}" and job.payload == {"kind": "library", "full": True}
    again = csrf_post(superuser_client, url, {"action": "scan", "_selected_action": [library.id]})
    assert again.status_code == 302 and Job.objects.count() == 1  # one active scan per library


@pytest.mark.django_db
def test_library_page_shows_progress_and_distribution(superuser_client, library):
    make_track(library, "a/1.mp3", earmark_tags={"genre": ["rock", "pop"], "version": ["v1"]})
    make_track(library, "a/2.flac", format="flac", earmark_tags={"genre": ["rock"]})
    html = superuser_client.get(reverse("admin:workers_library_change", args=[library.id])).content.decode()
    assert "<svg" in html and "tags written" in html and "rock: 2" in html and "version" not in html.split("<svg")[1]


# --- tracks ----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_track_list_filters_and_search(superuser_client, library):
    make_track(library, "a/one.mp3", artist="Zed Band")
    make_track(library, "a/two.ogg", format="ogg", state="failed", title="Other")
    url = reverse("admin:workers_track_changelist")
    assert "one.mp3" in superuser_client.get(url, {"q": "Zed"}).content.decode()
    assert "two.ogg" not in superuser_client.get(url, {"q": "Zed"}).content.decode()
    by_state = superuser_client.get(url, {"state__exact": "failed", "format": "ogg"}).content.decode()
    assert "two.ogg" in by_state and "one.mp3" not in by_state
    assert superuser_client.get(url, {"library__id__exact": library.id}).status_code == 200


@pytest.mark.django_db
def test_track_detail_shows_scores_file_tags_and_job_history(superuser_client, library):
    track = make_track(library)
    means = np.array([0.1, 0.9, 0.5], dtype="<f4")
    Score.objects.create(track=track, model_version="musicnn-test", labels_version="x", patches=7,
                         means=means.tobytes(), spreads=np.full(3, 0.25, dtype="<f4").tobytes())
    queue.enqueue("tag", f"tag:{track.id}", track_id=track.id)
    Job.objects.filter(track=track).update(state="failed", last_error="decoder exploded")
    html = superuser_client.get(reverse("admin:workers_track_change", args=[track.id])).content.decode()
    assert "musicnn-test, 7 patches" in html
    # Strongest first; indices because this label list does not match three scores.
    assert html.index("#1") < html.index("#2") < html.index("#0") and "0.9000" in html
    assert "could not read the file" in html  # the file does not exist: said, not raised
    assert "decoder exploded" in html and reverse("admin:workers_job_change", args=[Job.objects.get().id]) in html


@pytest.mark.django_db
def test_retag_and_recalibrate_queue_deduplicated_jobs(superuser_client, library):
    tracks = [make_track(library, f"a/{i}.mp3") for i in range(3)]
    url = reverse("admin:workers_track_changelist")
    ids = [t.id for t in tracks]
    csrf_post(superuser_client, url, {"action": "retag", "_selected_action": ids})
    csrf_post(superuser_client, url, {"action": "retag", "_selected_action": ids})
    csrf_post(superuser_client, url, {"action": "recalibrate", "_selected_action": ids[:1]})
    assert sorted(Job.objects.filter(queue="tag").values_list("key", flat=True)) == sorted(f"tag:{i}" for i in ids)
    assert list(Job.objects.filter(queue="calibrate").values_list("key", "track_id")) == [(f"calibrate:{ids[0]}", ids[0])]


# --- jobs and meta -------------------------------------------------------------------------------


@pytest.mark.django_db
def test_job_actions_retry_and_cancel_and_the_full_error(superuser_client):
    queue.enqueue("scan", "a")
    queue.enqueue("scan", "b")
    a, b = Job.objects.order_by("key")
    long_error = "Traceback:\n" + "x" * 3000 + "\nThe End"
    Job.objects.filter(id=a.id).update(state="failed", last_error=long_error)
    url = reverse("admin:workers_job_changelist")
    csrf_post(superuser_client, url, {"action": "cancel", "_selected_action": [b.id]})
    csrf_post(superuser_client, url, {"action": "retry", "_selected_action": [a.id]})
    assert dict(Job.objects.values_list("key", "state")) == {"a": "queued", "b": "cancelled"}
    Job.objects.filter(id=a.id).update(state="failed", last_error=long_error)
    html = superuser_client.get(reverse("admin:workers_job_change", args=[a.id])).content.decode()
    assert "The End" in html
    filtered = superuser_client.get(url, {"queue": "scan", "state__exact": "failed"}).content.decode()
    assert f'value="{a.id}"' in filtered and f'value="{b.id}"' not in filtered


@pytest.mark.django_db
def test_meta_is_read_only(superuser_client):
    queue.pause("tag")
    key = queue.paused_key("tag")
    url = reverse("admin:workers_meta_change", args=[key])
    html = superuser_client.get(url).content.decode()
    assert "paused" in html and 'name="_save"' not in html
    assert superuser_client.post(url, {"key": key}).status_code == 403
    assert superuser_client.get(reverse("admin:workers_meta_add")).status_code == 403


# --- plots ------------------------------------------------------------------------------------------


def test_bar_chart_escapes_labels_and_folds_the_tail():
    svg = plots.bar_chart([("<b>&", 5), *((f"v{i}", 1) for i in range(30))], "genre <x>", limit=10)
    assert svg.startswith("<svg") and "<b>" not in svg and "&lt;b&gt;&amp;" in svg
    assert "other (21)" in svg and "genre &lt;x&gt;" in svg


def test_histogram_marks_sit_at_their_values():
    counts = plots.bin_values([0.0, 0.1, 0.5, 0.5, 0.99, 2.0], 0.0, 1.0, bins=10)
    assert counts == [1, 1, 0, 0, 0, 2, 0, 0, 0, 2]
    svg = plots.histogram(counts, 0.0, 1.0, "msd:rock", marks={"p5": 0.05, "p95": 0.95}, width=234)
    xs = [float(x) for x in re.findall(r'<line x1="([\d.]+)" y1="\d+" x2="[\d.]+" y2="[\d.]+" stroke="#ba2121"', svg)]
    assert xs == pytest.approx([34 + 192 * 0.05, 34 + 192 * 0.95])
    assert "p5 0.05" in svg and "p95 0.95" in svg
    with pytest.raises(ValueError):
        plots.histogram(counts, 1.0, 1.0, "empty range")


@pytest.mark.django_db
def test_plots_page_counts_formats_until_something_is_tagged(staff_client, library):
    make_track(library, "a/1.mp3")
    make_track(library, "a/2.mp3")
    make_track(library, "a/3.flac", format="flac")
    html = staff_client.get("/admin/dashboard/plots/").content.decode()
    assert "nothing tagged yet" in html and "mp3: 2" in html and "flac: 1" in html
    Track.objects.filter(format="flac").update(earmark_tags={"mood": ["calm"], "genre": ["jazz"]})
    what, groups = plots.library_distribution(Track.objects.all())
    assert what == "tags written" and list(groups) == ["genre", "mood"] and groups["mood"] == [("calm", 1)]


# --- supervisor -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_supervisor_table_and_control_through_the_real_socket(worker_env, tmp_path, django_user_model):
    sup = Supervisor(worker_env, tmp_path / "sup", EARMARK_SCANNERS=1).start()
    staff = django_user_model.objects.create_user("op", password="pw", is_staff=True)
    staff.user_permissions.add(permission(VIEW_PERMISSION))
    client = Client(enforce_csrf_checks=True)
    client.force_login(staff)
    try:
        with override_settings(EARMARK_SUPERVISOR_SOCKET=sup.env["EARMARK_SUPERVISOR_SOCKET"]):
            html = client.get("/admin/dashboard/").content.decode()
            assert "scanner:scanner_00" in html and "web:web" in html
            assert "needs the “control supervisor” permission" in html
            assert client.post("/admin/dashboard/supervisor/", {"action": "stop", "group": "scanner"}).status_code == 403

            staff.user_permissions.add(control_permission())
            staff = django_user_model.objects.get(id=staff.id)  # permissions are cached per instance
            client.force_login(staff)
            page = client.get("/admin/dashboard/").content.decode()
            token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
            assert '<option value="scanner">' in page and '<option value="web">' not in page
            response = client.post("/admin/dashboard/supervisor/",
                                   {"action": "stop", "group": "scanner", "csrfmiddlewaretoken": token})
            assert response.status_code == 302
            assert sup.status()["scanner:scanner_00"] == "STOPPED"
            client.post("/admin/dashboard/supervisor/",
                        {"action": "start", "group": "scanner", "csrfmiddlewaretoken": token})
            assert sup.status()["scanner:scanner_00"] == "RUNNING"
            refused = client.post("/admin/dashboard/supervisor/",
                                  {"action": "stop", "group": "web", "csrfmiddlewaretoken": token}, follow=True)
            assert "not controlled from the web page" in refused.content.decode()
        wait_for(lambda: Meta.objects.filter(key__startswith="worker:").exists(), message="the restarted scanner's row")
    finally:
        sup.stop()
