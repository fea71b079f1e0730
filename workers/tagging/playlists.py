"""Playlists per tag value, BPM range and key: Navidrome smart playlists (``.nsp``) and plain M3U8 files.

One playlist per genre, mood and instrument value that the database's tag rows
(``TrackTag``) hold, per BPM range (``feature_groups.BPM_RANGES``) and per key that
tracks have (``Track.bpm``, ``Track.musical_key``), optionally of one library only:

* ``nsp``: a Navidrome smart playlist (JSON; Navidrome imports ``.nsp`` files found
  in its music folder) whose rule is ``{"is": {"earmark_<category>": value}}`` on the
  tag that ``workers.tagging.navidrome``'s snippet defines. ``is`` matches the value
  exactly (``contains`` would put "indie rock" in "rock"). Navidrome evaluates the rule
  over everything it holds, so a library filter only decides which values get a
  playlist; Navidrome needs the snippet in ``navidrome.toml`` and a full scan first.
  A BPM range is Navidrome's own ``bpm`` field (``{"inTheRange": {"bpm": [80, 99]}}``, ``lt``
  below the lowest bound, ``gt`` above the highest), the whole-beat BPM of the standard field,
  which needs no snippet; a key is the snippet's ``earmark_key``
  (``{"is": {"earmark_key": "A minor"}}``), Earmark's key whatever the library's notation.
* ``m3u``: an extended M3U8 file listing the tracks, strongest first, each as
  ``#EXTINF:<seconds>,<artist - title>`` and its path relative to the directory the
  playlist will be in (``base_dir``), so the folder of playlists can move with the music.
  The same groups by database query: a BPM range slowest first, a key surest first.

Paths: the database holds each name as ``workers.library.paths`` text; the real name
is ``paths.to_bytes``. An entry is written as those bytes, relative to ``base_dir``:
a name that is valid UTF-8 (nearly all) makes a valid UTF-8 line; a name that is not
cannot be spelled in UTF-8 at all, so its raw bytes are written, which is what a player
on the same filesystem needs to open it (counted in ``Playlist.raw_names``). A name
holding a line break cannot be an M3U line and is left out (``Playlist.skipped``); one
starting with ``#`` gets ``./`` so it is not read as a comment.

File names are ``<category>-<value>.nsp`` / ``.m3u8`` (``bpm-80-100``, ``key-c-sharp-minor``) made safe: letters and digits
kept, everything else (slashes, dots, spaces) turned into ``-``, never empty, never
starting with a dot, distinct even when two values would spell the same. Torch-free.
"""
from __future__ import annotations

import io
import json
import os
import re
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from django.db.models import F

from workers.library import paths
from workers.models import Library, Track, TrackTag
from workers.tagging import feature_groups
from workers.tagging.categories import CATEGORIES, GENRE, INSTRUMENT, MOOD
from workers.tagging.navidrome import tag_name

FORMATS = ("nsp", "m3u")
EXTENSIONS = {"nsp": ".nsp", "m3u": ".m3u8"}
PLAYLIST_CATEGORIES: tuple[str, ...] = (GENRE, MOOD, INSTRUMENT)
BPM, KEY = "bpm", "key"
FEATURE_PLAYLISTS: tuple[str, ...] = (BPM, KEY)  # playlists by measured tempo and key
DEFAULT_SORT = "random"  # a fresh mix of the value's tracks each time Navidrome refreshes the playlist
DEFAULT_LIMIT = 500
MAX_STEM = 120


@dataclass
class Entry:
    path: str  # as stored (paths.to_text)
    artist: str
    title: str
    duration: float | None


@dataclass
class Group:
    """The tracks that carry one value of one category."""

    category: str
    value: str
    tracks: int = 0
    entries: list[Entry] = field(default_factory=list)
    rule: dict | None = None  # the smart playlist's rule; None: the category's tag is the value
    title: str = ""  # the playlist's name after "Earmark "; "" for "<category>: <value>"
    stem: str = ""  # the file name's stem before it is made safe; "" for "<category>-<value>"


@dataclass
class Playlist:
    filename: str
    category: str
    value: str
    tracks: int
    data: bytes
    skipped: int = 0  # entries left out: a line break in the name
    raw_names: int = 0  # entries written as raw bytes: the name is not UTF-8


