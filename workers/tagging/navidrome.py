"""The ``navidrome.toml`` snippet that makes every Earmark category a tag Navidrome (0.55 and later) imports.

Navidrome imports only the tags its mapping names (its ``resources/mappings.yaml``
plus the ``Tags`` section of ``navidrome.toml``); every other tag in a file is
ignored. It already maps the standard ``genre`` (``TCON``, ``GENRE``, ``©gen``)
and ``mood`` (``TMOO``, ``MOOD``, ``----:com.apple.iTunes:MOOD``) fields, which
Earmark fills according to the library's standard-tags policy
(``workers.tagfiles.standard``). Earmark's own namespace needs a custom tag per
category, whose aliases are the names under which Navidrome sees Earmark's keys.

Navidrome reads tags through TagLib's property map and lower-cases every name
(aliases too, so they are case-insensitive), which gives, for the key ``genre``:

* ID3v2 (MP3, WAV, AIFF): a ``TXXX`` frame is named by its description, so
  ``TXXX`` ``earmark:genre`` is ``earmark:genre``;
* MP4: a freeform atom loses its ``----:com.apple.iTunes:`` prefix, so
  ``----:com.apple.iTunes:earmark:genre`` is ``earmark:genre`` too;
* Vorbis comments (FLAC, Ogg, Opus): the field name, ``EARMARK_GENRE`` is ``earmark_genre``.

Each tag is named ``earmark_<category>`` (a plain lower-case name, usable as a
smart-playlist field: ``{"is": {"earmark_mood": "calm"}}``). Values are written as
separate values (one per list item), so no ``Split`` is configured: a value never
needs splitting, and splitting on "/" or "," could break one. Torch-free and
Django-light: only the models, for the longest value a tag row holds.

Tempo and key need no mapping: Navidrome's ``mappings.yaml`` already reads the standard
fields Earmark writes them to (``NATIVE``): ``bpm`` (``TBPM``, ``BPM``, ``tmpo``; a main
tag, stored as a whole number, the smart-playlist field ``bpm`` with ``inTheRange``,
``gt`` and ``lt``) and ``key`` (``TKEY``, ``KEY``, ``----:com.apple.iTunes:initialKey``; an
additional tag, the field ``key``, in the library's notation), and ReplayGain (the
fields ``rgtrackgain`` … ``rgalbumpeak``). Those fields follow the library's standard-tags
policy, so they may hold the user's own values. The snippet adds Earmark's exact values
from its namespace (``FEATURE_TAGS``): ``earmark_key`` ("A minor", whatever the notation,
which the key playlists match) and ``earmark_bpm`` (the tempo to a tenth of a beat, a
``float`` tag for the song's details).
"""
from __future__ import annotations

from dataclasses import dataclass

from workers.audio.formats import ID3, MP4, VORBIS
from workers.models import TrackTag
from workers.tagfiles.families import ID3_PREFIX, MP4_PREFIX, VORBIS_PREFIX
from workers.tagging.categories import CATEGORIES, ERA, GENRE, MOOD

TAG_PREFIX = "earmark_"
ITUNES_FREEFORM = "----:com.apple.iTunes:"  # dropped from freeform atom names by Navidrome
#: Categories that also describe the album (Navidrome collects their values from its tracks, as it does
#: for its own genre and mood, so albums can be browsed by them); instruments and vocals are per track.
ALBUM_LEVEL = frozenset({GENRE, MOOD, ERA})
MIN_VERSION = "0.55.0"  # the first Navidrome with configurable tags ("Tags" in navidrome.toml)
DOCS = "https://www.navidrome.org/docs/usage/configuration/custom-tags/"
#: What Navidrome's own resources/mappings.yaml reads for tempo and key (lower-cased TagLib names): the standard
#: fields Earmark writes them to (``workers.tagfiles.standard``) need no snippet.
NATIVE = {"bpm": ("tbpm", "bpm", "tmpo", "wm/beatsperminute"),
          "key": ("tkey", "key", "----:com.apple.itunes:initialkey", "wm/initialkey")}
