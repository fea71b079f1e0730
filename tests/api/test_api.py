"""``POST /api/enqueue`` and ``GET /api/tracks`` through Django's test client (CSRF checks on).

Who may call (a live token's key, by ``Authorization: Bearer`` or ``X-Api-Key``;
never a session), what a token may name (its libraries' paths: any other path
makes the whole request 403 and queues nothing), what a malformed request gets
(400, or 405 for another method), the rate limits (429 with ``Retry-After``),
and the log line every request leaves (the token's name, never a key).
"""
from __future__ import annotations

import logging
import os

import pytest

from workers.api import tokens
from workers.models import ApiToken, Job, Track

from tests.api.conftest import ENQUEUE, TRACKS
from tests.conftest import drain_scans


def _scan_jobs():
    return list(Job.objects.filter(queue="scan"))


# --- who may call -------------------------------------------------------------------------------------


def test_a_token_queues_a_file_of_its_library(world):
    response = world.post({"paths": [str(world.song)]})
    assert response.status_code == 202, response.content
    body = response.json()
    assert body["ok"] is True
    [result] = body["results"]
    assert result["path"] == str(world.song) and result["ok"] and result["error"] == ""
    [job] = _scan_jobs()
    assert result["job_ids"] == [job.id] and result["track_ids"] == []  # not scanned yet: no track row
    assert job.state == "queued" and job.library_id == world.a.id
    assert job.payload["reason"] == "api:lidarr" and job.payload["folder"] == str(world.song.parent)
    assert response["Cache-Control"] == "no-store" and "Set-Cookie" not in response
    assert ApiToken.objects.get().last_used_at is not None


def test_the_key_may_come_in_x_api_key(world):
    response = world.post({"paths": [str(world.a_root)]}, key=None, HTTP_X_API_KEY=world.key)
    assert response.status_code == 202 and response.json()["results"][0]["ok"]


@pytest.mark.parametrize("how", ["no key", "wrong scheme", "garbage", "unknown prefix", "wrong secret",
                                 "session only"])
def test_without_a_valid_key_401_and_nothing_is_queued(world, django_user_model, how):
    prefix = ApiToken.objects.get().prefix
    headers = {
        "no key": {},
        "wrong scheme": {"HTTP_AUTHORIZATION": f"Basic {world.key}"},
        "garbage": {"HTTP_AUTHORIZATION": "Bearer not-a-key"},
        "unknown prefix": {"HTTP_AUTHORIZATION": "Bearer em_00000000_" + world.key.split("_", 2)[2]},
        "wrong secret": {"HTTP_AUTHORIZATION": f"Bearer em_{prefix}_" + "x" * 43},
        "session only": {},
    }[how]
    if how == "session only":  # an admin's session is no key: the API never looks at sessions
        world.client.force_login(django_user_model.objects.create_superuser("root", password="pw"))
    response = world.post({"paths": [str(world.song)]}, key=None, **headers)
    assert response.status_code == 401, (how, response.content)
    assert response["WWW-Authenticate"].startswith('Bearer realm="earmark"')
    assert _scan_jobs() == []
    assert world.get(str(world.song), key=None, **headers).status_code == 401
    assert ApiToken.objects.get().last_used_at is None


def test_a_revoked_key_is_refused_at_once(world):
    assert world.post({"paths": [str(world.song)]}).status_code == 202
    assert tokens.revoke(ApiToken.objects.all()) == 1
    response = world.post({"paths": [str(world.a_root)]})
    assert response.status_code == 401 and "revoked" in response.json()["error"]
    assert world.get(str(world.song)).status_code == 401
    assert len(_scan_jobs()) == 1, "only the request before the revocation queued anything"


# --- what a token may name ----------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["other library", "mixed", "outside every library", "dot-dot", "link into B"])
def test_a_path_outside_the_tokens_libraries_is_403_for_the_whole_request(world, tmp_path, where):
    outside = tmp_path / "elsewhere.mp3"
    outside.write_bytes(world.song.read_bytes())
    (tmp_path / "outside-link").symlink_to(world.other)  # a link from outside every library into B
    wanted = {
        "other library": [str(world.other)],
        "mixed": [str(world.song), str(world.other)],
        "outside every library": [str(outside)],
        "dot-dot": [f"{world.a_root}/../b/Other/{world.other.name}"],
        "link into B": [str(tmp_path / "outside-link")],
    }[where]
    response = world.post({"paths": wanted})
    assert response.status_code == 403, (where, response.content)
    body = response.json()
    assert "nothing was queued" in body["error"]
    assert str(world.song) not in body["forbidden"] and len(body["forbidden"]) == 1
    assert _scan_jobs() == []


