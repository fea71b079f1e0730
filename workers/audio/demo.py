"""Invent a whole music library on disk: for demos, tests and benchmarks.

``build_library(root, tracks, seed=...)`` writes
``root/<Artist>/<Album>/<NN> <Title>.<ext>`` with real encoded audio
(``workers.audio.synth`` clips), ordinary user tags (title, artist, album,
album artist, track number, date, genre) and a mix of formats, the way a
collection ripped and bought over years looks. A few names carry non-ASCII
letters, because real libraries do and path handling must cope.

Everything derives from ``seed``: the same seed gives the same names, tags
and audio, and (every encoder used here is bit-exact) the same bytes. The
library is planned first in the parent process, then rendered, optionally in
several processes, since a benchmark library of 5,000 files must not take
all afternoon. A file is written under a temporary name and renamed into
place, so an interrupted run leaves no half-files and a rerun skips what is
already there.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from workers.audio.encode import write_audio
from workers.audio.formats import get_format
from workers.audio.synth import STYLES, synth_clip

DEFAULT_FORMATS = ("mp3", "flac", "ogg", "opus", "m4a", "wav")
MANIFEST_NAME = "demo-manifest.json"

# Which genre tag a synth style gets, so tags and sound roughly agree.
STYLE_GENRES = {
    "band": ("Rock", "Indie Rock", "Alternative"),
    "electronic": ("Electronic", "House", "Techno"),
    "ambient": ("Ambient", "New Age"),
    "acoustic": ("Folk", "Singer-Songwriter", "Classical"),
    "hiphop": ("Hip-Hop", "Trip-Hop"),
    "jazz": ("Jazz", "Bebop"),
    "vocal_pop": ("Pop", "Synthpop"),
    "noise": ("Experimental", "Noise"),
}

# ------------------------------------------------------------------- names

_ADJECTIVES = (
    "Silver", "Hollow", "Electric", "Quiet", "Crimson", "Velvet", "Northern", "Paper",
    "Broken", "Golden", "Midnight", "Wandering", "Static", "Gentle", "Distant", "Burning",
    "Frozen", "Lonely", "Neon", "Salt", "Amber", "Wild", "Sleeping", "Glass", "Copper",
)
_NOUNS = (
    "Harbor", "Lantern", "River", "Engine", "Orchard", "Signal", "Meadow", "Tide", "Comet",
    "Garden", "Mirror", "Station", "Forest", "Ocean", "Window", "Valley", "Machine", "Bridge",
    "Ember", "Compass", "Horizon", "Island", "Anchor", "Feather", "Canyon",
)
_PLURALS = (
    "Foxes", "Lanterns", "Ghosts", "Sparrows", "Wolves", "Pilots", "Tigers", "Strangers",
    "Satellites", "Rivers", "Saints", "Kites", "Owls", "Machines", "Echoes",
)
_FIRST = (
    "Mara", "Jonas", "Elena", "Theo", "Ingrid", "Rafael", "Noor", "Callum", "Ada", "Kenji",
    "Zoë", "Søren", "Chloé", "Björn", "Anaïs", "José", "Małgorzata", "Dvořák", "Åsa", "Renée",
)
_LAST = (
    "Holloway", "Brandt", "Okafor", "Lindqvist", "Moreau", "Castillo", "Whitfield", "Nakamura",
    "Ferreira", "Quinn", "Lefèvre", "Sjöberg", "Müller", "Núñez", "Øvergaard", "Kovačić",
)
_VERBS = ("Falling", "Running", "Dreaming", "Waiting", "Dancing", "Leaving", "Burning", "Drifting")
_PLACES = ("Lisbon", "the Coast", "Kyoto", "the North", "Reykjavík", "São Paulo", "Tromsø",
           "the City", "Marseille", "Nowhere", "Zürich", "the Valley")


def _pick(rng: np.random.Generator, words: tuple[str, ...]) -> str:
    return words[int(rng.integers(len(words)))]


def artist_name(rng: np.random.Generator) -> str:
    """An invented band or person name, in one of several familiar shapes."""
    shape = int(rng.integers(6))
    if shape == 0:
        return f"The {_pick(rng, _ADJECTIVES)} {_pick(rng, _PLURALS)}"
    if shape == 1:
        return f"{_pick(rng, _FIRST)} {_pick(rng, _LAST)}"
    if shape == 2:
        return f"{_pick(rng, _NOUNS)} {_pick(rng, _NOUNS)}"
    if shape == 3:
        return f"{_pick(rng, _FIRST)} & the {_pick(rng, _PLURALS)}"
    if shape == 4:
        return f"{_pick(rng, _ADJECTIVES)} {_pick(rng, _NOUNS)}"
    return _pick(rng, _PLURALS)


def album_name(rng: np.random.Generator) -> str:
    """An invented album title."""
    shape = int(rng.integers(5))
    if shape == 0:
        return f"{_pick(rng, _ADJECTIVES)} {_pick(rng, _NOUNS)}"
    if shape == 1:
        return f"Songs from {_pick(rng, _PLACES)}"
    if shape == 2:
        return f"The {_pick(rng, _NOUNS)} Sessions"
    if shape == 3:
        return f"{_pick(rng, _NOUNS)}s & {_pick(rng, _PLURALS)}"
    return _pick(rng, _NOUNS)


def track_title(rng: np.random.Generator) -> str:
    """An invented song title."""
    shape = int(rng.integers(6))
    if shape == 0:
        return f"{_pick(rng, _VERBS)} {_pick(rng, ('Home', 'Slowly', 'Again', 'Away', 'Under'))}"
    if shape == 1:
        return f"{_pick(rng, _ADJECTIVES)} {_pick(rng, _NOUNS)}"
    if shape == 2:
        return f"Letter to {_pick(rng, _FIRST)}"
    if shape == 3:
        return f"{_pick(rng, _VERBS)} in {_pick(rng, _PLACES)}"
    if shape == 4:
        return f"The {_pick(rng, _NOUNS)}"
    return f"{_pick(rng, _NOUNS)} (Part {int(rng.integers(1, 4))})"


def safe_name(name: str) -> str:
    """A name usable as one path component on every common filesystem."""
    cleaned = "".join("_" if ch in '/\\:*?"<>|' or ord(ch) < 32 else ch for ch in name)
    return cleaned.strip(" .") or "_"


# -------------------------------------------------------------------- plan

@dataclass(frozen=True)
class DemoTrack:
    """One file to write: where, what it sounds like, and its tags."""

    relpath: str
    fmt: str
    seed: int
    style: str
    seconds: float
    sample_rate: int
    channels: int
    tags: dict = field(hash=False)


def plan_library(tracks: int, seed: int = 0, min_seconds: float = 20.0, max_seconds: float = 40.0,
                 formats: tuple[str, ...] = DEFAULT_FORMATS) -> list[DemoTrack]:
    """Decide every artist, album and track, deterministically from ``seed``.

    Albums hold 5 to 12 tracks and share a style, genre, year and format;
    artists release 1 to 3 albums. Formats rotate over albums from a
    seeded start, so every requested format appears once there are as many
    albums as formats.
    """
    if tracks < 0:
        raise ValueError("tracks must be >= 0")
    if not 0 < min_seconds <= max_seconds:
        raise ValueError("need 0 < min_seconds <= max_seconds")
    for fmt in formats:
        get_format(fmt)
    if not formats:
        raise ValueError("at least one format is needed")
    rng = np.random.default_rng(seed)
    plan: list[DemoTrack] = []
    used_artists: set[str] = set()
    album_index = int(rng.integers(len(formats)))
    while len(plan) < tracks:
        artist = _unique(artist_name(rng), used_artists)
        style = str(rng.choice(list(STYLES)))
        genre = _pick(rng, STYLE_GENRES[style])
        year = int(rng.integers(1965, 2025))
        used_albums: set[str] = set()
        for _ in range(int(rng.integers(1, 4))):
            if len(plan) >= tracks:
                break
            album = _unique(album_name(rng), used_albums)
            fmt = formats[album_index % len(formats)]
            album_index += 1
            size = min(int(rng.integers(5, 13)), tracks - len(plan))
            plan.extend(_album_tracks(rng, artist, album, year, genre, style, fmt, size,
                                      min_seconds, max_seconds))
            year = min(2025, year + int(rng.integers(1, 5)))
    return plan


def _unique(name: str, used: set[str]) -> str:
    """``name``, or ``name II``, ``name III``... if already taken."""
    candidate, n = name, 1
    while candidate.casefold() in used:
        n += 1
        candidate = f"{name} {_roman(n)}"
    used.add(candidate.casefold())
    return candidate


def _roman(n: int) -> str:
    numerals = ((10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I"))
    out = ""
    for value, letters in numerals:
        while n >= value:
            out += letters
            n -= value
    return out


def _album_tracks(rng, artist, album, year, genre, style, fmt, size, min_seconds,
                  max_seconds) -> list[DemoTrack]:
    """The tracks of one album, numbered 1..size."""
    spec = get_format(fmt)
    sample_rate = 48000 if fmt == "opus" or (spec.lossless and rng.random() < 0.3) else 44100
    channels = 1 if rng.random() < 0.05 else 2
    titles: set[str] = set()
    out = []
    for number in range(1, size + 1):
        title = _unique(track_title(rng), titles)
        seconds = round(float(rng.uniform(min_seconds, max_seconds)), 3)
        audio_seed = int(rng.integers(2**31))
        relpath = os.path.join(safe_name(artist), safe_name(album),
                               f"{number:02d} {safe_name(title)}{spec.extension}")
        tags = {"title": title, "artist": artist, "albumartist": artist, "album": album,
                "tracknumber": f"{number}/{size}", "date": str(year), "genre": genre}
        out.append(DemoTrack(relpath, fmt, audio_seed, style, seconds, sample_rate, channels, tags))
    return out


# ------------------------------------------------------------------ render

@dataclass
class DemoSummary:
    """What ``build_library`` did, for the command to print."""

    root: str
    planned: int
    written: int
    skipped: int
    bytes: int
    seconds: float
    audio_seconds: float
    formats: dict[str, int]

    def describe(self) -> str:
        per = ", ".join(f"{k} {v}" for k, v in sorted(self.formats.items()))
        rate = self.written / self.seconds if self.seconds else 0.0
        return (f"{self.planned} tracks in {self.root}: {self.written} written, {self.skipped} already there "
                f"({per}); {self.bytes / 1e6:.1f} MB, {self.audio_seconds / 3600:.2f} h of audio, "
                f"{self.seconds:.1f} s ({rate:.1f} files/s)")


def render_track(root: str, track: DemoTrack, overwrite: bool = False) -> tuple[bool, int]:
    """Write one planned track; returns (written, size in bytes).

    Writes ``<name>.partial`` then renames, so readers (and a rerun) only
    ever see complete files; ``.partial`` is no audio extension, so a
    scanner running meanwhile ignores it.
    """
    path = os.path.join(root, track.relpath)
    if not overwrite and os.path.exists(path):
        return False, os.path.getsize(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    samples = synth_clip(track.seed, track.seconds, track.sample_rate, track.channels, style=track.style)
    partial = path + ".partial"
    try:
        write_audio(partial, samples, track.sample_rate, track.fmt, tags=track.tags)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return True, os.path.getsize(path)


def _render_star(args) -> tuple[bool, int]:
    return render_track(*args)


def build_library(root: str | os.PathLike, tracks: int, seed: int = 0, min_seconds: float = 20.0,
                  max_seconds: float = 40.0, formats: tuple[str, ...] = DEFAULT_FORMATS,
                  jobs: int = 1, overwrite: bool = False, progress=None) -> DemoSummary:
    """Plan and write a demo library under ``root``; see the module docstring.

    ``jobs`` > 1 renders in that many processes (synthesis and encoding are
    CPU bound; nothing here touches the database or torch, so forking is
    safe). ``progress(done, total)`` is called as files complete. A
    ``demo-manifest.json`` at the root lists every track and its tags, for
    benchmarks and tests that want to check what the scanner found.
    """
    start = time.perf_counter()
    root = os.fspath(root)
    plan = plan_library(tracks, seed, min_seconds, max_seconds, tuple(formats))
    os.makedirs(root, exist_ok=True)
    work = [(root, t, overwrite) for t in plan]
    results = []
    if jobs > 1 and len(plan) > 1:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            for result in pool.imap(_render_star, work, chunksize=4):
                results.append(result)
                if progress:
                    progress(len(results), len(plan))
    else:
        for item in work:
            results.append(_render_star(item))
            if progress:
                progress(len(results), len(plan))
    _write_manifest(root, seed, plan)
    written = sum(1 for ok, _ in results if ok)
    return DemoSummary(
        root=root, planned=len(plan), written=written, skipped=len(plan) - written,
        bytes=sum(size for _, size in results), seconds=time.perf_counter() - start,
        audio_seconds=sum(t.seconds for t in plan), formats=dict(Counter(t.fmt for t in plan)),
    )


def _write_manifest(root: str, seed: int, plan: list[DemoTrack]) -> None:
    """Record the plan as JSON next to the music (not an audio extension)."""
    data = {"seed": seed, "tracks": [asdict(t) for t in plan]}
    path = Path(root) / MANIFEST_NAME
    tmp = path.with_suffix(".json.partial")
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp, path)
