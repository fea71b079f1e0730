"""The admin as a tool (issue 15): finding music by what Earmark heard (tag columns, a filter per
category with counts, a strength filter, search on tag values, the tag rows every recorded write
leaves behind), and libraries that scan when added and take their jobs and rows when deleted."""
from __future__ import annotations

import pytest
from django.test import Client
from django.utils import timezone

from tests.conftest import STANDARD_FORM
from workers.admin import failures
from workers.jobs import queue
from workers.models import Job, Library, Meta, Score, Track, TrackTag
from workers.tagging import apply
from workers.tagging.tagset import build_tags

pytestmark = pytest.mark.django_db

URL = "/admin/workers/track/"


def tagged(library, name: str, **categories: list[tuple[str, float]]) -> Track:
    """A track with these written values (``mood=[("calm", 0.8)]``), recorded as a real write records them."""
    track = Track.objects.create(library=library, path=f"{library.root}/{name}", folder=library.root,
                                 format="mp3", state="tagged")
    TrackTag.objects.bulk_create([TrackTag(track=track, category=c, value=v, rank=r, strength=s)
                                  for c, values in categories.items() for r, (v, s) in enumerate(values)])
    Track.objects.filter(id=track.id).update(earmark_tags={c: [v for v, _ in vs] for c, vs in categories.items()})
    return track


def listed(admin_client, **params) -> str:
    response = admin_client.get(URL, params)
    assert response.status_code == 200
    return response.content.decode()


def test_a_filter_per_category_with_counts_and_tag_columns(admin_client, library):
    tagged(library, "calm-piano.mp3", mood=[("calm", 0.9)], instrument=[("piano", 0.8), ("strings", 0.4)])
    tagged(library, "calm-guitar.mp3", mood=[("calm", 0.55)], instrument=[("guitar", 0.7)])
    tagged(library, "dark.mp3", mood=[("dark", 0.7)])
    page = listed(admin_client)
    assert "calm (2)" in page and "dark (1)" in page and "piano (1)" in page, "choices with their counts"
    assert "piano, strings" in page, "the instrument column lists the values, strongest first"
    calm = listed(admin_client, mood="calm")
    assert "calm-piano.mp3" in calm and "calm-guitar.mp3" in calm and "dark.mp3" not in calm
    both = listed(admin_client, mood="calm", instrument="piano")
    assert "calm-piano.mp3" in both and "calm-guitar.mp3" not in both


def test_the_strength_filter_keeps_only_sure_tags(admin_client, library):
    tagged(library, "sure.mp3", mood=[("calm", 0.9)])
    tagged(library, "unsure.mp3", mood=[("calm", 0.55)])
    sure = listed(admin_client, mood="calm", strength="0.75")
    assert "sure.mp3" in sure and "unsure.mp3" not in sure
    anything_sure = listed(admin_client, strength="0.75")
    assert "sure.mp3" in anything_sure and "unsure.mp3" not in anything_sure


def test_search_finds_tag_values_as_well_as_paths(admin_client, library):
    tagged(library, "a.mp3", instrument=[("piano", 0.8)])
    tagged(library, "b.mp3", instrument=[("guitar", 0.8)])
    tagged(library, "piano-sonata.mp3", instrument=[("strings", 0.8)])
    found = listed(admin_client, q="Piano")
    assert "a.mp3" in found and "piano-sonata.mp3" in found and "b.mp3" not in found


def test_recording_a_write_replaces_the_tracks_tag_rows(library):
    track = Track.objects.create(library=library, path=f"{library.root}/x.mp3", folder=library.root, format="mp3")
    scores = {"mtt:piano": 0.95, "mtt:guitar": 0.01, "mtt:classical": 0.9}
    first = build_tags(scores, models="m")
    apply.record(track, apply.Written(first, True, 1, 1, "m", "uncalibrated"))
    rows = {(t.category, t.value): t for t in TrackTag.objects.filter(track=track)}
    assert ("instrument", "piano") in rows and rows[("instrument", "piano")].strength > 0.5
    assert set(rows) == {(c, v) for c, vs in first.categories.items() for v in vs}
    second = build_tags({"mtt:piano": 0.01, "mtt:guitar": 0.95, "mtt:classical": 0.01}, models="m")
    apply.record(track, apply.Written(second, True, 1, 1, "m", "uncalibrated"))
    now = set(TrackTag.objects.filter(track=track).values_list("category", "value"))
    assert ("instrument", "piano") not in now and ("instrument", "guitar") in now
    assert Track.objects.get(id=track.id).earmark_tags == second.categories


def _form_post(admin_client, url, data):
    page = admin_client.get(url)
    token = page.cookies["csrftoken"].value if "csrftoken" in page.cookies else ""
    return admin_client.post(url, {**data, "csrfmiddlewaretoken": token})


