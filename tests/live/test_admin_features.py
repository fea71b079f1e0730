"""Tempo, key and loudness in the admin (issue 16): list columns that sort, filters by BPM range, key and
loudness with counts, search by key in any notation, the track page's measurements and reasons, and the
library's key notation (the form, ``library add/set --key-notation``). Tracks get the columns directly."""
from __future__ import annotations

import re

import pytest
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext

from tests.conftest import STANDARD_FORM
from workers.admin.tracks import TrackAdmin
from workers.features import FEATURES_VERSION
from workers.library.libraries import add_library, update_library
from workers.models import Library, Track
from workers.tagging import feature_groups

pytestmark = pytest.mark.django_db

URL = "/admin/workers/track/"


def measured(library, name: str, bpm=None, key="", lufs=None, **more) -> Track:
    """A track with tempo, key and loudness columns as the tagger stores them."""
    features = more.pop("features", None)
    if features is None:
        forms = feature_groups.notations(key) if key else None
        features = {"version": FEATURES_VERSION, "bpm": bpm, "key": key or None, "loudness_lufs": lufs,
                    "key_short": forms and forms.standard, "key_camelot": forms and forms.camelot,
                    "key_open": forms and forms.open_key, "reasons": {}}
    return Track.objects.create(library=library, path=f"{library.root}/{name}", folder=library.root, format="mp3",
                                state="tagged", bpm=bpm, bpm_confidence=0.8 if bpm is not None else None,
                                musical_key=key, key_confidence=0.4 if key else None, loudness_lufs=lufs,
                                track_gain_db=None if lufs is None else round(-18 - lufs, 2),
                                features=features, features_version=FEATURES_VERSION, **more)


def listed(client, **params) -> str:
    response = client.get(URL, params)
    assert response.status_code == 200
    return response.content.decode()


def names_in(page: str) -> list[str]:
    """The tracks' file names in the order the list shows them."""
    return re.findall(r"/music/([\w.-]+\.mp3)</a>", page)


def column(name: str) -> int:
    """The changelist's ``o`` index of a list column (0 is the action checkbox)."""
    return TrackAdmin.list_display.index(name) + 1


def test_columns_show_bpm_key_and_loudness_and_sort(admin_client, library):
    measured(library, "slow.mp3", bpm=72.25, key="A minor", lufs=-20.04)
    measured(library, "fast.mp3", bpm=174.0, key="C# major", lufs=-8.5)
    measured(library, "mid.mp3", bpm=120.0, key="Eb minor", lufs=-14.0)
    Library.objects.filter(id=library.id).update(key_notation="camelot")
    page = listed(admin_client)
    assert "72.2" in page and "174.0" in page, "BPM to a tenth"
    assert "A minor (8A)" in page and "C# major (3B)" in page, "the key as the library writes it (Camelot)"
    assert "-20.0 LUFS" in page and "-8.5 LUFS" in page
    for header in ("BPM", "key", "loudness"):
        assert re.search(rf'<th[^>]*class="[^"]*sortable[^"]*"[^>]*>.*?{header}', page, re.S), header
    assert names_in(listed(admin_client, o=column("bpm_column"))) == ["slow.mp3", "mid.mp3", "fast.mp3"]
    assert names_in(listed(admin_client, o=f"-{column('bpm_column')}")) == ["fast.mp3", "mid.mp3", "slow.mp3"]
    assert names_in(listed(admin_client, o=column("loudness_column"))) == ["slow.mp3", "mid.mp3", "fast.mp3"]
    assert names_in(listed(admin_client, o=column("key_column"))) == ["slow.mp3", "fast.mp3", "mid.mp3"]


def test_the_bpm_filter_is_by_whole_beats_as_in_the_file(admin_client, library):
    measured(library, "b79-4.mp3", bpm=79.4)   # the file says 79
    measured(library, "b79-6.mp3", bpm=79.6)   # the file says 80
    measured(library, "b99-4.mp3", bpm=99.4)   # 99
    measured(library, "b99-6.mp3", bpm=99.6)   # 100
    measured(library, "b150.mp3", bpm=150.0)
    measured(library, "none.mp3")
    assert sorted(names_in(listed(admin_client, bpm="80-100"))) == ["b79-6.mp3", "b99-4.mp3"]
    assert names_in(listed(admin_client, bpm="under-80")) == ["b79-4.mp3"]
    assert names_in(listed(admin_client, bpm="100-120")) == ["b99-6.mp3"]
    assert names_in(listed(admin_client, bpm="140-plus")) == ["b150.mp3"]
    assert names_in(listed(admin_client, bpm="none")) == ["none.mp3"]
    page = listed(admin_client)
    assert "80–100 (2)" in page and "140 and over (1)" in page and "no BPM (1)" in page and "120–140 (0)" in page
    # Every measured track is in exactly one range, and the ranges agree with the BPM the file holds.
    for track in Track.objects.exclude(bpm=None):
        ranges = [r for r in feature_groups.BPM_RANGES if Track.objects.filter(feature_groups.bpm_q(r), id=track.id)]
        assert len(ranges) == 1, track.path
        whole = int(round(track.bpm))
        assert (ranges[0].low or 0) <= whole < (ranges[0].high or 1000), (track.bpm, ranges[0])


