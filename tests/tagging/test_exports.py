"""Exports for players (issue 14): the navidrome.toml snippet and the playlists per tag value.

The snippet is checked against what Earmark really writes: real files of every format get
Earmark's tags through ``write_earmark_tags``, mutagen reads the raw keys back, and each is
turned into the name Navidrome gives it (TagLib's property name, lower-cased: a TXXX frame
by its description, an MP4 freeform atom without ``----:com.apple.iTunes:``, a Vorbis
comment by its field name), which must be an alias of that category's tag and no other's.
"""
from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import mutagen
import pytest
from django.core.management import CommandError, call_command
from mutagen.id3 import ID3

from workers.audio.formats import FORMATS, ID3 as ID3_FAMILY, MP4 as MP4_FAMILY, VORBIS as VORBIS_FAMILY, tag_family
from workers.library import paths
from workers.library.libraries import add_library
from workers.features import FEATURES_VERSION
from workers.models import Library, Track, TrackTag
from workers.tagfiles.namespace import open_tags, read_earmark_tags, write_earmark_tags
from workers.tagging import feature_groups, measures, navidrome, playlists
from workers.tagging.categories import CATEGORIES, canonical_values

from tests.audio_factory import make_file

# One distinctive pair of values per category, so a raw key is found by what it holds, not by its spelling.
WRITTEN = {"genre": ["rock", "jazz"], "mood": ["calm", "sad"], "instrument": ["piano", "guitar"],
           "vocals": ["female"], "era": ["1980s"]}


def _snippet() -> dict:
    return tomllib.loads(navidrome.snippet())


# --- the navidrome snippet --------------------------------------------------------------------


def test_the_snippet_is_toml_with_one_tag_per_category_and_earmarks_exact_bpm_and_key():
    tags = _snippet()["Tags"]
    assert sorted(tags) == sorted([*(f"earmark_{c}" for c in CATEGORIES), "earmark_bpm", "earmark_key"])
    longest = max(len(v) for c in CATEGORIES for v in canonical_values(c))
    for name, conf in tags.items():
        assert set(conf) == {"Aliases", "Type", "MaxLength", "Album"}, name
        assert conf["Type"] == ("float" if name == "earmark_bpm" else "string") and isinstance(conf["Album"], bool)
        assert conf["MaxLength"] >= (max(map(len, feature_groups.KEYS)) if name in ("earmark_bpm", "earmark_key")
                                     else longest), "no value Earmark writes may be cut"
        assert conf["Aliases"] and all(a == a.lower() for a in conf["Aliases"]), "Navidrome lower-cases names"
        assert name == name.lower() and name.replace("_", "").isalnum(), "usable as a smart-playlist field"
    assert tags["earmark_genre"]["Album"] and not tags["earmark_instrument"]["Album"]
    assert not tags["earmark_bpm"]["Album"] and not tags["earmark_key"]["Album"]
    # BPM and key are Navidrome's own tags already: the snippet must not take their standard fields away.
    native = {a for names in navidrome.NATIVE.values() for a in names}
    assert not native & {a for conf in tags.values() for a in conf["Aliases"]}
    assert "bpm" not in tags and "key" not in tags


def test_the_snippet_says_how_to_paste_it_and_can_be_appended_to_a_config():
    text = navidrome.snippet()
    head = text.split("[Tags.", 1)[0]
    assert all(line.startswith("#") or not line.strip() for line in head.splitlines()), "only comments first"
    assert "navidrome.toml" in head and "full scan" in head.lower() and "end" in head.lower()
    # Appended after a user's settings and sections, the user's settings and ours both survive.
    config = 'MusicFolder = "/music"\n[Scanner]\nSchedule = "@every 24h"\n\n' + text
    parsed = tomllib.loads(config)
    assert parsed["MusicFolder"] == "/music" and parsed["Scanner"] == {"Schedule": "@every 24h"}
    assert parsed["Tags"] == _snippet()["Tags"]