def test_a_library_added_in_the_admin_is_scanned_at_once(admin_client, tmp_path):
    (tmp_path / "new").mkdir()
    response = _form_post(admin_client, "/admin/workers/library/add/",
                          {"name": "new", "root": str(tmp_path / "new"), "enabled": "on", "write_mode": "minimal", **STANDARD_FORM})
    assert response.status_code == 302, response.content.decode()[:2000]
    library = Library.objects.get(name="new")
    job = Job.objects.get(queue="scan", key=f"library:{library.id}")
    assert job.state == "queued"


def test_deleting_a_library_cancels_its_jobs_and_removes_its_rows(admin_client, library):
    track = tagged(library, "a.mp3", mood=[("calm", 0.9)])
    Score.objects.create(track=track, model_version="m", labels_version="l", means=b"", spreads=b"")
    queue.enqueue("tag", f"tag:{track.id}", track_id=track.id, library_id=library.id)
    queue.enqueue("scan", f"library:{library.id}", {"kind": "library"}, library_id=library.id)
    Meta.objects.create(key=f"scan:{library.id}", value={"gen": 1, "state": "done"}, updated_at=timezone.now())
    response = _form_post(admin_client, f"/admin/workers/library/{library.id}/delete/", {"post": "yes"})
    assert response.status_code == 302
    assert not Library.objects.filter(id=library.id).exists()
    assert not Track.objects.exists() and not TrackTag.objects.exists() and not Score.objects.exists()
    assert set(Job.objects.values_list("state", flat=True)) == {"cancelled"}, "no orphan job is left to run"
    assert not Meta.objects.filter(key=f"scan:{library.id}").exists()


# --- failures ---------------------------------------------------------------------------------

FAILURES = "/admin/failures/"


def test_failures_are_grouped_by_reason_with_counts_and_can_be_retried_or_ignored(admin_client, library, tmp_path):
    root = tmp_path / "music"
    for n in range(3):  # three files the scanner could not read for the same reason
        (root / f"bad{n}.mp3").write_bytes(b"not audio at all")
        Track.objects.create(library=library, path=str(root / f"bad{n}.mp3"), folder=str(root), format="mp3",
                             state="failed", error=f"not an audio file: {root}/bad{n}.mp3 starts with 16 bytes of text")
    Track.objects.create(library=library, path=str(root / "gone.flac"), folder=str(root), format="flac",
                         state="failed", error="quarantined: the tagger process died 3 times on this file "
                                               "(last: worker:host:tag:0); it is skipped until the file changes")
    queue.enqueue("scan", "folder:x", {"kind": "folder"}, library_id=library.id)
    Job.objects.filter(key="folder:x").update(state="failed", last_error=f"cannot list {root}/sub: Permission denied")
    page = admin_client.get(FAILURES).content.decode()
    assert "5 failures in 3 groups" in page
    assert failures.reason_of(f"not an audio file: {root}/bad1.mp3 starts with 16 bytes of text") in page
    assert page.count("bad0.mp3") == 1 and "bad2.mp3" in page, "examples of the group are listed"

    token = admin_client.get(FAILURES).cookies["csrftoken"].value
    keys = [g.key for g in failures.groups()]
    job_group = next(k for k in keys if k.startswith("job|"))
    track_group = next(k for k in keys if "not an audio file" in k)
    admin_client.post(FAILURES, {"action": "retry", "group": [job_group, track_group], "csrfmiddlewaretoken": token})
    assert Job.objects.get(key="folder:x").state == "queued", "the failed job is back in its queue"
    assert Track.objects.filter(state="failed", path__contains="bad").count() == 3, "still not audio: re-read, failed"

    quarantine = next(k for k in keys if k.startswith("track|") and "quarantined" in k)
    admin_client.post(FAILURES, {"action": "ignore", "group": [quarantine], "csrfmiddlewaretoken": token})
    after = admin_client.get(FAILURES).content.decode()
    assert "quarantined" not in after and "1 reason ignored" in after
    admin_client.post(FAILURES, {"action": "unignore", "csrfmiddlewaretoken": token})
    assert "quarantined" in admin_client.get(FAILURES).content.decode()


def test_the_failures_page_is_for_viewers_and_acting_needs_operate_queues(library, django_user_model):
    from workers.live.views import ensure_groups

    viewer = django_user_model.objects.create_user("viewer", password="pw", is_staff=True)
    viewer.groups.add(ensure_groups()["viewer"])
    anonymous = Client()
    assert anonymous.get(FAILURES).status_code == 302, "sent to the login page"
    c = Client()
    c.force_login(viewer)
    page = c.get(FAILURES)
    assert page.status_code == 200 and 'name="group"' not in page.content.decode()
    queue.enqueue("scan", "folder:y", {"kind": "folder"}, library_id=library.id)
    Job.objects.filter(key="folder:y").update(state="failed", last_error="boom")
    refused = c.post(FAILURES, {"action": "retry", "group": [g.key for g in failures.groups()]})
    assert refused.status_code == 403
    assert Job.objects.get(key="folder:y").state == "failed", "a viewer cannot retry"