#: Earmark's own keys for the exact values (``measures.namespace_fields``): (key, Navidrome tag type, max length).
FEATURE_TAGS = (("bpm", "float", 16), ("key", "string", 16))


@dataclass(frozen=True)
class NavidromeTag:
    """One custom tag of the snippet: its name, the names it is found under per tag family, its options."""

    category: str
    name: str
    aliases: dict[str, str]  # tag family (workers.audio.formats) -> the name Navidrome sees
    album: bool
    max_length: int
    type: str = "string"


def tag_name(category: str) -> str:
    """The Navidrome tag (and smart-playlist field) that holds a category: ``earmark_mood``."""
    return TAG_PREFIX + category


def seen_names(key: str) -> dict[str, str]:
    """The lower-case name under which Navidrome sees Earmark's ``key`` in each tag family."""
    if not MP4_PREFIX.startswith(ITUNES_FREEFORM):
        raise ValueError(f"the MP4 prefix {MP4_PREFIX!r} is not an iTunes freeform name")
    return {
        ID3: (ID3_PREFIX + key).lower(),
        MP4: (MP4_PREFIX[len(ITUNES_FREEFORM):] + key).lower(),
        VORBIS: (VORBIS_PREFIX + key.upper()).lower(),
    }


def tags() -> list[NavidromeTag]:
    """The snippet's tags, one per category in ``CATEGORIES`` order, then Earmark's exact BPM and key."""
    max_length = TrackTag._meta.get_field("value").max_length
    return [*(NavidromeTag(category, tag_name(category), seen_names(category), category in ALBUM_LEVEL, max_length)
              for category in CATEGORIES),
            *(NavidromeTag(key, tag_name(key), seen_names(key), False, length, kind)
              for key, kind, length in FEATURE_TAGS)]


def _toml_string(text: str) -> str:
    """A TOML basic string (the names are plain ASCII, but quote properly anyway)."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def snippet() -> str:
    """The TOML text to append to ``navidrome.toml``, with a comment that says how."""
    lines = [
        "# Earmark's tags for Navidrome " + MIN_VERSION + " or later:",
        "#   " + ", ".join(t.name for t in tags()),
        "#",
        "# Append this to the END of your navidrome.toml (each tag is a [table], so it must come after",
        "# every top-level setting; with Docker the file is usually /data/navidrome.toml), restart",
        "# Navidrome, then run a FULL scan (a quick scan does not apply new tag settings).",
        "# The tags can then be used as smart-playlist fields, e.g. {\"all\": [{\"is\": {\"earmark_mood\": \"calm\"}}]}",
        "# (`manage.py export playlists` writes one .nsp file per value), and show in each song's tags.",
        "#",
        "# Genre and mood are also written to the standard fields (per the library's standard-tags policy),",
        "# which Navidrome maps natively to its own genre and mood; these tags hold everything Earmark heard.",
        "# So are tempo, key and ReplayGain, which Navidrome reads natively too: BPM (TBPM, BPM, tmpo) as the",
        "# smart-playlist field \"bpm\" (e.g. {\"inTheRange\": {\"bpm\": [120, 129]}}), the key (TKEY, KEY,",
        "# initialkey, in the library's notation) as \"key\", and the gains as \"rgtrackgain\" and \"rgalbumgain\".",
        "# earmark_key (\"A minor\" in any notation) and earmark_bpm (to a tenth of a beat) are Earmark's exact values.",
        "# Aliases are the names Navidrome gives Earmark's keys: the TXXX description in ID3",
        "# (MP3, WAV, AIFF), the freeform name without '----:com.apple.iTunes:' in MP4, the",
        "# comment name in Vorbis comments (FLAC, Ogg, Opus).",
        "# Navidrome's custom tags: " + DOCS,
    ]
    for tag in tags():
        aliases = list(dict.fromkeys(tag.aliases.values()))
        lines += [
            "",
            f"[Tags.{tag.name}]",
            "Aliases = [" + ", ".join(_toml_string(a) for a in aliases) + "]",
            f"Type = {_toml_string(tag.type)}",
            f"MaxLength = {tag.max_length}",
            f"Album = {'true' if tag.album else 'false'}",
        ]
    return "\n".join(lines) + "\n"