def test_per_path_errors_come_back_in_a_202_and_only_good_paths_are_queued(world):
    """Inside the token's libraries, what is wrong with a path is that path's error (from the enqueue core)."""
    (world.a_root / "notes.txt").write_text("not audio")
    (world.a_root / "escape.mp3").symlink_to(world.other)  # a link in A that leads into B: enqueue refuses it
    wanted = [str(world.song), str(world.a_root / "gone.mp3"), str(world.a_root / "notes.txt"),
              str(world.a_root / "escape.mp3")]
    response = world.post({"paths": wanted})
    assert response.status_code == 202, response.content
    body = response.json()
    assert body["ok"] is False
    results = body["results"]
    assert [r["path"] for r in results] == wanted
    assert [r["ok"] for r in results] == [True, False, False, False]
    assert "does not exist" in results[1]["error"]
    assert "not audio" in results[2]["error"]
    assert "symlink" in results[3]["error"]
    assert all(r["job_ids"] == [] for r in results[1:])
    assert [j.id for j in _scan_jobs()] == results[0]["job_ids"]
    assert not any(str(world.other.parent) in str(j.payload) for j in _scan_jobs())


# --- malformed requests -------------------------------------------------------------------------------


@pytest.mark.parametrize("body", ["not json", "[]", '["/a"]', "{}", '{"paths": []}', '{"paths": "/a"}',
                                  '{"paths": [1]}', '{"paths": [""]}', '{"paths": ["relative/song.mp3"]}',
                                  '{"paths": ["/a\\u0000b"]}', '{"paths": ["/1", "/2", "/3"]}', b"\xff\xfe"])
def test_a_malformed_body_is_400_and_queues_nothing(world, settings, body):
    settings.EARMARK_API_MAX_PATHS = 2
    response = world.post(body)
    assert response.status_code == 400, (body, response.content)
    assert response.json()["error"]
    assert _scan_jobs() == []


