"""Progress you can plan with (issue 15): one time-left rule for queues and library scans, on the
dashboard's channels and the library pages; and the library form refusing junk standard limits."""
from __future__ import annotations

import datetime
import re

import pytest
from django.urls import reverse
from django.utils import timezone

from tests.conftest import STANDARD_FORM
from workers.jobs import queue
from workers.library import scan
from workers.live import eta, snapshots
from workers.models import Job, Library, Meta

pytestmark = pytest.mark.django_db


def running_scan(library, done: int, total: int, minutes_ago: float, state: str = "running") -> None:
    started = timezone.now() - datetime.timedelta(minutes=minutes_ago)
    Meta.objects.update_or_create(key=scan.progress_key(library.id), defaults={"updated_at": timezone.now(), "value": {
        "gen": 1, "state": state, "full": False, "folders_total": total, "folders_done": done, "files_seen": 7,
        "started_at": started.isoformat()}})


@pytest.mark.parametrize("left, rate, paused, says", [
    (0, 5, False, ""), (10, 0, False, "—"), (10, 5, True, "paused"), (3, 5, False, "< 1 min"),
    (60, 5, False, "12 min"), (1000, 5, False, "3.3 h"),
])
def test_one_rule_for_time_left(left, rate, paused, says):
    assert eta.text(left, rate, paused) == says


def test_a_scans_rate_is_folders_per_minute_since_it_began():
    now = timezone.now()
    progress = {"state": "running", "folders_done": 10, "folders_total": 40,
                "started_at": (now - datetime.timedelta(minutes=2)).isoformat()}
    assert eta.scan(progress, now) == {"rate": 5.0, "eta": "6 min"}
    assert eta.scan({**progress, "folders_done": 0}, now) == {"rate": 0.0, "eta": "—"}
    assert eta.scan({**progress, "state": "done"}, now) == {} and eta.scan({}, now) == {}
    later = eta.scan(progress, now + datetime.timedelta(minutes=2))
    assert later == {"rate": 2.5, "eta": "12 min"}, "no folder done for a while: the rate falls, time left grows"


def test_queue_rows_carry_their_time_left_at_the_last_minutes_rate():
    for i in range(30):
        queue.enqueue("tag", f"t{i}")
    Job.objects.filter(id__in=list(Job.objects.order_by("id").values_list("id", flat=True)[:10])).update(
        state="done", finished_at=timezone.now())
    state = snapshots.queues_snapshot().state
    assert state["throughput"]["per_minute"]["tag"] == 10
    assert state["queue:tag"]["eta"] == "2 min" and state["queue:scan"]["eta"] == ""
    queue.pause("tag")
    assert snapshots.queues_snapshot().state["queue:tag"]["eta"] == "paused"


def test_a_running_scan_shows_rate_and_time_left_and_is_read_again_while_it_runs(library):
    snap = snapshots.jobs_snapshot()
    assert snap.state[scan.progress_key(library.id)]["eta"] == "" and snap.refresh_at is None
    running_scan(library, done=10, total=40, minutes_ago=2)
    snap = snapshots.jobs_snapshot()
    row = snap.state[scan.progress_key(library.id)]
    assert (row["rate"], row["eta"]) == (5.0, "6 min")
    assert snap.refresh_at is not None, "the clock moves the rate: the broker reads it again"
    running_scan(library, done=40, total=40, minutes_ago=2, state="done")
    snap = snapshots.jobs_snapshot()
    assert snap.state[scan.progress_key(library.id)]["eta"] == "" and snap.refresh_at is None


def test_the_library_pages_show_the_scans_time_left(admin_client, library):
    running_scan(library, done=10, total=40, minutes_ago=2)
    listing = admin_client.get(reverse("admin:workers_library_changelist")).content.decode()
    assert "running: 10/40 folders, 7 files; 6 min left at 5.0 folders/min" in listing
    page = admin_client.get(reverse("admin:workers_library_change", args=[library.id])).content.decode()
    assert "6 min left at 5.0 folders/min (of the 40 folders found so far)" in page
    running_scan(library, done=0, total=1, minutes_ago=0.1)
    page = admin_client.get(reverse("admin:workers_library_change", args=[library.id])).content.decode()
    assert "time left: not known yet" in page


def _csrf_post(client, url, data):
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', client.get(url).content.decode()).group(1)
    return client.post(url, {**data, "csrfmiddlewaretoken": token})


@pytest.mark.parametrize("limits, says", [
    ('["genre"]', "standard limits are an object"),
    ('{"genre": "two"}', "must be a whole number"),
    ('{"genre": -1}', "must be a whole number"),
    ('{"genre": 1.5}', "must be a whole number"),
    ('{"genre": true}', "must be a whole number"),
    ('{"instrument": 2}', "has no standard field"),
    ('{"colour": 2}', "has no standard field"),
])
def test_junk_standard_limits_are_a_form_error_not_a_failed_tag_job(admin_client, library, limits, says):
    url = reverse("admin:workers_library_change", args=[library.id])
    form = {"name": "music", "root": library.root, "enabled": "on", "write_mode": "minimal",
            **STANDARD_FORM, "standard_limits": limits}
    response = _csrf_post(admin_client, url, form)
    assert response.status_code == 200 and says in response.content.decode()
    assert Library.objects.get(id=library.id).standard_limits == {"genre": 2, "mood": 2}, "nothing saved"


def test_good_standard_limits_are_saved(admin_client, library):
    url = reverse("admin:workers_library_change", args=[library.id])
    form = {"name": "music", "root": library.root, "enabled": "on", "write_mode": "minimal",
            **STANDARD_FORM, "standard_limits": '{"genre": 1, "mood": 0}'}
    assert _csrf_post(admin_client, url, form).status_code == 302
    assert Library.objects.get(id=library.id).standard_limits == {"genre": 1, "mood": 0}
