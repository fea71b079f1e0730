"""Tempo, key and loudness as groups: the BPM and loudness ranges and the 24 keys (no torch).

The admin's list filters (``workers.admin.track_filters``) and the BPM and key playlists
(``workers.tagging.playlists``) both group tracks by these, so a range means the same
everywhere.

BPM ranges are of the BPM as players see it: the standard field holds the measured tempo
rounded to whole beats (``measures.standard_values``) and Navidrome keeps it as an integer,
so "80–100" is a whole-beat BPM from 80 to 99, a measured ``79.5 <= bpm < 99.5``. The
admin, an M3U playlist and Navidrome's smart playlist (``bpm`` in ``[80, 99]``) then hold
the same tracks (the bounds are even, so the ties that Python's round-half-even sends down
are never on a bound). Loudness ranges are of the measured integrated loudness as it is.

Keys are named as ``Track.musical_key`` holds them (``"A minor"``, ``"F# major"``: the
pitch names of ``workers.features.key``), listed in Camelot order (1A, 1B, 2A … 12B), so
neighbours in a list are the keys a DJ mixes between. ``key_from_search`` reads a key in
any of the three notations a person may type (``A minor``, ``Am``, ``bb minor``, ``8A``,
``1m``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from django.db.models import Q

from workers.features import key as keys

NONE = "none"  # the filter choice for "not measured"
MODES = ("minor", "major")


@dataclass(frozen=True)
class Range:
    """A half-open range ``[low, high)`` of a measure; ``None`` is unbounded on that side."""

    slug: str   # the filter's URL value and the playlist file name's part: "80-100"
    label: str  # "80–100"
    low: float | None
    high: float | None

    def q(self, field: str, shift: float = 0.0) -> Q:
        q = Q()
        if self.low is not None:
            q &= Q(**{f"{field}__gte": self.low + shift})
        if self.high is not None:
            q &= Q(**{f"{field}__lt": self.high + shift})
        return q


BPM_RANGES = (
    Range("under-80", "under 80", None, 80),
    Range("80-100", "80–100", 80, 100),
    Range("100-120", "100–120", 100, 120),
    Range("120-140", "120–140", 120, 140),
    Range("140-plus", "140 and over", 140, None),
)
LOUDNESS_RANGES = (  # LUFS, loudest first: mastered pop and rock is -6 to -10, broadcast -23
    Range("over-9", "louder than −9 LUFS", -9, None),
    Range("14-9", "−14 to −9 LUFS", -14, -9),
    Range("18-14", "−18 to −14 LUFS", -18, -14),
    Range("23-18", "−23 to −18 LUFS", -23, -18),
    Range("under-23", "quieter than −23 LUFS", None, -23),
)


def bpm_q(r: Range) -> Q:
    """The tracks whose whole-beat BPM (the one in the file and in Navidrome) is in the range."""
    return r.q("bpm", shift=-0.5)


def loudness_q(r: Range) -> Q:
    return r.q("loudness_lufs")


def _name(tonic: int, mode: str) -> str:
    return f"{keys.PITCH_CLASSES[tonic]} {mode}"


def _camelot_order(item: tuple[int, str]) -> tuple[int, str]:
    code = keys.camelot(*item)
    return int(code[:-1]), code[-1]


#: The 24 keys as ``Track.musical_key`` names them, in Camelot order (1A, 1B, 2A, … 12B).
KEYS: tuple[str, ...] = tuple(_name(t, m) for t, m in sorted(((t, m) for t in range(12) for m in MODES),
                                                                 key=_camelot_order))


@dataclass(frozen=True)
class Notations:
    standard: str  # "Am" (what ID3 TKEY and most taggers write)
    camelot: str   # "8A"
    open_key: str  # "1m"


def notations(name: str) -> Notations | None:
    """A key name (``"A minor"``) in the three notations a library may write; None for anything else."""
    try:
        tonic, mode = keys.parse(name)
    except ValueError:
        return None
    short = keys.PITCH_CLASSES[tonic] + ("m" if mode == "minor" else "")
    return Notations(short, keys.camelot(tonic, mode), keys.open_key(tonic, mode))


def canonical(name: str) -> str | None:
    """``"Bb minor"`` for ``"A# minor"``, ``"Bbm"`` or ``"Bb minor"``: the name ``Track.musical_key`` uses."""
    try:
        return _name(*keys.parse(name))
    except ValueError:
        return None


_CAMELOT = {keys.camelot(t, m).upper(): _name(t, m) for t in range(12) for m in MODES}
_OPEN = {keys.open_key(t, m).lower(): _name(t, m) for t in range(12) for m in MODES}
_CODE = re.compile(r"(1[0-2]|[1-9])\s*([a-z])", re.IGNORECASE)
_LOOKS_LIKE_KEY = re.compile(r"[a-g][#b]?(\s*(m|min|minor|maj|major))?", re.IGNORECASE)


def key_from_search(term: str) -> str | None:
    """The key a search term names (``A minor``, ``a minor``, ``Am``, ``F#``, ``Db major``, ``8A``, ``1m``), or None.

    A bare letter (``a``, ``e``) is not taken for a key: it is what a person types to
    find an artist, and every other search matches it already.
    """
    text = " ".join(term.split())
    code = _CODE.fullmatch(text)
    if code:
        number, letter = code.groups()
        return _CAMELOT.get(f"{number}{letter.upper()}") or _OPEN.get(f"{number}{letter.lower()}")
    if len(text) < 2 or not _LOOKS_LIKE_KEY.fullmatch(text):
        return None
    return canonical(text[0].upper() + text[1:].lower())
