"""Reading and writing Earmark's own tags, and only those, in audio files.

Earmark owns one namespace, ``earmark``, spelled per tag family:

=========  ===============================  ========================================
family     formats                          one key (``genre``; ``score_mtt_piano``)
=========  ===============================  ========================================
ID3v2      MP3, WAV (``id3`` chunk),        ``TXXX`` frame, description
           AIFF (``ID3`` chunk)             ``earmark:genre``
MP4        M4A (AAC, ALAC)                  freeform atom ``----:com.apple.iTunes:earmark:genre``
Vorbis     FLAC, Ogg Vorbis, Opus           comment field ``EARMARK_GENRE``
=========  ===============================  ========================================

Keys are lower-case ``[a-z0-9_]`` (see ``tagset.TagSet.fields``) so one
spelling is legal everywhere; Vorbis upper-cases them by convention. A key
holds a list of strings: several values of one ``TXXX`` frame (null-separated
in both ID3v2.3 and v2.4), several data atoms of one freeform atom, or a
repeated Vorbis field.

Everything else in the file is the user's, and a write must leave it as it
was. The rules that follow from that:

* A write replaces the whole namespace: our keys not in the new set (say
  scores after switching to minimal mode) are removed, so the file holds
  exactly what was asked for, and writing the same set twice gives the same
  bytes.
* ID3: the tag keeps its version (v2.3 stays v2.3, v2.4 stays v2.4; a file
  without a tag gets v2.4; v2.2, which nothing can write, becomes v2.3). Frames
  are loaded untranslated, so a v2.3 ``TYER`` is not rewritten as ``TDRC``,
  and multi-values are joined with the null separator, so a user's value list
  keeps its shape. An MP3's ID3v1 tag is restored byte for byte afterwards
  (mutagen regenerates it from the v2 frames otherwise), and a tag holding
  frames mutagen cannot parse (which it would silently drop) is refused.
* Vorbis: a user comment that is not valid UTF-8 would be rewritten with
  replacement characters, so such files are refused too.

``read_user_tags`` returns the user's tags in a normalised, JSON-ready form
(binary payloads as size and hash) so that before/after comparisons and the
scanner's record of "the user's own tags" mean the same thing.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from mutagen import MutagenError

from workers.audio.formats import ID3 as ID3_FAMILY
from workers.audio.formats import MP4 as MP4_FAMILY
from workers.audio.formats import VORBIS as VORBIS_FAMILY
from workers.audio.formats import format_for_path, tag_family
from workers.tagfiles import standard
from workers.tagfiles.families import (  # noqa: F401 - the namespace's names, used as tagfile.NAMESPACE etc.
    ID3_PREFIX, MP4_PREFIX, NAMESPACE, VORBIS_PREFIX, FileTags, Fields, TagFileError, UnsupportedFormatError, _Id3Tags,
    _Mp4Tags, _VorbisTags, _KEY, find_oserror,
)

# ------------------------------------------------------------------ public API

def normalize_fields(fields: Mapping[str, str | Sequence[str]]) -> Fields:
    """Validate tag keys and values and put them in the canonical shape.

    A single string becomes a one-element list; empty lists are dropped (an
    absent key is how "no values" is stored). Keys must be lower-case
    ``[a-z0-9_]`` and values non-empty strings without NUL (the ID3 value
    separator), so that what is written reads back identically in every
    family: that identity is what makes "already tagged" detectable.
    """
    out: Fields = {}
    for key, values in fields.items():
        if not isinstance(key, str) or not _KEY.match(key):
            raise ValueError(f"tag key {key!r} must be lower-case letters, digits and '_'")
        values = [values] if isinstance(values, str) else list(values)
        for value in values:
            if not isinstance(value, str) or not value or "\x00" in value:
                raise ValueError(f"tag {key!r}: value {value!r} must be a non-empty string without NUL")
        if values:
            out[key] = values
    return out


def read_earmark_tags(path: str | os.PathLike, fmt: str | None = None) -> Fields:
    """Earmark's keys in the file (``{"genre": ["rock", "pop"], "version": [...]}``).

    Keys come back in the canonical lower-case spelling whatever case the
    file uses, including keys this version would not write (a stale or
    future key), so that callers see everything a write would replace.
    """
    return open_tags(path, fmt).earmark()


def read_user_tags(path: str | os.PathLike, fmt: str | None = None) -> dict[str, list[str]]:
    """Every tag that is not Earmark's, normalised for comparison and JSON."""
    return open_tags(path, fmt).user()


def write_earmark_tags(path: str | os.PathLike, fields: Mapping[str, str | Sequence[str]],
                       fmt: str | None = None) -> bool:
    """Replace Earmark's namespace in ``path`` with ``fields``, in place.

    Returns False (and writes nothing) when the file already holds exactly
    these values. This edits the file directly: callers that care about
    crash safety use ``workers.tagfiles.safewrite.safe_write_tags``, which calls this
    on a copy.
    """
    wanted = normalize_fields(fields)
    tags = open_tags(path, fmt)
    if tags.earmark() == wanted:
        return False
    tags.check_rewritable()
    tags.replace_earmark(wanted)
    tags.save()
    return True


def write_tags(path: str | os.PathLike, fields: Fields, planned, fmt: str | None = None) -> None:
    """Replace Earmark's namespace with ``fields`` and make ``planned``'s standard-field changes, in place.

    For the safe writer, on its copy; ``planned`` is a ``workers.tagfiles.standard.Plan``.
    """
    tags = open_tags(path, fmt)
    tags.check_rewritable()
    tags.replace_earmark(normalize_fields(fields))
    standard.apply(tags, planned)
    tags.save()


def read_id3_version(path: str | os.PathLike, fmt: str | None = None) -> tuple[int, int] | None:
    """``(2, 3)`` or ``(2, 4)`` for a file with an ID3v2 tag; None without one."""
    tags = open_tags(path, fmt)
    return tags.id3_version() if isinstance(tags, _Id3Tags) else None


def open_tags(path: str | os.PathLike, fmt: str | None = None) -> FileTags:
    """Parse the file's tags once, for several reads and at most one write.

    ``fmt`` (a ``workers.audio.formats`` key) defaults to what the file name
    says; mutagen errors become ``TagFileError`` with a readable reason.
    """
    path = os.fspath(path)
    fmt = fmt or format_for_path(path)
    if fmt is None:
        raise UnsupportedFormatError(f"unsupported format: {os.path.splitext(path)[1] or 'no extension'}")
    family = tag_family(fmt)
    opener = {ID3_FAMILY: _Id3Tags, MP4_FAMILY: _Mp4Tags, VORBIS_FAMILY: _VorbisTags}[family]
    try:
        return opener(path, fmt)
    except MutagenError as exc:
        oserror = find_oserror(exc)
        if oserror is not None:
            raise oserror from exc
        raise TagFileError(f"cannot read the {fmt} file's tags: {exc}") from exc