def _navidrome_names(path: Path, fmt: str) -> dict[str, list[str]]:
    """Every tag in the file as Navidrome names it, with its values, read raw with mutagen."""
    family = tag_family(fmt)
    if fmt == "mp3":
        tags = ID3(str(path))
    else:
        tags = mutagen.File(str(path)).tags
    names: dict[str, list[str]] = {}
    if family == ID3_FAMILY:
        for frame in tags.getall("TXXX"):
            names[frame.desc.lower()] = [str(t) for t in frame.text]
    elif family == MP4_FAMILY:
        for key, values in tags.items():
            if key.startswith("----:"):
                name = key.removeprefix("----:com.apple.iTunes:").lower()
                names[name] = [bytes(v).decode("utf-8") for v in values]
    else:
        assert family == VORBIS_FAMILY
        for key, value in tags:
            names.setdefault(key.lower(), []).append(value)
    return names


CASES = [*FORMATS, "mp3-v23"]


@pytest.mark.parametrize("case", CASES)
def test_every_alias_matches_what_earmark_writes(tmp_path, case):
    fmt = case.split("-")[0]
    path = make_file(tmp_path, fmt, seconds=1.0, tags={"title": "Song", "genre": "Mine"})
    if case == "mp3-v23":
        tag = ID3(str(path))
        tag.update_to_v23()
        tag.save(str(path), v2_version=3)
    assert write_earmark_tags(path, {**WRITTEN, "version": "earmark/1 test"})
    assert read_earmark_tags(path) == {**WRITTEN, "version": ["earmark/1 test"]}, "the write really happened"
    names = _navidrome_names(path, fmt)
    tags = _snippet()["Tags"]
    family = tag_family(fmt)
    for category, values in WRITTEN.items():
        holding = [name for name, vals in names.items() if vals == values]
        assert len(holding) == 1, (category, names)
        seen = holding[0]
        own = tags[f"earmark_{category}"]["Aliases"]
        assert seen in own, f"{case}: Navidrome sees {category} as {seen!r}, the snippet has {own}"
        others = [n for n, conf in tags.items() if n != f"earmark_{category}" and seen in conf["Aliases"]]
        assert others == [], f"{seen!r} would also land in {others}"
        assert navidrome.seen_names(category)[family] == seen
    # The user's own genre is not one of ours: it stays Navidrome's native genre.
    assert not any(a in ("genre", "tcon", "©gen") for conf in tags.values() for a in conf["Aliases"])


def _features(bpm=121.44, key="A minor") -> dict:
    forms = feature_groups.notations(key)
    return {"version": FEATURES_VERSION, "bpm": bpm, "bpm_confidence": 0.9, "key": key, "key_confidence": 0.5,
            "key_short": forms.standard, "key_camelot": forms.camelot, "key_open": forms.open_key,
            "loudness_lufs": -11.2, "reasons": {}}


@pytest.mark.parametrize("case", CASES)
def test_earmarks_exact_bpm_and_key_reach_the_snippets_tags(tmp_path, case):
    """What ``measures.namespace_fields`` writes for tempo and key is seen under earmark_bpm / earmark_key."""
    fmt = case.split("-")[0]
    path = make_file(tmp_path, fmt, seconds=1.0, tags={"title": "Song"})
    if case == "mp3-v23":
        tag = ID3(str(path))
        tag.update_to_v23()
        tag.save(str(path), v2_version=3)
    fields = measures.namespace_fields(Track(features=_features()))
    assert write_earmark_tags(path, fields)
    names = _navidrome_names(path, fmt)
    tags = _snippet()["Tags"]
    for key, tag in (("bpm", "earmark_bpm"), ("key", "earmark_key")):
        seen = navidrome.seen_names(key)[tag_family(fmt)]
        assert seen in names and seen in tags[tag]["Aliases"], (case, key, sorted(names))
        assert not [n for n, conf in tags.items() if n != tag and seen in conf["Aliases"]]
    assert float(names[navidrome.seen_names("bpm")[tag_family(fmt)]][0]) == pytest.approx(121.4), \
        "a float Navidrome parses, to a tenth of a beat"
    key_name = navidrome.seen_names("key")[tag_family(fmt)]
    assert names[key_name] == ["A minor"], "the same name whatever the library's notation"
    bpm_conf = navidrome.seen_names("bpm_confidence")[tag_family(fmt)]
    assert bpm_conf in names and not any(bpm_conf in conf["Aliases"] for conf in tags.values())