def display_name(category: str, value: str) -> str:
    return f"Earmark {category}: {value}"


def _title(group: Group) -> str:
    return f"Earmark {group.title}" if group.title else display_name(group.category, group.value)


def safe_stem(category: str, value: str) -> str:
    """``mood-calm``: letters and digits of the value, the rest as single dashes; never empty."""
    text = value.lower().replace("&", " and ")
    text = "".join(ch if ch.isalnum() else "-" for ch in text)
    text = re.sub(r"-+", "-", text).strip("-") or "value"
    return f"{category}-{text}"[:MAX_STEM].rstrip("-")


def groups(library: Library | None = None, categories=PLAYLIST_CATEGORIES, with_entries: bool = True) -> list[Group]:
    """Every (category, value) the tag rows hold, in category then value order, with its tracks.

    Tracks whose file is gone (``missing``) are left out; entries come strongest first.
    """
    unknown = set(categories) - set(CATEGORIES)
    if unknown:
        raise ValueError(f"unknown categories: {', '.join(sorted(unknown))}")
    rows = TrackTag.objects.filter(category__in=categories).exclude(track__state=Track.State.MISSING)
    if library is not None:
        rows = rows.filter(track__library=library)
    rows = rows.order_by("category", "value", F("strength").desc(nulls_last=True), "rank", "track__path")
    found: dict[tuple[str, str], Group] = {}
    columns = ("category", "value", "track__path", "track__artist", "track__title", "track__duration")
    for category, value, path, artist, title, duration in rows.values_list(*columns).iterator(2000):
        group = found.get((category, value))
        if group is None:
            group = found[(category, value)] = Group(category, value)
        group.tracks += 1
        if with_entries:
            group.entries.append(Entry(path, artist, title, duration))
    order = {c: i for i, c in enumerate(CATEGORIES)}
    return sorted(found.values(), key=lambda g: (order[g.category], g.value))


def bpm_rule(r: feature_groups.Range) -> dict:
    """Navidrome's rule for a range of the whole-beat ``bpm`` it reads from the standard field."""
    if r.low is None:
        return {"lt": {BPM: int(r.high)}}
    if r.high is None:
        return {"gt": {BPM: int(r.low) - 1}}
    return {"inTheRange": {BPM: [int(r.low), int(r.high) - 1]}}


def key_rule(name: str) -> dict:
    return {"is": {tag_name(KEY): name}}


def measure_groups(library: Library | None = None, kinds=FEATURE_PLAYLISTS,
                      with_entries: bool = True) -> list[Group]:
    """A group per BPM range and per key that tracks (not missing) have, ranges slowest first, keys in Camelot order."""
    unknown = set(kinds) - set(FEATURE_PLAYLISTS)
    if unknown:
        raise ValueError(f"unknown feature playlists: {', '.join(sorted(unknown))}")
    tracks = Track.objects.exclude(state=Track.State.MISSING)
    if library is not None:
        tracks = tracks.filter(library=library)
    columns = ("path", "artist", "title", "duration")
    found = []
    if BPM in kinds:
        for r in feature_groups.BPM_RANGES:
            rows = tracks.filter(feature_groups.bpm_q(r)).order_by("bpm", "path")
            group = Group(BPM, r.label, rule=bpm_rule(r), title=f"BPM {r.label}", stem=f"{BPM}-{r.slug}")
            if with_entries:
                group.entries = [Entry(*row) for row in rows.values_list(*columns).iterator(2000)]
                group.tracks = len(group.entries)
            else:
                group.tracks = rows.count()
            if group.tracks:
                found.append(group)
    if KEY in kinds:
        rows = (tracks.filter(musical_key__in=feature_groups.KEYS)
                .order_by("musical_key", F("key_confidence").desc(nulls_last=True), "path"))
        by_key: dict[str, Group] = {}
        for name, *entry in rows.values_list("musical_key", *columns).iterator(2000):
            group = by_key.get(name)
            if group is None:
                forms = feature_groups.notations(name)
                group = by_key[name] = Group(KEY, name, rule=key_rule(name),
                                             title=f"key {name} ({forms.standard}, {forms.camelot}, {forms.open_key})",
                                             stem=f"{KEY}-{name.replace('#', ' sharp')}")
            group.tracks += 1
            if with_entries:
                group.entries.append(Entry(*entry))
        found += [by_key[name] for name in feature_groups.KEYS if name in by_key]
    return found