def test_the_key_filter_lists_all_24_keys_with_counts_and_none(admin_client, library):
    measured(library, "am1.mp3", key="A minor")
    measured(library, "am2.mp3", key="A minor")
    measured(library, "cs.mp3", key="C# major")
    measured(library, "nokey.mp3", features={"version": FEATURES_VERSION, "reasons": {"key": "no tonal centre"}})
    page = listed(admin_client)
    assert "A minor · Am · 8A · 1m (2)" in page and "C# major · C# · 3B · 8d (1)" in page
    assert "E major · E · 12B · 5d (0)" in page, "every key is a choice, with its count"
    assert "none (1)" in page
    choices = re.findall(r'href="\?key=([^"&]+)"', page)
    assert len(choices) == 25 and len(set(choices)) == 25, "24 keys and none"
    assert sorted(names_in(listed(admin_client, key="A minor"))) == ["am1.mp3", "am2.mp3"]
    assert names_in(listed(admin_client, key="none")) == ["nokey.mp3"]
    assert len(names_in(listed(admin_client, key="not a key"))) == 4, "an unknown value filters nothing out"


def test_the_loudness_filter(admin_client, library):
    measured(library, "loud.mp3", lufs=-7.2)
    measured(library, "modern.mp3", lufs=-11.0)
    measured(library, "edge.mp3", lufs=-14.0)  # -14 is in "-14 to -9"
    measured(library, "quiet.mp3", lufs=-30.0)
    measured(library, "silent.mp3", features={"version": FEATURES_VERSION, "reasons": {"loudness": "silence"}})
    assert names_in(listed(admin_client, loudness="over-9")) == ["loud.mp3"]
    assert sorted(names_in(listed(admin_client, loudness="14-9"))) == ["edge.mp3", "modern.mp3"]
    assert names_in(listed(admin_client, loudness="under-23")) == ["quiet.mp3"]
    assert names_in(listed(admin_client, loudness="none")) == ["silent.mp3"]
    assert "−14 to −9 LUFS (2)" in listed(admin_client)


@pytest.mark.parametrize("term", ["A minor", "a minor", "Am", "8A", "8a", "1m"])
def test_search_finds_a_key_in_any_notation(admin_client, library, term):
    measured(library, "in-a.mp3", key="A minor")
    measured(library, "in-c.mp3", key="C major")  # A minor's relative major: 8B, 1d
    assert names_in(listed(admin_client, q=term)) == ["in-a.mp3"]


def test_key_search_adds_to_the_usual_search_and_leaves_other_terms_alone(admin_client, library):
    measured(library, "db.mp3", key="C# major")
    measured(library, "Amber.mp3", key="E minor")
    assert names_in(listed(admin_client, q="Db major")) == ["db.mp3"], "an enharmonic name finds the key"
    assert names_in(listed(admin_client, q="Amber")) == ["Amber.mp3"], "a word that starts like a key is a word"
    assert feature_groups.key_from_search("e") is None and feature_groups.key_from_search("Em") == "E minor"
    assert feature_groups.key_from_search("13A") is None and feature_groups.key_from_search("12b") == "E major"


def test_the_list_reads_no_features_json_and_costs_no_query_per_row(admin_client, library):
    measured(library, "one.mp3", bpm=120.0, key="A minor", lufs=-10.0)
    listed(admin_client)  # the sidebar's counts, cached from here on
    with CaptureQueriesContext(connection) as few:
        listed(admin_client)
    for i in range(20):
        measured(library, f"more{i}.mp3", bpm=100.0 + i, key=feature_groups.KEYS[i], lufs=-12.0)
    with CaptureQueriesContext(connection) as many:
        page = listed(admin_client)
    assert len(names_in(page)) == 21
    assert len(many) == len(few), "the key column's library notation comes with the list's one query"
    listing = [q["sql"] for q in many if q["sql"].startswith('SELECT "workers_track"."id"')]
    assert listing and all('"workers_track"."features"' not in sql for sql in listing), listing


