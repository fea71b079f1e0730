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

import hashlib
import os
import re
from collections.abc import Mapping, Sequence

from mutagen import MutagenError
from mutagen.aiff import AIFF
from mutagen.flac import FLAC
from mutagen.id3 import ID3, TXXX, Encoding, Frames, ID3NoHeaderError
from mutagen.mp4 import MP4, AtomDataType, MP4Cover, MP4FreeForm
from mutagen.oggopus import OggOpus
from mutagen.oggvorbis import OggVorbis
from mutagen.wave import WAVE

from workers.audio.formats import ID3 as ID3_FAMILY
from workers.audio.formats import MP4 as MP4_FAMILY
from workers.audio.formats import VORBIS as VORBIS_FAMILY
from workers.audio.formats import format_for_path, tag_family

NAMESPACE = "earmark"
ID3_PREFIX = "earmark:"
MP4_PREFIX = "----:com.apple.iTunes:earmark:"
VORBIS_PREFIX = "EARMARK_"

_KEY = re.compile(r"^[a-z0-9_]+$")

Fields = dict[str, list[str]]


class TagFileError(Exception):
    """The file's tags cannot be read or safely rewritten; ``str()`` says why."""


class UnsupportedFormatError(TagFileError):
    """The file is not one of the formats Earmark writes tags into."""


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


# ------------------------------------------------------------------ families

class FileTags:
    """One file's parsed tags; subclasses know one tag family."""

    def __init__(self, path: str, fmt: str):
        self.path = path
        self.fmt = fmt

    def earmark(self) -> Fields:
        raise NotImplementedError

    def user(self) -> dict[str, list[str]]:
        raise NotImplementedError

    def check_rewritable(self) -> None:
        """Raise TagFileError when saving would alter the user's tags."""

    def replace_earmark(self, fields: Fields) -> None:
        raise NotImplementedError

    def save(self) -> None:
        """Write the tags back; OSErrors surface unwrapped (errno intact)."""
        try:
            self._save()
        except MutagenError as exc:
            oserror = find_oserror(exc)
            if oserror is not None:
                raise oserror from exc
            raise TagFileError(f"cannot write the {self.fmt} file's tags: {exc}") from exc

    def _save(self) -> None:
        raise NotImplementedError