def _native_names(path: Path, fmt: str) -> dict[str, list[str]]:
    """The file's standard (non-Earmark) tags as Navidrome names them: ID3 frame ids, MP4 atoms, Vorbis names."""
    family = tag_family(fmt)
    tags = ID3(str(path)) if fmt == "mp3" else mutagen.File(str(path)).tags
    if family == ID3_FAMILY:
        return {frame.FrameID.lower(): [str(t) for t in frame.text] for frame in tags.values()
                if frame.FrameID != "TXXX" and hasattr(frame, "text")}
    if family == MP4_FAMILY:
        return {key.lower(): [bytes(v).decode() if isinstance(v, bytes) else str(v) for v in values]
                for key, values in tags.items()}
    return {key.lower(): [value] for key, value in tags}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("notation", ["standard", "camelot"])
def test_the_standard_bpm_and_key_fields_are_ones_navidrome_maps_natively(tmp_path, fmt, notation):
    path = make_file(tmp_path, fmt, seconds=1.0, tags={"title": "Song"})
    track = Track(library=Library(key_notation=notation), features=_features(bpm=127.6, key="F# minor"))
    values = measures.standard_values(track)
    assert values["bpm"] == ["128"] and values["key"] == (["F#m"] if notation == "standard" else ["11A"])
    tags = open_tags(path)
    for name in ("bpm", "key"):
        tags.set_standard_raw(name, {"text": values[name], "encoding": None})
    tags.save()
    names = _native_names(path, fmt)
    for name in ("bpm", "key"):
        holding = [n for n, vals in names.items() if vals == values[name]]
        assert len(holding) == 1 and holding[0] in navidrome.NATIVE[name], (fmt, name, names)


def test_the_navidrome_command_prints_or_writes_the_snippet(tmp_path, capsys):
    call_command("export", "navidrome")
    assert capsys.readouterr().out == navidrome.snippet()
    out = tmp_path / "nd.toml"
    call_command("export", "navidrome", "--out", str(out))
    assert out.read_text() == navidrome.snippet()


# --- playlists ----------------------------------------------------------------------------------


@pytest.fixture
def library(tmp_path):
    (tmp_path / "music").mkdir()
    return add_library("music", str(tmp_path / "music"))


def track(library, name: str | bytes, fmt: str = "flac", state: str = "tagged", artist: str = "", title: str = "",
          duration: float | None = 61.4, real: bool = True, **categories) -> Track:
    """A track row for ``name`` under the library (a real file unless ``real=False``) and its tag rows."""
    raw = os.path.join(os.fsencode(library.root), os.fsencode(name))
    if real:
        make_file(Path(os.fsdecode(os.path.dirname(raw))), fmt, seconds=0.3, name=os.fsdecode(os.path.basename(raw)))
    row = Track.objects.create(library=library, path=paths.to_text(raw), folder=paths.to_text(os.path.dirname(raw)),
                               format=fmt, state=state, artist=artist, title=title, duration=duration)
    TrackTag.objects.bulk_create([TrackTag(track=row, category=c, value=v, rank=r, strength=s)
                                  for c, vs in categories.items() for r, (v, s) in enumerate(vs)])
    return row


def _by_name(made) -> dict[str, playlists.Playlist]:
    return {p.filename: p for p in made}


@pytest.mark.django_db
def test_nsp_playlists_one_per_value_with_the_snippets_tag_names(library, tmp_path):
    track(library, "a.flac", real=False, mood=[("calm", 0.9)], genre=[("rock", 0.8), ("indie rock", 0.6)],
          vocals=[("female", 0.7)])
    track(library, "b.flac", real=False, mood=[("calm", 0.6)], instrument=[("piano", 0.5)])
    track(library, "gone.flac", real=False, state="missing", mood=[("sad", 0.9)])
    out = tmp_path / "out"
    call_command("export", "playlists", "--out", str(out))
    files = sorted(p.name for p in out.iterdir())
    assert files == ["genre-indie-rock.nsp", "genre-rock.nsp", "instrument-piano.nsp", "mood-calm.nsp"], \
        "genre, mood and instrument values only; nothing for a missing file's values"
    calm = json.loads((out / "mood-calm.nsp").read_text())
    assert calm["name"] == "Earmark mood: calm" and "2" in calm["comment"]
    assert calm["all"] == [{"is": {"earmark_mood": "calm"}}], "exact match: 'contains' would put indie rock in rock"
    assert calm["sort"] == "random" and calm["limit"] == playlists.DEFAULT_LIMIT
    snippet_tags = _snippet()["Tags"]
    for path in out.iterdir():
        rule = json.loads(path.read_text())["all"][0]["is"]
        assert set(rule) <= set(snippet_tags), f"{path.name} filters on a tag Navidrome does not import"
    rock = json.loads((out / "genre-rock.nsp").read_text())
    assert rock["all"] == [{"is": {"earmark_genre": "rock"}}]
    call_command("export", "playlists", "--out", str(out), "--limit", "0")
    assert "limit" not in json.loads((out / "mood-calm.nsp").read_text())


