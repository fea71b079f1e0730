"""What the scanner learns from one file with mutagen: format, stream facts, the user's tags.

Cheap by design (headers only, no decoding): the scanner reads thousands of
files per second. Anything mutagen cannot make sense of becomes a
``BadFile`` with a sentence a person understands.
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field

import mutagen

from workers.audio.diagnose import explain_unreadable

# The user's tags we keep in searchable columns, by mutagen "easy" key.
_ID3_EASY = {"TIT2": "title", "TPE1": "artist", "TALB": "album", "TRCK": "tracknumber",
             "TDRC": "date", "TCON": "genre", "TPE2": "albumartist", "TPOS": "discnumber"}
_KIND = {"MP3": "mp3", "EasyMP3": "mp3", "FLAC": "flac", "OggVorbis": "ogg", "OggOpus": "opus",
         "MP4": "m4a", "EasyMP4": "m4a", "WAVE": "wav", "AIFF": "aiff"}


class BadFile(Exception):
    """A file that is not usable audio; the message says why, for a person."""


@dataclass
class FileInfo:
    format: str
    codec: str
    duration: float
    sample_rate: int | None
    channels: int | None
    bitrate: int | None
    tags: dict = field(default_factory=dict)

    def tag(self, key: str) -> str:
        values = self.tags.get(key) or [""]
        return str(values[0])[:500]


def identity(st: os.stat_result) -> dict:
    """The file's ``device`` and ``inode`` as the track row stores them (see ``db_int``)."""
    return {"device": db_int(st.st_dev), "inode": db_int(st.st_ino)}


def db_int(value: int | None) -> int | None:
    """An unsigned 64-bit ``st_dev``/``st_ino`` as the signed 64-bit integer a database column holds.

    Both are 64-bit unsigned in the kernel, and some filesystems use the top
    bit (overlayfs' xino, NFS file ids, a large device major); the same value
    always maps to the same integer, which is all matching needs.
    """
    if value is None:
        return None
    return value - (1 << 64) if value >= 1 << 63 else value


def read(path: bytes) -> FileInfo:
    """Read one file's stream facts and tags; raises ``BadFile``."""
    try:
        size = os.stat(path).st_size
        if size == 0:
            raise BadFile("empty file (0 bytes)")
        audio = mutagen.File(path, easy=True)
    except BadFile:
        raise
    except FileNotFoundError:
        raise BadFile("the file vanished while it was being scanned") from None
    except PermissionError:
        raise BadFile("permission denied: the file cannot be read") from None
    except OSError as exc:
        raise BadFile(f"the file cannot be read: {os.strerror(exc.errno or errno.EIO)}") from None
    except Exception as exc:  # mutagen raises many types for damaged headers
        raise BadFile(_unreadable(path, _describe(exc, path))) from None
    if audio is None:
        raise BadFile(_unreadable(path, ""))
    info = audio.info
    duration = float(getattr(info, "length", 0) or 0)
    if duration <= 0:
        raise BadFile("no audio data in the file (duration 0)")
    kind = _KIND.get(type(audio).__name__, type(audio).__name__.lower())
    codec = str(getattr(info, "codec", "") or "")
    if kind == "m4a" and codec.startswith("alac"):
        kind = "alac"
    return FileInfo(
        format=kind,
        codec=codec or kind,
        duration=round(duration, 3),
        sample_rate=getattr(info, "sample_rate", None),
        channels=getattr(info, "channels", None),
        bitrate=getattr(info, "bitrate", None),
        tags=_user_tags(audio),
    )


def _describe(exc: Exception, path: bytes | str | None = None) -> str:
    text = str(exc).strip() or type(exc).__name__
    if path is not None:  # mutagen often names the file (as a bytes repr); the track already says which
        for form in (repr(path), repr(os.fsdecode(path)), os.fsdecode(path)):
            text = text.replace(form, "the file")
    return text[:200]


def _unreadable(path: bytes, detail: str) -> str:
    """What the file's first bytes say it is ("not audio: the file is a PNG image"), plus mutagen's detail."""
    reason = explain_unreadable(path)
    if not detail:
        return reason
    return f"{reason[:-1]}; {detail})" if reason.endswith(")") else f"{reason} ({detail})"


def _user_tags(audio) -> dict:
    """The user's own tags as ``{key: [values]}``, leaving out Earmark's namespace."""
    tags = audio.tags
    if tags is None:
        return {}
    out: dict[str, list[str]] = {}
    try:
        items = list(tags.items())
    except Exception:
        return {}
    for key, value in items:
        key = _ID3_EASY.get(str(key)[:4], str(key)) if not hasattr(tags, "valid_keys") else str(key)
        if "earmark" in key.lower():
            continue
        values = value if isinstance(value, list) else getattr(value, "text", [value])
        out[key.lower()] = [str(v)[:1000] for v in values][:20]
    return out