def _nsp(group: Group, sort: str, limit: int) -> bytes:
    what = (f"at {group.value} BPM (whole beats)" if group.category == BPM
            else f"Earmark heard in {group.value}" if group.category == KEY
            else f"Earmark tagged {group.category} \"{group.value}\"")
    doc = {
        "name": _title(group),
        "comment": f"Tracks {what} ({group.tracks} when exported). Made by Earmark's `manage.py export playlists`.",
        "all": [group.rule or {"is": {tag_name(group.category): group.value}}],
        "sort": sort,
    }
    if limit:
        doc["limit"] = limit
    return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _m3u(group: Group, base: bytes) -> tuple[bytes, int, int]:
    """The M3U8 text of a group, and how many entries were skipped and written raw."""
    out = [b"#EXTM3U", f"#PLAYLIST:{_title(group)}".encode("utf-8")]
    skipped = raw = 0
    for entry in group.entries:
        real = paths.to_bytes(entry.path)
        rel = os.path.relpath(real, base)
        if b"\n" in rel or b"\r" in rel:
            skipped += 1
            continue
        if rel.startswith(b"#"):
            rel = b"./" + rel
        try:
            rel.decode("utf-8")
        except UnicodeDecodeError:
            raw += 1
        if entry.artist and entry.title:
            label = f"{entry.artist} - {entry.title}"
        else:
            label = entry.title or os.path.basename(real).decode("utf-8", "replace")
        seconds = int(round(entry.duration)) if entry.duration else -1
        out.append(f"#EXTINF:{seconds},{_one_line(label)}".encode("utf-8"))
        out.append(rel)
    return b"\n".join(out) + b"\n", skipped, raw


def build(fmt: str, *, library: Library | None = None, base_dir: str | os.PathLike | None = None,
          categories=PLAYLIST_CATEGORIES, features=FEATURE_PLAYLISTS, sort: str = DEFAULT_SORT,
          limit: int = DEFAULT_LIMIT) -> list[Playlist]:
    """The playlists of one format, in memory; ``base_dir`` (m3u): the directory they will be in."""
    if fmt not in FORMATS:
        raise ValueError(f"playlist format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "m3u":
        if base_dir is None or not os.path.isabs(os.fspath(base_dir)):
            raise ValueError("M3U playlists need the absolute path of the directory they will be in")
        base = os.path.realpath(os.fsencode(base_dir))
    playlists, taken = [], set()
    every = groups(library, categories, with_entries=fmt == "m3u")
    every += measure_groups(library, features, with_entries=fmt == "m3u")
    for group in every:
        stem = safe_stem(*group.stem.split("-", 1)) if group.stem else safe_stem(group.category, group.value)
        name, n = stem, 1
        while name.lower() in taken:  # "r&b" and "r and b", or names that differ only in case
            n += 1
            name = f"{stem}-{n}"
        taken.add(name.lower())
        filename = name + EXTENSIONS[fmt]
        if fmt == "nsp":
            playlists.append(Playlist(filename, group.category, group.value, group.tracks, _nsp(group, sort, limit)))
        else:
            data, skipped, raw = _m3u(group, base)
            playlists.append(Playlist(filename, group.category, group.value, group.tracks, data, skipped, raw))
    return playlists


def write(out_dir: str | os.PathLike, playlists: list[Playlist]) -> list[Path]:
    """Write each playlist into ``out_dir`` (made if missing), each file replaced atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for playlist in playlists:
        target = out / playlist.filename
        fd, tmp = tempfile.mkstemp(prefix=".earmark-playlist-", dir=out)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(playlist.data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        written.append(target)
    return written


def zip_bytes(playlists: list[Playlist]) -> bytes:
    """The playlists as one zip archive, each at the top level."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for playlist in playlists:
            archive.writestr(playlist.filename, playlist.data)
    return buffer.getvalue()


def default_base(library: Library | None = None) -> str:
    """Where M3U playlists are meant to go when no directory is given: the library's root
    (the root all libraries share, when there are several; ``/`` when they share none)."""
    if library is not None:
        return library.root
    roots = list(Library.objects.values_list("root", flat=True))
    if not roots:
        return "/"
    return os.path.commonpath(roots)