def _entries(playlist_path: Path) -> list[tuple[bytes, bytes]]:
    """(EXTINF line, path line) pairs of an M3U8 file."""
    lines = playlist_path.read_bytes().split(b"\n")
    assert lines[0] == b"#EXTM3U" and lines[-1] == b""
    body = [line for line in lines[1:-1] if not line.startswith(b"#PLAYLIST:")]
    assert len(body) % 2 == 0
    return [(body[i], body[i + 1]) for i in range(0, len(body), 2)]


@pytest.mark.django_db
def test_m3u_paths_are_relative_and_resolve_to_the_real_files(library, tmp_path):
    calm = [track(library, "Artist/Album/01 plain.flac", artist="Ann", title="Plain", duration=61.4,
                  mood=[("calm", 0.5)]),
            track(library, "Café – ñ/señal, \"quoted\".mp3", fmt="mp3", title="Only title", mood=[("calm", 0.9)]),
            track(library, "#hash start.ogg", fmt="ogg", duration=None, mood=[("calm", 0.7)]),
            track(library, b"latin1 \xe9t\xe9.flac", mood=[("calm", 0.3)])]
    track(library, "line\nbreak.flac", mood=[("calm", 0.2)])
    out = tmp_path / "lists" / "moods"
    call_command("export", "playlists", "--out", str(out), "--format", "m3u")
    playlist = out / "mood-calm.m3u8"
    assert (out / "mood-calm.m3u8").exists() and not (out / "mood-calm.nsp").exists()
    assert b"#PLAYLIST:Earmark mood: calm" in playlist.read_bytes()
    entries = _entries(playlist)
    assert len(entries) == 4, "the name with a line break cannot be a playlist line and is left out"
    strongest_first = sorted(calm, key=lambda t: -t.tag_rows.get().strength)
    for (_, line), expected in zip(entries, strongest_first):
        assert line.startswith(b"../../music/"), line
        assert os.path.samefile(os.path.join(os.fsencode(out), line), paths.to_bytes(expected.path)), line
    assert [info for info, _ in entries] == [
        "#EXTINF:61,Only title".encode(),  # a title without an artist
        b"#EXTINF:-1,#hash start.ogg",  # no duration: -1; no title: the file name
        "#EXTINF:61,Ann - Plain".encode(),
        "#EXTINF:61,latin1 \ufffdt\ufffd.flac".encode(),  # the label is text; the path line below is not
    ]
    assert b"\xe9t\xe9" in entries[3][1], "a name that is not UTF-8 is written as its bytes, which open the file"
    # Beside the music, a name starting with # is given ./ so that it does not read as a comment.
    beside = _by_name(playlists.build("m3u", base_dir=library.root))["mood-calm.m3u8"].data.split(b"\n")
    assert b"./#hash start.ogg" in beside and b"#hash start.ogg" not in beside
    assert b"Artist/Album/01 plain.flac" in beside
    made = _by_name(playlists.build("m3u", base_dir=str(out)))["mood-calm.m3u8"]
    assert (made.skipped, made.raw_names, made.tracks) == (1, 1, 5)