class _Id3Tags(FileTags):
    """ID3v2 in an MP3's header or a WAV/AIFF chunk."""

    def __init__(self, path: str, fmt: str):
        super().__init__(path, fmt)
        self.container, self.tags = self._load(translate=False)
        if self.tags.version < (2, 3, 0):
            # v2.2 frames cannot be written back as they are; mutagen can
            # only write v2.3/v2.4, so translate and keep the nearest (v2.3).
            self.container, self.tags = self._load(translate=True)
            self.tags.update_to_v23()
            self.save_version = 3
        else:
            self.save_version = 3 if self.tags.version[:2] == (2, 3) else 4

    def _load(self, translate: bool, **kwargs):
        """(WAVE/AIFF object or None for MP3, its ID3 tag) from the file.

        Untranslated unless asked, and an empty v2.4 tag when there is none.
        ``load_v1=False``: merging ID3v1 fields into the v2 tag would write
        them into it on save.
        """
        options = dict(translate=translate, v2_version=3, load_v1=False, **kwargs)
        if self.fmt == "mp3":
            try:
                return None, ID3(self.path, **options)
            except ID3NoHeaderError:
                return None, ID3()
        container = (WAVE if self.fmt == "wav" else AIFF)(self.path, **options)
        if container.tags is None:
            container.add_tags()
        return container, container.tags

    def id3_version(self) -> tuple[int, int] | None:
        """The version in the file (None when it has no tag yet)."""
        if getattr(self.tags, "_header", None) is None:
            return None
        return tuple(self.tags.version[:2])

    def _ours(self):
        return [f for f in self.tags.getall("TXXX") if f.desc.lower().startswith(ID3_PREFIX)]

    def earmark(self) -> Fields:
        return {f.desc[len(ID3_PREFIX):].lower(): [str(t) for t in f.text] for f in self._ours()}

    def user(self) -> dict[str, list[str]]:
        ours = {f.HashKey for f in self._ours()}
        out = {key: _id3_values(frame) for key, frame in sorted(self.tags.items()) if key not in ours}
        for raw in self.tags.unknown_frames:
            out.setdefault(f"unknown:{raw[:4].decode('latin-1')}", []).append(_digest(raw))
        return out

    def check_rewritable(self) -> None:
        """Refuse tags holding frames that mutagen parsed away.

        mutagen drops frames it cannot decode (bad encodings, truncated
        payloads) and would write the tag without them. Listing the frame
        ids again with every frame left raw shows what the tag really holds.
        """
        if getattr(self.tags, "_header", None) is None:
            return
        if self.tags.version < (2, 3, 0):
            if self.tags.unknown_frames:
                raise TagFileError("the ID3v2.2 tag holds frames that cannot be upgraded to v2.3; "
                                   "rewriting it would drop them")
            return
        _, raw = self._load(translate=False, known_frames=_RawFrames())
        raw_ids = {frame[:4].decode("latin-1") for frame in raw.unknown_frames}
        parsed = {f.FrameID for f in self.tags.values()}
        parsed |= {raw[:4].decode("latin-1") for raw in self.tags.unknown_frames}
        lost = sorted(raw_ids - parsed)
        if lost:
            raise TagFileError(
                "the ID3 tag holds frames that cannot be parsed ("
                + ", ".join(lost) + "); rewriting it would drop them"
            )

    def replace_earmark(self, fields: Fields) -> None:
        for frame in self._ours():
            del self.tags[frame.HashKey]
        for key, values in fields.items():
            self.tags.add(TXXX(encoding=self._encoding(values), desc=ID3_PREFIX + key, text=values))

    def _encoding(self, values: list[str]) -> Encoding:
        """Latin-1 for ASCII text (compact, valid in v2.3 and v2.4), else UTF."""
        if all(v.isascii() for v in values):
            return Encoding.LATIN1
        return Encoding.UTF16 if self.save_version == 3 else Encoding.UTF8

    def _save(self) -> None:
        options = dict(v2_version=self.save_version, v23_sep=None)
        if self.fmt == "mp3":
            tail = _read_id3v1(self.path)
            self.tags.save(self.path, v1=1, **options)  # 1: update an existing v1, never add one
            _restore_id3v1(self.path, tail)
        else:
            self.container.save(**options)


class _RawFrames(dict):
    """A frame table that knows every frame id but parses none.

    Handed to mutagen as ``known_frames`` it keeps every frame of the tag in
    ``unknown_frames``, raw; ``__contains__`` mirrors the real table so that
    mutagen's size-format guess for v2.4 tags comes out the same.
    """

    def __contains__(self, name) -> bool:
        return name in Frames

    def __getitem__(self, name):
        raise KeyError(name)


def _id3_values(frame) -> list[str]:
    """A frame's values as text: its text, its URL, or a hash of its payload."""
    if hasattr(frame, "text") and not hasattr(frame, "data"):
        return [str(t) for t in frame.text]
    if hasattr(frame, "url"):
        return [frame.url]
    return [_digest(repr(frame).encode("utf-8", "surrogateescape"))]


