"""Each tag family's reader and writer of Earmark's fields: ID3 (MP3, WAV, AIFF), MP4 and Vorbis comments.

``workers.tagfiles.namespace.open_tags`` picks the family; each ``FileTags``
parses a file once for several reads and at most one write, and leaves every
frame, atom or comment that is not Earmark's exactly as it was.
"""
from __future__ import annotations

import hashlib
import os
import re

from mutagen import MutagenError
from mutagen.aiff import AIFF
from mutagen.flac import FLAC
from mutagen.id3 import ID3, TXXX, Encoding, Frames, ID3NoHeaderError
from mutagen.mp4 import MP4, AtomDataType, MP4Cover, MP4FreeForm
from mutagen.oggopus import OggOpus
from mutagen.oggvorbis import OggVorbis
from mutagen.wave import WAVE

NAMESPACE = "earmark"
ID3_PREFIX = "earmark:"
MP4_PREFIX = "----:com.apple.iTunes:earmark:"
VORBIS_PREFIX = "EARMARK_"
MP4_MOOD = "----:com.apple.iTunes:MOOD"  # Picard's mood atom
MP4_FREEFORM = "----:com.apple.iTunes:"
# ReplayGain 2.0 as rsgain writes it: ID3 TXXX, lower-case MP4 freeform atoms, FLAC/Vorbis comments; Opus has R128_*.
REPLAYGAIN = ("replaygain_track_gain", "replaygain_track_peak", "replaygain_album_gain", "replaygain_album_peak")
R128 = ("r128_track_gain", "r128_album_gain")

_KEY = re.compile(r"^[a-z0-9_]+$")

Fields = dict[str, list[str]]
Raw = dict  # a standard field as stored: {"text": [str, ...], "encoding": int | None}


class TagFileError(Exception):
    """The file's tags cannot be read or safely rewritten; ``str()`` says why."""


class UnsupportedFormatError(TagFileError):
    """The file is not one of the formats Earmark writes tags into."""


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

    # The standard fields (``workers.tagfiles.standard``): genre, mood, BPM, key, ReplayGain.
    #: ``user()`` keys of the standard fields (upper case), for comparisons that leave them out.
    STANDARD_KEYS: frozenset[str] = frozenset()

    def is_standard_key(self, key: str) -> bool:
        """Whether a ``user()`` key is one of the standard fields (their case varies between taggers)."""
        return key.upper() in self.STANDARD_KEYS

    def supports(self, name: str) -> bool:
        """Whether this family has the field (only Opus has R128 gains, and it has no REPLAYGAIN_*)."""
        return name not in R128

    def standard_raw(self, name: str) -> Raw | None:
        """The field as stored (``{"text": [...], "encoding": …}``), None when the file has none."""
        raise NotImplementedError

    def set_standard_raw(self, name: str, raw: Raw | None) -> None:
        """Store the field as ``raw`` says (None removes it), where it was in the tag."""
        raise NotImplementedError

    def joins_values(self) -> bool:
        """Whether several values go into one joined string (ID3v2.3, as Picard writes it)."""
        return False

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

    STANDARD_KEYS = frozenset({"TCON", "TMOO", "TXXX:MOOD", "TBPM", "TKEY",
                               *(f"TXXX:{name.upper()}" for name in REPLAYGAIN)})

    def _standard_key(self, name: str) -> str:
        """TCON, TBPM, TKEY, ``TXXX:REPLAYGAIN_*``; TMOO in v2.4, ``TXXX:MOOD`` in v2.3 (no TMOO), as Picard has it."""
        if name == "mood":
            return "TXXX:MOOD" if self.save_version == 3 else "TMOO"
        return {"genre": "TCON", "bpm": "TBPM", "key": "TKEY"}.get(name) or f"TXXX:{name.upper()}"

    def _frames(self, key: str) -> list:
        """The frames of a standard field; a TXXX's description in any case (foobar2000 writes lower case)."""
        if not key.startswith("TXXX:"):
            return self.tags.getall(key)
        return [f for f in self.tags.getall("TXXX") if f.desc.upper() == key[5:]]

    def standard_raw(self, name: str) -> Raw | None:
        frames = self._frames(self._standard_key(name))
        if not frames:
            return None
        return {"text": [str(t) for t in frames[0].text], "encoding": int(frames[0].encoding)}

    def set_standard_raw(self, name: str, raw: Raw | None) -> None:
        key = self._standard_key(name)
        for frame in self._frames(key):
            del self.tags[frame.HashKey]
        if raw is None:
            return
        values = list(raw["text"])
        encoding = Encoding(raw["encoding"]) if raw.get("encoding") is not None else self._encoding(values)
        if self.save_version == 3 and encoding == Encoding.UTF8:  # v2.3 has no UTF-8
            encoding = Encoding.UTF16
        if key.startswith("TXXX:"):
            self.tags.add(TXXX(encoding=encoding, desc=key[5:], text=values))
        else:
            self.tags.add(Frames[key](encoding=encoding, text=values))

    def joins_values(self) -> bool:
        return self.save_version == 3

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

    _KEYS = {"genre": "\xa9gen", "mood": MP4_MOOD, "bpm": "tmpo", "key": MP4_FREEFORM + "initialkey",
             **{name: MP4_FREEFORM + name for name in REPLAYGAIN}}
    STANDARD_KEYS = frozenset(key.upper() for key in _KEYS.values())

    def _present(self, name: str) -> list[str]:
        """The atoms holding a field: freeform names match in any case (taggers differ)."""
        want = self._KEYS[name].upper()
        return [k for k in self.tags if k.upper() == want]

    def standard_raw(self, name: str) -> Raw | None:
        present = self._present(name)
        if not present:
            return None
        return {"text": [_mp4_text(v) for v in _as_list(self.tags[present[0]])], "encoding": None}

    def set_standard_raw(self, name: str, raw: Raw | None) -> None:
        for key in self._present(name):
            del self.tags[key]
        key = self._KEYS[name]
        if raw is not None and name == "genre":
            self.tags[key] = list(raw["text"])
        elif raw is not None and name == "bpm":  # an integer atom, as iTunes and Picard write it
            self.tags[key] = [int(round(float(t))) for t in raw["text"]]
        elif raw is not None:
            self.tags[key] = [MP4FreeForm(v.encode("utf-8"), dataformat=AtomDataType.UTF8) for v in raw["text"]]

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

    STANDARD_KEYS = frozenset({"GENRE", "MOOD", "BPM", "KEY", *(n.upper() for n in REPLAYGAIN + R128)})

    def supports(self, name: str) -> bool:
        """Opus carries R128 gains instead of REPLAYGAIN_* (RFC 7845); FLAC and Vorbis the reverse."""
        if name in R128 or name in REPLAYGAIN:
            return (name in R128) == (self.fmt == "opus")
        return True

    def standard_raw(self, name: str) -> Raw | None:
        values = [v for k, v in self.tags if k.upper() == name.upper()]
        return {"text": values, "encoding": None} if values else None

    def set_standard_raw(self, name: str, raw: Raw | None) -> None:
        """One comment per value, at the place of the field's first comment (the end when it had none)."""
        comments = list(self.tags)
        at = next((i for i, (k, _) in enumerate(comments) if k.upper() == name.upper()), len(comments))
        kept = [(k, v) for k, v in comments if k.upper() != name.upper()]
        at -= sum(1 for k, _ in comments[:at] if k.upper() == name.upper())
        new = [(name.upper(), v) for v in (raw or {}).get("text", [])]
        self.tags[:] = kept[:at] + new + kept[at:]

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