@pytest.mark.django_db
def test_the_library_filter(library, tmp_path):
    (tmp_path / "other").mkdir()
    other = add_library("other", str(tmp_path / "other"))
    mine = track(library, "mine.flac", mood=[("calm", 0.9)])
    track(other, "theirs.flac", mood=[("calm", 0.9)], genre=[("jazz", 0.8)])
    out = tmp_path / "pl"
    call_command("export", "playlists", "--out", str(out), "--format", "m3u", "--library", "music")
    assert sorted(p.name for p in out.iterdir()) == ["mood-calm.m3u8"], "jazz is only in the other library"
    lines = [line for _, line in _entries(out / "mood-calm.m3u8")]
    assert len(lines) == 1 and os.path.samefile(os.path.join(os.fsencode(out), lines[0]), paths.to_bytes(mine.path))
    everything = _by_name(playlists.build("m3u", base_dir=str(out)))
    assert everything["mood-calm.m3u8"].tracks == 2 and "genre-jazz.m3u8" in everything
    nsp = _by_name(playlists.build("nsp", library=other))
    assert sorted(nsp) == ["genre-jazz.nsp", "mood-calm.nsp"]
    with pytest.raises(CommandError, match="no library named"):
        call_command("export", "playlists", "--out", str(out), "--library", "nope")


@pytest.mark.parametrize("category, value, expected", [
    ("mood", "calm", "mood-calm"),
    ("genre", "r&b", "genre-r-and-b"),
    ("genre", "hip hop", "genre-hip-hop"),
    ("genre", "../../etc/passwd", "genre-etc-passwd"),
    ("mood", ".hidden", "mood-hidden"),
    ("mood", "///", "mood-value"),
    ("genre", "música", "genre-música"),
])
def test_file_names_are_safe(category, value, expected):
    stem = playlists.safe_stem(category, value)
    assert stem == expected
    assert "/" not in stem and "\\" not in stem and not stem.startswith(".") and "\x00" not in stem


@pytest.mark.django_db
def test_values_that_spell_the_same_name_get_distinct_files(library, tmp_path):
    track(library, "a.flac", real=False, genre=[("r&b", 0.9), ("r and b", 0.8), ("R-and-B", 0.7)])
    made = playlists.build("nsp", library=library)
    names = [p.filename for p in made]
    assert len(set(n.lower() for n in names)) == 3 and all(n.startswith("genre-r-and-b") for n in names), names
    written = playlists.write(tmp_path / "o", made)
    values = {json.loads(p.read_text())["all"][0]["is"]["earmark_genre"] for p in written}
    assert values == {"r&b", "r and b", "R-and-B"}


def test_m3u_needs_an_absolute_directory():
    with pytest.raises(ValueError, match="absolute"):
        playlists.build("m3u", base_dir="relative/dir")
    with pytest.raises(ValueError, match="format"):
        playlists.build("pls")


# --- BPM range and key playlists ------------------------------------------------------------------


def measured(library, name: str, bpm=None, key="", key_confidence=0.5, state="tagged", real=False) -> Track:
    """A track whose tempo and key are stored as the tagger stores them (``measures.columns``)."""
    row = track(library, name, state=state, real=real, title=name)
    features = {"version": FEATURES_VERSION, "bpm": bpm, "bpm_confidence": 0.8, "key": key or None,
                "key_confidence": key_confidence if key else None, "reasons": {}}
    Track.objects.filter(id=row.id).update(**measures.columns(features))
    return Track.objects.get(id=row.id)


def navidrome_matches(rule: dict, bpm: int | None) -> bool:
    """How Navidrome evaluates our BPM rules on its integer ``bpm`` column (NULL matches nothing)."""
    if bpm is None:
        return False
    (op, args), = rule.items()
    (field_name, value), = args.items()
    assert field_name == "bpm"
    return {"lt": lambda: bpm < value, "gt": lambda: bpm > value,
            "inTheRange": lambda: value[0] <= bpm <= value[1]}[op]()


BPMS = [59.0, 79.4, 79.5, 79.6, 80.0, 99.4, 99.5, 99.6, 100.5, 119.5, 128.0, 139.49, 139.5, 140.0, 181.0]