def _read_id3v1(path: str) -> bytes | None:
    """The file's last 128 bytes if they are an ID3v1 tag."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() < 128:
            return None
        f.seek(-128, os.SEEK_END)
        tail = f.read(128)
    return tail if tail.startswith(b"TAG") else None


def _restore_id3v1(path: str, tail: bytes | None) -> None:
    """Put the original ID3v1 tag back where mutagen regenerated it."""
    if tail is None or _read_id3v1(path) == tail:
        return
    with open(path, "r+b") as f:
        f.seek(-128, os.SEEK_END)
        f.write(tail)


class _Mp4Tags(FileTags):
    """iTunes-style ``ilst`` atoms in an MP4/M4A file."""

    def __init__(self, path: str, fmt: str):
        super().__init__(path, fmt)
        self.file = MP4(path)
        if self.file.tags is None:
            self.file.add_tags()
        self.tags = self.file.tags

    def _our_keys(self) -> list[str]:
        prefix = MP4_PREFIX.lower()
        return [k for k in self.tags if k.lower().startswith(prefix)]

    def earmark(self) -> Fields:
        return {k[len(MP4_PREFIX):].lower(): [_mp4_text(v) for v in self.tags[k]] for k in self._our_keys()}

    def user(self) -> dict[str, list[str]]:
        ours = set(self._our_keys())
        return {k: [_mp4_text(v) for v in _as_list(self.tags[k])] for k in sorted(self.tags) if k not in ours}

    def replace_earmark(self, fields: Fields) -> None:
        for key in self._our_keys():
            del self.tags[key]
        for key, values in fields.items():
            self.tags[MP4_PREFIX + key] = [
                MP4FreeForm(v.encode("utf-8"), dataformat=AtomDataType.UTF8) for v in values
            ]

    def _save(self) -> None:
        self.file.save()


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _mp4_text(value) -> str:
    """An MP4 value as text; covers and binary freeform data as size and hash."""
    if isinstance(value, MP4Cover):
        return f"cover:{value.imageformat}:{_digest(bytes(value))}"
    if isinstance(value, MP4FreeForm):
        if value.dataformat == AtomDataType.UTF8:
            return bytes(value).decode("utf-8", "replace")
        return f"data:{value.dataformat}:{_digest(bytes(value))}"
    if isinstance(value, tuple):
        return "/".join(str(v) for v in value)
    return str(value)


class _VorbisTags(FileTags):
    """Vorbis comments in FLAC, Ogg Vorbis and Ogg Opus."""

    def __init__(self, path: str, fmt: str):
        super().__init__(path, fmt)
        self.file = {"flac": FLAC, "ogg": OggVorbis, "opus": OggOpus}[fmt](path)
        if self.file.tags is None:
            self.file.add_tags()
        self.tags = self.file.tags

    @staticmethod
    def _is_ours(key: str) -> bool:
        return key.upper().startswith(VORBIS_PREFIX)

    def earmark(self) -> Fields:
        out: Fields = {}
        for key, value in self.tags:
            if self._is_ours(key):
                out.setdefault(key[len(VORBIS_PREFIX):].lower(), []).append(value)
        return out

    def user(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for key, value in self.tags:
            if not self._is_ours(key):
                out.setdefault(key.upper(), []).append(value)
        for picture in getattr(self.file, "pictures", ()):
            out.setdefault("flac:picture", []).append(f"{picture.type}:{picture.mime}:{_digest(picture.data)}")
        return out

    def check_rewritable(self) -> None:
        """Refuse comments mutagen decoded lossily (invalid UTF-8)."""
        for key, value in self.tags:
            if "\ufffd" in value and not self._is_ours(key):
                raise TagFileError(
                    f"the Vorbis comment {key!r} is not valid UTF-8; rewriting it would change it"
                )

    def replace_earmark(self, fields: Fields) -> None:
        kept = [(k, v) for k, v in self.tags if not self._is_ours(k)]
        ours = [(VORBIS_PREFIX + key.upper(), v) for key, values in fields.items() for v in values]
        self.tags[:] = kept + ours

    def _save(self) -> None:
        self.file.save()


# ------------------------------------------------------------------ helpers

def _digest(data: bytes) -> str:
    """Size and a short hash: enough to notice a changed binary payload."""
    return f"{len(data)}b:sha1:{hashlib.sha1(data).hexdigest()[:16]}"


def find_oserror(exc: BaseException) -> OSError | None:
    """The OSError behind a mutagen error, if any (mutagen wraps them).

    Callers need the errno to tell a full disk from a read-only one.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError):
            return exc
        for arg in getattr(exc, "args", ()):
            if isinstance(arg, OSError):
                return arg
        exc = exc.__cause__ or exc.__context__
    return None
