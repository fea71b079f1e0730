"""The admin's export downloads (issue 14): the navidrome.toml snippet and a zip of playlists, for staff
who may view tracks; everyone else is sent to the login page or refused."""
from __future__ import annotations

import io
import json
import os
import tomllib
import zipfile

import pytest
from django.contrib.auth.models import Permission
from django.test import Client
from django.urls import reverse

from workers.library import paths
from workers.library.libraries import add_library
from workers.models import Track, TrackTag
from workers.tagging import navidrome

from tests.audio_factory import make_file

pytestmark = pytest.mark.django_db

NAVIDROME = "/admin/exports/navidrome/"
PLAYLISTS = "/admin/exports/playlists/"


@pytest.fixture
def library(tmp_path):
    (tmp_path / "music").mkdir()
    lib = add_library("music", str(tmp_path / "music"))
    path = make_file(tmp_path / "music" / "Album", "flac", seconds=0.3, name="01 song.flac")
    track = Track.objects.create(library=lib, path=paths.to_text(str(path)), folder=paths.to_text(str(path.parent)),
                                 format="flac", state="tagged", artist="Ann", title="Song", duration=12.0)
    TrackTag.objects.create(track=track, category="mood", value="calm", rank=0, strength=0.8)
    TrackTag.objects.create(track=track, category="genre", value="r&b", rank=0, strength=0.7)
    return lib


def _zip(response) -> dict[str, bytes]:
    assert response["Content-Type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def test_urls_are_registered_by_name():
    assert reverse("earmark-export-navidrome") == NAVIDROME
    assert reverse("earmark-export-playlists") == PLAYLISTS


def test_the_snippet_downloads_as_a_toml_attachment(admin_client):
    response = admin_client.get(NAVIDROME)
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    assert response["Content-Disposition"] == 'attachment; filename="navidrome-earmark.toml"'
    assert response.content.decode() == navidrome.snippet()
    assert "earmark_mood" in tomllib.loads(response.content.decode())["Tags"]


def test_nsp_playlists_download_as_a_zip(admin_client, library):
    response = admin_client.get(PLAYLISTS, {"format": "nsp"})
    assert response.status_code == 200
    assert response["Content-Disposition"] == 'attachment; filename="earmark-playlists-nsp.zip"'
    files = _zip(response)
    assert sorted(files) == ["genre-r-and-b.nsp", "mood-calm.nsp"]
    assert json.loads(files["mood-calm.nsp"])["all"] == [{"is": {"earmark_mood": "calm"}}]
    assert admin_client.get(PLAYLISTS).content == response.content, "nsp is the default"


def test_m3u_playlists_are_relative_to_the_chosen_directory(admin_client, library, tmp_path):
    files = _zip(admin_client.get(PLAYLISTS, {"format": "m3u"}))
    assert sorted(files) == ["genre-r-and-b.m3u8", "mood-calm.m3u8"]
    lines = files["mood-calm.m3u8"].decode().splitlines()
    assert lines[0] == "#EXTM3U" and "#EXTINF:12,Ann - Song" in lines
    assert lines[-1] == "Album/01 song.flac", "by default relative to the library root"
    elsewhere = tmp_path / "playlists"
    response = admin_client.get(PLAYLISTS, {"format": "m3u", "dir": str(elsewhere), "library": "music"})
    assert response["Content-Disposition"] == 'attachment; filename="earmark-playlists-m3u-music.zip"'
    line = _zip(response)["mood-calm.m3u8"].decode().splitlines()[-1]
    assert line == "../music/Album/01 song.flac"
    elsewhere.mkdir()
    assert os.path.samefile(elsewhere / line, tmp_path / "music" / "Album" / "01 song.flac")


def test_bad_requests(admin_client, library):
    assert admin_client.get(PLAYLISTS, {"format": "pls"}).status_code == 400
    assert admin_client.get(PLAYLISTS, {"format": "m3u", "dir": "relative/dir"}).status_code == 400
    assert admin_client.get(PLAYLISTS, {"library": "nope"}).status_code == 404


@pytest.mark.parametrize("who", ["anonymous", "not staff"])
def test_anonymous_and_non_staff_go_to_the_login_page(django_user_model, library, who):
    client = Client()
    if who == "not staff":
        client.force_login(django_user_model.objects.create_user("plain", password="pw"))
    for url in (NAVIDROME, PLAYLISTS, PLAYLISTS + "?format=m3u"):
        response = client.get(url)
        assert response.status_code == 302 and response["Location"].startswith("/admin/login/"), url
        assert "Content-Disposition" not in response


def test_staff_need_permission_to_view_tracks(django_user_model, library):
    user = django_user_model.objects.create_user("staff", password="pw", is_staff=True)
    client = Client()
    client.force_login(user)
    for url in (NAVIDROME, PLAYLISTS):
        assert client.get(url).status_code == 403, url
    assert b"Navidrome snippet" not in client.get("/admin/").content, "no links for those who may not follow them"
    user.user_permissions.add(Permission.objects.get(codename="view_track", content_type__app_label="workers"))
    client.force_login(django_user_model.objects.get(id=user.id))
    for url in (NAVIDROME, PLAYLISTS):
        assert client.get(url).status_code == 200, url


def test_the_admin_index_links_to_the_downloads(admin_client):
    page = admin_client.get("/admin/").content.decode()
    assert f'href="{NAVIDROME}"' in page
    assert f'href="{PLAYLISTS}?format=nsp"' in page and f'href="{PLAYLISTS}?format=m3u"' in page