@pytest.mark.django_db
def test_bpm_and_key_playlists_in_navidromes_fields_agree_with_the_database(library, tmp_path):
    for i, bpm in enumerate(BPMS):
        measured(library, f"t{i:02}.flac", bpm=bpm)
    measured(library, "none.flac")
    measured(library, "a1.flac", key="A minor", key_confidence=0.3)
    measured(library, "a2.flac", key="A minor", key_confidence=0.9)
    measured(library, "cs.flac", key="C# minor")
    measured(library, "c.flac", key="C minor")
    measured(library, "gone.flac", key="E major", bpm=300.0, state="missing")
    out = tmp_path / "nsp"
    call_command("export", "playlists", "--out", str(out))
    files = sorted(p.name for p in out.iterdir())
    assert files == ["bpm-100-120.nsp", "bpm-120-140.nsp", "bpm-140-plus.nsp", "bpm-80-100.nsp", "bpm-under-80.nsp",
                     "key-a-minor.nsp", "key-c-minor.nsp", "key-c-sharp-minor.nsp"], \
        "a playlist per range and key that tracks have; C# and C apart; nothing for a missing file's key"
    key = json.loads((out / "key-a-minor.nsp").read_text())
    assert key["all"] == [{"is": {"earmark_key": "A minor"}}] and key["name"] == "Earmark key A minor (Am, 8A, 1m)"
    assert "earmark_key" in _snippet()["Tags"], "the key playlists' field is one the snippet defines"
    assert json.loads((out / "bpm-80-100.nsp").read_text())["all"] == [{"inTheRange": {"bpm": [80, 99]}}]
    assert json.loads((out / "bpm-under-80.nsp").read_text())["all"] == [{"lt": {"bpm": 80}}]
    assert json.loads((out / "bpm-140-plus.nsp").read_text())["all"] == [{"gt": {"bpm": 139}}]
    assert "bpm" in navidrome.NATIVE, "BPM ranges are on Navidrome's own bpm field"

    m3u = _by_name(playlists.build("m3u", base_dir=library.root))
    rows = {t.path.rsplit("/", 1)[1]: t for t in Track.objects.all()}
    for r in feature_groups.BPM_RANGES:
        rule = json.loads((out / f"bpm-{r.slug}.nsp").read_text())["all"][0]
        in_m3u = [line.decode() for line in m3u[f"bpm-{r.slug}.m3u8"].data.split(b"\n")
                  if line and not line.startswith(b"#")]
        # What Navidrome holds is the whole-beat BPM Earmark writes into the file's standard field.
        in_navidrome = sorted(name for name, t in rows.items() if t.state != "missing" and navidrome_matches(
            rule, None if t.bpm is None else int(measures.standard_values(t)["bpm"][0])))
        assert sorted(in_m3u) == in_navidrome, (r, in_m3u, in_navidrome)
        assert [rows[n].bpm for n in in_m3u] == sorted(rows[n].bpm for n in in_m3u), "slowest first"
    assert sum(p.tracks for p in m3u.values() if p.category == "bpm") == len(BPMS), "each tempo in one range"
    a_minor = [line for line in m3u["key-a-minor.m3u8"].data.split(b"\n") if line and not line.startswith(b"#")]
    assert a_minor == [b"a2.flac", b"a1.flac"], "surest first"
    assert b"#PLAYLIST:Earmark key A minor (Am, 8A, 1m)" in m3u["key-a-minor.m3u8"].data


@pytest.mark.django_db
def test_bpm_and_key_playlists_follow_the_library_filter(library, tmp_path):
    (tmp_path / "other").mkdir()
    other = add_library("other", str(tmp_path / "other"))
    measured(library, "mine.flac", bpm=90.0, key="D major")
    measured(other, "theirs.flac", bpm=130.0, key="G minor")
    mine = _by_name(playlists.build("m3u", library=library, base_dir=library.root))
    assert sorted(mine) == ["bpm-80-100.m3u8", "key-d-major.m3u8"]
    assert mine["bpm-80-100.m3u8"].data.endswith(b"\nmine.flac\n")
    assert sorted(_by_name(playlists.build("nsp", library=other))) == ["bpm-120-140.nsp", "key-g-minor.nsp"]
    assert sorted(_by_name(playlists.build("nsp", features=()))) == [], "no tag rows, no measure playlists asked for"
    with pytest.raises(ValueError, match="unknown"):
        playlists.build("nsp", features=("loudness",))