def test_a_body_over_the_upload_limit_is_413(world, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 200
    response = world.post({"paths": [str(world.song)] * 20})
    assert response.status_code == 413 and "fewer paths" in response.json()["error"]
    assert _scan_jobs() == []


def test_other_methods_are_405(world):
    for method, url, allow in (("get", ENQUEUE, "POST"), ("put", ENQUEUE, "POST"), ("delete", ENQUEUE, "POST"),
                               ("post", TRACKS, "GET"), ("patch", TRACKS, "GET")):
        response = getattr(world.client, method)(url, HTTP_AUTHORIZATION=f"Bearer {world.key}")
        assert response.status_code == 405, (method, url)
        assert response["Allow"] == allow


# --- GET /api/tracks ----------------------------------------------------------------------------------


def _track(library, path, **fields) -> Track:
    return Track.objects.create(library=library, path=str(path), folder=str(path.parent), **fields)


def test_a_track_is_answered_with_its_state_tags_and_features(world):
    track = _track(world.a, world.song, state="tagged", earmark_tags={"genre": ["ambient"], "mood": ["calm"]},
                   bpm=92.5, bpm_confidence=0.8, musical_key="A minor", loudness_lufs=-14.2, artist="Band",
                   title="Song", tags={"genre": ["Ambient"], "artist": ["Band"]})
    Job.objects.create(queue="tag", key=f"track:{track.id}", track=track, run_after=track.created_at,
                       created_at=track.created_at)
    response = world.get(str(world.song))
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["id"] == track.id and body["path"] == str(world.song) and body["library"] == "A"
    assert body["state"] == "tagged" and body["error"] == ""
    assert body["earmark_tags"] == {"genre": ["ambient"], "mood": ["calm"]}
    assert (body["bpm"], body["musical_key"], body["loudness_lufs"]) == (92.5, "A minor", -14.2)
    assert body["tags"] == {"genre": ["Ambient"], "artist": ["Band"]} and body["artist"] == "Band"
    assert [j["queue"] for j in body["jobs"]] == ["tag"]
    # The same track by a path that is written differently but names the same file.
    assert world.get(f"{world.a_root}/Album/./{world.song.name}").json()["id"] == track.id


def test_tracks_unknown_outside_or_without_a_path(world):
    _track(world.b, world.other, state="tagged")  # exists, but in a library the token may not read
    assert world.get(str(world.a_root / "Album" / "unknown.mp3")).status_code == 404
    assert world.get(str(world.song)).status_code == 404  # a file not scanned yet
    refused = world.get(str(world.other))
    assert refused.status_code == 403 and set(refused.json()) == {"error"}  # nothing of the track leaks
    assert world.get(None).status_code == 400
    assert world.get("relative.mp3").status_code == 400


def test_enqueue_then_scan_then_the_track_is_known(world):
    """The whole hook: queue a folder, a scanner runs the job, the track answers with its tag job queued."""
    response = world.post({"paths": [str(world.song.parent)]})
    assert response.status_code == 202 and response.json()["ok"]
    assert drain_scans() == []
    body = world.get(str(world.song)).json()
    assert body["state"] in ("new", "scanned") and body["format"] == "mp3"
    assert [j["queue"] for j in body["jobs"]] == ["tag"]
    again = world.post({"paths": [str(world.song)]}).json()["results"][0]
    assert again["track_ids"] == [body["id"]]


# --- rate limits --------------------------------------------------------------------------------------


def test_a_token_over_its_limit_gets_429_with_retry_after(world, settings, monkeypatch):
    settings.EARMARK_API_RATE_PER_TOKEN, settings.EARMARK_API_RATE_WINDOW_SECONDS = 2, 60
    second = tokens.create("beets", [world.a]).key
    for _ in range(2):
        assert world.post({"paths": [str(world.song)]}).status_code == 202
    refused = world.post({"paths": [str(world.song)]})
    assert refused.status_code == 429 and "API key" in refused.json()["error"]
    assert 1 <= int(refused["Retry-After"]) <= 60
    assert int(refused["Retry-After"]) == 60 - (1_000_000 % 60)  # the pinned clock's place in its window
    assert world.get(str(world.song)).status_code == 429
    assert world.post({"paths": [str(world.song)]}, key=second).status_code == 202, "the limit is per token"
    from workers.api import ratelimit

    monkeypatch.setattr(ratelimit, "clock", lambda: 1_000_000.5 + 60)  # the next window
    assert world.post({"paths": [str(world.song)]}).status_code == 202


def test_an_address_over_its_limit_gets_429_whatever_key_it_sends(world, settings):
    settings.EARMARK_API_RATE_PER_IP, settings.EARMARK_API_RATE_PER_TOKEN = 3, 0
    assert world.post({"paths": [str(world.song)]}, key="em_bad_guess").status_code == 401
    assert world.post({"paths": [str(world.song)]}, key="em_bad_guess").status_code == 401
    assert world.post({"paths": [str(world.song)]}).status_code == 202
    refused = world.post({"paths": [str(world.song)]})
    assert refused.status_code == 429 and "address" in refused.json()["error"]
    assert int(refused["Retry-After"]) >= 1
    assert world.post({"paths": [str(world.song)]}, REMOTE_ADDR="10.0.0.2").status_code == 202


# --- the log ------------------------------------------------------------------------------------------


def test_every_request_is_logged_with_the_token_name_and_never_a_key(world, caplog):
    wrong = "em_" + ApiToken.objects.get().prefix + "_" + "S3cr3t" * 7
    with caplog.at_level(logging.INFO, logger="earmark.api"):
        world.post({"paths": [str(world.song)]})
        world.post({"paths": [str(world.song)]}, key=wrong)
        world.post({"paths": [str(world.other)]})
        world.get(str(world.song), key=None, HTTP_X_API_KEY=world.key)
        world.client.get(ENQUEUE)
    lines = [r.getMessage() for r in caplog.records if r.name == "earmark.api"]
    assert len(lines) == 5, lines
    assert lines[0].startswith("POST /api/enqueue 202 token=lidarr ip=127.0.0.1 ") and "paths=1 ok=1" in lines[0]
    assert lines[1].startswith("POST /api/enqueue 401 token=- ip=127.0.0.1")
    assert lines[2].startswith("POST /api/enqueue 403 token=lidarr") and "outside=1" in lines[2]
    assert lines[3].startswith("GET /api/tracks 404 token=lidarr")
    assert lines[4].startswith("GET /api/enqueue 405 token=- ")
    secret = world.key.split("_", 2)[2]
    assert secret not in caplog.text and "S3cr3t" not in caplog.text and world.key not in caplog.text
    assert os.fspath(world.song) not in lines[3], "the query string (a path, or a key pasted there) is not logged"