# --- the track page and its player --------------------------------------------------------------


def test_the_track_page_shows_strengths_strongest_labels_and_a_player(admin_client, library):
    import numpy as np

    from workers.tagging import scores as stored

    track = tagged(library, "song.mp3", mood=[("calm", 0.91)], instrument=[("piano", 0.77)])
    Score.objects.create(track=track, model_version="m", labels_version="l", patches=3,
                         means=stored.pack(np.linspace(0.9, 0.1, 100)), spreads=stored.pack(np.zeros(100)))
    page = admin_client.get(f"/admin/workers/track/{track.id}/change/").content.decode()
    assert "<td>calm</td><td>0.91</td>" in page and "<td>piano</td><td>0.77</td>" in page
    assert "strongest first" in page and "<svg" in page, "the bar chart of the strongest labels"
    assert f'<audio controls preload="none" src="/admin/workers/track/{track.id}/audio/">' in page


def test_the_player_gets_the_file_with_range_requests_staff_only_and_inside_the_library(admin_client, library, tmp_path):
    data = bytes(range(256)) * 40
    (tmp_path / "music" / "song.mp3").write_bytes(data)
    track = tagged(library, "song.mp3")
    url = f"/admin/workers/track/{track.id}/audio/"
    whole = admin_client.get(url)
    assert whole.status_code == 200 and b"".join(whole.streaming_content) == data
    assert whole["Content-Type"] == "audio/mpeg" and whole["Accept-Ranges"] == "bytes"
    part = admin_client.get(url, HTTP_RANGE="bytes=10-19")
    assert part.status_code == 206 and part.content == data[10:20]
    assert part["Content-Range"] == f"bytes 10-19/{len(data)}"
    tail = admin_client.get(url, HTTP_RANGE="bytes=-5")
    assert tail.status_code == 206 and tail.content == data[-5:]
    assert admin_client.get(url, HTTP_RANGE=f"bytes={len(data)}-").status_code == 416
    assert Client().get(url).status_code == 302, "anonymous: to the login page"
    outside = tmp_path / "secret.mp3"
    outside.write_bytes(b"not yours")
    (tmp_path / "music" / "song.mp3").unlink()
    (tmp_path / "music" / "song.mp3").symlink_to(outside)
    assert admin_client.get(url).status_code == 404, "a symlink leading out of the library is never followed"


# --- the dashboard's queue controls ---------------------------------------------------------------


def test_the_dashboard_pauses_resumes_retries_and_cancels_per_queue(admin_client, library, django_user_model):
    page = admin_client.get("/admin/dashboard/").content.decode()
    assert 'value="pause:tag"' in page and "confirm(" in page and "left (at that rate)" in page
    token = admin_client.get("/admin/dashboard/").cookies["csrftoken"].value
    steer = "/admin/dashboard/queues/"
    admin_client.post(steer, {"action": "pause:tag", "csrfmiddlewaretoken": token})
    assert queue.is_paused("tag")
    admin_client.post(steer, {"action": "resume:tag", "csrfmiddlewaretoken": token})
    assert not queue.is_paused("tag")
    queue.enqueue("tag", "t1")
    queue.enqueue("tag", "t2")
    admin_client.post(steer, {"action": "cancel:tag", "csrfmiddlewaretoken": token})
    assert set(Job.objects.values_list("state", flat=True)) == {"cancelled"}
    admin_client.post(steer, {"action": "retry:tag", "csrfmiddlewaretoken": token})
    assert set(Job.objects.values_list("state", flat=True)) == {"queued"}
    from workers.live.views import ensure_groups

    viewer = django_user_model.objects.create_user("viewer2", password="pw", is_staff=True)
    viewer.groups.add(ensure_groups()["viewer"])
    c = Client()
    c.force_login(viewer)
    assert 'value="pause:tag"' not in c.get("/admin/dashboard/").content.decode()
    assert c.post(steer, {"action": "pause:tag"}).status_code == 403 and not queue.is_paused("tag")


def test_the_dashboard_charts_jobs_done_per_minute_per_queue(admin_client):
    from datetime import timedelta

    from workers.live import plots

    now = timezone.now()
    for n, minutes_ago in enumerate([1, 1, 1, 30]):
        queue.enqueue("tag", f"done{n}")
        Job.objects.filter(key=f"done{n}").update(state="done", finished_at=now - timedelta(minutes=minutes_ago))
    tag_chart = plots.throughput_charts(now=now)[1]
    assert "tag: jobs done per minute" in tag_chart and ">3<" in tag_chart, "the peak minute's count is labelled"
    assert tag_chart.count("<rect") == 2, "two minutes had work"
    assert "jobs done per minute" in admin_client.get("/admin/dashboard/").content.decode()
