"""The demo library: workers.audio.demo and ``manage.py make_demo_library``."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from tests import audio_factory as af
from workers.audio.decode import decode
from workers.audio.formats import format_for_path
from workers.audio.demo import DEFAULT_FORMATS, MANIFEST_NAME, build_library, plan_library, safe_name

SHORT = dict(min_seconds=0.5, max_seconds=0.8)


def audio_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and format_for_path(p.name))


def test_plan_is_deterministic_per_seed():
    a = plan_library(40, seed=7)
    assert a == plan_library(40, seed=7)
    assert [t.tags for t in a] == [t.tags for t in plan_library(40, seed=7)]
    assert [t.relpath for t in a] != [t.relpath for t in plan_library(40, seed=8)]


def test_plan_looks_like_a_library():
    plan = plan_library(400, seed=1)
    assert len(plan) == 400
    assert len({t.relpath for t in plan}) == 400
    assert {t.fmt for t in plan} == set(DEFAULT_FORMATS)
    assert any(any(ord(ch) > 127 for ch in t.relpath) for t in plan), "some names are non-ASCII"
    assert len({t.tags["artist"] for t in plan}) >= 10
    assert len({t.tags["genre"] for t in plan}) >= 5
    assert all(20.0 <= t.seconds <= 40.0 for t in plan)
    for track in plan:
        artist, album, name = Path(track.relpath).parts
        assert artist == safe_name(track.tags["artist"]) and album == safe_name(track.tags["album"])
        number, total = track.tags["tracknumber"].split("/")
        assert name.startswith(f"{int(number):02d} ") and 1 <= int(number) <= int(total)
        assert 1965 <= int(track.tags["date"]) <= 2025
    albums = {}
    for track in plan:
        albums.setdefault(os.path.dirname(track.relpath), set()).add(track.fmt)
    assert all(len(fmts) == 1 for fmts in albums.values()), "an album has one format"


def test_plan_validates_arguments():
    with pytest.raises(ValueError):
        plan_library(5, min_seconds=3, max_seconds=2)
    with pytest.raises(ValueError):
        plan_library(5, formats=("mp3", "wma"))
    assert plan_library(0) == []


def test_safe_name():
    assert safe_name('AC/DC: "Live"?') == "AC_DC_ _Live__"
    assert safe_name("...") == "_"
    assert safe_name("Sjöberg ") == "Sjöberg"


def test_build_writes_readable_tagged_files(tmp_path):
    summary = build_library(tmp_path, 14, seed=3, formats=("flac", "mp3", "opus"), **SHORT)
    files = audio_files(tmp_path)
    assert summary.planned == summary.written == len(files) == 14
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text(encoding="utf-8"))
    assert manifest["seed"] == 3 and len(manifest["tracks"]) == 14
    for entry in manifest["tracks"]:
        path = tmp_path / entry["relpath"]
        assert af.read_user_tags(path) == entry["tags"]
        assert format_for_path(path.name) == ("m4a" if entry["fmt"] == "alac" else entry["fmt"])
        assert decode(path).duration == pytest.approx(entry["seconds"], abs=0.05)
    assert not list(tmp_path.rglob("*.partial"))


def test_build_is_byte_identical_for_a_seed_and_any_jobs(tmp_path):
    one = build_library(tmp_path / "one", 12, seed=5, formats=DEFAULT_FORMATS, **SHORT)
    two = build_library(tmp_path / "two", 12, seed=5, formats=DEFAULT_FORMATS, jobs=2, **SHORT)
    assert one.written == two.written == 12
    a, b = audio_files(tmp_path / "one"), audio_files(tmp_path / "two")
    assert [p.relative_to(tmp_path / "one") for p in a] == [p.relative_to(tmp_path / "two") for p in b]
    for x, y in zip(a, b):
        assert x.read_bytes() == y.read_bytes(), x.name


def test_rerun_skips_existing_files(tmp_path):
    build_library(tmp_path, 6, seed=2, formats=("wav",), **SHORT)
    again = build_library(tmp_path, 6, seed=2, formats=("wav",), **SHORT)
    assert again.written == 0 and again.skipped == 6
    forced = build_library(tmp_path, 6, seed=2, formats=("wav",), overwrite=True, **SHORT)
    assert forced.written == 6


def test_command(tmp_path, capsys):
    call_command("make_demo_library", str(tmp_path / "lib"), "--tracks", "7", "--seed", "11",
                 "--min-seconds", "0.4", "--max-seconds", "0.6", "--formats", "flac,m4a,ogg,alac,aiff",
                 verbosity=0)
    out = capsys.readouterr().out
    assert "7 tracks" in out and "7 written" in out
    files = audio_files(tmp_path / "lib")
    assert len(files) == 7
    for path in files:
        tags = af.read_user_tags(path)
        assert tags["title"] and tags["artist"] and tags["album"] and tags["genre"]
        assert path.name.startswith(tags["tracknumber"].split("/")[0].zfill(2) + " ")


def test_command_refuses_unknown_format(tmp_path):
    with pytest.raises(CommandError, match="unknown formats"):
        call_command("make_demo_library", str(tmp_path), "--tracks", "1", "--formats", "mp3,wma")
    with pytest.raises(CommandError):
        call_command("make_demo_library", str(tmp_path), "--tracks", "1",
                     "--min-seconds", "5", "--max-seconds", "1")