def test_the_track_page_shows_every_measure_in_all_notations_and_the_reasons(admin_client, library):
    full = measured(library, "full.mp3", bpm=127.96, key="A minor", lufs=-9.82, album="LP",
                    track_peak=0.891251, album_gain_db=-7.5, album_peak=0.95)
    Library.objects.filter(id=library.id).update(key_notation="open")
    html = admin_client.get(f"/admin/workers/track/{full.id}/change/").content.decode()
    assert "Tempo, key and loudness" in html
    assert "128.0 BPM (files: 128)" in html and "confidence 0.80" in html
    assert "A minor: Am (standard) · 8A (Camelot) · 1m (Open Key)" in html and "confidence 0.40" in html
    assert "Open Key (1m, 10d)" in html, "the notation the library writes"
    assert "-9.82 LUFS" in html and "-8.18 dB" in html, "loudness and its ReplayGain 2.0 track gain"
    assert "0.891251 (-1.00 dBTP)" in html and "-7.50 dB" in html and "0.950000" in html
    assert FEATURES_VERSION in html

    odd = measured(library, "odd.mp3", album="LP", features={
        "version": FEATURES_VERSION, "reasons": {"tempo": "no steady beat", "key": "no tonal centre",
                                                 "loudness": "silence: nothing above the absolute gate"}})
    html = admin_client.get(f"/admin/workers/track/{odd.id}/change/").content.decode()
    for reason in ("no steady beat", "no tonal centre", "silence: nothing above the absolute gate"):
        assert reason in html
    assert "the album&#x27;s other tracks are not all measured yet" in html

    short = measured(library, "short.mp3", features={"version": "0:old", "reasons": {"all": "shorter than 400 ms"}})
    Track.objects.filter(id=short.id).update(features_version="0:old")
    html = admin_client.get(f"/admin/workers/track/{short.id}/change/").content.decode()
    assert "all: not measurable" in html and "shorter than 400 ms" in html
    assert "an older method" in html and "no album tag" in html

    bare = Track.objects.create(library=library, path=f"{library.root}/bare.mp3", folder=library.root, format="mp3")
    assert "not measured yet" in admin_client.get(f"/admin/workers/track/{bare.id}/change/").content.decode()


def _form_post(admin_client, url, data):
    page = admin_client.get(url)
    token = page.cookies["csrftoken"].value if "csrftoken" in page.cookies else ""
    return admin_client.post(url, {**data, "csrfmiddlewaretoken": token})


def test_the_library_form_sets_the_key_notation(admin_client, library):
    url = f"/admin/workers/library/{library.id}/change/"
    page = admin_client.get(url).content.decode()
    assert 'name="key_notation"' in page and "Camelot (8A, 2B)" in page
    base = {"name": library.name, "root": library.root, "enabled": "on", "write_mode": "minimal", **STANDARD_FORM}
    assert _form_post(admin_client, url, {**base, "key_notation": "camelot"}).status_code == 302
    assert Library.objects.get(id=library.id).key_notation == "camelot"
    refused = _form_post(admin_client, url, {**base, "key_notation": "roman"})
    assert refused.status_code == 200 and Library.objects.get(id=library.id).key_notation == "camelot"


def test_library_add_and_set_take_a_key_notation(tmp_path, capsys):
    (tmp_path / "dj").mkdir()
    call_command("library", "add", "dj", str(tmp_path / "dj"), "--key-notation", "camelot", "--no-scan")
    assert Library.objects.get(name="dj").key_notation == "camelot"
    call_command("library", "set", "dj", "--key-notation", "open")
    assert "key_notation = open" in capsys.readouterr().out
    assert Library.objects.get(name="dj").key_notation == "open"
    (tmp_path / "plain").mkdir()
    call_command("library", "add", "plain", str(tmp_path / "plain"), "--no-scan")
    assert Library.objects.get(name="plain").key_notation == "standard", "the default"
    with pytest.raises(CommandError):
        call_command("library", "set", "dj", "--key-notation", "roman")
    with pytest.raises(ValidationError, match="key notation"):
        update_library(Library.objects.get(name="dj"), key_notation="roman")
    with pytest.raises(ValidationError, match="key notation"):
        add_library("bad", str(tmp_path / "plain"), key_notation="roman")
    assert Library.objects.get(name="dj").key_notation == "open" and not Library.objects.filter(name="bad").exists()
